"""
Rewrite the image paths of the release's files from the authors' machines to yours, by prefix.

    python data/vretrver/remap.py --inp=data/vretrver/sft_raw.json --out=data/vretrver/sft.json --remap=/remote-home1/x/M-BEIR:/data/mbeir
    python data/vretrver/remap.py --inp=rl_train.parquet --out=rl_train_local.parquet --remap=/a/imgs:/data/imgs,/b/tools:/data/tools

remap is "old:new[,old2:new2...]"; the first old prefix a path starts with is replaced by its new one.
SFT/RSFT JSON (ShareGPT records): every entry of "images". Parquet (RL/eval rows): "images" ({"image":
path} dicts or paths) and extra_info's query_image, candidate_images and images, and each hit's
candidate_images. Every path must match a prefix: otherwise nothing is written and the error lists the
first unmatched paths (docs/spec.md §10). data/vretrver/convert.py takes the same --remap.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
inp = ""      # the release's SFT/RSFT JSON or RL/eval parquet
out = ""      # where the rewritten file goes (same format)
remap = ""    # "old_prefix:new_prefix[,...]"
# -----------------------------------------------------------------------------


def parse_remap(spec):
    """'old:new,old2:new2' -> [(old, new), ...]; an empty spec is no remap."""
    pairs = []
    for item in [p for p in spec.split(",") if p.strip()]:
        if ":" not in item:
            raise ValueError(f"remap {item!r}: expected old_prefix:new_prefix")
        old, new = item.split(":", 1)
        if not old:
            raise ValueError(f"remap {item!r}: the old prefix is empty")
        pairs.append((old, new))
    return pairs


class Remapper:
    """Applies the prefix pairs to paths, collecting the ones no prefix matches (left as they are)."""

    def __init__(self, spec):
        self.pairs, self.unmatched = parse_remap(spec), []

    def __call__(self, path):
        if not self.pairs or not isinstance(path, str) or not path:
            return path
        for old, new in self.pairs:
            if path.startswith(old):
                return new + path[len(old):]
        self.unmatched.append(path)
        return path

    def check(self, where):
        if self.unmatched:
            first = list(dict.fromkeys(self.unmatched))[:5]
            raise ValueError(f"{where}: {len(self.unmatched)} image paths match no remap prefix "
                             f"({', '.join(o for o, _ in self.pairs)}); first: {', '.join(first)}")


def remap_image_value(value, fix):
    """A path, an {"image": path} / HF {"path": ...} dict or a list of them, remapped."""
    if isinstance(value, list):
        return [remap_image_value(v, fix) for v in value]
    if isinstance(value, dict):
        return {k: (fix(v) if k in ("image", "path") else v) for k, v in value.items()}
    return fix(value)


def remap_sft_records(records, fix):
    for r in records:
        r["images"] = [fix(p) for p in r.get("images") or []]
    return records


def remap_row(row, fix):
    """One RL/eval parquet row (a dict), remapped in place; extra_info may be a JSON string."""
    if "images" in row and row["images"] is not None:
        row["images"] = remap_image_value(row["images"], fix)
    info = row.get("extra_info")
    as_text = isinstance(info, str)
    info = json.loads(info) if as_text else info
    if isinstance(info, dict):
        for key in ("query_image", "candidate_images", "images"):
            if info.get(key) is not None:
                info[key] = remap_image_value(info[key], fix)
        row["extra_info"] = json.dumps(info) if as_text else info
    for hit in row.get("hit") or []:
        if isinstance(hit, dict) and hit.get("candidate_images"):
            hit["candidate_images"] = remap_image_value(hit["candidate_images"], fix)
    return row


def main():
    if not inp or not out or not remap:
        raise ValueError("set --inp, --out and --remap=old_prefix:new_prefix")
    fix = Remapper(remap)
    if inp.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        rows = [remap_row(r, fix) for r in pq.read_table(inp).to_pylist()]
        fix.check(inp)
        common.atomic_write(out, lambda f: pq.write_table(pa.Table.from_pylist(rows), f), mode="wb")
        n = len(rows)
    else:
        records = remap_sft_records(common.read_json(inp), fix)
        fix.check(inp)
        common.write_json(out, records)
        n = len(records)
    print(f"{inp}: {n} records, image paths remapped -> {out}")


if __name__ == "__main__":
    configure(globals())
    main()
