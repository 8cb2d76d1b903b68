"""Mixed precision as FSDP2 does it (fp32 master weights and AdamW state, bf16 compute, fp32 gradient
reduction), in one process as a 1-rank group; and chunked log-probs against the full (L, V) computation."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import common
from sft import token_loss_sum

SMALL = dict(n_layer=2, n_embd=64, n_head=2, n_kv_head=1, vision_depth=1, vision_hidden=32)


def text_batch(tokenizer, n=4, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, len(tokenizer) - 30, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}


def train_steps(model, batch, steps, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss, n = token_loss_sum(model, batch, "cpu", chunk=16)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def trained_weights(model):
    """The language model's trained weights as fp32 (full, unsharded) tensors by name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.float().clone() for k, v in state.items() if "visual" not in k}


def test_bf16_mixed_precision_moves_every_weight_at_lr_1e6_and_tracks_fp32(tokenizer):
    """At lr 1e-6, 10 AdamW steps: pure bf16 weights lose most updates to rounding; fp32 masters with bf16
    compute keep them (>= 90% of elements move) and follow the fp32 run's updates."""
    batch = text_batch(tokenizer)
    runs = {}
    for name in ("fp32", "mixed", "pure_bf16"):
        model = common.build_tiny_model("qwen2_5_vl", tokenizer, seed=0, **SMALL)
        model.model.visual.requires_grad_(False)
        if name == "pure_bf16":
            model = model.to(torch.bfloat16)
        if name == "mixed":
            model = checkpoint.shard(model, 1, torch.bfloat16)  # a 1-rank group: fp32 params, bf16 compute
        before = trained_weights(model)
        train_steps(model, batch, 10, 1e-6)
        after = trained_weights(model)
        runs[name] = torch.cat([(after[k] - before[k]).flatten() for k in sorted(before)])
    if dist.is_initialized():
        dist.destroy_process_group()
    trained = runs["fp32"] != 0  # the elements a gradient reached (embedding rows of unseen tokens get none)
    moved = {name: (delta[trained] != 0).float().mean().item() for name, delta in runs.items()}
    assert trained.float().mean() > 0.5 and moved["mixed"] >= 0.9
    assert moved["pure_bf16"] < 0.5  # why masters matter: most bf16 elements cannot take a 1e-6 step
    mixed, fp32 = runs["mixed"], runs["fp32"]
    assert F.cosine_similarity(mixed, fp32, dim=0) > 0.95  # the same updates, to bf16 compute noise
    assert abs(mixed.norm() / fp32.norm() - 1) < 0.1


def test_chunked_logprobs_equal_the_full_computation(tokenizer):
    """Values and gradients of common.token_logprobs in chunks of 7 positions against a log_softmax over the
    model's full (B, L, V) logits, at temperature 1 and 0.7."""
    model = common.build_tiny_model("qwen2_5_vl", tokenizer, seed=0, **SMALL)
    batch = text_batch(tokenizer, n=2, length=30)
    targets = batch["input_ids"][:, 1:]
    for temperature in (1.0, 0.7):
        model.zero_grad(set_to_none=True)
        chunked = common.token_logprobs(model, batch, "cpu", temperature, chunk=7)
        chunked.sum().backward()
        grads_chunked = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        logits = model(**common.model_inputs(batch, "cpu")).logits[:, :-1].float() / temperature
        full = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
        full.sum().backward()
        assert (chunked - full).abs().max() < 1e-6
        diffs = {n: (grads_chunked[n] - p.grad).abs().max().item() for n, p in model.named_parameters() if p.grad is not None}
        assert grads_chunked.keys() == diffs.keys() and max(diffs.values()) < 1e-5, diffs
    loss, n = token_loss_sum(model, batch, "cpu", chunk=5)  # SFT's loss: the summed cross-entropy
    logits = model(**common.model_inputs(batch, "cpu")).logits[:, :-1]
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    assert abs(loss.item() - reference.item()) < 1e-3 and int(n) == targets.numel()
