"""
Supervised fine-tuning on ShareGPT records (the released V-Retrver SFT format, LLaMA-Factory style):
{"conversations": [{"from": "system"|"human"|"gpt", "value": "...<image>..."}], "images": [paths]}.
The loss is on gpt turns only (their text and the <|im_end|> that closes them); system, human and tool
observation turns are context. rsft.py trains through the same train() below: one trainer, not two.
The defaults are the release's 7B SFT (docs/spec.md §6); config/toy.py is the toy.

    torchrun --nproc_per_node=8 sft.py --init_from=checkpoints/Qwen2.5-VL-7B-Instruct --data_root=data/vretrver --sft_data=sft.json
    python sft.py config/toy.py --init_from=out/toy/base/model --sft_data=sft/cold_start.jsonl --out_dir=out/toy/sft
    python sft.py config/toy.py --init_from=scratch --sft_data=sft/warmup_compare.jsonl --out_dir=out/toy/drills

Images are shown at the resolution the policy sees them: a record's "image_sizes" (one [w, h] per image)
when present, else images of the first human turn (query and candidates) at the prompt resolution and
images of later human turns (tool observations) at the tool resolution. Under torchrun the policy is
sharded with FSDP2 (gloo on CPU, nccl on GPU); a micro-batch without images gets a dummy image (no
loss) so that ranks never differ in modality (docs/spec.md §8). Checkpoints are Hugging Face directories
written by rank 0 ({out_dir}/model) with the optimizer state beside them; a rerun resumes from there.
"""

import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import checkpoint
import common
from configurator import configure

# -----------------------------------------------------------------------------
data_root = "data/vretrver"  # image paths (and sft_data) are relative to it
sft_data = "sft.json"      # comma-separated ShareGPT .json (a list) or .jsonl files
init_from = "checkpoints/Qwen2.5-VL-7B-Instruct"  # a local Hugging Face directory, or 'scratch' (a tiny model of `arch`)
vision_from = ""           # optional checkpoint whose vision tower (and projector) replaces init_from's
arch = "qwen2_5_vl"        # scratch only: qwen2_vl | qwen2_5_vl | qwen3_vl
tokenizer_dir = ""         # scratch only: a local tokenizer directory
n_layer = 4                # scratch only: the tiny policy's LLM ...
n_embd = 128
n_head = 4
n_kv_head = 2
vision_depth = 2           # ... and vision tower
vision_hidden = 64
out_dir = "out/mbeir/sft"  # model/ (HF format) and the trainer state go here
prompt_min_pixels = 3136   # images of the first human turn (query, candidates) ...
prompt_max_pixels = 2000000  # (the release trains on images of up to 2M pixels)
tool_min_pixels = 3136     # ... and of later human turns (tool observations)
tool_max_pixels = 2000000
max_length = 32768         # longer records are skipped (and counted), never truncated through an image
epochs = 2.0
batch_size = 1             # records per micro-batch (length-bucketed)
grad_accum = 8             # micro-batches per rank per optimizer step: global batch 64 on 8 GPUs
learning_rate = 1e-5
min_lr_frac = 0.0          # cosine decays to learning_rate * min_lr_frac
warmup_frac = 0.1
weight_decay = 0.0
grad_clip = 1.0
stop_loss = 0.0            # stop early once the mean loss of the last 25 steps is below this (0 = never)
freeze_vision = True       # vision tower and projector frozen (the release's setting)
vision_lr_mult = 1.0       # when trained: the vision tower's lr multiplier (a from-scratch tower learns slowly)
grad_checkpointing = True
logprob_chunk = 1024       # positions whose (chunk, vocab) logits exist at once in the loss (docs/spec.md §11)
dtype = "bfloat16"         # bfloat16 | float32 (the toy, CPU)
log_every = 10
save_every = 500           # also checkpoint every N steps (0 = only at the end)
resume = True              # continue from {out_dir}/model if a trainer state is there
seed = 1337
# -----------------------------------------------------------------------------

ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
# the settings train() reads: sft.py passes its own, rsft.py its own (the same names)
TRAIN_KEYS = ("epochs", "batch_size", "grad_accum", "learning_rate", "min_lr_frac", "warmup_frac", "weight_decay",
              "grad_clip", "stop_loss", "freeze_vision", "vision_lr_mult", "grad_checkpointing", "log_every",
              "save_every", "resume", "seed", "logprob_chunk", "dtype")


