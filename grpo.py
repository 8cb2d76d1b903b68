"""
GRPO for the agentic reranker, written out by hand: sample G trajectories per prompt with engine.py's
engine (tools live, one shared prefill per group), score them with the evidence-aligned reward, turn the
rewards into group advantages, and take a clipped policy-gradient step on the policy's own tokens.

    python grpo.py config/toy.py --policy=out/toy/rsft/model --out_dir=out/toy/grpo
    python grpo.py config/toy.py --policy=out/toy/sft_notool/model --use_tools=False --out_dir=out/toy/grpo_notool
    torchrun --nproc_per_node=8 grpo.py config/grpo_7b.py --policy=/ckpt/V-Retrver-7B-RSFT --data_root=/data/mbeir

One step: each rank takes its share of prompts_per_step prompts (groups stay whole on a rank), samples
group_size trajectories per prompt, computes rewards (on the policy's own text only: the turns it wrote,
never the observations) and advantages A = (R - mean_group) / (std_group + eps). Then one training
forward per micro-batch over each full interleaved sequence (prompt images, tool images, positions as in
generation) gives the log-probs of the sampled tokens; the loss mask from the rollout (1 = sampled)
keeps prompt and observation tokens out. Loss per token: -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A)
(dual clip for A < 0), plus beta * k3 KL to a frozen reference when beta > 0 (else no reference model
is loaded), aggregated as a token mean over the global batch (or sequence mean, or Dr.GRPO's constant).
With ppo_epochs = 1 the ratio is 1 (logp_old = logp.detach()); with more, logp_old is recorded before the
first update and clipping matters. Under torchrun the policy is sharded with FSDP2; generation gathers the
weights once (engine.unsharded), so ranks that generate different lengths never meet in a collective.
"""

import math
import os
import re
import time

import numpy as np
import torch
import torch.distributed as dist

import common
import rollout
from engine import Engine, parse_answer, unsharded
import sft
from configurator import configure

# -----------------------------------------------------------------------------
data_root = "data/toy"
query_files = "query/train/mbeir_toyt2i_task0_train.jsonl,query/train/mbeir_toycir_task7_train.jsonl"
pool_files = "cand_pool/train/mbeir_toyt2i_task0_train_cand_pool.jsonl,cand_pool/train/mbeir_toycir_task7_train_cand_pool.jsonl"
instructions_file = "instructions.json"
ranked_in = "out/toy/ranked_train.jsonl"  # stage-0 ranking of the training queries: the prompt's candidates
policy = "out/toy/rsft/model"  # start from this checkpoint (local Hugging Face directory)
out_dir = "out/toy/grpo"   # model/ (HF format + trainer state) goes here
window = 5                 # candidates per prompt: the top of the stage-0 list
shuffle_window = True      # show them in a random order: stage 0 was trained on these queries, so its order would be a shortcut
reward = "paper"           # paper | release (REFERENCE §4)
use_tools = True           # False: the text-only ablation (no tools in the prompt, rollout or reward)
max_steps = 100
prompts_per_step = 16      # P, over all ranks (a multiple of the world size)
group_size = 8             # G trajectories per prompt
temperature = 1.0
top_p = 1.0
max_calls = 2
max_new_tokens = 256       # one assistant turn
max_response_tokens = 1024  # generated + observation tokens per trajectory (Dr.GRPO's L_max)
scale_std = True           # divide advantages by the group std (False: Dr.GRPO)
adv_eps = 1e-6
loss_agg = "token-mean"    # token-mean | seq-mean | dr-grpo
clip_eps_low = 0.2
clip_eps_high = 0.2
dual_clip = 3.0            # bound on -rho*A for A < 0 (0 = off)
beta = 0.0                 # k3 KL to the initial policy; 0 = no reference model at all
ppo_epochs = 1             # optimizer steps per rollout batch (1 = on-policy)
micro_batch_size = 8       # trajectories per training forward
learning_rate = 1e-6
warmup_steps = 10          # linear warm-up, then constant
weight_decay = 0.01
grad_clip = 1.0
freeze_vision = True
grad_checkpointing = False
prompt_min_pixels = 784
prompt_max_pixels = 784
tool_min_pixels = 3136
tool_max_pixels = 12544
dtype = "float32"          # float32 | bfloat16 (GPU)
log_every = 1
save_every = 0             # also checkpoint every N steps (0 = only at the end)
resume = True              # continue from {out_dir}/model if a trainer state is there
wandb_log = False          # log to wandb (must be installed); else a no-op stand-in
wandb_project = "nanoretrver"
seed = 1337
# -----------------------------------------------------------------------------

