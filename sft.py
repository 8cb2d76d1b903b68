"""
Supervised fine-tuning on ShareGPT records (the released V-Retrver SFT format, LLaMA-Factory style):
{"conversations": [{"from": "system"|"human"|"gpt", "value": "...<image>..."}], "images": [paths]}.
The loss is on gpt turns only (their text and the <|im_end|> that closes them); system, human and tool
observation turns are context. rsft.py trains through the same train() below: one trainer, not two.

    python sft.py config/toy.py --init_from=scratch --sft_data=sft/warmup_compare.jsonl --out_dir=out/toy/drills
    python sft.py config/toy.py --init_from=out/toy/drills/model --vision_from=out/toy/vision --sft_data=sft/warmup.jsonl \
        --out_dir=out/toy/base
    python sft.py config/toy.py --init_from=out/toy/base/model --sft_data=sft/cold_start.jsonl --out_dir=out/toy/sft
    torchrun --nproc_per_node=8 sft.py --init_from=/ckpt/Qwen2.5-VL-7B-Instruct --data_root=/data/vretrver \\
        --sft_data=sft.json --dtype=bfloat16 --grad_checkpointing=True --prompt_max_pixels=2000000 ...

Images are shown at the resolution the policy sees them: a record's "image_sizes" (one [w, h] per image)
when present, else images of the first human turn (query and candidates) at the prompt resolution and
images of later human turns (tool observations) at the tool resolution. Under torchrun the policy is
sharded with FSDP2 (gloo on CPU, nccl on GPU); a micro-batch without images gets a dummy image (no
loss) so that ranks never differ in modality (REFERENCE §8). Checkpoints are Hugging Face directories
written by rank 0 ({out_dir}/model) with the optimizer state beside them; a rerun resumes from there.
"""

import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import common
from configurator import configure

# -----------------------------------------------------------------------------
data_root = "data/toy"     # image paths (and sft_data) are relative to it
sft_data = "sft/cold_start.jsonl"  # comma-separated ShareGPT .json (a list) or .jsonl files
init_from = "scratch"      # 'scratch' = a tiny model of `arch`; else a local Hugging Face directory
vision_from = ""           # optional checkpoint whose vision tower (and projector) replaces init_from's
arch = "qwen2_5_vl"        # scratch only: qwen2_vl | qwen2_5_vl | qwen3_vl
tokenizer_dir = "data/toy/tokenizer"  # scratch only
n_layer = 4                # scratch only: the policy's LLM ...
n_embd = 128
n_head = 4
n_kv_head = 2
vision_depth = 2           # ... and vision tower
vision_hidden = 64
out_dir = "out/toy/sft"    # model/ (HF format) and the trainer state go here
prompt_min_pixels = 784    # images of the first human turn (query, candidates) ...
prompt_max_pixels = 784
tool_min_pixels = 3136     # ... and of later human turns (tool observations)
tool_max_pixels = 12544
max_length = 4096          # longer records are skipped (and counted), never truncated through an image
epochs = 2.0
batch_size = 8             # records per micro-batch (length-bucketed)
grad_accum = 1             # micro-batches per rank per optimizer step
learning_rate = 1e-5
min_lr_frac = 0.0          # cosine decays to learning_rate * min_lr_frac
warmup_frac = 0.1
weight_decay = 0.0
grad_clip = 1.0
stop_loss = 0.0            # stop early once the mean loss of the last 25 steps is below this (0 = never)
freeze_vision = True       # vision tower and projector frozen (the release's setting)
vision_lr_mult = 1.0       # when trained: the vision tower's lr multiplier (a from-scratch tower learns slowly)
grad_checkpointing = False
dtype = "float32"          # float32 | bfloat16 (GPU)
log_every = 10
save_every = 0             # also checkpoint every N steps (0 = only at the end)
resume = True              # continue from {out_dir}/model if a trainer state is there
seed = 1337
# -----------------------------------------------------------------------------

ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def load_records(paths, root):
    """ShareGPT records from .json (a list) or .jsonl files; errors name the file and record."""
    records = []
    for path in [p for p in paths.split(",") if p]:
        path = common.resolve_path(path, root)
        items = common.read_json(path) if path.endswith(".json") else common.read_jsonl(path)
        for i, rec in enumerate(items):
            where = f"{path}: record {i}"
            if not isinstance(rec.get("conversations"), list) or not rec["conversations"]:
                raise ValueError(f"{where}: needs a non-empty 'conversations' list")
            n_placeholders = sum(t.get("value", "").count("<image>") for t in rec["conversations"])
            if n_placeholders != len(rec.get("images", [])):
                raise ValueError(f"{where}: {n_placeholders} <image> placeholders but {len(rec.get('images', []))} images")
            bad = [t.get("from") for t in rec["conversations"] if t.get("from") not in ROLES]
            if bad:
                raise ValueError(f"{where}: unknown role {bad[0]!r} (expected system, human or gpt)")
            missing = [p for p in rec.get("images", []) if not os.path.exists(common.resolve_path(p, root))]
            if missing:
                raise FileNotFoundError(f"{where}: missing image {missing[0]}")
            records.append(rec)
    return records


