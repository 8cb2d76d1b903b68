"""No model output can break the engine: 10,000 random and adversarial tool-call turns go through the engine's
own turn handling (decode the turn, run the tool, build and tokenize the observation), and every observation
holds exactly its template's control tokens and its images' tokens, whatever text the model wrote."""
import json
import random

import torch

import tools
from engine import Row
from test_rollout import setup

SPECIALS = ["<|image_pad|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<image>",
            "<|endoftext|>", "<tool_call>", "</tool_call>", "<|video_pad|>"]
NAMES = ["select_images", "crop_image", "zoom_in", "crop_image_normalized", "Crop_Image", ""]


def adversarial_value(rng, depth=0):
    """A JSON value a model might write: numbers of every kind, strings full of control-token text, nesting."""
    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice(SPECIALS) * rng.randrange(1, 4)
    if kind == 1:
        return rng.randrange(-5, 8)
    if kind == 2:
        return rng.choice([0.0, 0.4, 1.0, 1e308, -1e-300, 3.5, 2.0])
    if kind == 3:
        return rng.choice([None, True, False, "2", " 1 ", "１"])
    if kind == 4 and depth < 3:
        return [adversarial_value(rng, depth + 1) for _ in range(rng.randrange(0, 6))]
    if kind == 5 and depth < 3:
        return {rng.choice(["bbox_2d", "target_image", "target_images", rng.choice(SPECIALS)]): adversarial_value(rng, depth + 1)}
    if kind == 6:
        return [rng.uniform(-0.5, 1.5) for _ in range(4)]
    if kind == 7:
        return [rng.randrange(-50, 200) for _ in range(rng.choice([3, 4, 5]))]
    return "".join(rng.choice("ab{}[]\":,<|>_ 0123\n") for _ in range(rng.randrange(0, 12)))


def adversarial_turn(rng):
    """The text of one assistant turn that ends with </tool_call> (where the engine runs the tool)."""
    if rng.random() < 0.25:  # a well-formed call, so that the valid path (images spliced) is fuzzed too
        name, args = rng.choice([("select_images", {"target_images": rng.sample([0, 1, 2, 3], rng.randrange(1, 4))}),
                                 ("crop_image", {"bbox_2d": sorted(rng.uniform(0, 1) for _ in range(2)) * 2,
                                                 "target_image": rng.randrange(0, 4)})])
        return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"
    name = rng.choice(NAMES + SPECIALS)
    args = {k: adversarial_value(rng) for k in rng.sample(["bbox_2d", "target_image", "target_images", "x"], rng.randrange(0, 4))}
    if rng.random() < 0.3:
        args = adversarial_value(rng)
    call = json.dumps({"name": name, "arguments": args}, ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.2:  # broken JSON
        call = call[:rng.randrange(len(call) + 1)] + rng.choice(SPECIALS)
    prefix = "".join(rng.choice(SPECIALS + ["think ", "x"]) for _ in range(rng.randrange(0, 3)))
    return f"{prefix}<tool_call>\n{call}\n</tool_call>"


def test_ten_thousand_turns_never_break_an_observation(tokenizer, toy_data):
    engine, prompt = setup("qwen2_5_vl", tokenizer, toy_data)
    rng, counts = random.Random(0), {"valid": 0, "invalid": 0}
    special_ids = {tokenizer.convert_tokens_to_ids(t) for t in SPECIALS if t.startswith("<|")}
    for i in range(10_000):
        text = adversarial_turn(rng)
        # the model reaches control-token TEXT with ordinary pieces (the single control ids are never sampled)
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert not special_ids & set(ids)
        row = Row(0, 0, [], [], [], 0, None)
        row.ids = ids[:-1] + [engine.tool_end]  # the turn as sampled, closed by the real </tool_call> token
        keep = engine.step_row(row, engine.tool_end, prompt, max_new_tokens=10 ** 6, max_response_tokens=10 ** 6)
        assert keep and row.pending is not None, text
        obs_ids, _, grids, images = row.pending
        assert engine.clean_observation(obs_ids, grids, len(images)), text
        reason = row.tool_calls[-1]["error"] or ""
        assert not any(s in reason for s in SPECIALS), (text, reason)  # the tools echo no model text
        counts["valid" if row.tool_calls[-1]["valid"] else "invalid"] += 1
    assert counts["valid"] > 1000 and counts["invalid"] > 5000  # both paths were exercised


def test_an_unclean_observation_is_replaced_not_spliced(tokenizer, toy_data):
    """Defense in depth: if a tool ever returned text with a control token, the engine splices a plain invalid
    observation instead (the check itself, on a forged result)."""
    engine, prompt = setup("qwen2_5_vl", tokenizer, toy_data)
    forged = tools.ToolResult(False, None, None, "x", [{"type": "text", "text": "oops <|image_pad|> <|im_start|>"}], [])
    result, (ids, _, grids) = engine.observation(forged)  # the processor would raise on the forged text itself
    assert result.content == [{"type": "text", "text": tools.INVALID}] and engine.clean_observation(ids, grids, 0)
    assert engine.tok.decode(ids) == "<|im_end|>\n<|im_start|>user\n" + tools.INVALID + "<|im_end|>\n<|im_start|>assistant\n"
    real = tools.execute_tool_call('<tool_call>\n{"name": "select_images", "arguments": {"target_images": [1]}}\n</tool_call>',
                                   prompt["tool_images"], engine.tool_min_pixels, engine.tool_max_pixels)
    result, (ids, _, grids) = engine.observation(real)
    assert result is real and engine.clean_observation(ids, grids, 1) and isinstance(grids, torch.Tensor)
