"""
The toy's stand-in for a pretrained vision encoder: trains the tiny policy's vision tower (and projector)
to tell the toy's attributes apart, with one linear head per attribute on the mean of an image's visual
tokens, then saves the whole policy (language model still at its random init) as a Hugging Face directory
that sft.py starts the warm-up from.

    python data/toy/vision_pretrain.py config/toy.py    # reads data/toy/sft/warmup.jsonl, writes out/toy/vision

Why a stage of its own: a released Qwen2.5-VL inherits a vision tower that was pretrained before the
language model ever saw it. Trained only through the language model's head, a from-scratch toy tower
learned the tag's texture after a long, seed-dependent plateau (1500 steps with one seed, none in 3000
with another); trained directly, as here, it reads the texture in ~2000 short steps, and then the
language model learns to name what it sees in a few hundred (README, "toy training").
The heads see every view of warmup.jsonl (prompt, full, crop); the tag texture is not scored at the
prompt view, where it is not visible by design, and the held-out report shows it stays at chance there.
"""

import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
data_root = "data/toy"
warmup_data = "sft/warmup.jsonl"  # records with "attributes" and "kind" (cold_start.py)
tokenizer_dir = "data/toy/tokenizer"
arch = "qwen2_5_vl"
n_layer = 4                # the policy's shape: the same knobs as sft.py's scratch model
n_embd = 128
n_head = 4
n_kv_head = 2
vision_depth = 2
vision_hidden = 64
out_dir = "out/toy/vision" # Hugging Face directory of the whole policy
vision_steps = 2000
vision_batch_size = 32
vision_learning_rate = 3e-3
held_out = 0.1             # last fraction of the records, scored at the end
seed = 1337
# -----------------------------------------------------------------------------

ATTRIBUTES = ["colour", "background", "corner", "mark"]


def pooled_features(visual, processor, images):
    """(B, n_embd): the mean of each image's visual tokens as the language model receives them."""
    px = processor.image_processor(images=images, return_tensors="pt")
    tokens = visual(px["pixel_values"], grid_thw=px["image_grid_thw"]).pooler_output  # (sum tokens, n_embd)
    counts = (px["image_grid_thw"].prod(-1) // common.MERGE ** 2).tolist()
    return torch.stack([t.mean(0) for t in tokens.split(counts)])


def main():
    from transformers import AutoTokenizer
    torch.manual_seed(seed)
    records = common.read_jsonl(common.resolve_path(warmup_data, data_root), required=("images", "attributes", "kind"))
    images = []
    for i, r in enumerate(records):
        img = common.load_image(common.resolve_path(r["images"][0], data_root))
        size = tuple(r.get("image_sizes", [img.size])[0])
        images.append(img if img.size == size else img.resize(size))
    names = {k: sorted({r["attributes"][k] for r in records}) for k in ATTRIBUTES}
    labels = {k: torch.tensor([names[k].index(r["attributes"][k]) for r in records]) for k in ATTRIBUTES}
    scored = {k: torch.tensor([k != "mark" or r["kind"] != "prompt" for r in records], dtype=torch.float) for k in ATTRIBUTES}
    n_train = len(records) - int(held_out * len(records))

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = common.build_tiny_model(arch, tokenizer, seed=seed, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                    n_kv_head=n_kv_head, vision_depth=vision_depth, vision_hidden=vision_hidden)
    processor = common.make_processor(tokenizer, common.ARCHS[arch][2], 28 * 28, 112 * 112 * 4)
    visual = model.model.visual
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(n_embd, len(names[k])) for k in ATTRIBUTES})
    optimizer = torch.optim.AdamW(list(visual.parameters()) + list(heads.parameters()), lr=vision_learning_rate)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    for step in range(vision_steps):
        idx = rng.integers(0, n_train, vision_batch_size).tolist()
        feats = pooled_features(visual, processor, [images[i] for i in idx])
        loss = sum((F.cross_entropy(heads[k](feats), labels[k][idx], reduction="none") * scored[k][idx]).mean()
                   for k in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == vision_steps - 1:
            print(f"step {step:5d} | loss {loss.item():.4f} | {time.time() - t0:.0f}s", flush=True)

    idx = list(range(n_train, len(records)))
    with torch.no_grad():
        feats = torch.cat([pooled_features(visual, processor, [images[i] for i in idx[j:j + 64]])
                           for j in range(0, len(idx), 64)])
    accuracy = {}
    for k in ATTRIBUTES:
        right = (heads[k](feats).argmax(-1) == labels[k][idx]).float()
        for kind in ("prompt", "full", "crop"):
            sel = torch.tensor([records[i]["kind"] == kind for i in idx])
            if sel.any():
                accuracy[f"{k}/{kind}"] = round(right[sel].mean().item(), 3)
    print("held-out accuracy (mark/prompt should stay near chance 0.25):", accuracy)
    tmp = out_dir.rstrip("/") + ".tmp"  # written beside, then renamed: an interrupted save leaves no half model
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    print(f"saved {out_dir} ({time.time() - t0:.0f}s)")
    return accuracy


if __name__ == "__main__":
    configure(globals())
    main()
