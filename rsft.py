"""
Rejection-sampling SFT: sample N trajectories per training query from the SFT policy (engine.py's
engine, temperature > 0, one shared prefill per group), keep the well-formed ones that rank the positive
first with an answer the prompt asked for, one candidate or the whole window each once (task.accepted;
optionally: that also made a valid tool call), write them as ShareGPT records with
their observation images as files, then fine-tune on them with sft.py's train(): one trainer, not two.
The defaults are the 7B run on the release's RL prompts (data/vretrver/convert.py); config/toy.py is the toy.

    torchrun --nproc_per_node=8 rsft.py --policy=out/mbeir/sft/model --out_dir=out/mbeir/rsft
    python rsft.py config/toy.py --policy=out/toy/sft/model --out_dir=out/toy/rsft --ranked_train=out/toy/ranked_train.jsonl

The prompt for a query is the top `window` of its stage-0 ranked list (retrieve.py on the training
split), shown in a random order fixed per query (shuffle_window): stage 0 was trained on these queries, so
on them its order puts the positive first more often than on test queries, and keeping only trajectories
that rank the positive first would teach the policy to trust that order. Sampling is resumable: each
sampled query is one line of {out_dir}/sampled.jsonl carrying its kept records (one append, so a kill
leaves a query either done or not, and a torn last line is dropped); a rerun skips the qids there, then
{out_dir}/rsft_data.jsonl (the records alone, what sft.py reads) is written from it. Training resumes too.
"""

import math
import os

import torch
import torch.distributed as dist

import checkpoint
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
out_dir = "out/mbeir/rsft"  # sampled.jsonl, rsft_data.jsonl, images/ and model/
n_queries = 0              # training queries to sample (0 = all)
exclude_queries_in = ""    # JSONL files under data_root (e.g. the cold-start SFT data) whose records' qids are not
                           # sampled: RSFT on the queries the teacher left without a trajectory (docs/spec.md §5)
n_samples = 8              # trajectories per query
window = 20                # candidates in the prompt: the top of the stage-0 list
shuffle_window = True      # ... in a random order: stage 0's order on its own training queries is a shortcut
require_tool = False       # also require at least one valid tool call
keep_per_query = 1         # accepted trajectories kept per query (the first ones)
require_ranking = True     # the answer must be one candidate or all of the window, each once (task.is_ranking)
temperature = 1.0
top_p = 1.0
max_new_tokens = 4096      # one assistant turn
max_response_tokens = 12288  # generated + observation tokens per trajectory
use_tools = True
prompt_style = "release"  # release | release_500 | compact (the toy's): docs/spec.md §3, §10
max_calls = 2
batch_queries = 4          # queries per generate() call (x n_samples rows)
gen_kv_gib = 16.0          # KV cache per rank for one generation chunk (the batch is split to fit)
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
logprob_chunk = 1024
log_every = 10
save_every = 0
resume = True
dtype = "bfloat16"         # bfloat16 | float32 (the toy, CPU)
seed = 1337
# -----------------------------------------------------------------------------


def gpt_turns(traj):
    """The policy's turns as the text of ShareGPT gpt turns: without the stop token that closed them."""
    turns = []
    for text in traj["turns"]:
        for stop in ("<|im_end|>", "<|endoftext|>"):
            text = text.removesuffix(stop)
        turns.append(text)
    return turns


