"""
Rejection-sampling SFT: sample N trajectories per training query from the SFT policy (engine.py's
engine, temperature > 0, one shared prefill per group), keep the well-formed ones that rank the positive
first (task.accepted; optionally: that also made a valid tool call), write them as ShareGPT records with
their observation images as files, then fine-tune on them with sft.py's train(): one trainer, not two.
The defaults are the 7B run on the release's RL prompts (data/vretrver/convert.py); config/toy.py is the toy.

    torchrun --nproc_per_node=8 rsft.py --policy=out/mbeir/sft/model --out_dir=out/mbeir/rsft
    python rsft.py config/toy.py --policy=out/toy/sft/model --out_dir=out/toy/rsft --ranked_train=out/toy/ranked_train.jsonl

The prompt for a query is the top `window` of its stage-0 ranked list (retrieve.py on the training
split), shown in a random order fixed per query (shuffle_window): stage 0 was trained on these queries, so
on them its order puts the positive first more often than on test queries, and keeping only trajectories
that rank the positive first would teach the policy to trust that order. Sampling is resumable (qids
already in {out_dir}/rsft_data.jsonl are skipped) and so is training.
"""

import math
import os

import torch
import torch.distributed as dist

import common
import sft
import task
from configurator import configure
from engine import Engine

# -----------------------------------------------------------------------------
data_root = "data/vretrver"  # image paths and the file lists below are relative to it
train_query_files = "query/rl_train.jsonl"  # the release's RL prompts as converted by data/vretrver/convert.py
train_pool_files = "cand_pool/rl_train_cand_pool.jsonl"
instructions_file = "instructions.json"
ranked_train = "data/vretrver/ranked/rl_train.jsonl"  # stage-0 ranking of the training queries
policy = "out/mbeir/sft/model"  # the SFT checkpoint to sample from and to fine-tune
out_dir = "out/mbeir/rsft"  # rsft_data.jsonl, images/ and model/
n_queries = 0              # training queries to sample (0 = all)
n_samples = 8              # trajectories per query
window = 20                # candidates in the prompt: the top of the stage-0 list
shuffle_window = True      # ... in a random order: stage 0's order on its own training queries is a shortcut
require_tool = False       # also require at least one valid tool call
keep_per_query = 1         # accepted trajectories kept per query (the first ones)
temperature = 1.0
top_p = 1.0
max_new_tokens = 4096      # one assistant turn
max_response_tokens = 12288  # generated + observation tokens per trajectory
use_tools = True
max_calls = 2
batch_queries = 4          # queries per generate() call (x n_samples rows)
prompt_min_pixels = 3136   # candidate images in the prompt ...
prompt_max_pixels = 200704  # (448x448)
tool_min_pixels = 3136     # ... and images the tools return
tool_max_pixels = 2000000
# training: the same knobs as sft.py (sft.TRAIN_KEYS), handed to its train()
epochs = 1.0
batch_size = 1
grad_accum = 8
learning_rate = 1e-5
min_lr_frac = 0.0
warmup_frac = 0.1
weight_decay = 0.0
grad_clip = 1.0
stop_loss = 0.0
freeze_vision = True
vision_lr_mult = 1.0
grad_checkpointing = True
log_every = 10
save_every = 0
resume = True
dtype = "bfloat16"         # bfloat16 | float32 (the toy, CPU)
seed = 1337
# -----------------------------------------------------------------------------


def to_record(traj, prompt, qid, positive, image_dir):
    """A sampled trajectory as a self-contained ShareGPT record (observation images written as files)."""
    system, human = task.to_sharegpt(prompt["messages"])
    conversations = [system, human]
    for k, text in enumerate(traj["turns"]):
        for stop in ("<|im_end|>", "<|endoftext|>"):
            text = text.removesuffix(stop)
        conversations.append({"from": "gpt", "value": text})
        if k < len(traj["observations"]):
            conversations.append({"from": "human", "value": traj["observations"][k]})
    n_prompt = len(prompt["prompt_images"])
    images, sizes = list(prompt["prompt_paths"]), [list(im.size) for im in prompt["prompt_images"]]
    for k, img in enumerate(traj["images"][n_prompt:]):
        path = os.path.join(image_dir, f"{qid.replace(':', '_')}_{traj['sample_index']}_{k}.png")
        img.save(path)
        images.append(os.path.relpath(path, data_root))
        sizes.append(list(img.size))
    return {"conversations": conversations, "images": images, "image_sizes": sizes, "qid": qid, "positive": positive}


def already_sampled(done_path, rank, world_size):
    """The qids an earlier, interrupted run sampled (rank 0 reads, every rank gets them)."""
    _, done = common.read_jsonl_resumable(done_path, "qid") if rank == 0 else ([], set())
    if world_size > 1:
        box = [done]
        dist.broadcast_object_list(box, src=0)
        done = box[0]
    return done


