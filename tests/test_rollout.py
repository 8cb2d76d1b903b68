import pytest
import torch

import common
import task
from conftest import TOY_CONFIG
from engine import Engine, mrope_positions
from task import parse_answer

CALL = '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [0, 0, 0.4, 0.4], "target_image": 2}}\n</tool_call>'


def setup(arch, tokenizer, toy_data, n_cands=3, use_tools=True):
    patch = common.ARCHS[arch][2]
    f = 2 * patch
    processor = common.make_processor(tokenizer, patch, f * f, 16 * f * f)
    model = common.build_tiny_model(arch, tokenizer, seed=0).eval()
    images = [common.load_image(f"{toy_data}/images/test/pool/{i}.png") for i in range(n_cands)]
    messages = task.build_messages("a red disc", False, "Find it.", [""] * n_cands, [True] * n_cands, use_tools,
                                   style="compact")
    prompt = {"messages": messages, "prompt_images": [common.qwen_resize(im, f * f, f * f, f) for im in images],
              "tool_images": [None] + images}
    engine = Engine(model, processor, use_tools=use_tools, tool_min_pixels=4 * f * f, tool_max_pixels=4 * f * f)
    return engine, prompt


def force_call(tokenizer, call=CALL, prompts=(0,)):
    """A logits hook: rows of the given prompts write `call` at the start of their first turn; no other
    </tool_call> is ever sampled, so exactly those rows make exactly one call."""
    forced = tokenizer(call, add_special_tokens=False)["input_ids"]
    tool_end = tokenizer.convert_tokens_to_ids("</tool_call>")

    def hook(row, logits):
        k = len(row.ids) - row.turn_start
        if row.prompt_index in prompts and not row.tool_calls and k < len(forced):
            out = torch.full_like(logits, -1e9)
            out[forced[k]] = 0
            return out
        logits = logits.clone()
        logits[tool_end] = -1e9
        return logits
    return hook


def full_forward_logits(engine, traj):
    """Logits of one plain forward over the whole final sequence with all its images."""
    model, ids = engine.model, traj["input_ids"]
    pixels = engine.processor.image_processor(images=traj["images"], return_tensors="pt")
    mm = torch.tensor([[int(i == model.config.image_token_id) for i in ids]])
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values=pixels["pixel_values"],
                     image_grid_thw=pixels["image_grid_thw"], mm_token_type_ids=mm).logits[0]


@pytest.mark.parametrize("arch", list(common.ARCHS))
def test_greedy_loop_equals_hf_generate(arch, tokenizer, toy_data):
    engine, prompt = setup(arch, tokenizer, toy_data)
    # a random model may write </tool_call> anywhere, where the engine pauses to run the tool and HF does not:
    # both sides are kept from writing it, so that they decode the same single turn
    tool_end = tokenizer.convert_tokens_to_ids("</tool_call>")
    no_tool_end = lambda row, logits: logits.index_fill(0, torch.tensor([tool_end]), -float("inf"))  # noqa: E731
    traj = engine.generate([prompt], max_new_tokens=12, logits_hook=no_tool_end)[0]
    text = engine.processor.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=False)
    batch = engine.processor(text=[text], images=prompt["prompt_images"], return_tensors="pt")
    out = engine.model.generate(**common.model_inputs(batch, "cpu"), max_new_tokens=12, do_sample=False,
                                bad_words_ids=[[i] for i in engine.banned + [tool_end]])
    n = batch["input_ids"].shape[1]
    assert traj["input_ids"][:n] == batch["input_ids"][0].tolist()
    assert traj["input_ids"][n:] == out[0, n:].tolist()[:len(traj["input_ids"]) - n]
    assert len(traj["input_ids"]) - n >= 2  # more than one token compared


