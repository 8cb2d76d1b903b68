"""
The agentic rollout: sliding-window reranking of a ranked JSONL with the policy, sampled through the
tool-calling engine (engine.py) on prompts in the task's format (task.py). The defaults are the paper's
evaluation (docs/spec.md §1): top 50, windows of 20, stride 10, greedy, two tool calls; config/toy.py is the toy.

    torchrun --nproc_per_node=8 rollout.py --policy=out/mbeir/grpo/model --ranked_in=out/mbeir/ranked_test.jsonl
    python rollout.py config/toy.py --policy=out/toy/grpo/model --out_dir=out/toy/rerank_grpo --ranked_in=out/toy/ranked_test.jsonl
    python rollout.py config/toy.py --policy=out/toy/sft/model --use_tools=False ...   # the no-tools ablation

Sliding-window reranking (rerank_batch): windows of `window` over the top `top_n`, back to front by `stride`;
each window's answer reorders its slice in place and the next window sees the new order. Writes
{out_dir}/reranked.jsonl (retrieve.py's schema, so evaluate.py reads it) and trajectories.jsonl, a
query at a time: a rerun skips the qids already written, nothing is lost or duplicated after a kill.
Under torchrun each rank reranks its share of the queries with its own full copy of the policy, so
ranks that generate different lengths never wait on each other inside generation (no collectives
there); rank 0 gathers and writes after every batch. Each candidate image is encoded by the vision
tower once per window it appears in (twice at most with stride = window/2): caching the features
across windows would save that, at the cost of threading precomputed features through the model.
"""

import math
import os

import torch.distributed as dist

import common
import task
from configurator import configure
from engine import Engine

# -----------------------------------------------------------------------------
data_root = "data/mbeir"   # image paths and the file lists below are relative to it
query_files = common.mbeir_files("query")  # the 16 M-BEIR test sets ...
pool_files = common.mbeir_files("pool")    # ... and their local pools
instructions_file = "instructions.json"  # dataset id -> task instructions ('' = none)
ranked_in = "out/mbeir/ranked_test.jsonl"  # stage-0 ranked JSONL (retrieve.py)
policy = "out/mbeir/grpo/model"  # local Hugging Face directory of the reranker
out_dir = "out/mbeir/rerank"  # reranked.jsonl, trajectories.jsonl and tool images go here
top_n = 50                 # rerank this many stage-0 candidates ...
window = 20                # ... in windows of this size ...
stride = 10                # ... moving back to front by this stride
use_tools = True           # False: tools absent from the prompt, tool tags never executed
prompt_style = "release"  # release | release_500 | compact (the toy's): docs/spec.md §3, §10
max_calls = 2              # tool calls per trajectory; a call past it is run but ends the trajectory
max_new_tokens = 4096      # tokens per generation (one assistant turn)
max_response_tokens = 12288  # generated + observation tokens per trajectory
temperature = 0.0          # 0 = greedy
top_p = 1.0
n_samples = 1              # trajectories per window: the ranking follows sample 0, every sample's trajectory is
                           # written (with temperature > 0: per-window pass@k, the headroom RL has; docs/spec.md §7)
prompt_min_pixels = 3136   # candidate and query images in the prompt, resized Qwen-style into [min, max]
prompt_max_pixels = 200704  # (448x448)
tool_min_pixels = 3136     # images returned by the tools
tool_max_pixels = 2000000
batch_queries = 8          # queries reranked side by side
gen_kv_gib = 16.0          # KV cache per rank for one generation chunk (the batch is split to fit)
dtype = "bfloat16"         # bfloat16 | float32 (the toy, CPU)
seed = 1337
# -----------------------------------------------------------------------------


def image_record(img, path):
    return {"path": path, "size": [img.width, img.height]}


def already_done(reranked_path, traj_path, rank, world_size):
    """The qids an earlier, interrupted run wrote; trajectories of a query whose ranking was not written go."""
    done = set()
    if rank == 0:
        _, done = common.read_jsonl_resumable(reranked_path, "qid")
        trajs, _ = common.read_jsonl_resumable(traj_path, "qid")
        common.write_jsonl(traj_path, [t for t in trajs if t["qid"] in done])  # a kill between the two files
    if world_size > 1:
        box = [done]
        dist.broadcast_object_list(box, src=0)
        done = box[0]
    return done


