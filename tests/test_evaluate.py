import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest

import evaluate
from configurator import configure
from evaluate import (average_precision_at_k, genecis_recall_at_1, hit_at_k, load_qrels, load_ranked,
                      mbeir_cutoff, reciprocal_rank)

SETTINGS = ("ranked", "qrels", "out", "recall_k", "recall_k_overrides", "map_ks", "benchmark")


@pytest.fixture
def fresh_config(monkeypatch):
    # configure() writes into the module's globals; monkeypatch puts the defaults back afterwards
    for key in SETTINGS:
        monkeypatch.setattr(evaluate, key, getattr(evaluate, key))


def write(path, text):
    path.write_text(text)
    return str(path)


def test_several_positives():
    ranked, positives = ["a", "b", "c", "d", "e"], {"b", "d"}
    assert hit_at_k(ranked, positives, 1) == 0.0
    assert hit_at_k(ranked, positives, 2) == 1.0
    assert reciprocal_rank(ranked, positives) == 0.5
    # relevant at ranks 2 and 4: (P@2 + P@4) / min(5, 2) = (1/2 + 2/4) / 2 = 0.5
    assert average_precision_at_k(ranked, positives, 5) == pytest.approx(0.5)


def test_positive_at_rank_3():
    ranked, positives = ["x", "y", "p", "z"], {"p"}
    assert hit_at_k(ranked, positives, 1) == 0.0
    assert hit_at_k(ranked, positives, 5) == 1.0
    assert reciprocal_rank(ranked, positives) == pytest.approx(1 / 3)
    # P@3 = 1/3, divided by min(5, 1) = 1
    assert average_precision_at_k(ranked, positives, 5) == pytest.approx(1 / 3)


def test_no_positive_retrieved_is_all_zeros():
    ranked, positives = ["x", "y", "z"], {"p"}
    assert hit_at_k(ranked, positives, 10) == 0.0
    assert reciprocal_rank(ranked, positives) == 0.0
    assert average_precision_at_k(ranked, positives, 10) == 0.0
    assert genecis_recall_at_1(ranked, [0.3, 0.2, 0.1], "p") == 0.0
    assert average_precision_at_k(ranked, set(), 10) == 0.0  # |GT| = 0


def test_k_larger_than_list():
    ranked, positives = ["x", "p"], {"p"}
    assert hit_at_k(ranked, positives, 100) == 1.0
    # P@2 = 1/2, divided by min(100, 1) = 1
    assert average_precision_at_k(ranked, positives, 100) == pytest.approx(0.5)


def test_map_more_ground_truth_than_k():
    # K = 3, |GT| = 5; top 3 = a (rel, P@1 = 1), x, b (rel, P@3 = 2/3) -> (1 + 2/3) / min(3, 5) = 5/9
    assert average_precision_at_k(["a", "x", "b", "c"], {"a", "b", "c", "d", "e"}, 3) == pytest.approx(5 / 9)


def test_map_less_ground_truth_than_k():
    # K = 5, |GT| = 2; a at rank 2 (P@2 = 1/2), b at rank 5 (P@5 = 2/5) -> (0.5 + 0.4) / min(5, 2) = 0.45
    assert average_precision_at_k(["x", "a", "y", "z", "b"], {"a", "b"}, 5) == pytest.approx(0.45)


def test_duplicates_count_once():
    ranked, positives = ["p", "p", "q", "x"], {"p", "q"}
    # rank 1 p (P@1 = 1), rank 2 repeated p is not relevant, rank 3 q (P@3 = 2/3) -> (1 + 2/3) / min(4, 2) = 5/6
    assert average_precision_at_k(ranked, positives, 4) == pytest.approx(5 / 6)
    assert hit_at_k(ranked, positives, 1) == 1.0
    assert reciprocal_rank(ranked, positives) == 1.0


def test_genecis_ties_go_against_target():
    assert genecis_recall_at_1(["a", "t", "b"], [0.9, 0.9, 0.1], "t") == 0.0
    assert genecis_recall_at_1(["t", "a"], [0.5, 0.5], "t") == 0.0  # listed first but tied
    assert genecis_recall_at_1(["t", "a"], [0.9, 0.8], "t") == 1.0
    assert genecis_recall_at_1(["a", "t"], [0.1, 0.8], "t") == 1.0  # the score decides, not the list order
    assert genecis_recall_at_1(["a", "b"], [0.9, 0.8], "t") == 0.0  # target absent
    assert genecis_recall_at_1(["t"], [0.1], "t") == 1.0


def test_mbeir_cutoff_overrides():
    assert mbeir_cutoff("fashioniq_task7") == 10
    assert mbeir_cutoff("Fashion200K_task0") == 10
    assert mbeir_cutoff("webqa_task1") == 5


def test_qrels_group_names(tmp_path):
    a = write(tmp_path / "mbeir_fashioniq_task7_test_qrels.txt", "7:1 0 7:100 1 7\n")
    b = write(tmp_path / "mbeir_mixed_val_qrels.txt", "1:1 0 1:2 1 0\n2:1 0 2:2 1 3\n2:2 0 2:3 0 3\n")
    groups = load_qrels(f"{a},{b}")
    assert groups == {"fashioniq_task7": {"7:1": {"7:100"}},
                      "mixed_task0": {"1:1": {"1:2"}},
                      "mixed_task3": {"2:1": {"2:2"}}}  # 2:2 has only a rel 0 line: not a query


