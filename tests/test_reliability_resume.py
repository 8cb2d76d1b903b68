"""RSFT sampling survives a kill at any append (one line per sampled query is the unit of progress), keeps
only text that is safe to store as ShareGPT, and a qid never names a file outside out_dir (rsft.py and
rollout.py)."""

import contextlib
import io
import json
import os

import pytest

import common
import rsft
import sft
from engine import Engine
from conftest import TOY_CONFIG, run_stage
from test_rsft import forcing_generate

POOL_FILE = "cand_pool/train/mbeir_toyt2i_task0_train_cand_pool.jsonl"
MALICIOUS = ["1:0", "../../escape:1", "sub/dir:2"]  # the last two would name files outside out_dir
CALL = '<think>look</think>\n<tool_call>\n{"name": "select_images", "arguments": {"target_images": [1, 2]}}\n</tool_call>'
CLEAN = ["<think>(2) yes</think>\n<answer>[2, 1, 3, 4, 5]</answer>", "<think>no tool</think>\n<answer>[2, 5, 4, 3, 1]</answer>"]
TEXTS = [CALL + CLEAN[0], CLEAN[1],  # right, one with a tool call: kept
         "<think>(2) like <image> this</think>\n<answer>[2, 1, 3, 4, 5]</answer>",  # right, but would break sft.py
         "<think>(2) <|vision_start|> yes</think>\n<answer>[2, 1, 3, 4, 5]</answer>"]  # right, a control token's text


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def setup(toy_data, tokenizer, tmp_path_factory):
    """A tiny policy and 3 training queries with the positive second, as they are and with malicious qids."""
    root = tmp_path_factory.mktemp("reliability")
    model = common.build_tiny_model("qwen2_5_vl", tokenizer, seed=0, n_layer=2, n_embd=64, n_head=2, n_kv_head=1,
                                    vision_depth=1, vision_hidden=32)
    model.save_pretrained(root / "policy")
    common.make_processor(tokenizer, 14, 784, 12544).save_pretrained(root / "policy")
    queries = [q for q in common.read_jsonl(f"{toy_data}/query/train/mbeir_toyt2i_task0_train.jsonl")
               if q["pos_cand_list"][0] not in ("1:0", "1:1", "1:2", "1:3")][:len(MALICIOUS)]
    for name, qs in [("plain", queries), ("malicious", [{**q, "qid": qid} for q, qid in zip(queries, MALICIOUS)])]:
        common.write_jsonl(str(root / f"{name}.jsonl"), qs)
        common.write_jsonl(str(root / f"{name}_ranked.jsonl"), [
            {"qid": q["qid"], "task_id": 0, "cands": ["1:0", q["pos_cand_list"][0], "1:1", "1:2", "1:3"]} for q in qs])
    return root


def rsft_args(root, toy_data, out, queries="plain"):
    # grad_accum past the record count: the run samples, writes its data and saves the policy without training
    return [TOY_CONFIG, f"--data_root={toy_data}", f"--policy={root}/policy", f"--ranked_train={root}/{queries}_ranked.jsonl",
            f"--train_query_files={root}/{queries}.jsonl", f"--train_pool_files={POOL_FILE}", "--shuffle_window=False",
            "--n_samples=4", "--keep_per_query=4", "--max_new_tokens=80", "--batch_queries=1", "--grad_accum=1000",
            f"--out_dir={out}"]


def content(records):
    """What a record says, without where its files were written."""
    return sorted((r["qid"], str(r["conversations"]), str(r["image_sizes"]), r["positive"]) for r in records)


@pytest.fixture(scope="module")
def straight(setup, toy_data):
    mp, log = pytest.MonkeyPatch(), io.StringIO()
    mp.setattr(Engine, "generate", forcing_generate(TEXTS))
    try:
        with contextlib.redirect_stdout(log):
            run_stage("rsft", rsft_args(setup, toy_data, setup / "straight"))
    finally:
        mp.undo()
    return common.read_jsonl(str(setup / "straight" / "rsft_data.jsonl")), log.getvalue()


def test_special_token_text_is_rejected(tokenizer):
    special = rsft.special_strings(tokenizer)
    assert {"<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>"} <= set(special)
    assert "<tool_call>" not in special  # the policy writes it: an added token, not a control token
    ok = {"turns": [CALL, CLEAN[0] + "<|im_end|>"]}  # the stop token that closed a turn is not part of the text
    assert rsft.safe_text(ok, special)
    for bad in TEXTS[2:] + ["<think><|image_pad|></think>", "a<|im_end|>b<|im_end|>"]:
        assert not rsft.safe_text({"turns": [CALL, bad]}, special), bad


