"""
Side-by-side measurements: each line prints both sides and ends with `ratio: X` (first side / second).
Timings on shared machines are noisy, so every comparison runs both sides in this one process, takes the
best of `repeats` runs of each, and reports only the ratio as the result.

    python bench.py                      # all measurements, tiny models on CPU
    python bench.py --only=faiss --repeats=5
    python bench.py --only=kv             # (also: decode, bare, prefill, prompt, logprob)
"""

import sys
import time

import numpy as np
import torch
from PIL import Image

import common
import task
from engine import Engine
from configurator import configure

# -----------------------------------------------------------------------------
only = ""          # '' = all, else one of decode, bare, prefill, kv, logprob, prompt, faiss
repeats = 3        # best-of-N timing per side
arch = "qwen2_5_vl"
tokenizer_dir = "data/toy/tokenizer"  # run data/toy/prepare.py first
n_layer = 4        # the toy policy's size
n_embd = 128
batch = 8          # (decode) rows generated side by side
new_tokens = 128   # (decode) tokens per row
group = 8          # (prefill) samples sharing one prompt
n_candidates = 20  # (prefill) candidate images in the prompt
train_batch = 8    # (prompt) reranking records per training step
splice_rows = 16   # (kv) rows, each splicing ...
splice_images = 4  # ... observations of this many images ...
splice_side = 224  # ... of this side (64 tokens each) at staggered steps
logprob_T = 1024   # (logprob) positions ...
logprob_V = 151936  # ... and vocabulary (Qwen's)
logprob_chunk = 64    # peak ~ 3 x chunk x V x 4 B (logits, log-softmax, grad): chunk <= T/12 for <= 25%
faiss_n = 100_000  # (faiss) pool size ...
faiss_dim = 512    # ... dimension ...
faiss_queries = 1000  # ... queries ...
faiss_k = 50       # ... and depth
seed = 1337
# -----------------------------------------------------------------------------


def best_time(fn):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def toy_engine():
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = common.build_tiny_model(arch, tokenizer, seed=seed, n_layer=n_layer, n_embd=n_embd).eval()
    patch = common.ARCHS[arch][2]
    processor = common.make_processor(tokenizer, patch, (2 * patch) ** 2, 16 * (2 * patch) ** 2)
    return Engine(model, processor, use_tools=False)


def toy_prompt(engine, n_images, side, text):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n_images)]
    messages = task.build_messages(text, False, "", [""] * n_images, [True] * n_images, False, style="compact")
    return {"messages": messages, "prompt_images": images, "tool_images": [None] + images}


def bench_decode():
    """(a) engine.py's loop vs HF generate: same model, same batch, greedy, no tools, new_tokens each."""
    engine = toy_engine()
    engine.stop_ids = set()  # both sides generate exactly new_tokens per row
    prompts = [toy_prompt(engine, 1, 28, f"query number {i}") for i in range(batch)]
    t_ours, trajs = best_time(lambda: engine.generate(prompts, max_new_tokens=new_tokens, max_response_tokens=10 ** 6))

    def hf_generate():  # the same job from the same messages: template, process, generate
        texts = [engine.processor.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=False)
                 for p in prompts]
        engine.processor.tokenizer.padding_side = "left"
        inputs = engine.processor(text=texts, images=[p["prompt_images"][0] for p in prompts], return_tensors="pt",
                                  padding=True)
        with torch.no_grad():
            out = engine.model.generate(**common.model_inputs(inputs, "cpu"), max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens, do_sample=False,
                                        bad_words_ids=[[i] for i in engine.banned])
        return out.shape[1] - inputs["input_ids"].shape[1]
    t_hf, hf_new = best_time(hf_generate)
    n = batch * new_tokens
    assert all(t["n_generated"] == new_tokens for t in trajs) and hf_new == new_tokens
    print(f"decode  batch {batch} x {new_tokens} tokens: engine.py {n / t_ours:.0f} tok/s, "
          f"HF generate {n / t_hf:.0f} tok/s, ratio: {t_hf / t_ours:.2f}")


