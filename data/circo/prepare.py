"""
CIRCO (composed image retrieval on COCO 2017 unlabeled images) as our query/pool/qrels files.

    python data/circo/prepare.py --circo_dir=data/circo --split=val
    python embed.py config/stage0_7b.py --data_root=data/circo --query_files=query/circo_val.jsonl \
        --pool_files=cand_pool/circo_cand_pool.jsonl --embed_out_dir=out/circo/embed
    python retrieve.py --data_root=data/circo --query_files=query/circo_val.jsonl \
        --pool_files=cand_pool/circo_cand_pool.jsonl --emb_dir=out/circo/embed/emb --ranked=out/circo/ranked.jsonl
    torchrun --nproc_per_node=8 rollout.py config/rollout_7b.py --data_root=data/circo --query_files=query/circo_val.jsonl \
        --pool_files=cand_pool/circo_cand_pool.jsonl --ranked_in=out/circo/ranked.jsonl --top_n=10 --window=10 \
        --stride=10 --out_dir=out/circo/rerank     # the paper reranks the top 10 on the zero-shot sets
    python evaluate.py --benchmark=circo --ranked=out/circo/ranked.jsonl --qrels=data/circo/qrels/circo_val_qrels.txt

Reads, under circo_dir: annotations/{split}.json (a list of {"id", "reference_img_id", "relative_caption",
"shared_concept", and for val "target_img_id", "gt_img_ids"}), annotations/image_info_unlabeled2017.json
(COCO's {"images": [{"id", "file_name"}]}, the 123,403-image pool) and the images under image_dir.
Writes query/circo_{split}.jsonl (qid "circo:{id}", the reference image, the relative caption, every
ground truth in pos_cand_list, task 7), cand_pool/circo_cand_pool.jsonl (did "circo:{image id}"),
qrels/circo_{split}_qrels.txt (val only: the test split's ground truth is held by the CIRCO server) and
instructions.json {"circo": [LamRA's CIRCO instruction]}. The metric is mAP@K (docs/spec.md §7).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
circo_dir = "data/circo"   # holds annotations/ and the images; the later stages' data_root
split = "val"              # val (ground truth public) | test
image_dir = "unlabeled2017"  # the COCO 2017 unlabeled images, relative to circo_dir
# -----------------------------------------------------------------------------

INSTRUCTION = "I'm looking for a similar everyday image with the described changes."  # LamRA's, for CIRCO


def convert(annotations, images, image_dir, split):
    """CIRCO annotations and COCO image info -> (queries, pool, qrels lines)."""
    path_of = {str(im["id"]): f"{image_dir}/{im['file_name']}" for im in images}
    pool = [{"did": f"circo:{i}", "txt": "", "img_path": p, "modality": "image"} for i, p in path_of.items()]
    queries, qrels = [], []
    for n, a in enumerate(annotations):
        where = f"{split}.json entry {n} (id {a.get('id')!r})"
        ref = str(a.get("reference_img_id"))
        if ref not in path_of:
            raise ValueError(f"{where}: reference image {ref} is not in image_info_unlabeled2017.json")
        gts = [f"circo:{g}" for g in a.get("gt_img_ids") or ([a["target_img_id"]] if a.get("target_img_id") else [])]
        missing = [g for g in gts if g.split(":")[1] not in path_of]
        if missing:
            raise ValueError(f"{where}: ground truth {missing[0]} is not in image_info_unlabeled2017.json")
        qid = f"circo:{int(a['id'])}"
        queries.append({"qid": qid, "query_txt": a["relative_caption"], "query_img_path": path_of[ref],
                        "query_modality": "image,text", "pos_cand_list": gts, "neg_cand_list": [], "task_id": 7,
                        "shared_concept": a.get("shared_concept", "")})
        qrels += [f"{qid} 0 {g} 1 7" for g in gts]
    return queries, pool, qrels


def main():
    annotations = common.read_json(os.path.join(circo_dir, "annotations", f"{split}.json"))
    images = common.read_json(os.path.join(circo_dir, "annotations", "image_info_unlabeled2017.json"))["images"]
    queries, pool, qrels = convert(annotations, images, image_dir, split)
    common.write_jsonl(os.path.join(circo_dir, "query", f"circo_{split}.jsonl"), queries)
    common.write_jsonl(os.path.join(circo_dir, "cand_pool", "circo_cand_pool.jsonl"), pool)
    if qrels:
        common.atomic_write(os.path.join(circo_dir, "qrels", f"circo_{split}_qrels.txt"),
                            lambda f: f.writelines(line + "\n" for line in qrels))
    inst_path = os.path.join(circo_dir, "instructions.json")
    instructions = common.read_json(inst_path) if os.path.exists(inst_path) else {}
    instructions["circo"] = [INSTRUCTION]
    common.write_json(inst_path, instructions)
    print(f"CIRCO {split}: {len(queries)} queries, {len(pool)} pool images, {len(qrels)} qrels lines -> {circo_dir}"
          + ("" if qrels else " (no ground truth: score the test split on the CIRCO server)"))


if __name__ == "__main__":
    configure(globals())
    main()