def image_views(record, factor):
    """(path, (w, h)) per image, in <image> order: the size each image is shown at."""
    views, k, seen_gpt = [], 0, False
    sizes = record.get("image_sizes")
    for turn in record["conversations"]:
        for _ in range(turn["value"].count("<image>")):
            path = common.resolve_path(record["images"][k], data_root)
            if sizes:
                w, h = sizes[k]
            else:
                lo, hi = (tool_min_pixels, tool_max_pixels) if seen_gpt else (prompt_min_pixels, prompt_max_pixels)
                with Image.open(path) as img:
                    h, w = common.smart_size(img.height, img.width, factor, lo, hi)
            if w % factor or h % factor:
                raise ValueError(f"record image {record['images'][k]}: size {w}x{h} is not a multiple of {factor}")
            views.append((path, (w, h)))
            k += 1
        seen_gpt = seen_gpt or turn["from"] == "gpt"
    return views


def render(record, processor):
    """Token ids and loss mask of a record, turn by turn; mask 1 on gpt text and its closing <|im_end|>."""
    tok = processor.tokenizer
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    views = image_views(record, factor)
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


def collate(examples, processor, image_token_id, pad_id):
    """Right-padded batch with pixel values; a batch without images gets a dummy one (mask 0). An example's
    images are (path, (w, h)) views (render) or images already at their size (grpo.py's trajectories)."""
    views = [v for ex in examples for v in ex["images"]]
    ids = [list(ex["input_ids"]) for ex in examples]
    masks = [list(ex["loss_mask"]) for ex in examples]
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    images = [v if isinstance(v, Image.Image) else load_view(*v) for v in views]
    if not images:  # FSDP: every rank must run the vision tower in every step (REFERENCE §8)
        images = [Image.new("RGB", (factor, factor))]
        dummy = processor.tokenizer("<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False)["input_ids"]  # 1 token
        ids[0] += dummy
        masks[0] += [0] * len(dummy)
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(ids), width, dtype=torch.long)
    loss_mask = torch.zeros(len(ids), width, dtype=torch.long)
    for b, (x, m) in enumerate(zip(ids, masks)):
        input_ids[b, :len(x)] = torch.tensor(x)
        attn[b, :len(x)] = 1
        loss_mask[b, :len(m)] = torch.tensor(m)
    pixels = processor.image_processor(images=images, return_tensors="pt")
    return {"input_ids": input_ids, "attention_mask": attn, "loss_mask": loss_mask,
            "mm_token_type_ids": (input_ids == image_token_id).long(),
            "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}


def load_view(path, size):
    img = common.load_image(path)
    return img if img.size == tuple(size) else img.resize(tuple(size), Image.BICUBIC)


def token_loss_sum(model, batch, device):
    """Summed cross-entropy over loss-mask tokens, and their count. Targets where mask is 0 are ignored."""
    inputs = common.model_inputs(batch, device)
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()  # (B, L-1, V) predicts tokens 1..L-1
    targets = batch["input_ids"][:, 1:].to(device).masked_fill(batch["loss_mask"][:, 1:].to(device) == 0, -100)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()


def build_model(device, torch_dtype):
    if init_from == "scratch":
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = common.build_tiny_model(arch, tokenizer, seed=seed, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                        n_kv_head=n_kv_head, vision_depth=vision_depth, vision_hidden=vision_hidden)
        patch = common.ARCHS[arch][2]
        processor = common.make_processor(tokenizer, patch, min(prompt_min_pixels, tool_min_pixels),
                                          max(prompt_max_pixels, tool_max_pixels))
        return model.to(device=device, dtype=torch_dtype), processor
    processor = common.load_processor(init_from, min(prompt_min_pixels, tool_min_pixels), max(prompt_max_pixels, tool_max_pixels))
    return common.load_model(init_from, dtype=torch_dtype, device=device), processor


def shard(model, world_size):
    """FSDP2 under torchrun: the vision tower, each decoder layer, then the root; one process keeps the plain model."""
    if world_size == 1:
        return model
    from torch.distributed.fsdp import fully_shard
    fully_shard(model.model.visual)  # its own unit: a frozen tower never shares a parameter group with trained weights
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def save_checkpoint(model, processor, optimizer, step, path, world_size, stopped_at=None):
    """HF-format model (full state dict) and the optimizer state, written by rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if common.is_rank0():
        model.save_pretrained(path, state_dict=model_state)
        processor.save_pretrained(path)
        common.atomic_write(os.path.join(path, "trainer_state.pt"), lambda f: torch.save(
            {"step": step, "stopped_at": stopped_at, "optimizer": optim_state}, f), mode="wb")
    if world_size > 1:
        dist.barrier()


def train(model, processor, examples, out_path, rank, world_size, device):
    """The training loop shared by sft.py and rsft.py; returns the losses logged."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if freeze_vision:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    if grad_checkpointing:
        model.gradient_checkpointing_enable()
    model = shard(model, world_size)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    vision = {id(p) for p in model.model.visual.parameters()}
    optimizer = torch.optim.AdamW([{"params": [p for p in params if id(p) not in vision], "lr_mult": 1.0},
                                   {"params": [p for p in params if id(p) in vision], "lr_mult": vision_lr_mult}],
                                  lr=learning_rate, weight_decay=weight_decay)
    # length-bucketed micro-batches: sort by length, cut into batches, shuffle the batches every epoch
    by_length = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    micro = [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    per_step = world_size * grad_accum  # micro-batches per optimizer step, over all ranks
    steps_per_epoch = len(micro) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(examples)} examples make {len(micro)} micro-batches, fewer than one step needs ({per_step})")
    total_steps = max(1, int(epochs * steps_per_epoch))
    warmup = max(1, int(warmup_frac * total_steps))
    start, stopped_at = 0, None
    state_path = os.path.join(out_path, "trainer_state.pt")
    if resume and os.path.exists(state_path):
        state = torch.load(state_path, weights_only=False)
        set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        start, stopped_at = state["step"], state.get("stopped_at")
        print0(f"resuming from step {start} of {total_steps}")
    image_token_id = model.config.image_token_id
    pad_id = processor.tokenizer.pad_token_id
    print0(f"{len(examples)} examples, {total_steps} steps of {per_step} micro-batches x {batch_size} records")
    losses, t0 = [], time.time()
    for step in range(start, total_steps):
        epoch, k = divmod(step, steps_per_epoch)
        order = np.random.default_rng(seed + epoch).permutation(len(micro))
        batch_ids = [micro[i] for i in order[k * per_step:(k + 1) * per_step]]
        mine = batch_ids[rank::world_size]  # this rank's grad_accum micro-batches
        batches = [collate([examples[i] for i in b], processor, image_token_id, pad_id) for b in mine]
        # token-mean over the global batch: count the loss tokens of every rank first
        n_tokens = torch.tensor(sum(int(b["loss_mask"][:, 1:].sum()) for b in batches), device=device)
        if world_size > 1:
            dist.all_reduce(n_tokens)
        lr = learning_rate * (step + 1) / warmup if step < warmup else learning_rate * (
            min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup))))
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        step_loss = 0.0
        for b in batches:
            loss_sum, _ = token_loss_sum(model, b, device)
            # FSDP averages gradients over ranks, so scale by world_size to get the global token mean
            (loss_sum * world_size / n_tokens.clamp(min=1)).backward()
            step_loss += loss_sum.item()
        if world_size > 1:
            total = torch.tensor(step_loss, device=device)
            dist.all_reduce(total)
            step_loss = total.item()
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss / max(1, n_tokens.item()))
        # the loss is global (all-reduced), so every rank stops at the same step
        stop = stop_loss > 0 and len(losses) >= 25 and sum(losses[-25:]) / 25 < stop_loss
        if step % log_every == 0 or step == total_steps - 1 or stop:
            print0(f"step {step:5d}/{total_steps} | loss {losses[-1]:.4f} | grad norm {float(norm):.3f} | "
                   f"lr {lr:.2e} | {time.time() - t0:.0f}s")
        if stop:
            print0(f"mean loss of the last 25 steps {sum(losses[-25:]) / 25:.4f} < stop_loss={stop_loss}: "
                   f"stopped after step {step + 1} of {total_steps}")
            stopped_at = step + 1
            break
        if save_every and (step + 1) % save_every == 0 and step + 1 < total_steps:
            save_checkpoint(model, processor, optimizer, step + 1, out_path, world_size)
    # an early stop is saved as the whole run done (a rerun resumes to nothing), with where it stopped beside it
    save_checkpoint(model, processor, optimizer, total_steps, out_path, world_size, stopped_at)
    print0(f"saved {out_path}")
    return losses


