"""The engine at scale: a ragged KV cache (a row's slots are its own tokens, whatever the other rows splice),
batches bounded by a KV budget, and samples keyed by prompt and sample index (independent of batching)."""
import torch

import common
import task
from engine import Engine
from test_rollout import full_forward_logits, setup

SELECT = '<tool_call>\n{"name": "select_images", "arguments": {"target_images": [1, 2, 3]}}\n</tool_call>'


def staggered_calls(tokenizer, calls_at):
    """A logits hook: the row (prompt p, sample g) writes calls_at[(p, g)] filler words, then a 3-image
    select_images call, in each of its first two turns; then it decodes freely (no call tag). Rows thus
    splice large observations at different steps."""
    forced = tokenizer(SELECT, add_special_tokens=False)["input_ids"]
    filler = tokenizer(" so", add_special_tokens=False)["input_ids"][0]
    tags = [tokenizer.convert_tokens_to_ids(t) for t in ("<tool_call>", "</tool_call>")]

    def hook(row, logits):
        k = len(row.ids) - row.turn_start - calls_at[(row.prompt_index, row.sample_index)]
        out = torch.full_like(logits, -1e9)
        if len(row.tool_calls) < 2 and k < len(forced):
            out[filler if k < 0 else forced[k]] = 0
            return out
        logits = logits.clone()
        logits[tags] = -1e9  # no further call
        return logits
    return hook


def test_rows_that_splice_at_different_steps_keep_their_own_slots(tokenizer, toy_data):
    """12 splices of ~60 tokens at different steps over 6 rows: the cache stays about the longest row's length
    (a rectangular cache that pads every row to each step's widest chunk grows by the sum of the widths), and
    every logit still equals one full forward over the final sequence."""
    engine, prompt = setup("qwen2_5_vl", tokenizer, toy_data)
    engine.tool_max_pixels = engine.tool_min_pixels * 4  # 16 tokens an image: observations of ~60 tokens
    other = dict(prompt, messages=task.build_messages("a blue disc on navy", False, "", [""] * 3, [True] * 3, True))
    calls_at = {(p, g): 3 + 7 * (3 * p + g) for p in range(2) for g in range(3)}  # 3, 10, ..., 38 tokens in
    trajs = engine.generate([prompt, other], n_samples=3, temperature=1.0, seed=5, max_new_tokens=70,
                            max_response_tokens=10 ** 6, logits_hook=staggered_calls(tokenizer, calls_at), keep_logits=True)
    assert [len(t["tool_calls"]) for t in trajs] == [2] * 6 and all(c["valid"] for t in trajs for c in t["tool_calls"])
    for t in trajs:
        full = full_forward_logits(engine, t)
        sampled = [i for i, m in enumerate(t["loss_mask"]) if m == 1]
        assert (torch.stack(t["logits"]) - torch.stack([full[i - 1] for i in sampled])).abs().max() < 1e-4
    longest = max(len(t["input_ids"]) for t in trajs)
    observation_widths = [len(t["input_ids"]) - len(t["loss_mask"]) + sum(1 for m in t["loss_mask"] if m == 0) for t in trajs]
    splices = sum(observation_widths) - 6 * min(observation_widths)  # what other rows' splices add to a rectangle
    slots = engine.stats["kv_slots_per_row"]
    assert longest <= slots <= longest * 17 / 16 + 16 + 80  # its own tokens, the growth slack and one step's width
    assert slots < longest + splices / 2  # far below what a rectangular cache would hold


def test_samples_do_not_depend_on_batching_or_chunking(tokenizer, toy_data):
    """A trajectory's random numbers are keyed by (seed, prompt key, sample index): generating a group alone,
    beside another group, or in chunks bounded by a tiny KV budget draws the same tokens."""
    engine, prompt = setup("qwen2_5_vl", tokenizer, toy_data, use_tools=False)
    a = dict(prompt, key="q:1")
    b = dict(prompt, key="q:2", messages=task.build_messages("a blue disc", False, "", [""] * 3, [True] * 3, False))
    kwargs = dict(n_samples=3, temperature=1.0, seed=7, max_new_tokens=12)
    together = engine.generate([a, b], **kwargs)
    assert engine.stats["chunks"] == 1
    alone_b = engine.generate([b], **kwargs)
    engine.kv_budget_bytes = 1  # every group over budget: one chunk per group
    chunked = engine.generate([b, a], **kwargs)
    assert engine.stats["chunks"] == 2
    ids = lambda trajs: [t["input_ids"] for t in trajs]  # noqa: E731
    assert ids(together[3:]) == ids(alone_b) == ids(chunked[:3]) and ids(together[:3]) == ids(chunked[3:])
    assert len({tuple(t["input_ids"]) for t in together[:3]}) > 1  # the samples of a group differ from each other


def test_chunks_fit_the_budget_and_keep_groups_whole(tokenizer, toy_data):
    engine, prompt = setup("qwen2_5_vl", tokenizer, toy_data)
    n_prompt = len(engine.encode_prompt(prompt)[0])
    per_group = 4 * (n_prompt + 100) * engine.kv_bytes_per_token  # 4 samples, 100 response tokens each
    engine.kv_budget_bytes = 2.5 * per_group
    chunks = engine.chunks([engine.encode_prompt(prompt)] * 5, 4, 100)
    assert chunks == [[0, 1], [2, 3], [4]]
    text = engine.model.config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    assert engine.kv_bytes_per_token == 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 4  # fp32


def test_the_kv_unit_is_what_a_real_cache_holds(tokenizer):
    """kv_bytes_per_token against the K/V tensors a DynamicCache holds after a forward of 10 tokens."""
    model = common.build_tiny_model("qwen2_5_vl", tokenizer, seed=0).eval()
    processor = common.make_processor(tokenizer, 14, 784, 784)
    engine = Engine(model, processor)
    cache = common.new_cache(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]), past_key_values=cache, use_cache=True)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert held == 10 * engine.kv_bytes_per_token
