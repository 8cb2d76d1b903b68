"""
Convert released V-Retrver RL/eval parquet rows into the M-BEIR-style JSONL files our stages read.

    python data/vretrver/convert.py --parquet=/data/vretrver/rl_train.parquet --out_dir=/data/vretrver/jsonl --dataset_id=9
    python data/vretrver/convert.py --parquet=/data/vretrver/mbeir_cirr_task7_test.parquet --out_dir=/data/vretrver/jsonl \
        --dataset_id=9 --task_id=7 --remap=/remote-home1/x/M-BEIR/:  \
        --mbeir_query_file=data/mbeir/query/test/mbeir_cirr_task7_test.jsonl \
        --mbeir_pool_file=data/mbeir/cand_pool/local/mbeir_cirr_task7_cand_pool.jsonl

Each parquet row holds one query, its candidate window in stage-0 order and, in evaluation rows, `hit`:
the stage-0 ranked list (top 50), a list of {"candidate_images", "candidate_texts"} (docs/spec.md §6,
§10). `extra_info` {qid, ground_truth_position (1-based), num_candidates, query_image, query_text,
candidate_images, candidate_texts}. From a file {name}.parquet this writes, under out_dir:
  query/{name}.jsonl              {"qid", "query_txt", "query_img_path", "pos_cand_list", "task_id", "src_qid",
                                   "release_prompt": the row's `prompt` messages, as released}
  cand_pool/{name}_cand_pool.jsonl  the distinct candidates of the windows and hits
  qrels/{name}_qrels.txt          "qid 0 did 1 task_id", one line per positive
  ranked/{name}.jsonl             retrieve.py's schema: the `hit` list when the row has one (first hit_depth),
                                   else the window, in the row's order
  instructions.json               dataset_id -> [""] (the release's query text already holds the instruction)
Ids. Without M-BEIR files: qid "<dataset_id>:<n>" (n the release qid's number when every row has a distinct
one, else the row index) and did "<dataset_id>:" + a hash of image and text. With --mbeir_query_file and
--mbeir_pool_file: the M-BEIR qid (by the release qid, else by query image path and text) and did (by image
path, compared from the end so that absolute release paths find the relative M-BEIR ones, and text), the
M-BEIR records' relative paths, and every positive of the M-BEIR query (pos_cand_list) in qrels; rows or
candidates without a match keep the hashed ids and are counted.
Positives. The window's candidate at ground_truth_position, or hit[ground_truth_position - 1] when the position
is past the window, plus the M-BEIR ones. A row whose positive is in neither (position 0, -1 or past the hit
list) is kept: its qrels line names a stand-in did "<dataset_id>:unranked:<n>" that no pool holds, so the
query counts as a miss instead of vanishing from the average.
Paths. --remap=old:new[,...] rewrites every image path by prefix (an unmatched path is an error listing
the first ones); other paths are kept as given (relative to the image root, the later stages' data_root);
images stored as bytes (HF-datasets {"bytes", "path"} dicts) are saved as PNG under out_dir/images/{name}/.
Needs pyarrow (not a dependency of nanoretrver).
"""

import hashlib
import io
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import common  # noqa: E402
import task  # noqa: E402
from configurator import configure  # noqa: E402
from remap import Remapper  # noqa: E402

# -----------------------------------------------------------------------------
parquet = ""               # released RL/eval parquet file
out_dir = "out/vretrver"   # query/, cand_pool/, qrels/, ranked/, images/ and instructions.json go here
dataset_id = ""            # M-BEIR dataset id of these rows, the qid/did prefix (e.g. 9)
task_id = 0                # M-BEIR task id for rows whose extra_info has none (qrels' last column)
name = ""                  # output file stem ('' = the parquet's; evaluate.py names its group from it)
image_root = ""            # if set, check that every image path exists under it (the later data_root)
remap = ""                 # "old_prefix:new_prefix[,...]": rewrite the authors' absolute image paths
hit_depth = 50             # ranked/ keeps this many of a row's `hit` list (the stage-0 top 50)
mbeir_query_file = ""      # M-BEIR query JSONL of these rows: real qids and all positives
mbeir_pool_file = ""       # M-BEIR candidate pool JSONL: real dids and records
# -----------------------------------------------------------------------------

KEYS = ("qid", "ground_truth_position", "num_candidates", "query_image", "query_text",
        "candidate_images", "candidate_texts")