FORMAT = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)


# ---- reward: pure functions of the policy's text --------------------------------------------------
def format_reward(text):
    """0.5 for <think>...</think>...<answer>...</answer>, 0.5 more if the answer is a list of ints."""
    match = FORMAT.search(text)
    if not match:
        return 0.0
    return 0.5 + 0.5 * (parse_answer(text[text.find("</think>", match.start()):]) is not None)


def positive_rank(text, positive):
    """1-based position of the positive in the answer of text (first occurrence), or None."""
    answer = parse_answer(text[text.find("</think>"):]) if "</think>" in text else None
    return answer.index(positive) + 1 if answer and positive in answer else None


def rank_reward(k, cutoff=None):
    """exp(-(k-1)^2 / 2): 1, 0.61, 0.14, ... for k = 1, 2, 3; 0 if missing or k > cutoff."""
    if k is None or (cutoff is not None and k > cutoff):
        return 0.0
    return math.exp(-((k - 1) ** 2) / 2.0)


def group_rewards(final_texts, n_valid_calls, positive, variant="paper", tools_on=True):
    """Rewards of one group of G trajectories (final assistant text, valid tool calls) for one prompt."""
    ks = [positive_rank(t, positive) for t in final_texts]
    fmt = [format_reward(t) for t in final_texts]
    if variant == "paper":
        out = [0.2 * f + 0.8 * rank_reward(k, cutoff=5) for f, k in zip(fmt, ks)]
        if tools_on:
            out = [r + 0.2 * (k == 1 and n > 0) - 0.1 * max(0, n - 1) for r, k, n in zip(out, ks, n_valid_calls)]
        return out
    if variant != "release":
        raise ValueError(f"reward={variant!r}: expected 'paper' or 'release'")
    out = [0.3 * f + 0.7 * rank_reward(k) for f, k in zip(fmt, ks)]
    if tools_on:
        tool_rate = sum(n > 0 for n in n_valid_calls) / len(n_valid_calls)
        curiosity = 0.6 * (0.6 - tool_rate) if tool_rate < 0.6 else 0.0
        out = [r + (curiosity if n > 0 else 0.0) - (0.05 * (n - 1) if n > 1 else 0.0) for r, n in zip(out, n_valid_calls)]
        out = [min(1.5, max(-0.5, r)) for r in out]
    return out


# ---- advantages and loss ---------------------------------------------------------------------------
def group_advantages(rewards, scale=True, eps=1e-6):
    """rewards (P, G) -> advantages (P, G): minus the group mean, over the group std (unbiased) if scale."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    return centered / (rewards.std(dim=1, keepdim=True) + eps) if scale else centered


def token_losses(logp, logp_old, advantages, eps_low, eps_high, dual=0.0, logp_ref=None, kl_coef=0.0):
    """Per-token loss (B, T), k3 KL (B, T) and a clipped flag (B, T). logp*: (B, T), advantages: (B,)."""
    adv = advantages[:, None]
    ratio = torch.exp(logp - logp_old)
    unclipped, clipped = ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    if dual:  # a negative advantage with a huge ratio would otherwise give an unbounded loss
        loss = torch.where(adv < 0, torch.minimum(loss, -dual * adv), loss)
    was_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    kl = torch.zeros_like(logp)
    if logp_ref is not None:
        d = logp_ref - logp
        kl = torch.exp(d) - d - 1
        loss = loss + kl_coef * kl
    return loss, kl, was_clipped


def aggregate(loss, mask, how, n_tokens, n_seqs, max_len):
    """This rank's share of the global loss. n_tokens, n_seqs: totals over ALL ranks (global batch)."""
    mask = mask.to(loss.dtype)
    if how == "token-mean":
        return (loss * mask).sum() / max(1, n_tokens)
    if how == "seq-mean":
        return ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / max(1, n_seqs)
    if how == "dr-grpo":
        return (loss * mask).sum() / (n_seqs * max_len)
    raise ValueError(f"loss_agg={how!r}: expected token-mean, seq-mean or dr-grpo")


def sampled_logprobs(model, batch, device, temperature=1.0):
    """(B, L-1) log-prob of each next token under model (one forward over the full sequences), at the
    sampling temperature: the distribution the rollout drew from, so the ratio and gradient are on-policy."""
    inputs = common.model_inputs(batch, device)
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()  # (B, L-1, V)
    if temperature > 0:
        logits = logits / temperature
    targets = batch["input_ids"][:, 1:].to(device)
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)