def rerank_batch(engine, batch, benchmark):
    """Slide the windows over a batch of queries, all queries' windows of one position in one generate();
    returns (trajectory records, reranked records)."""
    queries, pool, instructions = benchmark
    orders = {r["qid"]: list(r["cands"][:top_n]) for r in batch}
    starts = {qid: task.window_starts(len(order), window, stride) for qid, order in orders.items()}
    originals = {}  # path -> original image, loaded once per batch

    def original(rel):
        if rel not in originals:
            originals[rel] = common.load_image(common.resolve_path(rel, data_root))
        return originals[rel]

    traj_records = []
    for w in range(max((len(s) for s in starts.values()), default=0)):
        jobs, prompts = [], []
        for r in batch:
            if w >= len(starts[r["qid"]]):
                continue
            start = starts[r["qid"]][w]
            block = orders[r["qid"]][start:start + window]
            prompts.append(task.window_prompt(queries[r["qid"]], [pool[d] for d in block], instructions, original,
                                              use_tools, prompt_min_pixels, prompt_max_pixels, engine.factor, max_calls, prompt_style))
            prompts[-1]["key"] = (r["qid"], start)  # its samples are drawn from (seed, qid, window): resumable
            jobs.append((r["qid"], start, block, prompts[-1]["prompt_paths"]))
        trajs = engine.generate(prompts, n_samples, temperature, top_p, max_new_tokens, max_response_tokens, seed=seed)
        for i, t in enumerate(trajs):  # prompt-major: n_samples trajectories per window
            (qid, start, block, prompt_paths), sample = jobs[i // n_samples], i % n_samples
            if sample == 0:  # the next window sees the order sample 0 left
                orders[qid] = task.merge_window(orders[qid], start, window, t["answer"])
            images = [image_record(im, p) for im, p in zip(t["images"], prompt_paths)]
            for k, im in enumerate(t["images"][len(prompt_paths):]):
                name = f"{common.safe_filename(qid)}_w{start}{f'_s{sample}' if n_samples > 1 else ''}_{k}.png"  # qid: any string
                tool_path = os.path.join(out_dir, "images", name)
                im.save(tool_path)
                images.append(image_record(im, os.path.abspath(tool_path)))
            traj_records.append({"qid": qid, "window_start": start, "sample": sample, "window": block, "images": images,
                                 **{k: v for k, v in t.items() if k not in ("images", "prompt_index", "sample_index")}})
    rerank_records = []
    for r in batch:
        order = orders[r["qid"]] + r["cands"][top_n:]
        rerank_records.append({"qid": r["qid"], "task_id": r.get("task_id"), "cands": order,
                               "scores": [float(len(order) - i) for i in range(len(order))]})
    return traj_records, rerank_records


def main():
    rank, local_rank, world_size, device = common.dist_setup()
    task.window_starts(top_n, window, stride)  # bad window or stride: an error now, not an empty run
    benchmark = task.load_benchmark(data_root, query_files, pool_files, instructions_file)
    ranked = common.read_jsonl(ranked_in, required=("qid", "cands"))
    task.check_ranked(ranked, *benchmark[:2], top_n, ranked_in)
    reranked_path, traj_path = os.path.join(out_dir, "reranked.jsonl"), os.path.join(out_dir, "trajectories.jsonl")
    done = already_done(reranked_path, traj_path, rank, world_size)
    todo = [r for r in ranked if r["qid"] not in done]
    print0(f"reranking {len(todo)} queries ({len(done)} already done) with {policy}, window {window}, "
           f"stride {stride}, top {top_n}, tools {'on' if use_tools else 'off'}")
    model = common.load_model(policy, dtype=common.torch_dtype(dtype), device=device).eval()
    processor = common.load_processor(policy, min(prompt_min_pixels, tool_min_pixels), max(prompt_max_pixels, tool_max_pixels))
    engine = Engine(model, processor, use_tools, max_calls, tool_min_pixels, tool_max_pixels, gen_kv_gib)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)

    mine = todo[rank::world_size]
    n_batches = math.ceil(math.ceil(len(todo) / world_size) / batch_queries)  # the same count on every rank
    for b in range(n_batches):
        traj_records, rerank_records = rerank_batch(engine, mine[b * batch_queries:(b + 1) * batch_queries], benchmark)
        if world_size > 1:  # rank 0 writes what every rank produced
            gathered = [None] * world_size
            dist.all_gather_object(gathered, (traj_records, rerank_records))
            traj_records = [t for g in gathered for t in g[0]]
            rerank_records = [x for g in gathered for x in g[1]]
        if rank == 0:
            common.append_jsonl(traj_path, traj_records)  # trajectories first: a kill in between is cleaned up
            common.append_jsonl(reranked_path, rerank_records)
            print0(f"batch {b + 1}/{n_batches}: {len(rerank_records)} queries written")
    print0(f"wrote {reranked_path} and {traj_path}")
    common.dist_cleanup()


print0 = common.print0

if __name__ == "__main__":
    configure(globals())
    main()
