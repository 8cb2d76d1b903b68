"""
The agentic rollout: the V-Retrver prompt and answer format, and sliding-window reranking of a ranked
JSONL with the policy, sampled through the tool-calling engine (engine.py).

    python rollout.py config/toy.py --policy=out/toy/grpo/model              # rerank the test split
    python rollout.py config/toy.py --policy=out/toy/sft/model --use_tools=False   # the no-tools ablation
    torchrun --nproc_per_node=8 rollout.py --policy=/ckpt/V-Retrver-7B --ranked_in=out/mbeir/ranked.jsonl ...

Sliding-window reranking (main): windows of `window` over the top `top_n`, back to front by `stride`;
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

import numpy as np
import torch
import torch.distributed as dist

import common
import tools
from configurator import configure
from engine import Engine

# -----------------------------------------------------------------------------
data_root = "data/toy"     # image paths and the file lists below are relative to it
query_files = "query/test/mbeir_toyt2i_task0_test.jsonl,query/test/mbeir_toycir_task7_test.jsonl"
pool_files = "cand_pool/test/mbeir_toyt2i_task0_test_cand_pool.jsonl,cand_pool/test/mbeir_toycir_task7_test_cand_pool.jsonl"
instructions_file = "instructions.json"  # dataset id -> task instructions ('' = none)
ranked_in = "out/toy/ranked_test.jsonl"  # stage-0 ranked JSONL (retrieve.py)
policy = "out/toy/grpo/model"  # local Hugging Face directory of the reranker
out_dir = "out/toy/rerank"  # reranked.jsonl, trajectories.jsonl and tool images go here
top_n = 50                 # rerank this many stage-0 candidates ...
window = 20                # ... in windows of this size ...
stride = 10                # ... moving back to front by this stride
use_tools = True           # False: tools absent from the prompt, tool tags never executed
max_calls = 2              # tool calls per trajectory; a call past it is run but ends the trajectory
max_new_tokens = 512       # tokens per generation (one assistant turn)
max_response_tokens = 2048  # generated + observation tokens per trajectory
temperature = 0.0          # 0 = greedy
top_p = 1.0
prompt_min_pixels = 784    # candidate and query images in the prompt, resized Qwen-style into [min, max]
prompt_max_pixels = 784    # (toy: 28x28 = one token each)
tool_min_pixels = 3136     # images returned by the tools (4 * 28 * 28)
tool_max_pixels = 12544    # (toy: 112x112)
batch_queries = 8          # queries reranked side by side
dtype = "float32"          # float32 | bfloat16
seed = 1337
# -----------------------------------------------------------------------------

SYSTEM_PROMPT = ("You are a retrieval assistant. Given a query and numbered candidates, rank the candidates "
                 "from most to least relevant to the query.")
GUIDELINES = ("Guidelines: rank all candidates from most to least relevant to the query. Think step by step "
              "inside <think></think>, then give the full ranking as <answer>[i1, i2, ...]</answer>.")
TOOL_GUIDELINE = " Small details may be invisible at this resolution: inspect them with the tools first."


def build_messages(query_text, has_query_image, instruction, cand_texts, cand_has_image, use_tools):
    """The V-Retrver prompt (REFERENCE §3). Images come in placeholder order: query first, then candidates."""
    system = SYSTEM_PROMPT + ("\n\n" + tools.tools_prompt() if use_tools else "")
    content = [{"type": "text", "text": "Query:"}]
    if has_query_image:
        content.append({"type": "image"})
    content.append({"type": "text", "text": f"{instruction} {query_text}".strip() + "\nCandidates:"})
    for i, (text, has_image) in enumerate(zip(cand_texts, cand_has_image), 1):
        content.append({"type": "text", "text": f"({i}) "})
        if has_image:
            content.append({"type": "image"})
        content.append({"type": "text", "text": text or ""})
    content.append({"type": "text", "text": "\n\n" + GUIDELINES + (TOOL_GUIDELINE if use_tools else "")})
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def to_sharegpt(messages):
    """Chat messages -> ShareGPT turns (LLaMA-Factory style): image parts become <image> placeholders."""
    role = {"system": "system", "user": "human", "assistant": "gpt"}
    turns = []
    for m in messages:
        content = m["content"] if isinstance(m["content"], str) else "".join(
            "<image>" if part["type"] == "image" else part["text"] for part in m["content"])
        turns.append({"from": role[m["role"]], "value": content})
    return turns


def merge_window(order, start, size, answer):
    """Reorder order[start:start+size] by a 1-based answer: drop duplicates and out-of-range numbers,
    append the missing candidates in their previous order; None keeps the previous order."""
    block = order[start:start + size]
    if answer is None:
        return list(order)
    picked = []
    for i in answer:
        if 1 <= i <= len(block) and block[i - 1] not in picked:
            picked.append(block[i - 1])
    picked += [c for c in block if c not in picked]
    return order[:start] + picked + order[start + size:]


def window_starts(n, size, step):
    """Back to front: n=50, size=20, step=10 -> [30, 20, 10, 0]."""
    starts = list(range(max(n - size, 0), -1, -step))
    return starts if starts[-1] == 0 else starts + [0]


# -----------------------------------------------------------------------------
# sliding-window reranking of a ranked JSONL file

def image_record(img, path):
    return {"path": path, "size": [img.width, img.height]}


def load_benchmark(root, query_files, pool_files, instructions_file):
    """Queries by qid, candidates by did (M-BEIR JSONL) and the task instructions."""
    files = [f for f in query_files.split(",") if f], [f for f in pool_files.split(",") if f]
    queries = {q["qid"]: q for f in files[0] for q in common.read_jsonl(common.resolve_path(f, root), required=("qid",))}
    pool = {c["did"]: c for f in files[1] for c in common.read_jsonl(common.resolve_path(f, root), required=("did",))}
    instructions = common.read_json(common.resolve_path(instructions_file, root)) if instructions_file else {}
    return queries, pool, instructions


def window_order(dids, key):
    """A window's candidates in a random order fixed by key (e.g. seed, step, prompt index): a resumed run sees
    the same. Training prompts use it: stage 0 was trained on the training queries, so its order there would
    be a shortcut (the positive sits first more often than on test queries)."""
    return [dids[i] for i in np.random.default_rng(key).permutation(len(dids))]


def window_prompt(q, cands, instructions, load, use_tools, min_pixels, max_pixels, factor):
    """The prompt of one window: messages, prompt-view images, original images for the tools, and the
    paths of the prompt images (query first, then candidates). load(path) -> original image."""
    q_img = load(q["query_img_path"]) if q.get("query_img_path") else None
    c_imgs = [load(c["img_path"]) if c.get("img_path") else None for c in cands]
    messages = build_messages(q.get("query_txt") or "", q_img is not None, common.pick_instruction(instructions, q["qid"]),
                              [c.get("txt") or "" for c in cands], [im is not None for im in c_imgs], use_tools)
    return {"messages": messages, "tool_images": [q_img] + c_imgs,
            "prompt_images": [common.qwen_resize(im, min_pixels, max_pixels, factor) for im in [q_img] + c_imgs if im is not None],
            "prompt_paths": ([q["query_img_path"]] if q_img else []) + [c["img_path"] for c in cands if c.get("img_path")]}


def main():
    rank, local_rank, world_size, device = common.dist_setup()
    queries, pool, instructions = load_benchmark(data_root, query_files, pool_files, instructions_file)
    ranked = common.read_jsonl(ranked_in, required=("qid", "cands"))
    for r in ranked:
        if r["qid"] not in queries:
            raise ValueError(f"{ranked_in}: qid {r['qid']} is in none of the query files")
        missing = [d for d in r["cands"][:top_n] if d not in pool]
        if missing:
            raise ValueError(f"{ranked_in}: qid {r['qid']} ranks {missing[0]}, which is in none of the pool files")
    reranked_path, traj_path = os.path.join(out_dir, "reranked.jsonl"), os.path.join(out_dir, "trajectories.jsonl")
    done = set()
    if rank == 0:
        _, done = common.read_jsonl_resumable(reranked_path, "qid")
        trajs, _ = common.read_jsonl_resumable(traj_path, "qid")
        common.write_jsonl(traj_path, [t for t in trajs if t["qid"] in done])  # a kill between the two files
    if world_size > 1:
        box = [done]
        dist.broadcast_object_list(box, src=0)
        done = box[0]
    todo = [r for r in ranked if r["qid"] not in done]
    print0(f"reranking {len(todo)} queries ({len(done)} already done) with {policy}, window {window}, "
           f"stride {stride}, top {top_n}, tools {'on' if use_tools else 'off'}")

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = common.load_model(policy, dtype=torch_dtype, device=device).eval()
    processor = common.load_processor(policy, min(prompt_min_pixels, tool_min_pixels), max(prompt_max_pixels, tool_max_pixels))
    engine = Engine(model, processor, use_tools, max_calls, tool_min_pixels, tool_max_pixels)
    factor = engine.factor
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)

    mine = todo[rank::world_size]
    n_batches = math.ceil(math.ceil(len(todo) / world_size) / batch_queries)  # the same count on every rank
    for b in range(n_batches):
        batch = mine[b * batch_queries:(b + 1) * batch_queries]
        orders = {r["qid"]: list(r["cands"][:top_n]) for r in batch}
        starts = {qid: window_starts(len(order), window, stride) for qid, order in orders.items()}
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
                prompts.append(window_prompt(queries[r["qid"]], [pool[d] for d in block], instructions, original,
                                             use_tools, prompt_min_pixels, prompt_max_pixels, factor))
                jobs.append((r["qid"], start, block, prompts[-1]["prompt_paths"]))
            trajs = engine.generate(prompts, 1, temperature, top_p, max_new_tokens, max_response_tokens, seed=seed + b)
            for (qid, start, block, prompt_paths), t in zip(jobs, trajs):
                orders[qid] = merge_window(orders[qid], start, window, t["answer"])
                images = [image_record(im, p) for im, p in zip(t["images"], prompt_paths)]
                for k, im in enumerate(t["images"][len(prompt_paths):]):
                    tool_path = os.path.join(out_dir, "images", f"{qid.replace(':', '_')}_w{start}_{k}.png")
                    im.save(tool_path)
                    images.append(image_record(im, os.path.abspath(tool_path)))
                traj_records.append({"qid": qid, "window_start": start, "window": block, "images": images,
                                     **{k: v for k, v in t.items() if k not in ("images", "prompt_index", "sample_index")}})
        rerank_records = []
        for r in batch:
            order = orders[r["qid"]] + r["cands"][top_n:]
            rerank_records.append({"qid": r["qid"], "task_id": r.get("task_id"), "cands": order,
                                   "scores": [float(len(order) - i) for i in range(len(order))]})
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
