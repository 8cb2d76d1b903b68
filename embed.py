"""
Stage 0, part 1: LamRA-style embeddings of queries and candidate pools.

The embedding of an item is the VLM's final hidden state (after the last norm) at a summary position
that closes the item's prompt, L2-normalised; similarity is the dot product. The prompt, rendered with
the chat template in this repo:

    <|im_start|>user
    [<image>]{instruction} {query text}           (a candidate: [<image>]{candidate text})
    Summarize above {image and sentence | image | sentence} in one word:<|im_end|>
    <|im_start|>assistant
    <emb>                                          <- summary position (the last token when the
                                                      tokenizer has no <emb>, as in a plain Qwen)

That is embed_prompt=compact (the toy's). embed_prompt=lamra is LamRA-Ret's exact prompt (docs/spec.md §7):
a "You are a helpful assistant." system turn, texts through UniIR's format_string, the summary sentence
with its trailing space, and the summary at the last token of "<|im_start|>assistant\n", the position just
before LamRA's <emb> (LamRA reads the hidden state there). auto: compact when the tokenizer has <emb>.

The defaults encode the 16 M-BEIR test sets and their local pools with a real checkpoint (e.g. a LamRA
retriever, embed_train_steps=0); the toy (config/toy.py) trains a tiny embedder from scratch here with
in-batch InfoNCE on its train split first.

    torchrun --nproc_per_node=8 embed.py --embed_init_from=checkpoints/LamRA-Ret --data_root=data/mbeir
    python embed.py config/toy.py                                    # train the toy embedder, encode
    python embed.py config/toy.py --embed_init_from=out/toy/embed/model --embed_train_steps=0   # encode only

Writes {embed_out_dir}/emb/{name}.npy (float32, N x D) and {name}.ids.json for every query and pool file.
"""

import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import common
import task
from configurator import configure

# -----------------------------------------------------------------------------
data_root = "data/mbeir"   # image paths and the file lists below are relative to it
query_files = common.mbeir_files("query")  # to encode: the 16 M-BEIR test sets ...
pool_files = common.mbeir_files("pool")    # ... and their local pools
train_query_files = ""     # contrastive training data (only when embed_train_steps > 0)
train_pool_files = ""
instructions_file = "instructions.json"  # dataset id (or "id:task") -> task instructions ('' = none)
embed_prompt = "auto"      # lamra (LamRA-Ret's prompt and summary position) | compact (the toy's) | auto
embed_out_dir = "out/mbeir/embed"  # emb/ and (after training) model/ go here
embed_init_from = "checkpoints/LamRA-Ret"  # a local Hugging Face directory, or 'scratch' (a tiny model of `arch`)
arch = "qwen2_5_vl"        # scratch only: qwen2_vl | qwen2_5_vl | qwen3_vl
tokenizer_dir = ""         # scratch only: a local tokenizer directory
embed_n_layer = 2          # scratch only: LLM size ...
embed_n_embd = 128
embed_n_head = 4
embed_n_kv_head = 2
embed_vision_depth = 1     # ... and vision tower size
embed_vision_hidden = 64
embed_min_pixels = 3136    # images are resized Qwen-style into [min, max] pixels before encoding
embed_max_pixels = 200704  # (448x448; the toy: 784 = 28x28 = one token)
embed_train_steps = 0      # contrastive training steps (0 = encode only)
embed_batch_size = 64      # queries per step; the other queries' positives are the negatives
embed_learning_rate = 2e-3
embed_vision_lr_mult = 5.0  # the from-scratch vision tower learns too slowly at the LLM's rate
embed_weight_decay = 0.01
embed_warmup_steps = 50
embed_temperature = 0.05   # InfoNCE temperature
encode_batch_size = 64
dtype = "bfloat16"         # bfloat16 | float32 (the toy, CPU)
seed = 1337
# -----------------------------------------------------------------------------


LAMRA_SYSTEM = "You are a helpful assistant."  # Qwen2-VL's default system turn, which LamRA's template adds
LAMRA_SUMMARY = {"both": "\nSummarize above image and sentence in one word: ",
                 "text": "\nSummarize above sentence in one word: ", "image": "\nSummarize above image in one word: "}


def item_messages(text, has_image, instruction="", style="compact"):
    """The chat messages of one item. lamra: LamRA's M-BEIR loader, exactly (docs/spec.md §7): the query text
    is format_string(f"{format_string(instruction)} {text}"), a candidate's format_string(text); an item
    with an image and no text gets the image sentence only."""
    content = [{"type": "image"}] if has_image else []
    if style == "lamra":
        body = task.lamra_format(f"{task.lamra_format(instruction)} {text}" if instruction else text)
        kind = ("both" if body else "image") if has_image else "text"
        content.append({"type": "text", "text": (body if kind != "image" else "") + LAMRA_SUMMARY[kind]})
        return [{"role": "system", "content": LAMRA_SYSTEM}, {"role": "user", "content": content}]
    what = "image and sentence" if has_image and text else ("image" if has_image else "sentence")
    body = f"{instruction} {text}".strip()
    content.append({"type": "text", "text": f"{body}\nSummarize above {what} in one word:"})
    return [{"role": "user", "content": content}]


