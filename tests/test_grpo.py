import importlib
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import grpo
import task
from configurator import configure
from conftest import REPO, TOY_CONFIG, run_stage
from test_rollout import setup
from test_sft import free_port

GOOD = "<think>(2) has the checks</think>\n<answer>[2, 1, 3]</answer>"


# ---- rewards ----------------------------------------------------------------------------------------
def test_format_reward():
    assert task.format_reward(GOOD) == 1.0
    assert task.format_reward("<think>x</think> then <answer>two, one</answer>") == 0.5  # not a list of ints
    assert task.format_reward("<answer>[1, 2]</answer>") == 0.0  # no reasoning block
    assert task.format_reward("<think>x</think>\n<tool_call>\n{}\n</tool_call>") == 0.0  # stopped at a call
    assert task.format_reward("<answer>[1]</answer><think>x</think>") == 0.0  # wrong order
    assert task.format_reward("<think>x</think><answer>2</answer>") == 1.0  # the release prompts' single number
    assert task.positive_rank("<think>x</think><answer>2</answer>", 2) == 1


def test_rank_reward():
    assert task.rank_reward(1) == 1.0
    assert task.rank_reward(2) == pytest.approx(0.6065, abs=1e-4)
    assert task.rank_reward(3) == pytest.approx(0.1353, abs=1e-4)
    assert task.rank_reward(None) == 0.0
    assert task.rank_reward(6, cutoff=5) == 0.0 and task.rank_reward(6) == pytest.approx(math.exp(-12.5))
    assert task.positive_rank(GOOD, 1) == 2 and task.positive_rank(GOOD, 7) is None
    assert task.positive_rank("<think>x</think><answer>[3, 3, 1]</answer>", 3) == 1  # first occurrence


def test_paper_reward_on_hand_made_group():
    texts = [GOOD, GOOD, "<think>x</think><answer>[1, 2]</answer>", "<think>x</think>", GOOD]
    calls = [1, 0, 3, 1, 2]
    # 0.2 fmt + 0.8 rank + 0.2 [k=1 and a valid call] - 0.1 (calls - 1)+
    expected = [0.2 + 0.8 + 0.2, 0.2 + 0.8, 0.2 + 0.8 * math.exp(-0.5) - 0.2, 0.0 - 0.0, 0.2 + 0.8 + 0.2 - 0.1]
    assert task.group_rewards(texts, calls, 2, "paper") == pytest.approx(expected)
    # the text-only ablation drops the tool terms
    assert task.group_rewards(texts, calls, 2, "paper", tools_on=False) == pytest.approx([1.0, 1.0, 0.2 + 0.8 * math.exp(-0.5), 0.0, 1.0])
    # the paper's rank term is 0 beyond k = 5
    far = "<think>x</think><answer>[1, 2, 3, 4, 5, 6]</answer>"
    assert task.group_rewards([far], [0], 6, "paper") == pytest.approx([0.2])


def test_release_reward_on_hand_made_groups():
    texts = [GOOD, GOOD, "<think>x</think><answer>[1, 2]</answer>", "<think>x</think>"]
    # 2 of 4 made a valid call: group tool rate 0.5 < 0.6, curiosity 0.6 * 0.1 = 0.06 for them
    calls = [1, 0, 3, 0]
    expected = [0.3 + 0.7 + 0.06, 0.3 + 0.7, 0.3 + 0.7 * math.exp(-0.5) + 0.06 - 0.05 * 2, 0.0]
    assert task.group_rewards(texts, calls, 2, "release") == pytest.approx(expected)
    # tool rate 0.75 >= 0.6: no curiosity bonus
    assert task.group_rewards(texts, [1, 1, 1, 0], 2, "release") == pytest.approx([1.0, 1.0, 0.3 + 0.7 * math.exp(-0.5), 0.0])
    # clipped to [-0.5, 1.5]; no k > 5 cut-off in the release
    assert task.group_rewards(["<think>x</think>"] * 2, [40, 0], 1, "release") == pytest.approx([-0.5, 0.0])
    far = "<think>x</think><answer>[1, 2, 3, 4, 5, 6]</answer>"
    assert task.group_rewards([far], [0], 6, "release", tools_on=False) == pytest.approx([0.3 + 0.7 * math.exp(-12.5)])
    with pytest.raises(ValueError, match="reward"):
        task.group_rewards([GOOD], [0], 2, "papr")