def image_of(value, image_dir, fix=lambda p: p):
    """(path for the records or None, stable identity key) of a path, raw bytes or an HF image dict."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path") or value.get("image")
    if not value:
        return None, ""
    if isinstance(value, str):
        value = fix(value)
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


def norm_text(text):
    return task.lamra_format(text or "")  # the release's texts went through UniIR's format_string


class MBeirIndex:
    """M-BEIR queries and candidates, found by id, by image path (compared from the end) and text."""

    def __init__(self, queries, pool):
        self.queries = {q["qid"]: q for q in queries}
        self.pool = {c["did"]: c for c in pool}
        self.cand_by_key, self.queries_by_image = {}, {}
        for c in pool:
            self.cand_by_key.setdefault((c.get("img_path") or "", norm_text(c.get("txt"))), c["did"])
        for q in queries:
            self.queries_by_image.setdefault(q.get("query_img_path") or "", []).append(q)
        self.paths = set(self.queries_by_image) | {k[0] for k in self.cand_by_key}

    def relative(self, path):
        """The M-BEIR path that a (possibly absolute) path ends with, or '' for none."""
        parts = (path or "").replace("\\", "/").split("/")
        for i in range(len(parts)):
            if "/".join(parts[i:]) in self.paths:
                return "/".join(parts[i:])
        return ""

    def did(self, path, text):
        key = self.relative(path) if path else ""
        if path and not key:
            return None
        return self.cand_by_key.get((key, norm_text(text)))

    def query(self, release_qid, path, text):
        if release_qid in self.queries:
            return self.queries[release_qid]
        found = self.queries_by_image.get(self.relative(path) if path else "", [])
        text = norm_text(text).rstrip(".").lower()
        found = [q for q in found if norm_text(q.get("query_txt")).rstrip(".").lower() in text]
        return found[0] if len(found) == 1 else None


def parse_row(i, row):
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
    hits = row.get("hit") or []
    if not all(isinstance(h, dict) for h in hits):
        raise ValueError(f"{where}: hit must be a list of {{candidate_images, candidate_texts}} records")
    prompt = row.get("prompt")
    prompt = json.loads(prompt) if isinstance(prompt, str) and prompt.startswith("[") else prompt
    return where, info, list(zip(images, texts)), [(h.get("candidate_images"), h.get("candidate_texts")) for h in hits], gt, prompt


def convert_rows(rows, dataset_id, image_dir, task_id=0, fix=None, mbeir=None, hit_depth=50):
    """Parquet rows (python dicts) -> (queries, pool, qrels lines, ranked, stats) in our schemas.
    fix(path) remaps a path; mbeir (an MBeirIndex) gives real ids and positives."""
    dataset_id, fix = str(dataset_id), fix or (lambda p: p)
    if not dataset_id or ":" in dataset_id:
        raise ValueError(f"dataset_id must be set and contain no ':', got {dataset_id!r}")
    parsed = [parse_row(i, row) for i, row in enumerate(rows)]
    tails = [str(info["qid"]).rsplit(":", 1)[-1] for _, info, *_ in parsed]
    if not all(t.isdigit() for t in tails) or len({int(t) for t in tails}) != len(tails):
        tails = [str(i) for i in range(len(parsed))]  # no usable release numbers: the row index
    queries, pool, qrels, ranked = [], {}, [], []
    stats = {"queries_matched": 0, "cands_matched": 0, "cands": 0, "gt_past_window": 0, "no_positive": 0}

    def cand_did(where, img, txt):
        try:
            path, key = image_of(img, image_dir, fix)
        except (ValueError, OSError) as e:
            raise ValueError(f"{where}: candidate image: {e}") from None
        stats["cands"] += 1
        did = mbeir.did(path, txt) if mbeir else None
        if did:
            stats["cands_matched"] += 1
            pool.setdefault(did, dict(mbeir.pool[did]))
            return did
        did = f"{dataset_id}:" + hashlib.sha1(f"{key}\0{txt or ''}".encode()).hexdigest()[:16]
        pool.setdefault(did, {"did": did, "txt": txt or "", "img_path": path, "modality": modality(txt, path)})
        return did

    for (where, info, window, hits, gt, prompt), tail in zip(parsed, tails):
        tid = task_id if info.get("task_id") is None else info["task_id"]
        window_dids = [cand_did(where, img, txt) for img, txt in window]
        hit_dids = [cand_did(where, img, txt) for img, txt in hits[:max(hit_depth, gt if gt > 0 else 0)]]
        try:
            q_path, _ = image_of(info["query_image"], image_dir, fix)
        except (ValueError, OSError) as e:
            raise ValueError(f"{where}: query image: {e}") from None
        found = mbeir.query(str(info["qid"]), q_path, info["query_text"]) if mbeir else None
        qid = found["qid"] if found else f"{dataset_id}:{int(tail)}"
        positives = []
        if 1 <= gt <= len(window_dids):
            positives.append(window_dids[gt - 1])
        elif 1 <= gt <= len(hit_dids):
            positives.append(hit_dids[gt - 1])
            stats["gt_past_window"] += 1
        if found:
            stats["queries_matched"] += 1
            positives += found.get("pos_cand_list") or []
            for d in found.get("pos_cand_list") or []:  # a positive outside the lists is still a known candidate
                if d in mbeir.pool:
                    pool.setdefault(d, dict(mbeir.pool[d]))
        positives = list(dict.fromkeys(positives))
        if not positives:
            stats["no_positive"] += 1
            positives = [f"{dataset_id}:unranked:{int(tail)}"]
        record = {"qid": qid, "query_txt": info["query_text"] or "", "query_img_path": q_path,
                  "query_modality": modality(info["query_text"], q_path), "pos_cand_list": positives,
                  "neg_cand_list": [], "task_id": tid, "src_qid": str(info["qid"])}
        if found:  # the M-BEIR query: its own text and relative path (the release text holds the instruction)
            record.update(query_txt=found.get("query_txt") or "", query_img_path=found.get("query_img_path"),
                          query_modality=found.get("query_modality", record["query_modality"]))
        if prompt is not None:
            record["release_prompt"] = prompt
        queries.append(record)
        qrels += [f"{qid} 0 {d} 1 {tid}" for d in positives]
        cands = list(dict.fromkeys(hit_dids[:hit_depth] if hits else window_dids))  # a repeat keeps its first place
        ranked.append({"qid": qid, "task_id": tid, "cands": cands,
                       "scores": [float(len(cands) - j) for j in range(len(cands))]})
    seen = {}
    for q in queries:
        if q["qid"] in seen:
            raise ValueError(f"rows with release qids {seen[q['qid']]!r} and {q['src_qid']!r} map to the same qid {q['qid']}")
        seen[q["qid"]] = q["src_qid"]
    return queries, list(pool.values()), qrels, ranked, stats


def main():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        sys.exit("pyarrow is needed to read parquet: pip install pyarrow (it is not a dependency of nanoretrver)")
    if not parquet or not str(dataset_id):
        raise ValueError("set --parquet and --dataset_id")
    if bool(mbeir_query_file) != bool(mbeir_pool_file):
        raise ValueError("set both --mbeir_query_file and --mbeir_pool_file, or neither")
    stem = name or os.path.splitext(os.path.basename(parquet))[0]
    rows = pq.read_table(parquet).to_pylist()
    fix = Remapper(remap)
    mbeir = None
    if mbeir_query_file:
        mbeir = MBeirIndex(common.read_jsonl(mbeir_query_file, required=("qid",)),
                           common.read_jsonl(mbeir_pool_file, required=("did",)))
    queries, pool, qrels, ranked, stats = convert_rows(rows, dataset_id, os.path.join(out_dir, "images", stem),
                                                       task_id, fix, mbeir, hit_depth)
    fix.check(parquet)
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
    if mbeir:
        print(f"M-BEIR ids: {stats['queries_matched']}/{len(queries)} queries, {stats['cands_matched']}/{stats['cands']} candidates matched")
    if stats["gt_past_window"] or stats["no_positive"]:
        print(f"positives: {stats['gt_past_window']} past the window (found in hit), {stats['no_positive']} in no list "
              f"(kept with a stand-in positive: they count as misses)")
    window = min(n, 20)
    print(f"next: python rollout.py --data_root={image_root or '<image root>'} --query_files={paths['query']} "
          f"--pool_files={paths['cand_pool']} --instructions_file={inst_path} --ranked_in={paths['ranked']} "
          f"--top_n={n} --window={window} --stride={max(1, window // 2)} ...\n"
          f"      python evaluate.py --ranked=<rollout out_dir>/reranked.jsonl --qrels={paths['qrels']}")


if __name__ == "__main__":
    configure(globals())
    main()
