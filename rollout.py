"""
The agentic rollout: a hand-written KV-cached generation loop that pauses on tool calls, runs the tool
and splices the observation (with its images) into the row's cache, plus sliding-window reranking.

    python rollout.py config/toy.py --policy=out/toy/grpo/model              # rerank the test split
    python rollout.py config/toy.py --policy=out/toy/sft/model --use_tools=False   # the no-tools ablation
    torchrun --nproc_per_node=8 rollout.py --policy=/ckpt/V-Retrver-7B --ranked_in=out/mbeir/ranked.jsonl ...

How the engine works (Engine.generate):
- group-shared prefill: the distinct prompts (system + query + K candidate images) are left-padded into
  one batch and prefilled once; each prompt's cache row is then repeated for its G samples (padding is
  masked through the full-length attention_mask).
- every step runs ONE forward for all unfinished rows. A decoding row feeds its last sampled token; a row
  that just closed a tool call (</tool_call>) feeds its whole observation chunk
  `<|im_end|>\\n<|im_start|>user\\n{text + images}<|im_end|>\\n<|im_start|>assistant\\n`
  with its pixel values; chunks are right-padded to the longest in the step, so splicing rows and
  decoding rows share the step and the pad slots stay masked in the cache for good. Finished rows
  leave the batch at once, so nobody waits on them.
- positions are explicit M-RoPE ids (REFERENCE §8): a chunk's positions are computed on the chunk alone
  and shifted to the row's next free position; leaving them to the model is silently wrong.
- vision/pad tokens can never be sampled; a row ends at <|im_end|>/EOS, when it makes a call past
  max_calls (the call is run and recorded, nothing more is generated: no answer), or at its token budget.
- output per trajectory: exact token ids, loss mask (1 = sampled by the policy, 0 = prompt and observation
  tokens, including the <|im_end|> that opens an observation), the images in sequence order with their
  grids, the tool calls, the policy's own text per turn, the parsed answer and the stop reason.

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

import contextlib
import math
import os

import numpy as np
import torch
import torch.distributed as dist

import common
import tools
from configurator import configure

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
VISION_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"]


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


def parse_answer(text):
    """The first <answer>[...]</answer> as a list of ints, or None if there is none or it does not parse."""
    start = text.find("<answer>")
    end = text.find("</answer>", start)
    if start < 0 or end < 0:
        return None
    body = text[start + len("<answer>"):end].strip()
    if not (body.startswith("[") and body.endswith("]")):
        return None
    try:
        return [int(x) for x in body[1:-1].split(",") if x.strip()]
    except ValueError:
        return None


def is_well_formed(text):
    """<think>...</think> then <answer>[ints]</answer> (the full format reward's condition)."""
    think = text.find("<think>")
    end = text.find("</think>", think)
    return think >= 0 and end >= 0 and text.find("<answer>", end) >= 0 and parse_answer(text[end:]) is not None


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


def mrope_positions(ids, image_grid_thw, image_token_id, start, merge=common.MERGE):
    """(3, L) M-RoPE positions of one chunk whose first token sits at text position `start`, and the next
    free position. Text gets (p, p, p), p += 1; the image token at merged cell (i, j) gets (p, p+i, p+j),
    then p += max(h, w)."""
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    parts, p, i = [], start, 0
    while i < len(ids):
        if ids[i] == image_token_id:
            _, h, w = next(grids)
            h, w = h // merge, w // merge
            rows = torch.arange(h).repeat_interleave(w)
            cols = torch.arange(w).repeat(h)
            parts.append(torch.stack([torch.full((h * w,), p), p + rows, p + cols]))
            i, p = i + h * w, p + max(h, w)
        else:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            parts.append(torch.arange(p, p + j - i).expand(3, -1))
            i, p = j, p + j - i
    return torch.cat(parts, dim=1), p


class Row:
    """One trajectory being generated."""

    def __init__(self, prompt_index, sample_index, ids, images, grids, next_pos):
        self.prompt_index, self.sample_index = prompt_index, sample_index
        self.ids, self.mask = list(ids), [0] * len(ids)  # the whole sequence and its loss mask
        self.images, self.grids = list(images), list(grids)  # every image in sequence order
        self.next_pos = next_pos  # next free M-RoPE text position
        self.turn_start = len(ids)  # where the current assistant turn began
        self.turns, self.tool_calls = [], []  # the policy's own text per turn; every call made
        self.observations = []  # each spliced observation as ShareGPT text (<image> placeholders)
        self.pending = None  # the observation chunk to feed next, if any
        self.stop_reason = None
        self.generated_this_turn = 0
        self.response_tokens = 0
        self.logits = []  # (optional) every logit row used to sample this row's tokens


class Engine:
    """Generation with tool calls for one model + processor (nanochat's engine, for a VLM with tools)."""

    def __init__(self, model, processor, use_tools=True, max_calls=2, tool_min_pixels=3136, tool_max_pixels=12544):
        self.model, self.processor, self.tok = model, processor, processor.tokenizer
        self.use_tools, self.max_calls = use_tools, max_calls
        self.tool_min_pixels, self.tool_max_pixels = tool_min_pixels, tool_max_pixels
        self.factor = processor.image_processor.patch_size * processor.image_processor.merge_size
        self.image_token_id = model.config.image_token_id
        ids = lambda t: self.tok.convert_tokens_to_ids(t)
        self.im_end, self.tool_end = ids("<|im_end|>"), ids("</tool_call>")
        self.stop_ids = {self.im_end, self.tok.eos_token_id, ids("<|endoftext|>")} - {None}
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.im_end
        vocab = self.tok.get_vocab()
        self.banned = [vocab[t] for t in VISION_TOKENS if t in vocab]  # never sampled
        self.device = next(model.parameters()).device

    def encode(self, text, images):
        """Token ids, pixel values and grids of a piece of text with image placeholders."""
        batch = self.processor(text=[text], images=images or None, return_tensors="pt")
        grids = batch.get("image_grid_thw")
        return batch["input_ids"][0].tolist(), batch.get("pixel_values"), grids

    def observation_chunk(self, result):
        user = self.processor.apply_chat_template([{"role": "user", "content": result.content}], tokenize=False)
        return "<|im_end|>\n" + user + "<|im_start|>assistant\n"  # user = <|im_start|>user\n...<|im_end|>\n

    @torch.no_grad()
    def generate(self, prompts, n_samples=1, temperature=0.0, top_p=1.0, max_new_tokens=512,
                 max_response_tokens=2048, seed=0, logits_hook=None, keep_logits=False):
        """prompts: dicts with messages, prompt_images (placeholder order, prompt resolution) and tool_images
        (0 = query or None, i = candidate i, original resolution). Returns n_samples trajectories per prompt,
        prompt-major. logits_hook(row, logits) may edit a row's logits before sampling (tests)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with unsharded(self.model):  # FSDP: gather the weights once, then no collective until the end
            return self._generate(prompts, n_samples, temperature, top_p, max_new_tokens, max_response_tokens,
                                  gen, logits_hook, keep_logits)

    def _generate(self, prompts, n_samples, temperature, top_p, max_new_tokens, max_response_tokens, gen,
                  logits_hook, keep_logits):
        model, dev = self.model, self.device
        # group-shared prefill: the distinct prompts, left-padded into one batch, once; then each row of the
        # cache is repeated for its n_samples (padding stays masked through the full-length attention_mask)
        encoded = []
        for prompt in prompts:
            text = self.processor.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=False)
            ids, pixels, grids = self.encode(text, prompt["prompt_images"])
            pos, next_pos = mrope_positions(ids, grids, self.image_token_id, 0)
            encoded.append((ids, pixels, grids, pos, next_pos))
        width = max(len(e[0]) for e in encoded)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros(3, len(prompts), width, dtype=torch.long)
        attn = torch.zeros(len(prompts), width, dtype=torch.long)
        rows = []
        for p, (ids, pixels, grids, pos, next_pos) in enumerate(encoded):
            input_ids[p, width - len(ids):] = torch.tensor(ids)
            position_ids[:, p, width - len(ids):] = pos
            attn[p, width - len(ids):] = 1
            for g in range(n_samples):
                rows.append(Row(p, g, ids, prompts[p]["prompt_images"], [] if grids is None else grids.tolist(), next_pos))
        pixels = [e[1] for e in encoded if e[1] is not None]
        grids = [e[2] for e in encoded if e[2] is not None]
        cache = common.new_cache(model)
        out = model(input_ids=input_ids.to(dev), attention_mask=attn.to(dev), position_ids=position_ids.to(dev),
                    pixel_values=torch.cat(pixels).to(dev, model.dtype) if pixels else None,
                    image_grid_thw=torch.cat(grids).to(dev) if grids else None,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(n_samples)
        attn = attn.to(dev).repeat_interleave(n_samples, dim=0)
        logits = out.logits[:, -1].repeat_interleave(n_samples, dim=0)  # (B, V), B = prompts x samples
        active = list(range(len(rows)))  # rows[active[b]] is batch row b
        while active:
            # sample one token for every active row, then decide what each row feeds next
            logits = logits.float()
            raw = logits.cpu().clone() if keep_logits else None  # what the model computed, before masking
            logits[:, self.banned] = -float("inf")
            if logits_hook is not None:
                logits = torch.stack([logits_hook(rows[r], logits[b]) for b, r in enumerate(active)])
            tokens = sample(logits, temperature, top_p, gen).tolist()  # (B,)
            keep = []
            for b, (r, token) in enumerate(zip(active, tokens)):
                row = rows[r]
                if keep_logits:
                    row.logits.append(raw[b])
                row.ids.append(token)
                row.mask.append(1)
                row.generated_this_turn += 1
                row.response_tokens += 1
                if self.step_row(row, token, prompts[row.prompt_index], max_new_tokens, max_response_tokens):
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(active):  # finished rows leave the batch now
                index = torch.tensor(keep, device=dev)
                cache.batch_select_indices(index)
                attn = attn[index]
                active = [active[b] for b in keep]
            logits, attn = self.forward_step([rows[r] for r in active], cache, attn)
        return [self.trajectory(row) for row in rows]

    def step_row(self, row, token, prompt, max_new_tokens, max_response_tokens):
        """Update a row after it sampled `token`; False if the row is finished."""
        if token in self.stop_ids:
            row.turns.append(self.tok.decode(row.ids[row.turn_start:]))
            row.stop_reason = "stop"
            return False
        if token == self.tool_end and self.use_tools:
            turn_text = self.tok.decode(row.ids[row.turn_start:])
            row.turns.append(turn_text)
            result = tools.execute_tool_call(turn_text, prompt["tool_images"], self.tool_min_pixels,
                                             self.tool_max_pixels, self.factor)
            row.tool_calls.append({"name": result.name, "arguments": result.arguments, "valid": result.valid,
                                   "error": result.error})
            if len(row.tool_calls) > self.max_calls:
                row.stop_reason = "max_calls"  # run and recorded, but nothing more is generated
                return False
            ids, pixels, grids = self.encode(self.observation_chunk(result), result.images)
            if row.response_tokens + len(ids) > max_response_tokens:
                row.stop_reason = "length"
                return False
            row.pending = (ids, pixels, grids, result.images)
            row.observations.append("".join("<image>" if p["type"] == "image" else p["text"] for p in result.content))
            return True
        if row.generated_this_turn >= max_new_tokens or row.response_tokens >= max_response_tokens:
            row.turns.append(self.tok.decode(row.ids[row.turn_start:]))
            row.stop_reason = "length"
            return False
        return True

    def forward_step(self, batch_rows, cache, attn):
        """One forward for all active rows: each feeds its pending observation chunk or its last token."""
        dev, model = self.device, self.model
        if all(row.pending is None for row in batch_rows):  # the common case: every row decodes one token
            input_ids = torch.tensor([[row.ids[-1]] for row in batch_rows], device=dev)  # (B, 1)
            position_ids = torch.tensor([row.next_pos for row in batch_rows], device=dev).view(1, -1, 1).expand(3, -1, 1)
            for row in batch_rows:
                row.next_pos += 1
            attn = torch.cat([attn, torch.ones(len(batch_rows), 1, dtype=attn.dtype, device=dev)], dim=1)
            out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            return out.logits[:, -1], attn
        chunks = []
        for row in batch_rows:
            if row.pending is not None:  # the sampled </tool_call>, then the observation
                ids, pixels, grids, images = row.pending
                row.pending = None
                feed = [row.ids[-1]] + ids
                pos, row_next = mrope_positions(feed, grids, self.image_token_id, row.next_pos)
                row.ids += ids
                row.mask += [0] * len(ids)
                row.images += images
                row.grids += [] if grids is None else grids.tolist()
                row.response_tokens += len(ids)
                row.turn_start, row.generated_this_turn = len(row.ids), 0
                chunks.append((feed, pos, pixels, grids))
                row.next_pos = row_next
            else:
                chunks.append(([row.ids[-1]], torch.full((3, 1), row.next_pos), None, None))
                row.next_pos += 1
        width = max(len(c[0]) for c in chunks)
        input_ids = torch.full((len(chunks), width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros(3, len(chunks), width, dtype=torch.long)
        chunk_mask = torch.zeros(len(chunks), width, dtype=torch.long)
        for b, (ids, pos, _, _) in enumerate(chunks):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            position_ids[:, b, :len(ids)] = pos
            chunk_mask[b, :len(ids)] = 1
        pixels = [c[2] for c in chunks if c[2] is not None]
        grids = [c[3] for c in chunks if c[3] is not None]
        attn = torch.cat([attn, chunk_mask.to(dev)], dim=1)
        last = (chunk_mask.sum(1) - 1).to(dev)  # (B,) each row's last real slot in the chunk
        keep = torch.unique(last)  # the LM head runs only where some row needs its logits
        out = self.model(input_ids=input_ids.to(dev), attention_mask=attn, position_ids=position_ids.to(dev),
                         pixel_values=torch.cat(pixels).to(dev, model.dtype) if pixels else None,
                         image_grid_thw=torch.cat(grids).to(dev) if grids else None,
                         past_key_values=cache, use_cache=True, logits_to_keep=keep)
        return out.logits[torch.arange(len(chunks), device=dev), torch.searchsorted(keep, last)], attn

    def trajectory(self, row):
        text = "".join(row.turns)
        valid_calls = sum(c["valid"] for c in row.tool_calls)
        out = {"prompt_index": row.prompt_index, "sample_index": row.sample_index, "input_ids": row.ids,
               "loss_mask": row.mask, "images": row.images, "image_grid_thw": row.grids, "turns": row.turns,
               "final_text": row.turns[-1] if row.turns else "", "answer": parse_answer(text),
               "tool_calls": row.tool_calls, "observations": row.observations, "n_valid_calls": valid_calls, "stop_reason": row.stop_reason,
               "n_generated": sum(row.mask)}
        if row.logits:
            out["logits"] = row.logits
        return out


@contextlib.contextmanager
def unsharded(model):
    """Generation with an FSDP2-sharded policy: ranks run different numbers of forwards (rows end at
    different lengths), which would deadlock the per-layer all-gathers. So all-gather every shard once,
    in the same order on every rank, keep the weights whole during generation, and reshard after."""
    from torch.distributed.fsdp import FSDPModule
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp:
        yield
        return
    for m in fsdp:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP2's defaults: the root keeps its weights


def sample(logits, temperature, top_p, generator):
    """(B, V) logits -> (B,) tokens: greedy at temperature 0, else temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        outside = torch.cumsum(sorted_probs, -1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs.cpu(), 1, generator=generator).view(-1)

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
