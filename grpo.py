"""
GRPO for the agentic reranker, written out by hand: sample G trajectories per prompt with engine.py's
engine (tools live, one shared prefill per group), score them with the evidence-aligned reward, turn the
rewards into group advantages, and take a clipped policy-gradient step on the policy's own tokens.

    torchrun --nproc_per_node=8 grpo.py config/grpo_7b.py --policy=out/mbeir/rsft/model
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$HEAD grpo.py config/grpo_7b.py ...
    python grpo.py config/toy.py --policy=out/toy/rsft/model --out_dir=out/toy/grpo --ranked_train=out/toy/ranked_train.jsonl
    python grpo.py config/toy.py --policy=out/toy/sft_notool/model --use_tools=False --out_dir=out/toy/grpo_notool ...

The defaults are the release's 7B run (docs/spec.md §5) on its RL prompts (data/vretrver/convert.py);
config/grpo_7b.py writes them out, config/toy.py is the toy.

Each step's log values (reward mean and std, top-1 rate, tool-call rate, zero-variance groups, loss, KL,
clip fraction, grad norm, lr) are printed and appended to {out_dir}/log.jsonl, the training curve.

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

import functools
import os
import time
import types

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import common
import task
from configurator import configure
from engine import Engine

# -----------------------------------------------------------------------------
data_root = "data/vretrver"  # image paths and the file lists below are relative to it
train_query_files = "query/rl_train.jsonl"  # the release's RL prompts as converted by data/vretrver/convert.py
train_pool_files = "cand_pool/rl_train_cand_pool.jsonl"
instructions_file = "instructions.json"
ranked_train = "data/vretrver/ranked/rl_train.jsonl"  # stage-0 ranking of the training queries: the prompt's candidates
exclude_queries_in = ""    # JSONL files under data_root (e.g. the cold-start SFT data) whose records' qids are never
                           # prompts: RL on the queries the SFT teacher left without a trajectory (the toy's, README)
policy = "out/mbeir/rsft/model"  # start from this checkpoint (local Hugging Face directory)
out_dir = "out/mbeir/grpo"  # model/ (HF format + trainer state) goes here
window = 20                # candidates per prompt: the top of the stage-0 list (the released RL data's windows)
shuffle_window = True      # show them in a random order: stage 0 was trained on these queries, so its order would be a shortcut
reward = "paper"           # paper | release (docs/spec.md §4)
use_tools = True           # False: the text-only ablation (no tools in the prompt, rollout or reward)
prompt_style = "release"  # release | release_500 | compact (the toy's): docs/spec.md §3, §10
max_steps = 500            # ~1 epoch over the release's RL prompts at 128 prompts per step
prompts_per_step = 128     # P, over all ranks (a multiple of the world size): 16 per GPU on 8
group_size = 8             # G trajectories per prompt
temperature = 1.0
top_p = 1.0
max_calls = 2
max_new_tokens = 4096      # one assistant turn
max_response_tokens = 12288  # generated + observation tokens per trajectory (Dr.GRPO's L_max)
scale_std = True           # divide advantages by the group std (False: Dr.GRPO)
adv_eps = 1e-6
loss_agg = "token-mean"    # token-mean | seq-mean | dr-grpo
clip_eps_low = 0.2
clip_eps_high = 0.2
dual_clip = 3.0            # bound on -rho*A for A < 0 (0 = off)
beta = 0.0                 # k3 KL to the initial policy; 0 = no reference model at all
ppo_epochs = 1             # optimizer steps per rollout batch (1 = on-policy)
micro_batch_size = 2       # trajectories per training forward
gen_kv_gib = 16.0          # KV cache per rank for one generation chunk (a step's groups are generated in chunks)
learning_rate = 1e-6
warmup_steps = 10          # linear warm-up, then constant
weight_decay = 0.01
grad_clip = 1.0
freeze_vision = True
grad_checkpointing = True
logprob_chunk = 1024       # positions whose (chunk, vocab) logits exist at once in the loss (docs/spec.md §11)
prompt_min_pixels = 3136   # candidate images in the prompt ...
prompt_max_pixels = 200704  # (448x448)
tool_min_pixels = 3136     # ... and images the tools return
tool_max_pixels = 2000000
dtype = "bfloat16"         # bfloat16 | float32 (the toy, CPU)
log_every = 1
eval_prompts = 0           # training queries (excluded or not) held out of the stream and reranked greedily every eval_every steps:
eval_every = 10            # the policy's greedy top-1 watched during training ({out_dir}/eval.jsonl; 0 prompts = off)
keep_best = True           # with eval_prompts: the weights of the best evaluation so far (top-1, then reward; the
                           # earliest on ties, the start policy included) also go to {out_dir}/best, in dtype
best_min_z = 0.0           # > 0: a new best only if task.paired_gain over the best exceeds this (a gain of a few
                           # held-out prompts is noise: docs/lab_notes.md); 0 = any higher top-1, then reward
save_every = 50            # also checkpoint every N steps (0 = only at the end)
resume = True              # continue from {out_dir}/model if a trainer state is there
wandb_log = False          # log to wandb (must be installed); else a no-op stand-in
wandb_project = "nanoretrver"
seed = 1337
# -----------------------------------------------------------------------------


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


# the settings the update reads, passed as one dict (grpo.py's own globals in main, a test's values in tests)
UPDATE_KEYS = ("ppo_epochs", "temperature", "clip_eps_low", "clip_eps_high", "dual_clip", "beta", "loss_agg",
               "max_response_tokens", "grad_clip", "logprob_chunk")


def policy_update(model, optimizer, params, batches, advantages, n_seqs, hp, world_size, device, reference=None):
    """hp["ppo_epochs"] optimizer steps on one rollout batch. batches: this rank's collated micro-batches;
    advantages: (this rank's trajectories,) in batch order; n_seqs: trajectories over all ranks; hp: the
    UPDATE_KEYS settings. Returns this rank's sums in the last epoch (its share of the global loss, kl, clipped
    tokens, loss tokens) and the grad norm."""
    n_tokens = torch.tensor(sum(int(b["loss_mask"][:, 1:].sum()) for b in batches), device=device)
    if world_size > 1:
        dist.all_reduce(n_tokens)  # the token mean is over the global batch
    adv_chunks = advantages.split([len(b["input_ids"]) for b in batches])
    epochs, temp = hp["ppo_epochs"], hp["temperature"]
    logp_old, logp_ref = [None] * len(batches), [None] * len(batches)
    if epochs > 1 or reference is not None:  # recorded before the first update
        with torch.no_grad():
            for i, b in enumerate(batches):
                logp_old[i] = common.token_logprobs(model, b, device, temp, hp['logprob_chunk']) if epochs > 1 else None
                logp_ref[i] = common.token_logprobs(reference, b, device, temp, hp['logprob_chunk']) if reference is not None else None
    sums = {}
    for epoch in range(epochs):
        sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "tokens": 0.0}
        for i, (b, adv) in enumerate(zip(batches, adv_chunks)):
            logp = common.token_logprobs(model, b, device, temp, hp['logprob_chunk'])  # (B, L-1)
            old = logp.detach() if logp_old[i] is None else logp_old[i]
            mask = b["loss_mask"][:, 1:].to(device)  # 1 = a token the policy sampled
            loss_tok, kl, clipped = token_losses(logp, old, adv.to(device), hp["clip_eps_low"], hp["clip_eps_high"],
                                                 hp["dual_clip"], logp_ref[i], hp["beta"])
            loss = aggregate(loss_tok, mask, hp["loss_agg"], int(n_tokens), n_seqs, hp["max_response_tokens"])
            (loss * world_size).backward()  # FSDP averages gradients over ranks: undo it for a global sum
            m = mask.float()
            sums["loss"] += loss.item()
            sums["kl"] += (kl * m).sum().item()
            sums["clipped"] += (clipped * m).sum().item()
            sums["tokens"] += m.sum().item()
        norm = torch.nn.utils.clip_grad_norm_(params, hp["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sums, float(norm)


def all_reduce_sums(sums, device, world_size):
    """Add a dict of per-rank sums over all ranks (in place), in one collective."""
    if world_size > 1:
        t = torch.tensor(list(sums.values()), device=device, dtype=torch.float64)
        dist.all_reduce(t)
        sums.update(zip(sums, t.tolist()))
    return sums


def check_settings(world_size):
    if reward not in ("paper", "release"):
        raise ValueError(f"reward={reward!r}: expected 'paper' or 'release'")
    if loss_agg not in ("token-mean", "seq-mean", "dr-grpo"):
        raise ValueError(f"loss_agg={loss_agg!r}: expected token-mean, seq-mean or dr-grpo")
    if prompts_per_step % world_size:
        raise ValueError(f"prompts_per_step={prompts_per_step} is not a multiple of the world size {world_size}")


def load_policy(start_from, device, compute_dtype, world_size):
    """The policy (fp32 master weights, sharded, computing in compute_dtype), its processor, the AdamW over its
    trained weights, and the frozen reference when beta > 0."""
    model = common.load_model(start_from, dtype=torch.float32, device=device)
    processor = common.load_processor(start_from, min(prompt_min_pixels, tool_min_pixels), max(prompt_max_pixels, tool_max_pixels))
    reference = None
    if beta > 0:  # the initial policy, frozen
        reference = common.load_model(policy, dtype=compute_dtype, device=device).eval().requires_grad_(False)
        reference = checkpoint.shard(reference, world_size, compute_dtype)
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    if grad_checkpointing:
        model.gradient_checkpointing_enable()
    model = checkpoint.shard(model, world_size, compute_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    return model, processor, optimizer, params, reference


def make_prompts(picked, keys, benchmark, load, factor):
    """The prompts of ranked records (window shuffled by key) and each one's positive position."""
    queries, pool, instructions = benchmark
    prompts, positives = [], []
    for r, key in zip(picked, keys):
        dids = task.window_order(r["cands"][:window], (seed, *key)) if shuffle_window else r["cands"][:window]
        q = queries[r["qid"]]
        prompts.append(task.window_prompt(q, [pool[d] for d in dids], instructions, load, use_tools, prompt_min_pixels,
                                          prompt_max_pixels, factor, max_calls, prompt_style))
        positives.append(task.positive_position(dids, q.get("pos_cand_list")))
        prompts[-1]["key"] = key  # samples keyed by step and prompt: any world size draws the same
    return prompts, positives


