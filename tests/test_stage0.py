import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import common
import embed
import retrieve
from conftest import TOY_CONFIG, run_stage

TINY = ["--embed_n_layer=2", "--embed_n_embd=64", "--embed_n_head=2", "--embed_n_kv_head=1",
        "--embed_vision_depth=1", "--embed_vision_hidden=32"]


def files(root, split):
    q = f"query/{split}/mbeir_toyt2i_task0_{split}.jsonl,query/{split}/mbeir_toycir_task7_{split}.jsonl"
    p = (f"cand_pool/{split}/mbeir_toyt2i_task0_{split}_cand_pool.jsonl,"
         f"cand_pool/{split}/mbeir_toycir_task7_{split}_cand_pool.jsonl")
    return q, p


@pytest.fixture(scope="module")
def stage0(toy_data, tmp_path_factory):
    """Train a tiny embedder for a few steps, encode the test split, retrieve and evaluate."""
    out = tmp_path_factory.mktemp("stage0")
    q, p = files(toy_data, "test")
    tq, tp = files(toy_data, "train")
    common_args = [TOY_CONFIG, f"--data_root={toy_data}", f"--query_files={q}", f"--pool_files={p}"]
    run_stage("embed", common_args + TINY + [f"--train_query_files={tq}", f"--train_pool_files={tp}",
              f"--tokenizer_dir={toy_data}/tokenizer", f"--embed_out_dir={out}/embed", "--embed_train_steps=3", "--embed_batch_size=8"])
    run_stage("retrieve", common_args + [f"--emb_dir={out}/embed/emb", "--top_k=20", f"--ranked={out}/ranked.jsonl"])
    qrels = ",".join(f"{toy_data}/qrels/test/mbeir_{n}_test_qrels.txt" for n in ["toyt2i_task0", "toycir_task7"])
    _, metrics = run_stage("evaluate", [f"--ranked={out}/ranked.jsonl", f"--qrels={qrels}"])
    return str(out), metrics


def test_pipeline_writes_embeddings_ranked_lists_and_metrics(stage0, toy_data):
    out, metrics = stage0
    for name in ["mbeir_toyt2i_task0_test", "mbeir_toycir_task7_test_cand_pool"]:
        emb = np.load(f"{out}/embed/emb/{name}.npy")
        ids = json.load(open(f"{out}/embed/emb/{name}.ids.json"))
        assert emb.shape[0] == len(ids) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    ranked = common.read_jsonl(f"{out}/ranked.jsonl")
    assert len(ranked) == 24 and all(len(r["cands"]) == 20 for r in ranked)
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in ranked)
    assert set(metrics) == {"toyt2i_task0", "toycir_task7", "average"}
    assert os.path.exists(f"{out}/embed/model/config.json")  # the trained embedder, HF format


def test_embeddings_are_deterministic_and_independent_of_batching(stage0, toy_data):
    out, _ = stage0
    model = common.load_model(f"{out}/embed/model").eval()
    processor = common.load_processor(f"{out}/embed/model", 784, 784)
    queries = common.read_jsonl(f"{toy_data}/query/test/mbeir_toycir_task7_test.jsonl")[:3]
    t2i = common.read_jsonl(f"{toy_data}/query/test/mbeir_toyt2i_task0_test.jsonl")[:2]
    img = lambda p: common.qwen_resize(common.load_image(os.path.join(toy_data, p)), 784, 784)
    items = [(q["query_txt"], img(q["query_img_path"]), "instr") for q in queries] + [(q["query_txt"], None, "") for q in t2i]
    with torch.no_grad():
        together = embed.embed_batch(model, processor, items, "cpu")
        alone = torch.cat([embed.embed_batch(model, processor, [it], "cpu") for it in items])
        again = embed.embed_batch(model, processor, items, "cpu")
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)  # right padding does not leak in
    assert torch.equal(together, again)
    # and equal to the file embed.py wrote (same model, same prompt)
    saved = np.load(f"{out}/embed/emb/mbeir_toycir_task7_test.npy")[:3]
    instructions = json.load(open(f"{toy_data}/instructions.json"))
    items = [(q["query_txt"], img(q["query_img_path"]), common.pick_instruction(instructions, q["qid"])) for q in queries]
    with torch.no_grad():
        np.testing.assert_allclose(embed.embed_batch(model, processor, items, "cpu").numpy(), saved, atol=1e-5)


def test_summary_position_is_the_emb_token(toy_data):
    tokenizer = AutoTokenizer.from_pretrained(f"{toy_data}/tokenizer")
    processor = common.make_processor(tokenizer, 14, 784, 784)
    batch = embed.render_items([("a red circle", None, ""), ("a much longer blue square text", None, "instr")], processor)
    last = batch["attention_mask"].sum(1) - 1
    emb_id = tokenizer.convert_tokens_to_ids("<emb>")
    assert batch["input_ids"][0, last[0]] == emb_id and batch["input_ids"][1, last[1]] == emb_id


def test_faiss_search_equals_brute_force_numpy():
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((500, 32)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    queries = rng.standard_normal((20, 32)).astype(np.float32)
    scores, idx = retrieve.search(queries, pool, 10)
    sims = queries @ pool.T
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, expected, 1), rtol=1e-5, atol=1e-5)
    scores, idx = retrieve.search(queries, pool[:5], 10)  # k larger than the pool: the whole pool
    assert idx.shape == (20, 5)


def test_retrieve_reports_queries_whose_positive_is_not_in_the_pool(tmp_path, capsys):
    (tmp_path / "emb").mkdir()
    np.save(tmp_path / "emb" / "q.npy", np.eye(2, 4, dtype=np.float32))
    json.dump(["1:0", "1:1"], open(tmp_path / "emb" / "q.ids.json", "w"))
    np.save(tmp_path / "emb" / "p.npy", np.eye(3, 4, dtype=np.float32))
    json.dump(["1:a", "1:b", "1:c"], open(tmp_path / "emb" / "p.ids.json", "w"))
    common.write_jsonl(str(tmp_path / "q.jsonl"), [{"qid": "1:0", "task_id": 0, "pos_cand_list": ["1:a"]},
                                                   {"qid": "1:1", "task_id": 0, "pos_cand_list": ["1:zzz"]}])
    run_stage("retrieve", [TOY_CONFIG, f"--data_root={tmp_path}", "--query_files=q.jsonl", "--pool_files=p.jsonl",
                           f"--emb_dir={tmp_path}/emb", "--top_k=2", f"--ranked={tmp_path}/r.jsonl"])
    ranked = common.read_jsonl(str(tmp_path / "r.jsonl"))
    assert [r["qid"] for r in ranked] == ["1:0", "1:1"]  # kept, not dropped
    assert ranked[0]["cands"][0] == "1:a" and ranked[1]["cands"][0] == "1:b"
    assert "1 queries have no positive in their pool" in capsys.readouterr().out and "1:1" in open(tmp_path / "r.jsonl").read()