# ---- advantages and loss ----------------------------------------------------------------------------
def test_group_advantages_match_numpy():
    r = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2], [1.2, -0.1, 0.3, 0.9]])
    a = r.numpy()
    ref = (a - a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-6)
    assert np.allclose(grpo.group_advantages(r).numpy(), ref, atol=1e-6)
    assert np.allclose(grpo.group_advantages(r, scale=False).numpy(), a - a.mean(1, keepdims=True))  # Dr.GRPO
    assert grpo.group_advantages(r)[1].abs().max() == 0  # a zero-std group teaches nothing


def loop_reference(logp, old, ref, adv, mask, eps_lo, eps_hi, dual, beta, how, max_len):
    """The loss computed token by token in plain Python floats."""
    per_seq, total, count = [], 0.0, 0
    for b in range(len(logp)):
        s, n = 0.0, 0
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            r, a = math.exp(logp[b][t] - old[b][t]), adv[b]
            loss = -min(r * a, min(max(r, 1 - eps_lo), 1 + eps_hi) * a)
            if dual and a < 0:
                loss = min(loss, -dual * a)
            d = ref[b][t] - logp[b][t]
            loss += beta * (math.exp(d) - d - 1)
            s, n = s + loss, n + 1
        per_seq.append(s / max(n, 1))
        total, count = total + s, count + n
    return {"token-mean": total / count, "seq-mean": sum(per_seq) / len(per_seq),
            "dr-grpo": total / (len(logp) * max_len)}[how]


@pytest.mark.parametrize("how", ["token-mean", "seq-mean", "dr-grpo"])
def test_loss_matches_an_explicit_token_loop(how):
    g = torch.Generator().manual_seed(0)
    B, T = 4, 9
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + (torch.rand(B, T, generator=g) - 0.5) * 1.2  # ratios well beyond 1 +- 0.2: clipping is live
    ref = logp + (torch.rand(B, T, generator=g) - 0.5)
    adv = torch.tensor([1.3, -0.7, -2.0, 0.4])
    mask = torch.rand(B, T, generator=g) > 0.3
    loss, kl, clipped = grpo.token_losses(logp, old, adv, 0.2, 0.28, 3.0, ref, 0.05)
    got = grpo.aggregate(loss, mask, how, int(mask.sum()), B, 16)
    want = loop_reference(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, 3.0, 0.05, how, 16)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert 0 < clipped[mask].float().mean() < 1
    d = ref - logp
    assert torch.allclose(kl, torch.exp(d) - d - 1)


def test_loss_gradient_is_zero_on_clipped_and_masked_tokens():
    logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.5, -0.5, -1.0]])  # ratios 1, e^0.5 (clipped for A > 0), e^-0.5, 1 (masked)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, _, clipped = grpo.token_losses(logp, old, torch.tensor([1.0]), 0.2, 0.2)
    grpo.aggregate(loss, mask, "token-mean", 3, 1, 4).backward()
    assert clipped.tolist() == [[False, True, False, False]]
    assert logp.grad[0, 1] == 0 and logp.grad[0, 3] == 0
    assert logp.grad[0, 0].item() == pytest.approx(-1 / 3) and logp.grad[0, 2].item() == pytest.approx(-math.exp(-0.5) / 3)


def test_one_step_with_two_ranks_equals_one_rank(toy_data, tmp_path):
    worker = os.path.join(REPO, "tests", "grpo_fsdp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    results = []
    for nproc in (1, 2):
        out = tmp_path / str(nproc)
        out.mkdir()
        cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
               if nproc > 1 else [sys.executable]) + [worker, toy_data, str(out), "token-mean"]
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        results.append(torch.load(out / "result.pt", weights_only=False))
    one, two = results[0]["state"], results[1]["state"]
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert results[0]["sums"] == pytest.approx(results[1]["sums"], rel=1e-4, abs=1e-6)
    assert results[0]["sums"]["clipped"] > 0  # the second epoch clipped some tokens: the ratio was live