def sample_and_filter(engine, todo, position, benchmark, data_path, done_path, image_dir, rank, world_size, device):
    """Sample n_samples trajectories per query, keep the accepted ones as records; returns the counts."""
    queries, pool, instructions = benchmark
    load = lambda p: common.load_image(common.resolve_path(p, data_root))  # noqa: E731
    mine = todo[rank::world_size]
    n_batches = math.ceil(math.ceil(len(todo) / world_size) / batch_queries)  # the same count on every rank
    counts = {"samples": 0, "accepted": 0, "well_formed": 0, "queries_with_one": 0}
    for b in range(n_batches):
        batch, prompts, positives = mine[b * batch_queries:(b + 1) * batch_queries], [], []
        for r in batch:
            dids = task.window_order(r["cands"][:window], (seed, position[r["qid"]])) if shuffle_window else r["cands"][:window]
            q, cands = queries[r["qid"]], [pool[d] for d in dids]
            prompts.append(task.window_prompt(q, cands, instructions, load, use_tools, prompt_min_pixels,
                                              prompt_max_pixels, engine.factor, max_calls))
            positives.append(task.positive_position(dids, q.get("pos_cand_list")))  # None: nothing can be accepted
        trajs = engine.generate(prompts, n_samples, temperature, top_p, max_new_tokens, max_response_tokens, seed=seed + b) if prompts else []
        records = []
        for p, (r, prompt, positive) in enumerate(zip(batch, prompts, positives)):
            group = [t for t in trajs if t["prompt_index"] == p]
            ok = [t for t in group if task.accepted(t, positive, require_tool)]
            records += [to_record(t, prompt, r["qid"], positive, image_dir) for t in ok[:keep_per_query]]
            counts["samples"] += len(group)
            counts["well_formed"] += sum(task.is_well_formed(t["final_text"]) for t in group)
            counts["accepted"] += len(ok)
            counts["queries_with_one"] += bool(ok)
        qids = [r["qid"] for r in batch]
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, (records, qids))
            records, qids = [x for g in gathered for x in g[0]], [q for g in gathered for q in g[1]]
        if rank == 0:
            common.append_jsonl(data_path, records)  # records first: a kill in between only resamples
            common.append_jsonl(done_path, [{"qid": q} for q in qids])
        if b % 10 == 0 or b == n_batches - 1:
            print0(f"batch {b + 1}/{n_batches}: acceptance {counts['accepted']}/{counts['samples']} samples, "
                   f"well-formed {counts['well_formed']}, queries with a kept trajectory {counts['queries_with_one']}")
    if world_size > 1:
        for k in counts:  # the totals over all ranks
            t = torch.tensor(counts[k], device=device)
            dist.all_reduce(t)
            counts[k] = int(t)
    return counts


def main():
    rank, local_rank, world_size, device = common.dist_setup()
    common.seed_everything(seed)
    torch_dtype = common.torch_dtype(dtype)
    benchmark = task.load_benchmark(data_root, train_query_files, train_pool_files, instructions_file)
    ranked = common.read_jsonl(ranked_train, required=("qid", "cands"))
    ranked = ranked[:n_queries] if n_queries else ranked
    task.check_ranked(ranked, *benchmark[:2], window, ranked_train)
    data_path, image_dir = os.path.join(out_dir, "rsft_data.jsonl"), os.path.join(out_dir, "images")
    done_path = os.path.join(out_dir, "sampled_qids.jsonl")  # every sampled qid, accepted or not
    os.makedirs(image_dir, exist_ok=True)
    done = already_sampled(done_path, rank, world_size)
    position = {r["qid"]: i for i, r in enumerate(ranked)}  # a query's window order is keyed by it (resume)
    todo = [r for r in ranked if r["qid"] not in done]
    model = common.load_model(policy, dtype=torch_dtype, device=device).eval()
    processor = common.load_processor(policy, min(prompt_min_pixels, tool_min_pixels), max(prompt_max_pixels, tool_max_pixels))
    engine = Engine(model, processor, use_tools, max_calls, tool_min_pixels, tool_max_pixels)

    # 1. sample and keep what passes the rule
    print0(f"sampling {n_samples} trajectories for {len(todo)} queries ({len(done)} done) from {policy}")
    counts = sample_and_filter(engine, todo, position, benchmark, data_path, done_path, image_dir, rank, world_size, device)
    print0(f"acceptance rate {counts['accepted'] / max(1, counts['samples']):.3f} of samples, "
           f"{counts['queries_with_one'] / max(1, len(todo)):.3f} of queries; well-formed "
           f"{counts['well_formed'] / max(1, counts['samples']):.3f}")
    if world_size > 1:
        dist.barrier()  # rank 0 has written the data

    # 2. fine-tune the same policy on the accepted trajectories with sft.py's trainer
    records = sft.load_records(os.path.abspath(data_path), data_root) if os.path.exists(data_path) else []
    examples = [sft.render(r, processor, data_root, (prompt_min_pixels, prompt_max_pixels), (tool_min_pixels, tool_max_pixels))
                for r in records]
    model_path = os.path.join(out_dir, "model")
    if len(examples) < batch_size * grad_accum * world_size:  # too few for one optimizer step
        print0(f"only {len(examples)} accepted trajectories, fewer than one step needs: the policy is saved "
               f"unchanged as {model_path}")
        if rank == 0:
            model.save_pretrained(model_path)
            processor.save_pretrained(model_path)
            common.atomic_write(os.path.join(model_path, "trainer_state.pt"), lambda f: torch.save(
                {"step": 0, "optimizer": None, "accepted": len(examples)}, f), mode="wb")
        common.dist_cleanup()
        return
    if resume and os.path.exists(os.path.join(model_path, "trainer_state.pt")):
        model = common.load_model(model_path, dtype=torch_dtype, device=device)
    model.train()
    sft.train(model, processor, examples, model_path, {k: globals()[k] for k in sft.TRAIN_KEYS}, rank, world_size, device)
    common.dist_cleanup()


print0 = common.print0

if __name__ == "__main__":
    configure(globals())
    main()