def policy_update(model, optimizer, params, batches, advantages, n_seqs, world_size, device, reference=None):
    """ppo_epochs optimizer steps on one rollout batch. batches: this rank's collated micro-batches;
    advantages: (this rank's trajectories,) in batch order; n_seqs: trajectories over all ranks.
    Returns this rank's sums of (its share of the global loss, kl, clipped tokens, loss tokens) in the last epoch, and the grad norm."""
    n_tokens = torch.tensor(sum(int(b["loss_mask"][:, 1:].sum()) for b in batches), device=device)
    if world_size > 1:
        dist.all_reduce(n_tokens)  # the token mean is over the global batch
    adv_chunks = advantages.split([len(b["input_ids"]) for b in batches])
    logp_old, logp_ref = [None] * len(batches), [None] * len(batches)
    if ppo_epochs > 1 or reference is not None:  # recorded before the first update
        with torch.no_grad():
            for i, b in enumerate(batches):
                logp_old[i] = sampled_logprobs(model, b, device, temperature) if ppo_epochs > 1 else None
                logp_ref[i] = sampled_logprobs(reference, b, device, temperature) if reference is not None else None
    sums = torch.zeros(4, device=device)
    for epoch in range(ppo_epochs):
        sums.zero_()
        for i, (b, adv) in enumerate(zip(batches, adv_chunks)):
            logp = sampled_logprobs(model, b, device, temperature)  # (B, L-1)
            old = logp.detach() if logp_old[i] is None else logp_old[i]
            mask = b["loss_mask"][:, 1:].to(device)  # 1 = a token the policy sampled
            loss_tok, kl, clipped = token_losses(logp, old, adv.to(device), clip_eps_low, clip_eps_high,
                                                 dual_clip, logp_ref[i], beta)
            loss = aggregate(loss_tok, mask, loss_agg, int(n_tokens), n_seqs, max_response_tokens)
            (loss * world_size).backward()  # FSDP averages gradients over ranks: undo it for a global sum
            m = mask.float()
            sums += torch.stack([loss.detach(), (kl * m).sum().detach(), (clipped * m).sum(), m.sum()])
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sums, float(norm)


class NoWandb:
    def log(self, *args, **kwargs):
        pass