def prompt_style(processor):
    """embed_prompt, with auto resolved: compact when the tokenizer has an <emb> token (the toy's), else lamra."""
    if embed_prompt not in ("lamra", "compact", "auto"):
        raise ValueError(f"embed_prompt={embed_prompt!r}: expected lamra, compact or auto")
    if embed_prompt != "auto":
        return embed_prompt
    return "compact" if "<emb>" in processor.tokenizer.get_vocab() else "lamra"


def render_items(items, processor):
    """items: list of (text, image or None, instruction) -> model inputs, right-padded; the summary position
    of each row is its last token (compact appends <emb> when the tokenizer has it; lamra never does)."""
    texts, images = [], []
    style = prompt_style(processor)
    emb = "<emb>" if style == "compact" and "<emb>" in processor.tokenizer.get_vocab() else ""
    for text, image, instruction in items:
        msgs = item_messages(text, image is not None, instruction, style)
        texts.append(processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + emb)
        if image is not None:
            images.append(image)
    processor.tokenizer.padding_side = "right"
    return processor(text=texts, images=images or None, return_tensors="pt", padding=True)


def embed_batch(model, processor, items, device):
    batch = render_items(items, processor)
    inputs = common.model_inputs(batch, device)
    hidden = model.model(**inputs, use_cache=False).last_hidden_state  # (B, L, D), after the final norm
    last = inputs["attention_mask"].sum(1) - 1  # (B,) the summary position of each right-padded row
    summary = hidden[torch.arange(hidden.shape[0], device=device), last]  # (B, D)
    return F.normalize(summary.float(), dim=-1)


def build_embedder(device, torch_dtype):
    """The embedder and its processor: a tiny model of `arch` ('scratch') or a local checkpoint."""
    if embed_init_from != "scratch":
        model = common.load_model(embed_init_from, dtype=torch_dtype, device=device)
        return model, common.load_processor(embed_init_from, embed_min_pixels, embed_max_pixels)
    from transformers import AutoTokenizer
    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"tokenizer_dir={tokenizer_dir!r}: a scratch embedder needs a local tokenizer directory")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = common.build_tiny_model(arch, tokenizer, seed=seed, n_layer=embed_n_layer, n_embd=embed_n_embd,
                                    n_head=embed_n_head, n_kv_head=embed_n_kv_head,
                                    vision_depth=embed_vision_depth, vision_hidden=embed_vision_hidden)
    processor = common.make_processor(tokenizer, common.ARCHS[arch][2], embed_min_pixels, embed_max_pixels, arch=arch)
    return model.to(device=device, dtype=torch_dtype), processor


class Items:
    """Query and candidate records as (text, image at the embedder's size, instruction) items; images cached."""

    def __init__(self, instructions, factor):
        self.instructions, self.factor, self.cache = instructions, factor, {}

    def image(self, rel):
        if not rel:
            return None
        if rel not in self.cache:
            img = common.load_image(common.resolve_path(rel, data_root))
            self.cache[rel] = common.qwen_resize(img, embed_min_pixels, embed_max_pixels, self.factor)
        return self.cache[rel]

    def query(self, q):
        return q["query_txt"] or "", self.image(q.get("query_img_path")), common.pick_instruction(self.instructions, q["qid"], q.get("task_id"))

    def cand(self, c):
        return c.get("txt") or "", self.image(c.get("img_path")), ""


def load_training_pairs():
    """Training queries that have a positive in their pool, and the pools' candidates by did."""
    files = lambda s: [f for f in s.split(",") if f]  # noqa: E731
    queries, cand_by_did = [], {}
    for qf, pf in zip(files(train_query_files), files(train_pool_files), strict=True):
        qs = common.read_jsonl(common.resolve_path(qf, data_root), required=("qid", "pos_cand_list"))
        pool = common.read_jsonl(common.resolve_path(pf, data_root), required=("did",))
        common.check_images(qs, "query_img_path", "qid", data_root)
        common.check_images(pool, "img_path", "did", data_root)
        cand_by_did.update({c["did"]: c for c in pool})
        queries += [q for q in qs if any(d in cand_by_did for d in q["pos_cand_list"])]
    if not queries:
        raise ValueError(f"train_query_files={train_query_files!r}: no training query has a positive in its pool")
    return queries, cand_by_did