@pytest.mark.parametrize("arch", list(common.ARCHS))
def test_spliced_logits_equal_a_full_forward(arch, tokenizer, toy_data):
    """Rows of prompt 0 are forced to crop candidate 2, rows of prompt 1 decode freely: a mixed batch."""
    engine, prompt = setup(arch, tokenizer, toy_data)
    other = dict(prompt, messages=task.build_messages("a blue disc on navy", False, "", [""] * 3, [True] * 3, True,
                                                         style="compact"))
    trajs = engine.generate([prompt, other], n_samples=2, temperature=1.0, seed=3, max_new_tokens=60,
                            logits_hook=force_call(tokenizer), keep_logits=True)
    assert [len(t["tool_calls"]) for t in trajs] == [1, 1, 0, 0]
    for t in trajs:
        full = full_forward_logits(engine, t)
        sampled = [i for i, m in enumerate(t["loss_mask"]) if m == 1]
        reference = torch.stack([full[i - 1] for i in sampled])  # logits that predicted each sampled token
        assert (torch.stack(t["logits"]) - reference).abs().max() < 1e-4
    called = trajs[0]
    assert called["tool_calls"][0] == {"name": "crop_image", "valid": True, "error": None,
                                       "arguments": {"bbox_2d": [0, 0, 0.4, 0.4], "target_image": 2}}
    assert len(called["images"]) == 4 and called["images"][3].size == (2 * common.ARCHS[arch][2] * 2,) * 2


def test_loss_mask_is_one_exactly_on_sampled_tokens(tokenizer, toy_data):
    engine, prompt = setup("qwen2_5_vl", tokenizer, toy_data)
    traj = engine.generate([prompt], temperature=1.0, seed=1, max_new_tokens=60, logits_hook=force_call(tokenizer),
                           keep_logits=True)[0]
    ids, mask = traj["input_ids"], traj["loss_mask"]
    assert len(traj["logits"]) == sum(mask) == traj["n_generated"]  # one sampling step per masked-in token
    text = engine.processor.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=False)
    n_prompt = len(engine.encode(text, prompt["prompt_images"])[0])
    assert mask[:n_prompt] == [0] * n_prompt
    call_end = ids.index(engine.tool_end, n_prompt)
    assert mask[n_prompt:call_end + 1] == [1] * (call_end + 1 - n_prompt)  # the call, </tool_call> included
    obs_end = call_end + 1
    while tokenizer.decode(ids[call_end + 1:obs_end]).endswith("<|im_start|>assistant\n") is False:
        obs_end += 1
    observation = tokenizer.decode(ids[call_end + 1:obs_end])
    assert observation.startswith("<|im_end|>\n<|im_start|>user\nHere is the cropped image. (Image Size: 56x56)")
    assert mask[call_end + 1:obs_end] == [0] * (obs_end - call_end - 1)  # observation, image tokens included
    assert all(m == 1 for m in mask[obs_end:])


def test_group_shared_prefill_equals_independent_prefills(tokenizer, toy_data):
    engine, prompt = setup("qwen2_5_vl", tokenizer, toy_data)
    other = dict(prompt, messages=task.build_messages("a much longer query about a green disc", False, "",
                                                         [""] * 3, [True] * 3, True, style="compact"))
    hook = force_call(tokenizer, prompts=(1,))
    shared = engine.generate([prompt, other], n_samples=3, max_new_tokens=50, logits_hook=hook)
    alone = [engine.generate([p], n_samples=1, max_new_tokens=50, logits_hook=force_call(tokenizer, prompts=(0,)) if p is other else None)[0]
             for p in (prompt, other)]
    for t in shared:
        assert t["input_ids"] == alone[t["prompt_index"]]["input_ids"]


def test_no_tools_mode_never_executes_tool_tags(tokenizer, toy_data):
    engine, prompt = setup("qwen2_5_vl", tokenizer, toy_data, use_tools=False)
    assert "<tools>" not in prompt["messages"][0]["content"]
    traj = engine.generate([prompt], max_new_tokens=60, logits_hook=force_call(tokenizer))[0]
    assert traj["tool_calls"] == [] and len(traj["images"]) == 3 and all(m == 1 for m in traj["loss_mask"][-5:])


def test_a_call_past_max_calls_ends_the_trajectory(tokenizer, toy_data):
    engine, prompt = setup("qwen2_5_vl", tokenizer, toy_data)
    engine.max_calls = 0
    traj = engine.generate([prompt], max_new_tokens=60, logits_hook=force_call(tokenizer))[0]
    assert traj["stop_reason"] == "max_calls" and traj["tool_calls"][0]["valid"]
    assert traj["input_ids"][-1] == engine.tool_end and traj["answer"] is None


def test_vision_tokens_are_never_sampled(tokenizer, toy_data):
    engine, prompt = setup("qwen2_5_vl", tokenizer, toy_data)

    def push_vision(row, logits):
        logits = logits.clone()
        logits[engine.banned] = torch.where(torch.isinf(logits[engine.banned]), logits[engine.banned], 1e9)
        return logits
    traj = engine.generate([prompt], temperature=1.0, max_new_tokens=20, logits_hook=push_vision)[0]
    generated = [i for i, m in zip(traj["input_ids"], traj["loss_mask"]) if m]
    assert not set(generated) & set(engine.banned)