def bench_bare():
    """(a') engine.py's loop vs a bare loop of model forwards on the same ragged cache and batch (greedy, no
    tools, no budgets): the engine's own bookkeeping is the difference."""
    from engine import RaggedCache, ragged_mask
    engine = toy_engine()
    engine.stop_ids = set()
    prompts = [toy_prompt(engine, 1, 28, f"query number {i}") for i in range(batch)]
    t_ours, _ = best_time(lambda: engine.generate(prompts, max_new_tokens=new_tokens, max_response_tokens=10 ** 6))
    model = engine.model
    encoded = [engine.encode_prompt(p) for p in prompts]

    @torch.no_grad()
    def bare():
        width = max(len(e[0]) for e in encoded)
        ids = torch.full((batch, width), engine.pad_id)
        pos = torch.zeros(3, batch, width, dtype=torch.long)
        for b, e in enumerate(encoded):
            ids[b, :len(e[0])], pos[:, b, :len(e[0])] = torch.tensor(e[0]), e[3]
        cache = RaggedCache(model.config.get_text_config().num_hidden_layers)
        cache.lengths = torch.zeros(batch, dtype=torch.long)
        lengths = torch.tensor([len(e[0]) for e in encoded])
        out = model(input_ids=ids, position_ids=pos, attention_mask=ragged_mask(cache.lengths, width, None, "cpu"),
                    pixel_values=torch.cat([e[1] for e in encoded]), image_grid_thw=torch.cat([torch.tensor(e[2]) for e in encoded]),
                    past_key_values=cache, use_cache=True, logits_to_keep=torch.unique(lengths - 1))
        keep = torch.unique(lengths - 1)
        token = out.logits[torch.arange(batch), torch.searchsorted(keep, lengths - 1)].argmax(-1)
        cache.lengths, next_pos = lengths, torch.tensor([e[4] for e in encoded])
        for _ in range(new_tokens - 1):
            out = model(input_ids=token[:, None], position_ids=next_pos.view(1, -1, 1).expand(3, -1, 1),
                        attention_mask=ragged_mask(cache.lengths, 1, None, "cpu"), past_key_values=cache, use_cache=True)
            token, cache.lengths, next_pos = out.logits[:, -1].argmax(-1), cache.lengths + 1, next_pos + 1
    t_bare, _ = best_time(bare)
    n = batch * new_tokens
    print(f"decode  batch {batch} x {new_tokens} tokens: engine.py {n / t_ours:.0f} tok/s, bare forward loop "
          f"{n / t_bare:.0f} tok/s, ratio: {t_bare / t_ours:.2f}")


