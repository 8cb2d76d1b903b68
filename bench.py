"""
Side-by-side measurements: each line prints both sides and ends with `ratio: X` (first side / second).
Timings on shared machines are noisy, so every comparison runs both sides in this one process, takes the
best of `repeats` runs of each, and reports only the ratio as the result.

    python bench.py                      # all measurements, tiny models on CPU
    python bench.py --only=faiss --repeats=5
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
only = ""          # '' = all, else one of decode, prefill, prompt, faiss
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
    messages = task.build_messages(text, False, "", [""] * n_images, [True] * n_images, False)
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
    messages = task.build_messages("an orange disc with a checkered tag", False, "Find it.", [""] * 5, [True] * 5, True)
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
    for name, fn in [("decode", bench_decode), ("prefill", bench_prefill), ("prompt", bench_prompt),
                     ("faiss", bench_faiss)]:
        if only in ("", name):
            fn()