def main():
    rank, local_rank, world_size, device = common.dist_setup()
    common.seed_everything(seed)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model_path = os.path.join(out_dir, "model")
    global init_from
    if resume and os.path.exists(os.path.join(model_path, "trainer_state.pt")):
        init_from = model_path  # continue from the last checkpoint
    model, processor = build_model(device, torch_dtype)
    if vision_from and init_from != model_path:  # not on resume: the checkpoint already holds the tower
        # the toy trains its tower (data/toy/vision_pretrain.py) and its language model's first skill (the
        # verdict drills, text only) side by side, each from the same scratch model; here the two meet
        donor = common.load_model(vision_from, dtype=torch_dtype, device=device)
        model.model.visual.load_state_dict(donor.model.visual.state_dict())
        print0(f"vision tower and projector from {vision_from}")
        del donor
    records = load_records(sft_data, data_root)
    examples = [render(r, processor) for r in records]
    kept = [ex for ex in examples if len(ex["input_ids"]) <= max_length]
    if len(kept) < len(examples):
        print0(f"skipped {len(examples) - len(kept)} records longer than max_length={max_length}")
    print0(f"{len(kept)} records, mean {np.mean([len(e['input_ids']) for e in kept]):.0f} tokens, "
           f"{np.mean([sum(e['loss_mask']) for e in kept]):.0f} trained; model {common.count_params(model) / 1e6:.2f}M")
    train(model, processor, kept, model_path, rank, world_size, device)
    common.dist_cleanup()


print0 = common.print0

if __name__ == "__main__":
    configure(globals())
    main()
