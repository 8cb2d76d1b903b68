"""
Convert released V-Retrver RL/eval parquet rows into the M-BEIR-style JSONL files our stages read.

    python data/vretrver/convert.py --parquet=/data/vretrver/rl_train.parquet --out_dir=/data/vretrver/jsonl --dataset_id=9
    python data/vretrver/convert.py --parquet=/data/vretrver/fashioniq_test.parquet --out_dir=/data/vretrver/jsonl --dataset_id=7 --task_id=7

Each parquet row holds one query and its candidate window in stage-0 order: `extra_info` {qid,
ground_truth_position (1-based), num_candidates, query_image, query_text, candidate_images,
candidate_texts}. From a file {name}.parquet this writes, under out_dir:
  query/{name}.jsonl              {"qid": "<dataset_id>:<n>", "query_txt", "query_img_path", ...}
  cand_pool/{name}_cand_pool.jsonl  the distinct candidates; did = "<dataset_id>:" + a hash of image and text
  qrels/{name}_qrels.txt          "qid 0 did 1 task_id": the candidate at ground_truth_position
  ranked/{name}.jsonl             retrieve.py's schema, candidates in the row's order
  instructions.json               dataset_id -> [""] (the release's query text already holds the instruction)
n is the release qid's number ("9:17" or 17 -> 17) when every row has a distinct one, else the row index.
Image paths are kept as given (relative to the image root, the later stages' data_root); images stored
as bytes (HF-datasets {"bytes", "path"} dicts) are saved as PNG under out_dir/images/{name}/, absolute.
The `prompt`, `images` and `hit` columns are not read. Needs pyarrow (not a dependency of nanoretrver).
"""

import hashlib
import io
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
parquet = ""               # released RL/eval parquet file
out_dir = "out/vretrver"   # query/, cand_pool/, qrels/, ranked/, images/ and instructions.json go here
dataset_id = ""            # M-BEIR dataset id of these rows, the qid/did prefix (e.g. 9)
task_id = 0                # M-BEIR task id for rows whose extra_info has none (qrels' last column)
name = ""                  # output file stem ('' = the parquet's; evaluate.py names its group from it)
image_root = ""            # if set, check that every image path exists under it (the later data_root)
# -----------------------------------------------------------------------------

KEYS = ("qid", "ground_truth_position", "num_candidates", "query_image", "query_text",
        "candidate_images", "candidate_texts")