def load_records(paths, root):
    """ShareGPT records from .json (a list) or .jsonl files; errors name the file and record."""
    records, checked = [], set()  # checked: image paths already opened (candidates recur across records)
    for path in [p for p in paths.split(",") if p]:
        path = common.resolve_path(path, root)
        items = common.read_json(path) if path.endswith(".json") else common.read_jsonl(path)
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(items).__name__}")
        for i, rec in enumerate(items):
            where = f"{path}: record {i}"
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            if not isinstance(rec.get("conversations"), list) or not rec["conversations"]:
                raise ValueError(f"{where}: needs a non-empty 'conversations' list")
            for j, t in enumerate(rec["conversations"]):
                if not isinstance(t, dict) or not isinstance(t.get("value"), str):
                    got = type(t.get("value") if isinstance(t, dict) else t).__name__
                    raise ValueError(f"{where}: turn {j} needs a string 'value' (got {got})")
            images = rec.get("images", [])
            if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                raise ValueError(f"{where}: 'images' must be a list of paths")
            n_placeholders = sum(t["value"].count("<image>") for t in rec["conversations"])
            if n_placeholders != len(images):
                raise ValueError(f"{where}: {n_placeholders} <image> placeholders but {len(images)} images")
            bad = [t.get("from") for t in rec["conversations"] if t.get("from") not in ROLES]
            if bad:
                raise ValueError(f"{where}: unknown role {bad[0]!r} (expected system, human or gpt)")
            for p in images:  # open each image once now: a bad file fails here, not hours into training
                full = common.resolve_path(p, root)
                if full in checked:
                    continue
                if not os.path.exists(full):
                    raise FileNotFoundError(f"{where}: missing image {p}")
                try:
                    common.check_image(full)
                except common.ImageError as e:
                    raise common.ImageError(f"{where}: {e}") from None
                checked.add(full)
            records.append(rec)
    return records


def image_views(record, factor, root, prompt_pixels, tool_pixels):
    """(path, (w, h)) per image, in <image> order: the size each image is shown at. prompt_pixels and
    tool_pixels are (min, max) pixel areas for images before and after the first gpt turn."""
    views, k, seen_gpt = [], 0, False
    sizes = record.get("image_sizes")
    for turn in record["conversations"]:
        for _ in range(turn["value"].count("<image>")):
            path = common.resolve_path(record["images"][k], root)
            if sizes:
                w, h = sizes[k]
            else:
                lo, hi = tool_pixels if seen_gpt else prompt_pixels
                with Image.open(path) as img:
                    h, w = common.smart_size(img.height, img.width, factor, lo, hi)
            if w % factor or h % factor:
                raise ValueError(f"record image {record['images'][k]}: size {w}x{h} is not a multiple of {factor}")
            views.append((path, (w, h)))
            k += 1
        seen_gpt = seen_gpt or turn["from"] == "gpt"
    return views