def test_end_to_end_main(tmp_path, fresh_config, capsys):
    webqa = write(tmp_path / "mbeir_webqa_task1_test_qrels.txt",
                  "1:1 0 1:10 1 1\n1:2 0 1:20 1 1\n1:2 0 1:21 1 1\n1:3 0 1:30 0 1\n")
    fiq = write(tmp_path / "mbeir_fashioniq_task7_test_qrels.txt", "7:1 0 7:100 1 7\n7:2 0 7:200 1 7\n")
    fiq_cands = [f"7:{i}" for i in range(1, 7)] + ["7:100"] + ["7:7", "7:8", "7:9"]  # positive at rank 7
    records = [
        {"qid": "1:1", "task_id": 1, "cands": ["1:10", "1:11"], "scores": [0.9, 0.8]},
        {"qid": "1:2", "task_id": 1, "cands": ["1:99", "1:98", "1:21", "1:20"], "scores": [0.9, 0.8, 0.7, 0.6]},
        {"qid": "7:1", "task_id": 7, "cands": fiq_cands, "scores": [1.0 - i / 10 for i in range(10)]},
        {"qid": "5:5", "task_id": 5, "cands": ["5:1"], "scores": [0.5]},  # in no qrels: ignored
    ]
    ranked = write(tmp_path / "ranked.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "metrics.json"
    configure(vars(evaluate), argv=[f"--ranked={ranked}", f"--qrels={webqa},{fiq}", f"--out={out}", "--map_ks=5"])
    evaluate.main()
    metrics = json.loads(out.read_text())
    # webqa (cut-off 5): 1:1 hit at rank 1 (AP 1, GeneCIS 1); 1:2 first positive at rank 3, RR 1/3,
    # AP@5 = (1/3 + 2/4) / 2 = 5/12, GeneCIS 0. MRR = (1 + 1/3) / 2 = 66.67, mAP@5 = (1 + 5/12) / 2 = 70.83
    assert metrics["webqa_task1"] == {"n": 2, "mbeir_R@5": 100.0, "R@1": 50.0, "R@5": 100.0, "R@10": 100.0,
                                      "MRR": 66.67, "mAP@5": 70.83, "GeneCIS_R@1": 50.0}
    # fashioniq (cut-off 10): 7:1 hit at rank 7 (RR 1/7), 7:2 is not ranked: a miss. MRR = 1/14 = 7.14
    assert metrics["fashioniq_task7"] == {"n": 2, "mbeir_R@10": 50.0, "R@1": 0.0, "R@5": 0.0, "R@10": 50.0,
                                          "MRR": 7.14, "mAP@5": 0.0, "GeneCIS_R@1": 0.0}
    # average of unrounded group values: MRR = (2/3 + 1/14) / 2 = 31/84 = 36.90, mAP@5 = 17/48 = 35.42
    assert metrics["average"] == {"n": 4, "mbeir_R@k": 75.0, "R@1": 25.0, "R@5": 50.0, "R@10": 75.0,
                                  "MRR": 36.9, "mAP@5": 35.42, "GeneCIS_R@1": 25.0}
    printed = capsys.readouterr().out
    assert "1 of 2 qrels queries are not in the ranked file" in printed and "7:2" in printed
    assert "1 ranked queries are in no qrels file" in printed
    assert "| group | n | k | mbeir_R@k | R@1 |" in printed
    assert "| fashioniq_task7 | 2 | 10 | 50.00 |" in printed
    assert "| average | 4 | - | 75.00 |" in printed


def test_missing_query_counts_as_miss(fresh_config):
    qrels = {"toy_task0": {"0:1": {"0:5"}, "0:2": {"0:6"}}}
    metrics = evaluate.evaluate([{"qid": "0:1", "cands": ["0:5"], "scores": [1.0]}], qrels)
    assert metrics["toy_task0"]["n"] == 2
    assert metrics["toy_task0"]["R@1"] == 50.0 and metrics["toy_task0"]["MRR"] == 50.0


def test_malformed_qrels_line(tmp_path):
    path = write(tmp_path / "mbeir_bad_test_qrels.txt", "1:1 0 1:10 1 1\n1:2 0 1:20 1\n")
    with pytest.raises(ValueError, match=re.escape("mbeir_bad_test_qrels.txt:2")):
        load_qrels(path)


def test_malformed_jsonl_lines(tmp_path):
    good = json.dumps({"qid": "1:1", "cands": ["1:2"], "scores": [0.5]})
    cases = ["{not json", json.dumps({"qid": "1:2"}),  # not JSON; no cands
             json.dumps({"qid": "1:2", "cands": ["a", "b"], "scores": [0.1]}), good]  # length mismatch; repeat
    for i, bad in enumerate(cases):
        path = write(tmp_path / f"ranked{i}.jsonl", f"{good}\n{bad}\n")
        with pytest.raises(ValueError, match=re.escape(f"ranked{i}.jsonl:2")):
            load_ranked(path)