def bench_kv():
    """(e) the ragged cache: rows splice large observations (splice_images images) at different steps; KV slots
    per row against the longest row's real tokens, and what a rectangular cache (every row padded to each
    step's widest chunk) would hold."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = common.build_tiny_model(arch, tokenizer, seed=seed, n_layer=n_layer, n_embd=n_embd).eval()
    f = 2 * common.ARCHS[arch][2]
    processor = common.make_processor(tokenizer, common.ARCHS[arch][2], f * f, splice_side ** 2)
    engine = Engine(model, processor, use_tools=True, tool_min_pixels=f * f, tool_max_pixels=splice_side ** 2)
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (splice_side, splice_side, 3), dtype=np.uint8)) for _ in range(splice_images)]
    prompt = {"messages": task.build_messages("a query", False, "", [""] * splice_images, [True] * splice_images, True, style="compact"),
              "prompt_images": [common.qwen_resize(im, f * f, f * f, f) for im in images], "tool_images": [None] + images}
    call = tokenizer('<tool_call>\n{"name": "select_images", "arguments": {"target_images": %s}}\n</tool_call>'
                     % list(range(1, splice_images + 1)), add_special_tokens=False)["input_ids"]
    filler = tokenizer(" so", add_special_tokens=False)["input_ids"][0]

    def hook(row, logits):  # row r writes 5 + 9 r filler tokens, its call, then twice more; 24 splices over 16 rows
        out = torch.full_like(logits, -1e9)
        calls = 2 if row.sample_index % 2 else 1
        k = len(row.ids) - row.turn_start - (5 + 9 * row.sample_index)
        out[filler if k < 0 or len(row.tool_calls) >= calls else call[k] if k < len(call) else engine.im_end] = 0
        if len(row.tool_calls) >= calls and len(row.ids) - row.turn_start > 20:
            out[:] = -1e9
            out[engine.im_end] = 0
        return out
    trajs = engine.generate([prompt], n_samples=splice_rows, max_new_tokens=200, max_response_tokens=10 ** 6, logits_hook=hook)
    splices = sum(len(t["tool_calls"]) for t in trajs)
    slots, longest, rect = engine.stats["kv_slots_per_row"], engine.stats["longest_row"], engine.stats["rectangular_slots"]
    print(f"KV cache, {splice_rows} rows, {splices} splices of {splice_images} images: slots per row {slots}, longest row "
          f"{longest} tokens, a rectangular cache {rect} slots ({rect / longest:.2f}x), ratio: {slots / longest:.2f}")


def bench_logprob():
    """(f) peak memory of the sampled tokens' log-probs (forward + backward) at Qwen's vocabulary: one (T, V)
    fp32 block the plain way, against common.token_logprobs's chunks; both against T x V x 4 bytes."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = common.tiny_config(arch, tokenizer, n_layer=1, n_embd=64, n_head=2, n_kv_head=1, vision_depth=1, vision_hidden=32)
    config.text_config.vocab_size = logprob_V
    model = common.ARCHS[arch][0](config)
    # the head's and embeddings' weight gradients (V x D each) are not the log-prob computation's memory (FSDP
    # shards them at scale, memory.py counts them): frozen here, so the peak is the activations it holds
    model.lm_head.requires_grad_(False)
    model.model.language_model.embed_tokens.requires_grad_(False)
    ids = torch.randint(0, len(tokenizer) - 30, (1, logprob_T))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def peak(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        live = top = 0
        for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()):
            live += e.nbytes()
            top = max(top, live)
        return top

    def plain():
        logits = model(**batch).logits[:, :-1].float()
        torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).sum().backward()

    def chunked():
        common.token_logprobs(model, batch, "cpu", chunk=logprob_chunk).sum().backward()
    tv = logprob_T * logprob_V * 4
    p_plain, p_chunked = peak(plain), peak(chunked)
    print(f"log-probs, T {logprob_T} x V {logprob_V} (T x V x 4 = {tv / 2 ** 20:.0f} MiB): full logits peak "
          f"{p_plain / 2 ** 20:.0f} MiB ({p_plain / tv:.2f}x), chunks of {logprob_chunk} {p_chunked / 2 ** 20:.0f} MiB, "
          f"ratio: {p_chunked / tv:.2f}")


def bench_prefill():
    """(b) G samples of one prompt with n_candidates images: one shared prefill vs G independent ones."""
    engine = toy_engine()
    prompt = toy_prompt(engine, n_candidates, 112, "a query with many candidate images")
    t_shared, _ = best_time(lambda: engine.generate([prompt], n_samples=group, max_new_tokens=1))
    t_indep, _ = best_time(lambda: engine.generate([prompt] * group, n_samples=1, max_new_tokens=1))
    print(f"prefill group {group}, {n_candidates} images of 112x112: shared {t_shared * 1000:.0f} ms, "
          f"independent {t_indep * 1000:.0f} ms, ratio: {t_indep / t_shared:.2f}")


def spelled_out(tokenizer, text):
    """Plain BPE ids of text, without the added tokens: what a tokenizer lacking them would give."""
    backend = tokenizer.backend_tokenizer
    return [t.id for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text) for t in backend.model.tokenize(piece)]