def test_training_logprobs_are_the_samplers_distribution(tokenizer, toy_data):
    """The trainer's log-prob of a sampled token is the probability the rollout's sampler drew it with, at
    the sampling temperature: checked against the sampler's own frequencies."""
    from engine import sample
    engine, prompt = setup("qwen2_5_vl", tokenizer, toy_data, use_tools=False)
    model = engine.model
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # a peaked next-token distribution, so temperature matters
        traj = engine.generate([prompt], n_samples=1, temperature=0.5, max_new_tokens=4, seed=0)[0]
        batch = common.collate([{"input_ids": traj["input_ids"], "loss_mask": traj["loss_mask"], "images": traj["images"]}],
                                 engine.processor, model.config.image_token_id, tokenizer.pad_token_id)
        t = traj["loss_mask"].index(1)  # the first generated token, predicted from position t - 1
        token = traj["input_ids"][t]
        row = model(**common.model_inputs(batch, "cpu"), use_cache=False).logits[0, t - 1].float()  # (V,)
        draws = sample(row.expand(20000, -1), 0.5, 1.0, [torch.Generator().manual_seed(0)] * 20000)  # (20000,)
        freqs = torch.bincount(draws, minlength=row.numel()).float() / draws.numel()  # (V,) the sampler's
        p_trained = common.token_logprobs(model, batch, "cpu", temperature=0.5)[0, t - 1].exp().item()
        p_untempered = common.token_logprobs(model, batch, "cpu", temperature=1.0)[0, t - 1].exp().item()
    tv = lambda p, q: 0.5 * (p - q).abs().sum().item()  # noqa: E731  total variation distance
    # the trainer's probability of the sampled token, against a softmax at T computed here and the draws
    assert abs(p_trained - torch.softmax(row / 0.5, -1)[token].item()) < 1e-4
    assert abs(p_untempered - torch.softmax(row, -1)[token].item()) < 1e-4
    assert abs(p_trained - freqs[token].item()) < 0.02
    # over the whole vocabulary: the sampler draws from the T = 0.5 distribution, not the T = 1 one
    assert tv(freqs, torch.softmax(row / 0.5, -1)) < 0.03
    assert tv(freqs, torch.softmax(row, -1)) > 0.1


# ---- learning -----------------------------------------------------------------------------------------
def test_micro_run_raises_an_easy_synthetic_reward(tokenizer, toy_data):
    """Reward = share of generated tokens with an even id (about 0.5 for a random policy)."""
    importlib.reload(grpo)
    engine, prompt = setup("qwen2_5_vl", tokenizer, toy_data, use_tools=False)
    engine.stop_ids = set()  # fixed-length responses
    model = engine.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2)
    means = []
    for step in range(15):
        model.eval()
        with torch.no_grad():
            trajs = engine.generate([prompt, prompt], n_samples=8, temperature=1.0, max_new_tokens=6, seed=step)
        rewards = torch.tensor([float(np.mean([i % 2 == 0 for i, m in zip(t["input_ids"], t["loss_mask"]) if m]))
                                for t in trajs]).view(2, 8)
        means.append(rewards.mean().item())
        examples = [{"input_ids": t["input_ids"], "loss_mask": t["loss_mask"], "images": t["images"]} for t in trajs]
        batches = [common.collate(examples[i:i + 8], engine.processor, model.config.image_token_id,
                                    tokenizer.pad_token_id) for i in (0, 8)]
        model.train()
        hp = {k: getattr(grpo, k) for k in grpo.UPDATE_KEYS}  # the script's defaults: on-policy, token mean
        grpo.policy_update(model, optimizer, params, batches, grpo.group_advantages(rewards).flatten(), 16, hp, 1, "cpu")
    assert np.mean(means[:3]) < 0.65 and np.mean(means[-3:]) > np.mean(means[:3]) + 0.2