def test_rsft_keeps_only_text_safe_to_store(setup, toy_data, straight):
    straight, log = straight
    qids = [r["qid"] for r in common.read_jsonl(str(setup / "plain.jsonl"))]
    assert f"rejected for special-token text {2 * len(qids)}" in log  # counted in the stats
    assert sorted((r["qid"], r["conversations"][-1]["value"]) for r in straight) == sorted(
        (qid, text) for qid in qids for text in CLEAN)
    assert len(sft.load_records(str(setup / "straight" / "rsft_data.jsonl"), toy_data)) == 2 * len(qids)


def test_rsft_images_stay_inside_out_dir(setup, toy_data, monkeypatch):
    monkeypatch.setattr(Engine, "generate", forcing_generate(TEXTS))
    run_stage("rsft", rsft_args(setup, toy_data, setup / "malicious_rsft", "malicious"))
    records = common.read_jsonl(str(setup / "malicious_rsft" / "rsft_data.jsonl"))
    assert sorted({r["qid"] for r in records}) == sorted(MALICIOUS)
    tool_images = [os.path.realpath(os.path.join(toy_data, p)) for r in records for p in r["images"][5:]]
    assert len(tool_images) == 2 * len(MALICIOUS) == len(set(tool_images))
    assert all(os.path.dirname(p) == os.path.realpath(setup / "malicious_rsft" / "images") and os.path.exists(p)
               for p in tool_images)
    assert not [f for f in os.listdir(setup) if f.startswith("escape") or f.endswith(".png")]


@pytest.mark.parametrize("kill_at, torn", [(1, True), (2, False), (2, True)])
def test_rsft_resumes_after_a_kill_without_losing_or_duplicating(setup, toy_data, straight, monkeypatch, kill_at, torn):
    """Kill the run at its kill_at-th append to a file (torn: its last line half written), rerun: the data
    is the straight run's, every sampled query once."""
    out = setup / f"killed_{kill_at}_{torn}"
    monkeypatch.setattr(Engine, "generate", forcing_generate(TEXTS))
    append, calls = common.append_jsonl, []

    def killing_append(path, records):
        calls.append(path)
        if len(calls) == kill_at:
            if torn:  # every line but the last, and half of that one
                whole = "".join(json.dumps(r) + "\n" for r in records)
                with open(path, "a") as f:
                    f.write(whole[:len(whole) - len(json.dumps(records[-1])) // 2])
            raise Killed(path)
        append(path, records)
    monkeypatch.setattr(common, "append_jsonl", killing_append)
    with pytest.raises(Killed):
        run_stage("rsft", rsft_args(setup, toy_data, out))
    monkeypatch.setattr(common, "append_jsonl", append)
    run_stage("rsft", rsft_args(setup, toy_data, out))
    assert content(common.read_jsonl(str(out / "rsft_data.jsonl"))) == content(straight[0])
    plain = [q["qid"] for q in common.read_jsonl(str(setup / "plain.jsonl"))]
    assert sorted(r["qid"] for r in common.read_jsonl(str(out / "sampled.jsonl"))) == sorted(plain)  # each once


def test_rollout_tool_images_stay_inside_out_dir(setup, toy_data, monkeypatch):
    monkeypatch.setattr(Engine, "generate", forcing_generate([CALL + CLEAN[0]]))
    out = setup / "rerank"
    run_stage("rollout", [TOY_CONFIG, f"--data_root={toy_data}", f"--policy={setup}/policy",
                          f"--ranked_in={setup}/malicious_ranked.jsonl", f"--query_files={setup}/malicious.jsonl",
                          f"--pool_files={POOL_FILE}", f"--out_dir={out}", "--max_new_tokens=80"])
    trajs = common.read_jsonl(str(out / "trajectories.jsonl"))
    assert sorted(t["qid"] for t in trajs) == sorted(MALICIOUS)
    paths = [os.path.realpath(im["path"]) for t in trajs for im in t["images"][5:]]
    assert len(paths) == 2 * len(MALICIOUS) == len(set(paths))
    assert all(os.path.dirname(p) == os.path.realpath(out / "images") and os.path.exists(p) for p in paths)
    assert not [f for f in os.listdir(setup) if f.startswith("escape") or f.endswith(".png")]


def test_safe_filename():
    names = ["1:0", "1_0", "../../x", "..", ".", "", "a/b", "a\\b", "ok-name_1.2"]
    safe = [common.safe_filename(n) for n in names]
    assert len(set(safe)) == len(names)  # distinct names stay distinct
    assert all(os.path.dirname(os.path.join("d", s + "_0.png")) == "d" and not s.startswith(".") for s in safe)
    assert common.safe_filename("ok-name_1.2") == "ok-name_1.2" and common.safe_filename("1:0") == common.safe_filename("1:0")