@pytest.mark.parametrize("arch", list(common.ARCHS))
def test_mrope_positions_match_the_model(arch, tokenizer, toy_data):
    engine, prompt = setup(arch, tokenizer, toy_data)
    text = engine.processor.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=False)
    images = prompt["prompt_images"] + [prompt["tool_images"][1].resize((56, 84))]
    ids, _, grids = engine.encode(text + "<|vision_start|><|image_pad|><|vision_end|>x", images)
    mm = torch.tensor([[int(i == engine.image_token_id) for i in ids]])
    expected, _ = engine.model.model.get_rope_index(torch.tensor([ids]), mm_token_type_ids=mm, image_grid_thw=grids)
    mine, next_pos = mrope_positions(ids, grids, engine.image_token_id, 0)
    assert torch.equal(mine, expected[:, 0]) and next_pos == expected.max() + 1


def test_parse_answer():
    assert parse_answer("<think>x</think><answer>[3, 1, 2]</answer>") == [3, 1, 2]
    assert parse_answer("<answer>[2,1]</answer> <answer>[1]</answer>") == [2, 1]  # the first one
    assert parse_answer("<answer>3, 1</answer>") is None
    assert parse_answer("<answer>[a, 1]</answer>") is None
    assert parse_answer("no answer") is None
    assert parse_answer("<answer>[]</answer>") == []
    assert parse_answer("<answer> 3 </answer>") == [3]  # the release prompts ask for the single best number
    assert parse_answer("<answer>-3</answer>") is None and parse_answer("<answer>3.0</answer>") is None
    assert task.merge_window(["a", "b", "c", "d"], 0, 4, parse_answer("<answer>3</answer>")) == ["c", "a", "b", "d"]


def test_merge_window_rules():
    order = ["a", "b", "c", "d", "e", "f"]
    # window over c, d, e (start 2, size 3): answer [3, 1] -> e, c, then the missing d
    assert task.merge_window(order, 2, 3, [3, 1]) == ["a", "b", "e", "c", "d", "f"]
    assert task.merge_window(order, 2, 3, [2, 2, 9, 0, -1, 1]) == ["a", "b", "d", "c", "e", "f"]  # dup, out of range
    assert task.merge_window(order, 2, 3, None) == order  # unparsable: keep the previous order
    assert task.merge_window(order, 4, 5, [2, 1]) == ["a", "b", "c", "d", "f", "e"]  # a short last window
    assert task.merge_window(order, 0, 3, []) == order


def test_window_starts():
    assert task.window_starts(50, 20, 10) == [30, 20, 10, 0]
    assert task.window_starts(10, 20, 10) == [0]
    assert task.window_starts(25, 10, 10) == [15, 5, 0]