# ---- the script ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grpo_setup(toy_data, tokenizer, tmp_path_factory):
    """A tiny policy saved as a Hugging Face directory and a stage-0 ranking of 6 training queries."""
    root = tmp_path_factory.mktemp("grpo")
    model = common.build_tiny_model("qwen2_5_vl", tokenizer, seed=0, n_layer=2, n_embd=64, n_head=2, n_kv_head=1,
                                    vision_depth=1, vision_hidden=32)
    model.save_pretrained(root / "policy")
    common.make_processor(tokenizer, 14, 784, 12544).save_pretrained(root / "policy")
    rng, ranked = random.Random(0), []
    for name, task_id in (("toyt2i", 0), ("toycir", 7)):
        queries = common.read_jsonl(f"{toy_data}/query/train/mbeir_{name}_task{task_id}_train.jsonl")[:3]
        pool = [c["did"] for c in common.read_jsonl(f"{toy_data}/cand_pool/train/mbeir_{name}_task{task_id}_train_cand_pool.jsonl")]
        for q in queries:
            cands = [q["pos_cand_list"][0]] + rng.sample([d for d in pool if d != q["pos_cand_list"][0]], 4)
            rng.shuffle(cands)
            ranked.append({"qid": q["qid"], "task_id": task_id, "cands": cands})
    common.write_jsonl(root / "ranked.jsonl", ranked)
    return root


def script_args(toy_data, root, out, steps):
    return [TOY_CONFIG, f"--data_root={toy_data}", f"--policy={root}/policy", f"--ranked_train={root}/ranked.jsonl", f"--out_dir={out}",
            f"--max_steps={steps}", "--prompts_per_step=2", "--group_size=4", "--max_new_tokens=16",
            "--max_response_tokens=64", "--learning_rate=1e-3", "--warmup_steps=1", "--window=3", "--ppo_epochs=2"]


def run_grpo(argv):
    """The script in-process with a stand-in reward that varies within groups (a random tiny policy never
    earns the real one, and then every advantage is 0); the reward itself is tested above."""
    module = importlib.reload(grpo)
    configure(vars(module), argv, verbose=False)
    real = task.group_rewards
    task.group_rewards = lambda texts, calls, positive, variant, tools_on: [len(t) % 7 / 7 for t in texts]
    try:
        module.main()
    finally:
        task.group_rewards = real  # the real reward again for every other test


def test_script_trains_saves_and_resumes(toy_data, grpo_setup, tmp_path):
    run_grpo(script_args(toy_data, grpo_setup, tmp_path / "straight", 2))
    run_grpo(script_args(toy_data, grpo_setup, tmp_path / "resumed", 1))
    assert common.read_json(tmp_path / "resumed/model/trainer_state.json")["step"] == 1
    run_grpo(script_args(toy_data, grpo_setup, tmp_path / "resumed", 2))  # picks up at step 1
    a = common.load_model(str(tmp_path / "straight/model")).state_dict()
    b = common.load_model(str(tmp_path / "resumed/model")).state_dict()
    start = common.load_model(str(grpo_setup / "policy")).state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # it did train
    curves = [common.read_jsonl(str(tmp_path / run / "log.jsonl")) for run in ("straight", "resumed")]
    assert [x["step"] for x in curves[1]] == [0, 1]  # the training curve, one line per step, across the resume
    assert [x["reward"] for x in curves[0]] == [x["reward"] for x in curves[1]]  # samples keyed by step and prompt


def test_script_rejects_bad_arguments(toy_data, grpo_setup, tmp_path):
    with pytest.raises(ValueError, match="loss_agg"):
        run_stage("grpo", script_args(toy_data, grpo_setup, tmp_path, 1) + ["--loss_agg=token_sum"])
    with pytest.raises(ValueError, match="reward"):
        run_stage("grpo", script_args(toy_data, grpo_setup, tmp_path, 1) + ["--reward=papers"])