def special_strings(tokenizer):
    """The texts the tokenizer reads back as control tokens (<|im_start|>, <|vision_start|>, <|image_pad|>, ...)."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return sorted(set(tokenizer.all_special_tokens) | set(added))


def safe_text(traj, special):
    """Whether the policy's text can be stored verbatim in a ShareGPT record: an '<image>' in a gpt turn
    breaks sft.py's placeholder count, and a special token's text would be tokenized as that control token
    (a turn that ends early, an image slot with no image)."""
    return not any(s in text for text in gpt_turns(traj) for s in ("<image>", *special))


def to_record(traj, prompt, qid, positive, image_dir):
    """A sampled trajectory as a self-contained ShareGPT record (observation images written as files)."""
    system, human = task.to_sharegpt(prompt["messages"])
    conversations = [system, human]
    for k, text in enumerate(gpt_turns(traj)):
        conversations.append({"from": "gpt", "value": text})
        if k < len(traj["observations"]):
            conversations.append({"from": "human", "value": traj["observations"][k]})
    n_prompt = len(prompt["prompt_images"])
    images, sizes = list(prompt["prompt_paths"]), [list(im.size) for im in prompt["prompt_images"]]
    for k, img in enumerate(traj["images"][n_prompt:]):
        path = os.path.join(image_dir, f"{common.safe_filename(qid)}_{traj['sample_index']}_{k}.png")  # qid: any string
        img.save(path)
        images.append(os.path.relpath(path, data_root))
        sizes.append(list(img.size))
    return {"conversations": conversations, "images": images, "image_sizes": sizes, "qid": qid, "positive": positive}


def already_sampled(sampled_path, rank, world_size):
    """The qids an earlier, interrupted run sampled (rank 0 reads, every rank gets them); a torn last line
    (a kill mid-append) is dropped and that query sampled again."""
    _, done = common.read_jsonl_resumable(sampled_path, "qid") if rank == 0 else ([], set())
    if world_size > 1:
        box = [done]
        dist.broadcast_object_list(box, src=0)
        done = box[0]
    return done


def sample_and_filter(engine, todo, position, benchmark, sampled_path, image_dir, special, rank, world_size, device):
    """Sample n_samples trajectories per query, keep the accepted ones whose text is safe to store as records;
    appends one line per query to sampled_path and returns the counts."""
    queries, pool, instructions = benchmark
    load = lambda p: common.load_image(common.resolve_path(p, data_root))  # noqa: E731
    mine = todo[rank::world_size]
    n_batches = math.ceil(math.ceil(len(todo) / world_size) / batch_queries)  # the same count on every rank
    counts = {"samples": 0, "accepted": 0, "well_formed": 0, "queries_with_one": 0, "unsafe_text": 0}
    for b in range(n_batches):
        batch, prompts, positives, sizes = mine[b * batch_queries:(b + 1) * batch_queries], [], [], []
        for r in batch:
            dids = task.window_order(r["cands"][:window], (seed, position[r["qid"]])) if shuffle_window else r["cands"][:window]
            q, cands = queries[r["qid"]], [pool[d] for d in dids]
            prompts.append(task.window_prompt(q, cands, instructions, load, use_tools, prompt_min_pixels,
                                              prompt_max_pixels, engine.factor, max_calls, prompt_style))
            positives.append(task.positive_position(dids, q.get("pos_cand_list")))  # None: nothing can be accepted
            sizes.append(len(dids))
            prompts[-1]["key"] = r["qid"]  # its samples are drawn from (seed, qid, sample): a resume redraws the same
        trajs = engine.generate(prompts, n_samples, temperature, top_p, max_new_tokens, max_response_tokens, seed=seed) if prompts else []
        lines = []  # one per query, accepted or not: the unit of progress
        for p, (r, prompt, positive, size) in enumerate(zip(batch, prompts, positives, sizes)):
            group = [t for t in trajs if t["prompt_index"] == p]
            passed = [t for t in group if task.accepted(t, positive, require_tool, size if require_ranking else None)]
            ok = [t for t in passed if safe_text(t, special)]
            lines.append({"qid": r["qid"], "records": [to_record(t, prompt, r["qid"], positive, image_dir)
                                                       for t in ok[:keep_per_query]]})
            counts["samples"] += len(group)
            counts["well_formed"] += sum(task.is_well_formed(t["final_text"]) for t in group)
            counts["accepted"] += len(ok)
            counts["unsafe_text"] += len(passed) - len(ok)
            counts["queries_with_one"] += bool(ok)
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, lines)
            lines = [x for g in gathered for x in g]
        if rank == 0:
            common.append_jsonl(sampled_path, lines)  # one append: a query's records and its mark go together
        if b % 10 == 0 or b == n_batches - 1:
            print0(f"batch {b + 1}/{n_batches}: acceptance {counts['accepted']}/{counts['samples']} samples, "
                   f"well-formed {counts['well_formed']}, queries with a kept trajectory {counts['queries_with_one']}, "
                   f"rejected for special-token text {counts['unsafe_text']}")
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
    ranked = task.drop_queries(ranked, exclude_queries_in, data_root, ranked_train)
    ranked = ranked[:n_queries] if n_queries else ranked
    task.check_ranked(ranked, *benchmark[:2], window, ranked_train)
    data_path, image_dir = os.path.join(out_dir, "rsft_data.jsonl"), os.path.join(out_dir, "images")
    sampled_path = os.path.join(out_dir, "sampled.jsonl")  # every sampled qid with its kept records
    os.makedirs(image_dir, exist_ok=True)
    done = already_sampled(sampled_path, rank, world_size)
    position = {r["qid"]: i for i, r in enumerate(ranked)}  # a query's window order is keyed by it (resume)
    todo = [r for r in ranked if r["qid"] not in done]
    model = common.load_model(policy, dtype=torch_dtype, device=device).eval()
    processor = common.load_processor(policy, min(prompt_min_pixels, tool_min_pixels), max(prompt_max_pixels, tool_max_pixels))
    engine = Engine(model, processor, use_tools, max_calls, tool_min_pixels, tool_max_pixels, gen_kv_gib)

    # 1. sample and keep what passes the rule
    print0(f"sampling {n_samples} trajectories for {len(todo)} queries ({len(done)} done) from {policy}")
    counts = sample_and_filter(engine, todo, position, benchmark, sampled_path, image_dir,
                               special_strings(processor.tokenizer), rank, world_size, device)
    print0(f"acceptance rate {counts['accepted'] / max(1, counts['samples']):.3f} of samples, "
           f"{counts['queries_with_one'] / max(1, len(todo)):.3f} of queries; well-formed "
           f"{counts['well_formed'] / max(1, counts['samples']):.3f}; rejected for special-token text "
           f"{counts['unsafe_text']}")
    if rank == 0:  # the records alone, in one atomic write: what sft.py reads
        sampled, _ = common.read_jsonl_resumable(sampled_path, "qid")
        common.write_jsonl(data_path, [rec for line in sampled for rec in line["records"]])
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
        if rank == 0:  # written whole, then renamed into place, like a training checkpoint
            tmp = model_path + ".tmp"
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            common.write_json(os.path.join(tmp, "trainer_state.json"), {"step": 0, "accepted": len(examples)})
            checkpoint.swap_into_place(tmp, model_path)
        common.dist_cleanup()
        return
    # training keeps fp32 master weights (sampling ran on the dtype copy); a resume starts from its checkpoint
    del engine, model
    start_from = model_path if resume and checkpoint.read_trainer_state(model_path) else policy
    model = common.load_model(start_from, dtype=torch.float32, device=device)
    model.train()
    sft.train(model, processor, examples, model_path, {k: globals()[k] for k in sft.TRAIN_KEYS}, rank, world_size, device)
    common.dist_cleanup()


print0 = common.print0

if __name__ == "__main__":
    configure(globals())
    main()