@pytest.fixture(scope="module")
def rerank_setup(toy_data, tokenizer, tmp_path_factory):
    """An untrained tiny policy saved like a checkpoint, and a stage-0 ranked file of 6 queries."""
    root = tmp_path_factory.mktemp("rerank")
    model = common.build_tiny_model("qwen2_5_vl", tokenizer, seed=0)
    model.save_pretrained(root / "policy")
    common.make_processor(tokenizer, 14, 784, 12544).save_pretrained(root / "policy")
    queries = common.read_jsonl(f"{toy_data}/query/test/mbeir_toyt2i_task0_test.jsonl")[:6]
    ranked = [{"qid": q["qid"], "task_id": 0, "cands": [f"1:{i}" for i in range(7)] + q["pos_cand_list"],
               "scores": [1.0] * 8} for q in queries]
    common.write_jsonl(str(root / "ranked.jsonl"), ranked)
    args = [TOY_CONFIG, f"--data_root={toy_data}", f"--policy={root}/policy", f"--ranked_in={root}/ranked.jsonl",
            "--top_n=8", "--window=4", "--stride=2", "--batch_queries=2", "--max_new_tokens=12",
            "--query_files=query/test/mbeir_toyt2i_task0_test.jsonl",
            "--pool_files=cand_pool/test/mbeir_toyt2i_task0_test_cand_pool.jsonl"]
    return root, args


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rerank_writes_ranked_and_trajectories_and_resumes_after_a_kill(rerank_setup, tmp_path, temperature):
    """Sampled too: each window's samples are keyed by (seed, qid, window start), not by the batch's position
    in the run, so the rerun draws what the uninterrupted run drew."""
    from conftest import run_stage
    root, args = rerank_setup
    args = args + [f"--temperature={temperature}"]
    run_stage("rollout", args + [f"--out_dir={tmp_path}/a"])
    reranked = common.read_jsonl(f"{tmp_path}/a/reranked.jsonl")
    trajs = common.read_jsonl(f"{tmp_path}/a/trajectories.jsonl")
    assert [r["qid"] for r in reranked] == [r["qid"] for r in common.read_jsonl(f"{root}/ranked.jsonl")]
    for r, stage0 in zip(reranked, common.read_jsonl(f"{root}/ranked.jsonl")):
        assert sorted(r["cands"]) == sorted(stage0["cands"])  # a permutation, nothing lost
    first = [t["window_start"] for t in trajs if t["qid"] == reranked[0]["qid"]]
    assert first == [4, 2, 0]  # back to front over the top 8
    assert all(len(t["input_ids"]) == len(t["loss_mask"]) for t in trajs)
    # killed in batch 2 (2 queries, 3 windows each): its trajectories were written, its rankings torn
    b = tmp_path / "b"
    b.mkdir()
    lines = open(f"{tmp_path}/a/reranked.jsonl").read().splitlines(keepends=True)
    (b / "reranked.jsonl").write_text("".join(lines[:2]) + lines[2][:25])
    tlines = open(f"{tmp_path}/a/trajectories.jsonl").read().splitlines(keepends=True)
    (b / "trajectories.jsonl").write_text("".join(tlines[:12]))
    run_stage("rollout", args + [f"--out_dir={b}"])  # its first batch is the first run's second: same draws
    assert open(b / "reranked.jsonl").read() == "".join(lines)  # the rerun finishes the same job
    assert open(b / "trajectories.jsonl").read() == "".join(tlines).replace(f"{tmp_path}/a/", f"{b}/")


def test_n_samples_writes_every_sample_and_ranks_by_the_first(rerank_setup, tmp_path):
    """n_samples: each window's samples are all written (per-window pass@k); sample 0 is the trajectory a
    one-sample run draws (same key), so the ranking is the one-sample run's, and the others differ from it."""
    from conftest import run_stage
    root, args = rerank_setup
    args = args + ["--temperature=1.0", "--max_new_tokens=6"]
    run_stage("rollout", args + [f"--out_dir={tmp_path}/one"])
    run_stage("rollout", args + [f"--out_dir={tmp_path}/three", "--n_samples=3"])
    one = common.read_jsonl(f"{tmp_path}/one/trajectories.jsonl")
    three = common.read_jsonl(f"{tmp_path}/three/trajectories.jsonl")
    assert len(three) == 3 * len(one) and [t["sample"] for t in three[:6]] == [0, 1, 2, 0, 1, 2]
    firsts = [t for t in three if t["sample"] == 0]
    assert [(t["qid"], t["window_start"], t["input_ids"]) for t in firsts] == \
        [(t["qid"], t["window_start"], t["input_ids"]) for t in one]
    assert any(a["input_ids"] != b["input_ids"] for a, b in zip(three[0::3], three[1::3]))  # other draws
    assert open(f"{tmp_path}/three/reranked.jsonl").read() == open(f"{tmp_path}/one/reranked.jsonl").read()


def test_fsdp_sharded_policy_generates_without_deadlock(toy_data, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from test_sft import free_port
    from conftest import REPO
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           f"{REPO}/tests/fsdp_generate_worker.py", toy_data, str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert all(r["equal"] for r in results) and results[0]["n"] != results[1]["n"]


def test_window_order_is_a_fixed_permutation():
    dids = ["a", "b", "c", "d", "e"]
    orders = [task.window_order(dids, (1337, step, 0)) for step in range(20)]
    assert all(sorted(o) == dids for o in orders)
    assert task.window_order(dids, (1337, 3, 0)) == orders[3]  # the same key, the same order (resume)
    assert len({tuple(o) for o in orders}) > 10
    assert 2 <= sum(o[0] == "a" for o in orders) <= 8  # the stage-0 top is first about 1 time in 5
