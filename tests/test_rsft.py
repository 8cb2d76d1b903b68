import pytest
import torch

import common
import task
from engine import Engine
from conftest import TOY_CONFIG, run_stage

TINY = ["--epochs=1", "--batch_size=2", "--learning_rate=1e-4"]


def forcing_generate(texts):
    """Engine.generate, but sample k of every group writes texts[k] (then stops): known answers."""
    original = Engine.generate

    def generate(self, prompts, n_samples=1, *args, **kwargs):
        forced = [self.tok(t, add_special_tokens=False)["input_ids"] + [self.im_end] for t in texts]

        def hook(row, logits):
            k = len(row.ids) - row.turn_start
            seq = forced[row.sample_index % len(forced)]
            if row.tool_calls:  # after the observation: the answer part of the text
                seq = self.tok(texts[row.sample_index % len(texts)].split("</tool_call>")[1], add_special_tokens=False)["input_ids"] + [self.im_end]
            out = torch.full_like(logits, -1e9)
            out[seq[min(k, len(seq) - 1)]] = 0
            return out
        kwargs["logits_hook"] = hook
        return original(self, prompts, n_samples, *args, **kwargs)
    return generate


@pytest.fixture(scope="module")
def rsft_setup(toy_data, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("rsft")
    model = common.build_tiny_model("qwen2_5_vl", tokenizer, seed=0, n_layer=2, n_embd=64, n_head=2, n_kv_head=1,
                                    vision_depth=1, vision_hidden=32)
    model.save_pretrained(root / "policy")
    common.make_processor(tokenizer, 14, 784, 12544).save_pretrained(root / "policy")
    queries = common.read_jsonl(f"{toy_data}/query/train/mbeir_toyt2i_task0_train.jsonl")[:4]
    # the positive sits at window position 2 for every query
    ranked = [{"qid": q["qid"], "task_id": 0, "cands": ["1:0", q["pos_cand_list"][0], "1:1", "1:2", "1:3"]}
              for q in queries if q["pos_cand_list"][0] not in ("1:0", "1:1", "1:2", "1:3")]
    common.write_jsonl(str(root / "ranked.jsonl"), ranked)
    return root, ranked


def test_rsft_keeps_only_well_formed_trajectories_that_rank_the_positive_first(rsft_setup, toy_data, monkeypatch):
    root, ranked = rsft_setup
    call = '<think>look</think>\n<tool_call>\n{"name": "select_images", "arguments": {"target_images": [1, 2]}}\n</tool_call>'
    texts = [call + "<think>(2) yes</think>\n<answer>[2, 1, 3, 4, 5]</answer>",  # right, with a tool call
             "<think>no tool</think>\n<answer>[2, 5, 4, 3, 1]</answer>",         # right, no tool
             "<think>wrong</think>\n<answer>[1, 2, 3, 4, 5]</answer>",           # positive not first
             "<answer>[2, 1, 3, 4, 5]</answer>",                                 # not well formed
             "<think>twice</think>\n<answer>[2, 2, 1, 4, 5]</answer>",            # positive first, not a ranking
             "<think>one pick</think>\n<answer>2</answer>"]                       # right: one candidate
    monkeypatch.setattr(Engine, "generate", forcing_generate(texts))
    args = [TOY_CONFIG, f"--data_root={toy_data}", f"--policy={root}/policy", f"--ranked_train={root}/ranked.jsonl",
            "--train_query_files=query/train/mbeir_toyt2i_task0_train.jsonl",
            "--train_pool_files=cand_pool/train/mbeir_toyt2i_task0_train_cand_pool.jsonl",
            "--n_samples=6", "--keep_per_query=6", "--max_new_tokens=80"] + TINY
    run_stage("rsft", args + [f"--out_dir={root}/any", "--shuffle_window=False"])
    records = common.read_jsonl(f"{root}/any/rsft_data.jsonl")
    assert len(records) == 3 * len(ranked)  # the three right ones per query
    finals = sorted({r["conversations"][-1]["value"] for r in records})
    assert finals == ["<think>(2) yes</think>\n<answer>[2, 1, 3, 4, 5]</answer>",
                      "<think>no tool</think>\n<answer>[2, 5, 4, 3, 1]</answer>",
                      "<think>one pick</think>\n<answer>2</answer>"]
    with_tool = [r for r in records if len(r["conversations"]) == 5]
    assert len(with_tool) == len(ranked)
    r = with_tool[0]
    assert r["conversations"][3]["value"].startswith("Here are the selected images for detailed analysis.")
    assert len(r["images"]) == 5 + 2 and r["image_sizes"][-1] == [112, 112] and r["positive"] == 2
    assert common.load_model(f"{root}/any/model") is not None  # then it fine-tuned through sft.train
    # exclude_queries_in: the queries of the SFT data are never sampled
    common.write_jsonl(str(root / "taught.jsonl"), [{"qid": ranked[0]["qid"], "conversations": []}])
    run_stage("rsft", args + [f"--out_dir={root}/untaught", "--shuffle_window=False", f"--exclude_queries_in={root}/taught.jsonl"])
    sampled = common.read_jsonl(f"{root}/untaught/sampled.jsonl")
    assert sorted(s["qid"] for s in sampled) == sorted(r["qid"] for r in ranked[1:])
    # require_ranking=False: the answer with a duplicate, which puts the positive first, is kept too
    run_stage("rsft", args + [f"--out_dir={root}/lenient", "--shuffle_window=False", "--require_ranking=False"])
    finals = [r["conversations"][-1]["value"] for r in common.read_jsonl(f"{root}/lenient/rsft_data.jsonl")]
    assert len(finals) == 4 * len(ranked) and finals.count("<think>twice</think>\n<answer>[2, 2, 1, 4, 5]</answer>") == len(ranked)
    # require_tool: only the tool-using trajectory survives; out_dir relative to the working directory this time
    monkeypatch.chdir(root)
    run_stage("rsft", args + ["--out_dir=tool", "--require_tool=True", "--shuffle_window=False"])
    records = common.read_jsonl(f"{root}/tool/rsft_data.jsonl")
    assert len(records) == len(ranked) and all(len(r["conversations"]) == 5 for r in records)
    # shuffle_window (the default): each query shows its window in its own fixed random order, so the
    # forced answers (positive at 2) are right only where the shuffle put the positive second
    run_stage("rsft", args + ["--out_dir=shuffled", "--seed=9"])
    pool = {c["did"]: c for c in common.read_jsonl(f"{toy_data}/cand_pool/train/mbeir_toyt2i_task0_train_cand_pool.jsonl")}
    orders = {r["qid"]: task.window_order(r["cands"], (9, i)) for i, r in enumerate(ranked)}
    positives = {q["qid"]: q["pos_cand_list"][0] for q in common.read_jsonl(f"{toy_data}/query/train/mbeir_toyt2i_task0_train.jsonl")}
    second = [qid for qid, order in orders.items() if order[1] == positives[qid]]
    assert 0 < len(second) < len(ranked)  # this seed puts some positives second and not others
    records = common.read_jsonl(f"{root}/shuffled/rsft_data.jsonl")
    assert sorted(r["qid"] for r in records) == sorted(second * 3)
    assert all(r["images"][:5] == [pool[d]["img_path"] for d in orders[r["qid"]]] for r in records)


def test_is_ranking_accepts_one_pick_or_the_whole_window_once():
    assert task.is_ranking([2], 5) and task.is_ranking([3, 1, 2, 5, 4], 5)
    assert not task.is_ranking([4, 1, 2, 4, 4, 5], 5)  # duplicates (a sampled answer RSFT once kept)
    assert not task.is_ranking([2, 1, 3], 5)           # part of the window
    assert not task.is_ranking([6], 5) and not task.is_ranking([1, 2, 3, 4, 0], 5)  # out of range


def test_rsft_records_train_with_the_sft_renderer(rsft_setup, toy_data, tokenizer):
    import sft
    root, _ = rsft_setup
    records = sft.load_records(f"{root}/any/rsft_data.jsonl", toy_data)
    processor = common.make_processor(tokenizer, 14, 784, 12544)
    ex = sft.render(records[0], processor, toy_data, (784, 784), (3136, 12544))
    trained = tokenizer.decode([i for i, m in zip(ex["input_ids"], ex["loss_mask"]) if m])
    gpt = "".join(t["value"] + "<|im_end|>" for t in records[0]["conversations"] if t["from"] == "gpt")
    assert trained == gpt