def main():
    rank, local_rank, world_size, device = common.dist_setup()
    common.seed_everything(seed)
    if reward not in ("paper", "release"):
        raise ValueError(f"reward={reward!r}: expected 'paper' or 'release'")
    if loss_agg not in ("token-mean", "seq-mean", "dr-grpo"):
        raise ValueError(f"loss_agg={loss_agg!r}: expected token-mean, seq-mean or dr-grpo")
    if prompts_per_step % world_size:
        raise ValueError(f"prompts_per_step={prompts_per_step} is not a multiple of the world size {world_size}")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    queries, pool, instructions = rollout.load_benchmark(data_root, query_files, pool_files, instructions_file)
    ranked = common.read_jsonl(ranked_in, required=("qid", "cands"))
    for r in ranked:
        if r["qid"] not in queries:
            raise ValueError(f"{ranked_in}: qid {r['qid']} is in none of the query files")
    model_path = os.path.join(out_dir, "model")
    state_path = os.path.join(model_path, "trainer_state.pt")
    start_from = model_path if resume and os.path.exists(state_path) else policy
    model = common.load_model(start_from, dtype=torch_dtype, device=device)
    processor = common.load_processor(start_from, min(prompt_min_pixels, tool_min_pixels), max(prompt_max_pixels, tool_max_pixels))
    reference = None
    if beta > 0:  # the initial policy, frozen
        reference = sft.shard(common.load_model(policy, dtype=torch_dtype, device=device).eval().requires_grad_(False), world_size)
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    if grad_checkpointing:
        model.gradient_checkpointing_enable()
    model = sft.shard(model, world_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    start = 0
    if os.path.exists(state_path) and start_from == model_path:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        state = torch.load(state_path, weights_only=False)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        start = state["step"]
        print0(f"resuming from step {start}")
    engine = Engine(model, processor, use_tools, max_calls, tool_min_pixels, tool_max_pixels)
    image_token_id, pad_id = model.config.image_token_id, processor.tokenizer.pad_token_id
    wandb = NoWandb()
    if wandb_log and rank == 0:
        import wandb as wandb_module
        wandb = wandb_module.init(project=wandb_project, config={k: v for k, v in globals().items() if k in CONFIG_KEYS})
    original = {}

    def load(rel):
        if rel not in original:
            original[rel] = common.load_image(common.resolve_path(rel, data_root))
        return original[rel]

    order = np.random.default_rng(seed).permutation(len(ranked))  # a fixed prompt stream: resumable
    per_rank = prompts_per_step // world_size
    print0(f"GRPO on {len(ranked)} training prompts: {max_steps} steps of {prompts_per_step} prompts x {group_size}, "
           f"reward {reward}, tools {'on' if use_tools else 'off'}, from {start_from}")
    t0 = time.time()
    for step in range(start, max_steps):
        # ---- rollouts: this rank's prompts, G samples each ----
        picked = [ranked[order[(step * prompts_per_step + j) % len(ranked)]] for j in range(prompts_per_step)]
        mine = picked[rank * per_rank:(rank + 1) * per_rank]
        prompts, positives = [], []
        for j, r in enumerate(mine):
            dids = rollout.window_order(r["cands"][:window], (seed, step, rank * per_rank + j)) if shuffle_window else r["cands"][:window]
            q, cands = queries[r["qid"]], [pool[d] for d in dids]
            prompts.append(rollout.window_prompt(q, cands, instructions, load, use_tools, prompt_min_pixels,
                                                 prompt_max_pixels, engine.factor))
            hits = [i + 1 for i, c in enumerate(cands) if c["did"] in q.get("pos_cand_list", [])]
            positives.append(hits[0] if hits else None)
        model.eval()
        with torch.no_grad():
            trajs = engine.generate(prompts, group_size, temperature, top_p, max_new_tokens, max_response_tokens,
                                    seed=seed + step * world_size + rank)
        rewards = torch.tensor([group_rewards([t["final_text"] for t in trajs[p * group_size:(p + 1) * group_size]],
                                              [t["n_valid_calls"] for t in trajs[p * group_size:(p + 1) * group_size]],
                                              positives[p], reward, use_tools) for p in range(len(prompts))])  # (P_rank, G)
        advantages = group_advantages(rewards, scale_std, adv_eps).flatten()  # (P_rank * G,) prompt-major
        examples = [{"input_ids": t["input_ids"], "loss_mask": t["loss_mask"], "images": t["images"]} for t in trajs]
        batches = [sft.collate(examples[i:i + micro_batch_size], processor, image_token_id, pad_id)
                   for i in range(0, len(examples), micro_batch_size)]
        lr = learning_rate * min(1.0, (step + 1) / max(1, warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        sums, norm = policy_update(model, optimizer, params, batches, advantages, prompts_per_step * group_size,
                                   world_size, device, reference)

        # ---- logging: totals over all ranks ----
        tops = [positive_rank(t["final_text"], positives[i // group_size]) == 1 for i, t in enumerate(trajs)]
        stats = torch.tensor([rewards.sum().item(), (rewards ** 2).sum().item(), rewards.numel(), sum(tops),
                              sum(t["n_valid_calls"] > 0 for t in trajs), sum(t["n_generated"] for t in trajs),
                              float((rewards.std(dim=1) < 1e-6).sum()), rewards.shape[0]], device=device, dtype=torch.float64)
        if world_size > 1:
            dist.all_reduce(stats)
            dist.all_reduce(sums)
        n = stats[2]
        mean = stats[0] / n
        log = {"step": step, "reward": mean.item(), "reward_std": (stats[1] / n - mean ** 2).clamp(min=0).sqrt().item(),
               "top1": (stats[3] / n).item(), "tool_rate": (stats[4] / n).item(), "response_len": (stats[5] / n).item(),
               "zero_std_groups": (stats[6] / stats[7]).item(), "loss": sums[0].item(),
               "kl": (sums[1] / sums[3].clamp(min=1)).item(), "clip_frac": (sums[2] / sums[3].clamp(min=1)).item(),
               "grad_norm": norm, "lr": lr}
        wandb.log(log)
        if step % log_every == 0 or step == max_steps - 1:
            print0(f"step {step:4d}/{max_steps} | reward {log['reward']:.3f} ± {log['reward_std']:.3f} | top1 {log['top1']:.3f} | "
                   f"tools {log['tool_rate']:.2f} | len {log['response_len']:.0f} | zero-std {log['zero_std_groups']:.2f} | "
                   f"kl {log['kl']:.4f} | clip {log['clip_frac']:.3f} | {time.time() - t0:.0f}s")
        if save_every and (step + 1) % save_every == 0 and step + 1 < max_steps:
            sft.save_checkpoint(model, processor, optimizer, step + 1, model_path, world_size)
    sft.save_checkpoint(model, processor, optimizer, max_steps, model_path, world_size)
    print0(f"saved {model_path}")
    common.dist_cleanup()


print0 = common.print0
CONFIG_KEYS = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]

if __name__ == "__main__":
    configure(globals())
    main()