def render(record, processor, root, prompt_pixels, tool_pixels):
    """Token ids and loss mask of a record, turn by turn; mask 1 on gpt text and its closing <|im_end|>."""
    tok = processor.tokenizer
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    views = image_views(record, factor, root, prompt_pixels, tool_pixels)
    ids, mask, k = [], [], 0
    for turn in record["conversations"]:
        pieces = turn["value"].split("<image>")
        body = pieces[0]
        for piece, (_, (w, h)) in zip(pieces[1:], views[k:]):  # one pad token per 2x2 merged patch
            body += "<|vision_start|>" + "<|image_pad|>" * (w * h // factor ** 2) + "<|vision_end|>" + piece
        body += "<|im_end|>"
        k += len(pieces) - 1
        header = tok(f"<|im_start|>{ROLES[turn['from']]}\n", add_special_tokens=False)["input_ids"]
        body_ids = tok(body, add_special_tokens=False)["input_ids"]
        newline = tok("\n", add_special_tokens=False)["input_ids"]
        ids += header + body_ids + newline
        mask += [0] * len(header) + [int(turn["from"] == "gpt")] * len(body_ids) + [0] * len(newline)
    return {"input_ids": ids, "loss_mask": mask, "images": views}


def token_loss_sum(model, batch, device, chunk=1024):
    """Summed cross-entropy over loss-mask tokens, and their count: minus the log-probs of the targets where
    the mask is 1, computed in chunks of positions (common.token_logprobs) so no (L, V) logits exist."""
    logp = common.token_logprobs(model, batch, device, chunk=chunk)  # (B, L-1) predicts tokens 1..L-1
    mask = batch["loss_mask"][:, 1:].to(device) == 1
    return -(logp * mask).sum(), mask.sum()


def build_model(start_from, device, torch_dtype):
    """The policy and its processor: a tiny model of `arch` ('scratch') or a local checkpoint."""
    pixels = min(prompt_min_pixels, tool_min_pixels), max(prompt_max_pixels, tool_max_pixels)
    if start_from == "scratch":
        from transformers import AutoTokenizer
        if not os.path.isdir(tokenizer_dir):
            raise FileNotFoundError(f"tokenizer_dir={tokenizer_dir!r}: a scratch model needs a local tokenizer directory")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = common.build_tiny_model(arch, tokenizer, seed=seed, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                        n_kv_head=n_kv_head, vision_depth=vision_depth, vision_hidden=vision_hidden)
        processor = common.make_processor(tokenizer, common.ARCHS[arch][2], *pixels, arch=arch)
        return model.to(device=device, dtype=torch_dtype), processor
    return common.load_model(start_from, dtype=torch_dtype, device=device), common.load_processor(start_from, *pixels)


def take_vision_tower(model, donor_path, device, torch_dtype):
    """Replace the model's vision tower and projector with another checkpoint's. The toy trains its tower
    (data/toy/vision_pretrain.py) and its language model's first skill (the verdict drills, text only) side
    by side, each from the same scratch model; here the two meet."""
    donor = common.load_model(donor_path, dtype=torch_dtype, device=device)
    model.model.visual.load_state_dict(donor.model.visual.state_dict())
    print0(f"vision tower and projector from {donor_path}")


def load_examples(processor):
    """Rendered training examples (ids, loss mask, image views); records over max_length are skipped."""
    records = load_records(sft_data, data_root)
    examples = [render(r, processor, data_root, (prompt_min_pixels, prompt_max_pixels), (tool_min_pixels, tool_max_pixels))
                for r in records]
    kept = [ex for ex in examples if len(ex["input_ids"]) <= max_length]
    if len(kept) < len(examples):
        print0(f"skipped {len(examples) - len(kept)} records longer than max_length={max_length}")
    return kept


def train(model, processor, examples, out_path, cfg, rank, world_size, device):
    """The training loop shared by sft.py and rsft.py; cfg holds the TRAIN_KEYS settings. Returns the losses."""
    if cfg["freeze_vision"]:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    if cfg["grad_checkpointing"]:
        model.gradient_checkpointing_enable()
    compute_dtype = common.torch_dtype(cfg["dtype"])  # the masters stay fp32: checkpoint.shard
    model = checkpoint.shard(model, world_size, compute_dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    vision = {id(p) for p in model.model.visual.parameters()}
    optimizer = torch.optim.AdamW([{"params": [p for p in params if id(p) not in vision], "lr_mult": 1.0},
                                   {"params": [p for p in params if id(p) in vision], "lr_mult": cfg["vision_lr_mult"]}],
                                  lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"])
    # length-bucketed micro-batches: sort by length, cut into batches, shuffle the batches every epoch
    by_length = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    micro = [by_length[i:i + cfg["batch_size"]] for i in range(0, len(by_length), cfg["batch_size"])]
    per_step = world_size * cfg["grad_accum"]  # micro-batches per optimizer step, over all ranks
    steps_per_epoch = len(micro) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(examples)} examples make {len(micro)} micro-batches, fewer than one step needs ({per_step})")
    total_steps = max(1, int(cfg["epochs"] * steps_per_epoch))
    warmup = max(1, int(cfg["warmup_frac"] * total_steps))
    start, stopped_at, recent = 0, None, []  # recent: the losses before a resume, for stop_loss's window
    if cfg["resume"] and checkpoint.read_trainer_state(out_path):
        state = checkpoint.load_trainer_state(model, optimizer, out_path)
        start, stopped_at, recent = state["step"], state.get("stopped_at"), state.get("recent_losses", [])
        print0(f"resuming from step {start} of {total_steps}")
    image_token_id = model.config.image_token_id
    pad_id = processor.tokenizer.pad_token_id
    print0(f"{len(examples)} examples, {total_steps} steps of {per_step} micro-batches x {cfg['batch_size']} records")
    losses, t0 = [], time.time()
    for step in range(start, total_steps):
        epoch, k = divmod(step, steps_per_epoch)
        order = np.random.default_rng(cfg["seed"] + epoch).permutation(len(micro))
        batch_ids = [micro[i] for i in order[k * per_step:(k + 1) * per_step]]
        mine = batch_ids[rank::world_size]  # this rank's grad_accum micro-batches
        batches = [common.collate([examples[i] for i in b], processor, image_token_id, pad_id) for b in mine]
        # token-mean over the global batch: count the loss tokens of every rank first
        n_tokens = torch.tensor(sum(int(b["loss_mask"][:, 1:].sum()) for b in batches), device=device)
        if world_size > 1:
            dist.all_reduce(n_tokens)
        lr = cfg["learning_rate"] * (step + 1) / warmup if step < warmup else cfg["learning_rate"] * (
            cfg["min_lr_frac"] + (1 - cfg["min_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup))))
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        step_loss = 0.0
        for b in batches:
            loss_sum, _ = token_loss_sum(model, b, device, cfg["logprob_chunk"])
            # FSDP averages gradients over ranks, so scale by world_size to get the global token mean
            (loss_sum * world_size / n_tokens.clamp(min=1)).backward()
            step_loss += loss_sum.item()
        if world_size > 1:
            total = torch.tensor(step_loss, device=device)
            dist.all_reduce(total)
            step_loss = total.item()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss / max(1, n_tokens.item()))
        # the loss is global (all-reduced), so every rank stops at the same step
        window = (recent + losses)[-25:]
        stop = cfg["stop_loss"] > 0 and len(window) >= 25 and sum(window) / 25 < cfg["stop_loss"]
        if step % cfg["log_every"] == 0 or step == total_steps - 1 or stop:
            print0(f"step {step:5d}/{total_steps} | loss {losses[-1]:.4f} | grad norm {float(norm):.3f} | "
                   f"lr {lr:.2e} | {time.time() - t0:.0f}s")
        if stop:
            print0(f"mean loss of the last 25 steps {sum(window) / 25:.4f} < stop_loss={cfg['stop_loss']}: "
                   f"stopped after step {step + 1} of {total_steps}")
            stopped_at = step + 1
            break
        if cfg["save_every"] and (step + 1) % cfg["save_every"] == 0 and step + 1 < total_steps:
            checkpoint.save_checkpoint(model, processor, optimizer, step + 1, out_path, world_size, compute_dtype,
                                   {"recent_losses": (recent + losses)[-25:]})
    # an early stop is saved as the whole run done (a rerun resumes to nothing), with where it stopped beside it
    checkpoint.save_checkpoint(model, processor, optimizer, total_steps, out_path, world_size, compute_dtype,
                           {"stopped_at": stopped_at, "recent_losses": (recent + losses)[-25:]})
    print0(f"saved {out_path}")
    return losses


def main():
    rank, local_rank, world_size, device = common.dist_setup()
    common.seed_everything(seed)
    common.torch_dtype(dtype)  # a bad dtype is an error before anything loads
    model_path = os.path.join(out_dir, "model")
    resuming = resume and checkpoint.read_trainer_state(model_path) is not None
    # training keeps fp32 master weights whatever dtype computes (checkpoint.shard); checkpoints are saved in dtype
    model, processor = build_model(model_path if resuming else init_from, device, torch.float32)
    if vision_from and not resuming:  # on resume the checkpoint already holds the tower
        take_vision_tower(model, vision_from, device, torch.float32)
    examples = load_examples(processor)
    print0(f"{len(examples)} records, mean {np.mean([len(e['input_ids']) for e in examples]):.0f} tokens, "
           f"{np.mean([sum(e['loss_mask']) for e in examples]):.0f} trained; model {common.count_params(model) / 1e6:.2f}M")
    train(model, processor, examples, model_path, {k: globals()[k] for k in TRAIN_KEYS}, rank, world_size, device)
    common.dist_cleanup()


print0 = common.print0

if __name__ == "__main__":
    configure(globals())
    main()