def test_held_out_prompts_are_watched_greedily_and_never_trained_on(toy_data, grpo_setup, tmp_path):
    """eval_prompts: the last prompts of the stream are held out of training and reranked greedily every
    eval_every steps and after the last; their mean reward at step 0 equals the starting policy's own greedy
    rerank of those prompts, computed here through the engine; a resumed run logs the same evaluations."""
    argv = script_args(toy_data, grpo_setup, tmp_path / "straight", 2) + ["--eval_prompts=2", "--eval_every=1"]
    run_grpo(argv)
    evals = common.read_jsonl(str(tmp_path / "straight/eval.jsonl"))
    assert [e["step"] for e in evals] == [0, 1, 2] and all(e["prompts"] == 2 for e in evals)
    # the held-out records, and the training stream without them (the script's own functions, configured the same)
    module = importlib.reload(grpo)
    configure(vars(module), argv, verbose=False)
    ranked = common.read_jsonl(str(grpo_setup / "ranked.jsonl"))
    order = np.random.default_rng(module.seed).permutation(len(ranked))
    held = [ranked[i] for i in order[-2:]]
    benchmark = task.load_benchmark(toy_data, module.train_query_files, module.train_pool_files, module.instructions_file)
    load = lambda rel: common.load_image(common.resolve_path(rel, toy_data))  # noqa: E731
    trained_qids = {ranked[order[:-2][(step * 2 + j) % (len(order) - 2)]]["qid"] for step in range(2) for j in range(2)}
    assert not trained_qids & {r["qid"] for r in held}
    rewards = held_out_rewards(str(grpo_setup / "policy"), held, module, benchmark, toy_data)
    assert evals[0]["reward"] == pytest.approx(sum(rewards) / 2)
    run_grpo(script_args(toy_data, grpo_setup, tmp_path / "resumed", 1) + ["--eval_prompts=2", "--eval_every=1"])
    run_grpo(script_args(toy_data, grpo_setup, tmp_path / "resumed", 2) + ["--eval_prompts=2", "--eval_every=1"])
    assert common.read_jsonl(str(tmp_path / "resumed/eval.jsonl")) == evals
    # keep_best: {out_dir}/best holds the weights of the best evaluation (top-1, then reward, the earliest on
    # ties): they rerank the held-out prompts to the recorded reward, and a resumed run keeps the same one
    best = common.read_json(str(tmp_path / "straight/best/best.json"))
    assert {k: v for k, v in best.items() if k != "hits"} == max(evals, key=lambda e: (e["top1"], e["reward"], -e["step"]))
    assert len(best["hits"]) == 2 and sum(best["hits"]) / 2 == best["top1"]  # each held-out prompt's top-1 hit
    assert sum(held_out_rewards(str(tmp_path / "straight/best"), held, module, benchmark, toy_data)) / 2 == pytest.approx(best["reward"])
    assert common.read_json(str(tmp_path / "resumed/best/best.json")) == best


def test_paired_gain_on_a_hand_made_example():
    # prompt by prompt against the best: wins at 1 and 4, a loss at 2, ties at 0 and 3
    assert task.paired_gain([1, 1, 0, 0, 1], [1, 0, 1, 0, 0]) == pytest.approx(1 / math.sqrt(3))
    assert task.paired_gain([0, 1, 1, 1], [1, 0, 0, 0]) == pytest.approx(2 / 2)
    assert task.paired_gain([1, 0, 1], [1, 0, 1]) == 0.0  # the same hits: no evidence either way
    # the same top-1 rate (3 of 6) can hide 3 wins and 3 losses: no gain at all
    assert task.paired_gain([1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]) == 0.0


def test_best_min_z_keeps_the_start_without_a_paired_gain(toy_data, grpo_setup, tmp_path):
    """best_min_z > 0: a later evaluation replaces the best only on a paired top-1 gain beyond it, never on reward
    alone; a resumed run keeps the same best, and one whose best.json holds no hits says so."""
    extra = ["--eval_prompts=2", "--eval_every=1", "--best_min_z=100.0"]  # 2 prompts: the gain is at most sqrt(2)
    run_grpo(script_args(toy_data, grpo_setup, tmp_path / "straight", 2) + extra)
    evals = common.read_jsonl(str(tmp_path / "straight/eval.jsonl"))
    best = common.read_json(str(tmp_path / "straight/best/best.json"))
    assert [e["step"] for e in evals] == [0, 1, 2] and best["step"] == 0
    assert max(e["reward"] for e in evals) > evals[0]["reward"]  # the default rule would have moved on: reward alone
    assert {k: v for k, v in best.items() if k != "hits"} == evals[0]
    run_grpo(script_args(toy_data, grpo_setup, tmp_path / "resumed", 1) + extra)
    run_grpo(script_args(toy_data, grpo_setup, tmp_path / "resumed", 2) + extra)
    assert common.read_json(str(tmp_path / "resumed/best/best.json")) == best
    run_grpo(script_args(toy_data, grpo_setup, tmp_path / "old", 1) + extra)
    saved = common.read_json(str(tmp_path / "old/best/best.json"))
    common.write_json(str(tmp_path / "old/best/best.json"), {k: v for k, v in saved.items() if k != "hits"})
    with pytest.raises(ValueError, match="best_min_z=100.0: .* no top-1 hits"):
        run_grpo(script_args(toy_data, grpo_setup, tmp_path / "old", 2) + extra)