def bench_prompt():
    """(c) one SFT step (forward + backward) on tool-prompt reranking records: the prompt text that is the
    same in every record (the system prompt with the tool specs, the guidelines) spelled out in BPE, as a
    tokenizer without the toy's added tokens would give it, vs held as one added token each (the toy's)."""
    import re
    import sft
    from transformers import AutoTokenizer
    sys.path.insert(0, "data/toy")
    import prepare
    fixed = prepare.fixed_prompt_text()[::2]  # the tool variants: system prompt with tool specs, guidelines with hint
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert all(t in tok.get_vocab() for t in fixed), f"{tokenizer_dir} lacks the fixed prompt tokens: rerun prepare.py"
    model = common.build_tiny_model(arch, tok, seed=seed, n_layer=n_layer, n_embd=n_embd).train()
    processor = common.make_processor(tok, common.ARCHS[arch][2], 784, 784)
    reply = "<think>" + " ".join(f"({i}) candidate {i}: vertical, wanted checkered: no, best none." for i in range(1, 5))
    reply += " So candidate 1 is the match.</think>\n<answer>[1, 2, 3, 4, 5]</answer><|im_end|>"
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)) for _ in range(5)]
    messages = task.build_messages("an orange disc with a checkered tag", False, "Find it.", [""] * 5, [True] * 5, True,
                                   style="compact")
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + reply
    as_one = tok(text, add_special_tokens=False)["input_ids"]
    spelled = []
    for part in re.split("(" + "|".join(map(re.escape, fixed)) + ")", text):
        spelled += spelled_out(tok, part) if part in fixed else tok(part, add_special_tokens=False)["input_ids"]
    assert tok.decode(spelled) == tok.decode(as_one) == text and len(spelled) > len(as_one)

    def step(ids):
        examples = [{"input_ids": ids, "loss_mask": [1] * len(ids), "images": images}] * train_batch
        batch = common.collate(examples, processor, model.config.image_token_id, tok.pad_token_id)
        loss, n = sft.token_loss_sum(model, batch, "cpu")
        (loss / n).backward()
        model.zero_grad(set_to_none=True)
    t_spelled, _ = best_time(lambda: step(spelled))
    t_one, _ = best_time(lambda: step(as_one))
    print(f"SFT step, {train_batch} tool-prompt records: fixed text spelled out {len(spelled)} tokens/record "
          f"{t_spelled * 1000:.0f} ms, one token each {len(as_one)} tokens/record {t_one * 1000:.0f} ms, "
          f"ratio: {t_spelled / t_one:.2f}")


def bench_faiss():
    """(d) exact inner-product top-k: faiss IndexFlatIP vs numpy matmul + argpartition."""
    import retrieve
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((faiss_n, faiss_dim), dtype=np.float32)
    queries = rng.standard_normal((faiss_queries, faiss_dim), dtype=np.float32)

    def numpy_topk():
        sims = queries @ pool.T
        part = np.argpartition(-sims, faiss_k, axis=1)[:, :faiss_k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1)
        return np.take_along_axis(part, order, 1)
    t_faiss, (_, idx_faiss) = best_time(lambda: retrieve.search(queries, pool, faiss_k))
    t_numpy, idx_numpy = best_time(numpy_topk)
    same = np.mean(idx_faiss == idx_numpy)
    print(f"top-{faiss_k} of {faiss_n}x{faiss_dim} for {faiss_queries} queries: faiss {t_faiss * 1000:.0f} ms, "
          f"numpy {t_numpy * 1000:.0f} ms, same ids {same:.4f}, ratio: {t_numpy / t_faiss:.2f}")


if __name__ == "__main__":
    configure(globals())
    torch.manual_seed(seed)
    for name, fn in [("decode", bench_decode), ("bare", bench_bare), ("prefill", bench_prefill), ("kv", bench_kv),
                     ("logprob", bench_logprob), ("prompt", bench_prompt), ("faiss", bench_faiss)]:
        if only in ("", name):
            fn()
