"""Bad input is an error that names the setting, file or record: malformed ShareGPT records, an unknown
arch, an empty pool, training data without positives, a zero window or stride."""

import json

import numpy as np
import pytest

import common
import sft
from conftest import TOY_CONFIG, run_stage


@pytest.mark.parametrize("record, message", [
    ("not a record", r"record 1: expected a JSON object, got str"),
    ({"conversations": [{"from": "human", "value": None}]}, r"record 1: turn 0 needs a string 'value' \(got NoneType\)"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 5}]},
     r"record 1: turn 1 needs a string 'value' \(got int\)"),
    ({"conversations": [{"from": "human", "value": "hi"}, "gpt says hi"]}, r"record 1: turn 1 needs a string 'value'"),
])
def test_malformed_sharegpt_record_names_file_and_record(tmp_path, record, message):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<answer>[1]</answer>"}]}
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([good, record]))
    with pytest.raises(ValueError, match=f"sft.json: {message}"):
        sft.load_records(str(path), "")


def test_sharegpt_json_that_is_not_a_list_is_named(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps({"conversations": []}))
    with pytest.raises(ValueError, match=r"sft.json: expected a JSON list of records, got dict"):
        sft.load_records(str(path), "")


def test_unknown_arch_lists_the_valid_ones(tokenizer):
    with pytest.raises(ValueError, match=r"arch='llama': expected one of qwen2_vl, qwen2_5_vl, qwen3_vl"):
        common.build_tiny_model("llama", tokenizer)


def test_retrieve_with_an_empty_pool_names_it(tmp_path):
    common.write_jsonl(str(tmp_path / "q.jsonl"), [{"qid": "1:0", "task_id": 0, "pos_cand_list": ["1:9"]}])
    common.write_jsonl(str(tmp_path / "pool.jsonl"), [])
    np.save(tmp_path / "q.npy", np.ones((1, 4), np.float32))
    np.save(tmp_path / "pool.npy", np.zeros((0, 4), np.float32))
    common.write_json(str(tmp_path / "q.ids.json"), ["1:0"])
    common.write_json(str(tmp_path / "pool.ids.json"), [])
    with pytest.raises(ValueError, match=r"pool.jsonl: the pool is empty, there is nothing to retrieve for q.jsonl"):
        run_stage("retrieve", [f"--data_root={tmp_path}", "--query_files=q.jsonl", "--pool_files=pool.jsonl",
                               f"--emb_dir={tmp_path}", f"--ranked={tmp_path}/ranked.jsonl"])


def test_embed_training_without_positives_names_the_files(toy_data, tmp_path):
    queries = [{"qid": "1:0", "query_txt": "a red disc", "query_img_path": None, "pos_cand_list": ["1:999999"], "task_id": 0}]
    common.write_jsonl(str(tmp_path / "q.jsonl"), queries)
    with pytest.raises(ValueError, match=r"train_query_files=.*q.jsonl.*: no training query has a positive in its pool"):
        run_stage("embed", [TOY_CONFIG, f"--data_root={toy_data}", f"--tokenizer_dir={toy_data}/tokenizer",
                            f"--train_query_files={tmp_path}/q.jsonl",
                            "--train_pool_files=cand_pool/train/mbeir_toyt2i_task0_train_cand_pool.jsonl",
                            "--embed_train_steps=1", "--embed_n_layer=1", "--embed_n_embd=32", "--embed_n_head=2",
                            "--embed_n_kv_head=1", "--embed_vision_hidden=32", f"--embed_out_dir={tmp_path}/embed"])


@pytest.mark.parametrize("setting, message", [("--stride=0", "stride=0"), ("--window=0", "window=0")])
def test_rollout_zero_window_or_stride_names_the_setting(tmp_path, setting, message):
    with pytest.raises(ValueError, match=f"{message}.*must both be at least 1"):
        run_stage("rollout", [TOY_CONFIG, f"--data_root={tmp_path}", f"--out_dir={tmp_path}/out", setting])


def test_a_missing_checkpoint_is_named_at_once_and_nothing_is_downloaded(tmp_path, monkeypatch):
    """A local path that does not exist (or looks like a hub id) is an error naming it, before any network
    call: the hub is never contacted (every socket connect would raise here)."""
    import socket
    import time

    import common
    from conftest import TOY_CONFIG, run_stage

    def no_network(*args, **kwargs):
        raise AssertionError("the network was contacted")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    t0 = time.time()
    for path in (str(tmp_path / "missing"), "Qwen/Qwen2.5-VL-7B-Instruct"):
        with pytest.raises(FileNotFoundError, match=f"{path!r}: no such local"):
            common.load_model(path)
        with pytest.raises(FileNotFoundError, match="no such local directory"):
            common.load_processor(path, 784, 784)
    with pytest.raises(FileNotFoundError, match="some/missing_dir"):
        run_stage("sft", [TOY_CONFIG, "--init_from=some/missing_dir"])
    assert time.time() - t0 < 30