def step_prompts(ranked, order, step, rank, world_size, benchmark, load, factor):
    """This rank's prompts of one step (its share of prompts_per_step, groups whole) and each one's positive."""
    per_rank = prompts_per_step // world_size
    js = range(rank * per_rank, (rank + 1) * per_rank)
    picked = [ranked[order[(step * prompts_per_step + j) % len(order)]] for j in js]
    return make_prompts(picked, [(step, j) for j in js], benchmark, load, factor)


EVAL_KEY = 10 ** 9  # the held-out prompts' window orders: keys no training step uses


def greedy_eval(engine, held_out, rank, world_size, benchmark, load):
    """Greedy top-1 rate and mean reward of the policy on the held-out prompts (this rank's share, summed over
    ranks): what the policy being trained does at temperature 0, where evaluation happens."""
    js = range(rank, len(held_out), world_size)
    prompts, positives = make_prompts([held_out[j] for j in js], [(EVAL_KEY, j) for j in js], benchmark, load, engine.factor)
    trajs = engine.generate(prompts, 1, 0.0, 1.0, max_new_tokens, max_response_tokens, seed=seed)
    rewards = [task.group_rewards([t["final_text"]], [t["n_valid_calls"]], p, reward, use_tools)[0]
               for t, p in zip(trajs, positives)]
    hits = [0] * len(held_out)  # every held-out prompt's top-1 hit, 0 for other ranks' prompts (summed over ranks)
    for j, t, p in zip(js, trajs, positives):
        hits[j] = int(task.positive_rank(t["final_text"], p) == 1)
    return {"top1": sum(hits), "reward": sum(rewards), "n": len(trajs)}, hits


