"""
M-BEIR's query instructions (instructions/query_instructions.tsv) as our instructions.json.

    python data/mbeir/instructions.py --tsv=data/mbeir/instructions/query_instructions.tsv --out=data/mbeir/instructions.json

The TSV (UniIR) has a header line, then one row per task of a dataset, tab-separated and read by position
as UniIR and LamRA read it: query modality, candidate modality, dataset name, dataset id, then up to 4
instructions (empty cells dropped). UniIR keys a row by (dataset id, query modality, candidate modality);
one dataset can have several tasks (WebQA 1 and 2, MSCOCO 0 and 3, ...), so instructions.json holds:
  "{dataset_id}:{task_id}"  the row's instructions, for every row (task id from the two modalities)
  "{dataset_id}"            the same list, only when the dataset has a single row
common.pick_instruction tries "{dataset_id}:{task_id}" first, then "{dataset_id}"
(docs/spec.md §3, §7). Each instruction is kept as written; the stages format it (UniIR's format_string).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
tsv = "data/mbeir/instructions/query_instructions.tsv"  # M-BEIR's instruction table
out = "data/mbeir/instructions.json"
# -----------------------------------------------------------------------------

# UniIR's task ids by (query modality, candidate modality) (docs/spec.md §7)
MBEIR_TASK = {("text", "image"): 0, ("text", "text"): 1, ("text", "image,text"): 2, ("image", "text"): 3,
              ("image", "image"): 4, ("image", "text,image"): 5, ("image,text", "text"): 6,
              ("image,text", "image"): 7, ("image,text", "image,text"): 8}


def task_id(query_modality, cand_modality):
    """UniIR's M-BEIR task id of a (query modality, candidate modality) pair, or None."""
    return MBEIR_TASK.get((query_modality.strip(), cand_modality.strip()))


def parse_tsv(lines, where="query_instructions.tsv"):
    """The TSV's lines (header first) -> {"{dataset_id}:{task_id}": [instructions], "{dataset_id}": [...]}."""
    by_task, tasks_of = {}, {}
    for lineno, line in enumerate(lines, 1):
        if lineno == 1 or not line.strip():
            continue  # the header
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) < 5:
            raise ValueError(f"{where}:{lineno}: expected query modality, candidate modality, dataset, dataset id "
                             f"and at least one instruction, got {len(parts)} columns")
        tid = task_id(parts[0], parts[1])
        ds = parts[3].strip()
        if tid is None or not ds.isdigit():
            raise ValueError(f"{where}:{lineno}: unknown modality pair ({parts[0]!r}, {parts[1]!r}) or dataset id {ds!r}")
        prompts = [p.strip() for p in parts[4:] if p.strip()]
        if not prompts:
            raise ValueError(f"{where}:{lineno}: no instruction for dataset {ds} task {tid}")
        key = f"{ds}:{tid}"
        if key in by_task:
            raise ValueError(f"{where}:{lineno}: dataset {ds} task {tid} appears twice")
        by_task[key] = prompts
        tasks_of.setdefault(ds, []).append(key)
    if not by_task:
        raise ValueError(f"{where}: no instruction rows")
    out_map = dict(by_task)
    for ds, keys in tasks_of.items():
        if len(keys) == 1:
            out_map[ds] = by_task[keys[0]]
    return out_map


def main():
    with open(tsv, encoding="utf-8") as f:
        instructions = parse_tsv(f.readlines(), tsv)
    common.write_json(out, instructions)
    n_tasks = sum(":" in k for k in instructions)
    print(f"{tsv}: {n_tasks} dataset/task rows -> {out}")


if __name__ == "__main__":
    configure(globals())
    main()