def held_out_rewards(model_dir, held, module, benchmark, toy_data):
    """The stand-in rewards of a model's greedy reranks of held-out records, through the engine, windows keyed
    as grpo.py keys its evaluation prompts."""
    from engine import Engine
    load = lambda rel: common.load_image(common.resolve_path(rel, toy_data))  # noqa: E731
    model = common.load_model(model_dir).eval()
    processor = common.load_processor(model_dir, 784, 12544)
    engine = Engine(model, processor, True, module.max_calls, module.tool_min_pixels, module.tool_max_pixels)
    rewards = []
    for j, r in enumerate(held):
        dids = task.window_order(r["cands"][:module.window], (module.seed, module.EVAL_KEY, j))
        prompt = task.window_prompt(benchmark[0][r["qid"]], [benchmark[1][d] for d in dids], benchmark[2], load, True,
                                    module.prompt_min_pixels, module.prompt_max_pixels, engine.factor, module.max_calls,
                                    module.prompt_style)
        (t,) = engine.generate([prompt], 1, 0.0, 1.0, module.max_new_tokens, module.max_response_tokens)
        rewards.append(len(t["final_text"]) % 7 / 7)  # run_grpo's stand-in reward
    return rewards


def test_queries_of_the_sft_data_are_never_prompts(toy_data, grpo_setup, tmp_path):
    """exclude_queries_in: the qids of those records leave the prompt stream but not the held-out prompts, which
    are drawn from every query (the watch sees what SFT taught as well): with 4 of 6 excluded, the one held-out
    prompt is the record the permutation of all 6 puts last, which the step-0 evaluation reranks, and the step's
    prompts are the records left; excluding every query is an error naming the file."""
    ranked = common.read_jsonl(str(grpo_setup / "ranked.jsonl"))
    common.write_jsonl(tmp_path / "taught.jsonl", [{"qid": r["qid"], "conversations": []} for r in ranked[:4]])
    argv = script_args(toy_data, grpo_setup, tmp_path / "out", 1) + [
        f"--exclude_queries_in={tmp_path}/taught.jsonl", "--eval_prompts=1", "--eval_every=1"]
    prompted, window_prompt = [], task.window_prompt  # the query of every prompt the script builds, in order
    task.window_prompt = lambda q, *args: prompted.append(q["qid"]) or window_prompt(q, *args)
    try:
        run_grpo(argv)
    finally:
        task.window_prompt = window_prompt
    module = importlib.reload(grpo)
    configure(vars(module), argv, verbose=False)
    order = np.random.default_rng(module.seed).permutation(len(ranked))
    held = [ranked[order[-1]]]
    left = [ranked[i]["qid"] for i in order[:-1] if i >= 4]  # the stream: the permutation's order, without the excluded
    # the step-0 evaluation, step 0's two prompts, the final evaluation
    assert prompted == [held[0]["qid"], left[0], left[1 % len(left)], held[0]["qid"]]
    benchmark = task.load_benchmark(toy_data, module.train_query_files, module.train_pool_files, module.instructions_file)
    (step0, _) = common.read_jsonl(str(tmp_path / "out/eval.jsonl"))
    assert step0["reward"] == pytest.approx(held_out_rewards(str(grpo_setup / "policy"), held, module, benchmark, toy_data)[0])
    common.write_jsonl(tmp_path / "all.jsonl", [{"qid": r["qid"]} for r in ranked])
    with pytest.raises(ValueError, match="all.jsonl"):
        run_stage("grpo", script_args(toy_data, grpo_setup, tmp_path / "none", 1) + [f"--exclude_queries_in={tmp_path}/all.jsonl"])