def score(trajs, positives):
    """Rewards (P, G) of this rank's groups, prompt-major, and the step's named sums for the log."""
    groups = [trajs[p * group_size:(p + 1) * group_size] for p in range(len(positives))]
    rewards = torch.tensor([task.group_rewards([t["final_text"] for t in g], [t["n_valid_calls"] for t in g],
                                               positives[p], reward, use_tools) for p, g in enumerate(groups)])  # (P_rank, G)
    tops = [task.positive_rank(t["final_text"], positives[i // group_size]) == 1 for i, t in enumerate(trajs)]
    sums = {"reward": rewards.sum().item(), "reward_sq": (rewards ** 2).sum().item(), "trajectories": rewards.numel(),
            "top1": sum(tops), "with_tool": sum(t["n_valid_calls"] > 0 for t in trajs),
            "generated": sum(t["n_generated"] for t in trajs), "zero_std_groups": float((rewards.std(dim=1) < 1e-6).sum()),
            "groups": rewards.shape[0]}
    return rewards, sums


def log_line(step, stats, update, norm, lr):
    """The step's log values from the summed counts of all ranks."""
    n = stats["trajectories"]
    mean = stats["reward"] / n
    return {"step": step, "reward": mean, "reward_std": max(0.0, stats["reward_sq"] / n - mean ** 2) ** 0.5,
            "top1": stats["top1"] / n, "tool_rate": stats["with_tool"] / n, "response_len": stats["generated"] / n,
            "zero_std_groups": stats["zero_std_groups"] / stats["groups"], "loss": update["loss"],
            "kl": update["kl"] / max(1.0, update["tokens"]), "clip_frac": update["clipped"] / max(1.0, update["tokens"]),
            "grad_norm": norm, "lr": lr}


def main():
    rank, local_rank, world_size, device = common.dist_setup()
    common.seed_everything(seed)
    check_settings(world_size)
    benchmark = task.load_benchmark(data_root, train_query_files, train_pool_files, instructions_file)
    ranked = common.read_jsonl(ranked_train, required=("qid", "cands"))
    task.check_ranked(ranked, *benchmark[:2], window, ranked_train)
    prompt_qids = {r["qid"] for r in task.drop_queries(ranked, exclude_queries_in, data_root, ranked_train)}
    model_path = os.path.join(out_dir, "model")
    resuming = resume and checkpoint.read_trainer_state(model_path) is not None
    start_from, compute_dtype = model_path if resuming else policy, common.torch_dtype(dtype)
    model, processor, optimizer, params, reference = load_policy(start_from, device, compute_dtype, world_size)
    start = checkpoint.load_trainer_state(model, optimizer, model_path)["step"] if resuming else 0
    if resuming:
        print0(f"resuming from step {start}")
    log_path = os.path.join(out_dir, "log.jsonl")
    if rank == 0:  # the curve of the steps the checkpoint holds: a step run again after a kill is logged once
        logged, _ = common.read_jsonl_resumable(log_path, "step")
        common.write_jsonl(log_path, [x for x in logged if x["step"] < start])
    engine = Engine(model, processor, use_tools, max_calls, tool_min_pixels, tool_max_pixels, gen_kv_gib, compute_dtype)
    image_token_id, pad_id = model.config.image_token_id, processor.tokenizer.pad_token_id
    hp = {k: globals()[k] for k in UPDATE_KEYS}
    wandb = types.SimpleNamespace(log=lambda *args, **kwargs: None)  # a no-op stand-in unless wandb_log
    if wandb_log and rank == 0:
        import wandb as wandb_module
        wandb = wandb_module.init(project=wandb_project, config={k: v for k, v in globals().items() if k in CONFIG_KEYS})
    load = functools.lru_cache(maxsize=None)(lambda rel: common.load_image(common.resolve_path(rel, data_root)))  # originals, once

    # the held-out prompts are drawn from every training query, the excluded ones too, so that the watch sees the
    # skills the start policy already has as well as the ones RL works on; the stream is the rest, minus exclusions
    order = np.random.default_rng(seed).permutation(len(ranked))  # a fixed prompt stream: resumable
    held_out = [ranked[i] for i in order[len(order) - eval_prompts:]] if eval_prompts > 0 else []
    order = [i for i in order[:len(order) - len(held_out)] if ranked[i]["qid"] in prompt_qids]  # never held out
    if eval_prompts < 0 or not order:
        raise ValueError(f"eval_prompts={eval_prompts}: must leave some of the {len(prompt_qids)} prompts of {ranked_train} to train on")
    eval_path = os.path.join(out_dir, "eval.jsonl")
    best_path = os.path.join(out_dir, "best")
    best, best_hits = None, []  # the best evaluation so far, (top1, reward), and its hits: its weights are in best_path
    if held_out:
        evals, _ = common.read_jsonl_resumable(eval_path, "step")
        evals = [x for x in evals if x["step"] < start]  # the evaluations of the steps the checkpoint holds
        if rank == 0:
            common.write_jsonl(eval_path, evals)
        saved = common.read_json(os.path.join(best_path, "best.json")) if os.path.exists(os.path.join(best_path, "best.json")) else None
        if keep_best and saved and saved["step"] < start:  # else it is from steps run again now, or none
            best = (saved["top1"], saved["reward"])
            best_hits = saved.get("hits", [])

    def watch(step):  # step = updates done so far
        nonlocal best, best_hits
        model.eval()
        with torch.no_grad():
            sums, hits = greedy_eval(engine, held_out, rank, world_size, benchmark, load)
        sums = all_reduce_sums(sums, device, world_size)
        hits = [int(h) for h in all_reduce_sums(dict(enumerate(hits)), device, world_size).values()]  # all prompts', every rank
        line = {"step": step, "top1": sums["top1"] / sums["n"], "reward": sums["reward"] / sums["n"], "prompts": int(sums["n"])}
        print0(f"eval after {step} steps: greedy top1 {line['top1']:.3f} | reward {line['reward']:.3f} on {line['prompts']} held-out prompts")
        if rank == 0:
            common.append_jsonl(eval_path, [line])
        if best_min_z > 0 and best is not None and len(best_hits) != len(hits):  # a best.json of an older run
            raise ValueError(f"best_min_z={best_min_z}: {best_path}/best.json holds no top-1 hits of these {len(hits)} prompts")
        better = best is None or ((line["top1"], line["reward"]) > best if best_min_z <= 0 else task.paired_gain(hits, best_hits) > best_min_z)
        if keep_best and better:  # same values on every rank
            best, best_hits = (line["top1"], line["reward"]), hits
            checkpoint.save_weights(model, processor, best_path, compute_dtype, {"best.json": {**line, "hits": hits}})
            print0(f"best so far: saved to {best_path}")
    print0(f"GRPO on {len(order)} training prompts ({len(held_out)} held out): {max_steps} steps of {prompts_per_step} prompts x {group_size}, "
           f"reward {reward}, tools {'on' if use_tools else 'off'}, from {start_from}")
    t0 = time.time()
    for step in range(start, max_steps):
        if held_out and step % eval_every == 0:
            watch(step)
        # 1. rollouts: this rank's prompts, G samples each
        prompts, positives = step_prompts(ranked, order, step, rank, world_size, benchmark, load, engine.factor)
        model.eval()
        with torch.no_grad():
            trajs = engine.generate(prompts, group_size, temperature, top_p, max_new_tokens, max_response_tokens, seed=seed)
        # 2. rewards and group advantages
        rewards, stats = score(trajs, positives)
        advantages = group_advantages(rewards, scale_std, adv_eps).flatten()  # (P_rank * G,) prompt-major
        # 3. one policy update on the same token ids and loss masks the rollout produced, in micro-batches of
        # similar lengths (padding on one toy step: 29% -> 4% of the real tokens); the advantages follow
        by_length = sorted(range(len(trajs)), key=lambda i: len(trajs[i]["input_ids"]))
        examples = [{"input_ids": trajs[i]["input_ids"], "loss_mask": trajs[i]["loss_mask"], "images": trajs[i]["images"]}
                    for i in by_length]
        batches = [common.collate(examples[i:i + micro_batch_size], processor, image_token_id, pad_id)
                   for i in range(0, len(examples), micro_batch_size)]
        lr = learning_rate * min(1.0, (step + 1) / max(1, warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        update, norm = policy_update(model, optimizer, params, batches, advantages[by_length], prompts_per_step * group_size, hp,
                                     world_size, device, reference)
        # 4. log totals over all ranks; checkpoint
        log = log_line(step, all_reduce_sums(stats, device, world_size), all_reduce_sums(update, device, world_size), norm, lr)
        wandb.log(log)
        if rank == 0:  # the training curve, one line per step (a resumed run appends)
            common.append_jsonl(log_path, [log])
        if step % log_every == 0 or step == max_steps - 1:
            print0(f"step {step:4d}/{max_steps} | reward {log['reward']:.3f} ± {log['reward_std']:.3f} | top1 {log['top1']:.3f} | "
                   f"tools {log['tool_rate']:.2f} | len {log['response_len']:.0f} | zero-std {log['zero_std_groups']:.2f} | "
                   f"kl {log['kl']:.4f} | clip {log['clip_frac']:.3f} | {time.time() - t0:.0f}s")
        if save_every and (step + 1) % save_every == 0 and step + 1 < max_steps:
            checkpoint.save_checkpoint(model, processor, optimizer, step + 1, model_path, world_size, compute_dtype)
    if held_out:
        watch(max_steps)
    checkpoint.save_checkpoint(model, processor, optimizer, max_steps, model_path, world_size, compute_dtype)
    print0(f"saved {model_path}")
    common.dist_cleanup()


print0 = common.print0
CONFIG_KEYS = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]

if __name__ == "__main__":
    configure(globals())
    main()