def image_of(value, image_dir):
    """(path for the records or None, stable identity key) of a path, raw bytes or an HF image dict."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if not value:
        return None, ""
    if isinstance(value, str):
        return value, value
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"unsupported image value of type {type(value).__name__}")
    from PIL import Image
    digest = hashlib.sha1(value).hexdigest()[:16]
    path = os.path.abspath(os.path.join(image_dir, f"{digest}.png"))
    if not os.path.exists(path):
        img = Image.open(io.BytesIO(value))
        img.load()
        common.atomic_write(path, lambda f: img.save(f, format="PNG"), mode="wb")
    return path, "sha1:" + digest


def modality(txt, img):
    return "image,text" if txt and img else ("image" if img else "text")


def convert_rows(rows, dataset_id, image_dir, task_id=0):
    """Parquet rows (python dicts) -> (queries, pool, qrels lines, ranked) in our schemas."""
    dataset_id = str(dataset_id)
    if not dataset_id or ":" in dataset_id:
        raise ValueError(f"dataset_id must be set and contain no ':', got {dataset_id!r}")
    infos = []
    for i, row in enumerate(rows):
        info = row.get("extra_info")
        info = json.loads(info) if isinstance(info, str) else (info or {})
        where = f"row {i} (qid {info.get('qid')!r})"
        missing = [k for k in KEYS if k not in info]
        if missing:
            raise ValueError(f"{where}: extra_info is missing {', '.join(missing)}")
        try:
            n, gt = int(info["num_candidates"]), int(info["ground_truth_position"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: num_candidates and ground_truth_position must be integers") from None
        images, texts = info["candidate_images"] or [None] * n, info["candidate_texts"] or [""] * n
        if len(images) != n or len(texts) != n:
            raise ValueError(f"{where}: num_candidates {n} but {len(images)} candidate_images, {len(texts)} candidate_texts")
        if not 1 <= gt <= n:
            raise ValueError(f"{where}: ground_truth_position {gt} is outside 1..{n}")
        infos.append((where, info, images, texts, gt))
    tails = [str(info["qid"]).rsplit(":", 1)[-1] for _, info, *_ in infos]
    if not all(t.isdigit() for t in tails) or len({int(t) for t in tails}) != len(tails):
        tails = [str(i) for i in range(len(infos))]  # no usable release numbers: the row index
    queries, pool, qrels, ranked = [], {}, [], []
    for (where, info, images, texts, gt), tail in zip(infos, tails):
        qid, tid = f"{dataset_id}:{int(tail)}", task_id if info.get("task_id") is None else info["task_id"]
        dids = []
        for img, txt in zip(images, texts):
            try:
                path, key = image_of(img, image_dir)
            except (ValueError, OSError) as e:
                raise ValueError(f"{where}: candidate image: {e}") from None
            did = f"{dataset_id}:" + hashlib.sha1(f"{key}\0{txt or ''}".encode()).hexdigest()[:16]
            pool.setdefault(did, {"did": did, "txt": txt or "", "img_path": path, "modality": modality(txt, path)})
            dids.append(did)
        try:
            q_path, _ = image_of(info["query_image"], image_dir)
        except (ValueError, OSError) as e:
            raise ValueError(f"{where}: query image: {e}") from None
        positive = dids[gt - 1]
        cands = list(dict.fromkeys(dids))  # a candidate repeated in the window is kept once, first place
        queries.append({"qid": qid, "query_txt": info["query_text"] or "", "query_img_path": q_path,
                        "query_modality": modality(info["query_text"], q_path), "pos_cand_list": [positive],
                        "neg_cand_list": [], "task_id": tid, "src_qid": str(info["qid"])})
        qrels.append(f"{qid} 0 {positive} 1 {tid}")
        ranked.append({"qid": qid, "task_id": tid, "cands": cands,
                       "scores": [float(len(cands) - j) for j in range(len(cands))]})
    return queries, list(pool.values()), qrels, ranked


def main():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        sys.exit("pyarrow is needed to read parquet: pip install pyarrow (it is not a dependency of nanoretrver)")
    if not parquet or not str(dataset_id):
        raise ValueError("set --parquet and --dataset_id")
    stem = name or os.path.splitext(os.path.basename(parquet))[0]
    rows = pq.read_table(parquet).to_pylist()
    queries, pool, qrels, ranked = convert_rows(rows, dataset_id, os.path.join(out_dir, "images", stem), task_id)
    if image_root:
        common.check_images(queries, "query_img_path", "qid", image_root)
        common.check_images(pool, "img_path", "did", image_root)
    out = os.path.abspath(out_dir)
    paths = {k: os.path.join(out, k, f) for k, f in (("query", f"{stem}.jsonl"), ("cand_pool", f"{stem}_cand_pool.jsonl"),
                                                      ("qrels", f"{stem}_qrels.txt"), ("ranked", f"{stem}.jsonl"))}
    common.write_jsonl(paths["query"], queries)
    common.write_jsonl(paths["cand_pool"], pool)
    common.atomic_write(paths["qrels"], lambda f: f.writelines(line + "\n" for line in qrels))
    common.write_jsonl(paths["ranked"], ranked)
    inst_path = os.path.join(out, "instructions.json")
    instructions = common.read_json(inst_path) if os.path.exists(inst_path) else {}
    instructions.setdefault(str(dataset_id), [""])
    common.write_json(inst_path, instructions)
    n = max((len(r["cands"]) for r in ranked), default=0)
    print(f"{parquet}: {len(queries)} queries, {len(pool)} distinct candidates, up to {n} per query -> {out}")
    print(f"next: python rollout.py --data_root={image_root or '<image root>'} --query_files={paths['query']} "
          f"--pool_files={paths['cand_pool']} --instructions_file={inst_path} --ranked_in={paths['ranked']} "
          f"--top_n={n} --window={n} --stride={n} ...\n"
          f"      python evaluate.py --ranked=<rollout out_dir>/reranked.jsonl --qrels={paths['qrels']}")


if __name__ == "__main__":
    configure(globals())
    main()