def train_embedder(model, processor, items, device):
    """In-batch InfoNCE, symmetric: each query's positive against the batch's other positives."""
    queries, cand_by_did = load_training_pairs()
    print0(f"training on {len(queries)} queries for {embed_train_steps} steps")
    vision = [p for n, p in model.named_parameters() if ".visual." in f".{n}"]
    others = [p for n, p in model.named_parameters() if ".visual." not in f".{n}"]
    optimizer = torch.optim.AdamW([{"params": others, "lr_mult": 1.0}, {"params": vision, "lr_mult": embed_vision_lr_mult}],
                                  lr=embed_learning_rate, weight_decay=embed_weight_decay)
    rng = np.random.default_rng(seed)
    model.train()
    t0 = time.time()
    for step in range(embed_train_steps):
        lr = embed_learning_rate * min(1.0, (step + 1) / embed_warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / embed_train_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        batch = [queries[i] for i in rng.choice(len(queries), size=embed_batch_size, replace=False)]
        positives = [cand_by_did[next(d for d in q["pos_cand_list"] if d in cand_by_did)] for q in batch]
        q_emb = embed_batch(model, processor, [items.query(q) for q in batch], device)  # (B, D)
        c_emb = embed_batch(model, processor, [items.cand(c) for c in positives], device)  # (B, D)
        logits = q_emb @ c_emb.T / embed_temperature  # (B, B); row i's positive is column i
        # two batch rows may share a target: do not push a query away from its own positive
        dids = [c["did"] for c in positives]
        same = torch.tensor([[a == b for b in dids] for a in dids], device=device) & ~torch.eye(len(dids), dtype=torch.bool, device=device)
        logits = logits.masked_fill(same, float("-inf"))
        labels = torch.arange(len(batch), device=device)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0 or step == embed_train_steps - 1:
            acc = (logits.argmax(1) == labels).float().mean().item()
            print0(f"step {step:4d} | loss {loss.item():.4f} | in-batch acc {acc:.2f} | lr {lr:.2e} | {time.time() - t0:.0f}s")
    model.eval()
    model.save_pretrained(os.path.join(embed_out_dir, "model"))
    processor.save_pretrained(os.path.join(embed_out_dir, "model"))
    print0(f"saved embedder to {embed_out_dir}/model")


def encode_file(model, processor, items, f, kind, rank, world_size, device):
    """Embeddings of one query or pool file: ranks take strided shards, rank 0 stitches them in order."""
    id_key, make_item = ("qid", items.query) if kind == "query" else ("did", items.cand)
    records = common.read_jsonl(common.resolve_path(f, data_root), required=(id_key,))
    common.check_images(records, "query_img_path" if kind == "query" else "img_path", id_key, data_root)
    name = os.path.basename(f).removesuffix(".jsonl")
    mine = list(range(rank, len(records), world_size))
    chunks = []
    with torch.no_grad():
        for i in tqdm(range(0, len(mine), encode_batch_size), desc=f"encode {name}", disable=rank != 0):
            chunks.append(embed_batch(model, processor, [make_item(records[j]) for j in mine[i:i + encode_batch_size]], device).cpu().numpy())
    emb = np.concatenate(chunks) if chunks else np.zeros((0, model.config.text_config.hidden_size), np.float32)
    emb_path = os.path.join(embed_out_dir, "emb", f"{name}.npy")
    if world_size > 1:
        np.save(f"{emb_path}.rank{rank}.npy", emb)
        dist.barrier()
    if rank == 0:
        if world_size > 1:
            shards = [np.load(f"{emb_path}.rank{r}.npy") for r in range(world_size)]
            emb = np.zeros((len(records), shards[0].shape[1]), np.float32)
            for r, shard in enumerate(shards):
                emb[r::world_size] = shard
                os.remove(f"{emb_path}.rank{r}.npy")
        common.atomic_write(emb_path, lambda fh: np.save(fh, emb), mode="wb")
        common.write_json(os.path.join(embed_out_dir, "emb", f"{name}.ids.json"), [r[id_key] for r in records])
    if world_size > 1:
        dist.barrier()


def main():
    rank, local_rank, world_size, device = common.dist_setup()
    common.seed_everything(seed + rank)
    instructions = common.read_json(common.resolve_path(instructions_file, data_root)) if instructions_file else {}
    os.makedirs(os.path.join(embed_out_dir, "emb"), exist_ok=True)
    model, processor = build_embedder(device, common.torch_dtype(dtype))
    items = Items(instructions, processor.image_processor.patch_size * processor.image_processor.merge_size)
    print0(f"embedder: {embed_init_from} ({common.count_params(model) / 1e6:.2f}M params) on {device}, world {world_size}")
    if embed_train_steps > 0:  # the toy embedder, or fine-tuning a real one on one process
        if world_size > 1:
            raise SystemExit("embed.py trains on one process; run training without torchrun, then encode with it")
        train_embedder(model, processor, items, device)
    model.eval()
    files = lambda s: [f for f in s.split(",") if f]  # noqa: E731
    for f, kind in [(f, "query") for f in files(query_files)] + [(f, "pool") for f in files(pool_files)]:
        encode_file(model, processor, items, f, kind, rank, world_size, device)
    print0(f"wrote embeddings to {embed_out_dir}/emb")
    common.dist_cleanup()


print0 = common.print0

if __name__ == "__main__":
    configure(globals())
    main()
