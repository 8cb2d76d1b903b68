"""
GeneCIS (four conditional-similarity tasks, each query with its own small gallery) as our files.

    python data/genecis/prepare.py --genecis_dir=data/genecis --task=change_attribute   # and the 3 others
    python embed.py config/stage0_7b.py --data_root=data/genecis --query_files=query/genecis_change_attribute.jsonl \
        --pool_files=cand_pool/genecis_change_attribute_cand_pool.jsonl --embed_out_dir=out/genecis/embed
    python retrieve.py --data_root=data/genecis --query_files=... --pool_files=... --emb_dir=out/genecis/embed/emb \
        --top_k=50 --ranked=out/genecis/ranked.jsonl
    torchrun --nproc_per_node=8 rollout.py config/rollout_7b.py --data_root=data/genecis --query_files=... \
        --pool_files=... --ranked_in=out/genecis/ranked.jsonl --top_n=10 --window=10 --stride=10 --out_dir=out/genecis/rerank
    python evaluate.py --benchmark=genecis --ranked=out/genecis/ranked.jsonl \
        --qrels=data/genecis/qrels/genecis_change_attribute_qrels.txt,...   # the 4 tasks: 4 rows and their mean

Reads genecis_dir/annotations/{task}.json: a list of {"reference", "target", "gallery": [...], "condition"}.
The object tasks (change_object, focus_object) name COCO val2017 images by "val_image_id" (files
{id:012d}.jpg under image_dir, default val2017); the attribute tasks (change_attribute, focus_attribute) name
VAW images by "image_id", stored as per-query crops {image_id}_{i}_{k}.jpg under image_dir (default
{task}): k = 0 the reference, 1 the target, 2 + j gallery image j of query i. Writes query/genecis_{task}.jsonl
(qid "{task}:{i}", with "gallery": the dids of the target and the gallery, so retrieve.py scores the query
against its own gallery only), cand_pool/genecis_{task}_cand_pool.jsonl, qrels/genecis_{task}_qrels.txt (the
target) and instructions.json ({task}: LamRA's instruction). The metric is R@1 in the gallery (docs/spec.md §7).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
genecis_dir = "data/genecis"  # holds annotations/ and the images; the later stages' data_root
task = "change_attribute"     # change_attribute | focus_attribute | change_object | focus_object
image_dir = ""                # '' = val2017 (object tasks) or the task's name (attribute tasks' crops)
# -----------------------------------------------------------------------------

TASKS = ("change_attribute", "focus_attribute", "change_object", "focus_object")
# LamRA's instructions for GeneCIS (its object tasks use the "changes" one for both)
INSTRUCTIONS = {"change_attribute": "I'm looking for a similar everyday image with the described changes.",
                "focus_attribute": "I'm looking for an image with the same attributes as described.",
                "change_object": "I'm looking for a similar everyday image with the described changes.",
                "focus_object": "I'm looking for a similar everyday image with the described changes."}


def convert(samples, task, image_dir):
    """GeneCIS annotations of one task -> (queries, pool, qrels lines)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")
    coco = task.endswith("_object")
    pool, queries, qrels = {}, [], []

    def image(n, item, k, where):
        key = "val_image_id" if coco else "image_id"
        if not isinstance(item, dict) or key not in item:
            raise ValueError(f"{task}.json sample {n}: {where} has no {key!r}")
        name = f"{int(item[key]):012d}.jpg" if coco else f"{item[key]}_{n}_{k}.jpg"
        return f"{task}:{name.removesuffix('.jpg')}", f"{image_dir}/{name}"

    for n, s in enumerate(samples):
        _, ref_path = image(n, s.get("reference"), 0, "reference")
        gallery = [image(n, s.get("target"), 1, "target")]
        gallery += [image(n, g, 2 + j, f"gallery item {j}") for j, g in enumerate(s.get("gallery") or [])]
        for did, path in gallery:
            pool.setdefault(did, {"did": did, "txt": "", "img_path": path, "modality": "image"})
        qid, target = f"{task}:{n}", gallery[0][0]
        queries.append({"qid": qid, "query_txt": s.get("condition") or "", "query_img_path": ref_path,
                        "query_modality": "image,text", "pos_cand_list": [target], "neg_cand_list": [],
                        "task_id": 7, "gallery": list(dict.fromkeys(d for d, _ in gallery))})
        qrels.append(f"{qid} 0 {target} 1 7")
    return queries, list(pool.values()), qrels


def main():
    samples = common.read_json(os.path.join(genecis_dir, "annotations", f"{task}.json"))
    folder = image_dir or ("val2017" if task.endswith("_object") else task)
    queries, pool, qrels = convert(samples, task, folder)
    common.write_jsonl(os.path.join(genecis_dir, "query", f"genecis_{task}.jsonl"), queries)
    common.write_jsonl(os.path.join(genecis_dir, "cand_pool", f"genecis_{task}_cand_pool.jsonl"), pool)
    common.atomic_write(os.path.join(genecis_dir, "qrels", f"genecis_{task}_qrels.txt"),
                        lambda f: f.writelines(line + "\n" for line in qrels))
    inst_path = os.path.join(genecis_dir, "instructions.json")
    instructions = common.read_json(inst_path) if os.path.exists(inst_path) else {}
    instructions[task] = [INSTRUCTIONS[task]]
    common.write_json(inst_path, instructions)
    sizes = [len(q["gallery"]) for q in queries]
    print(f"GeneCIS {task}: {len(queries)} queries, galleries of {min(sizes, default=0)}-{max(sizes, default=0)}, "
          f"{len(pool)} pool images -> {genecis_dir}")


if __name__ == "__main__":
    configure(globals())
    main()
