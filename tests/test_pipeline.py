import json
import os
import subprocess
import sys
from xml.etree import ElementTree

import pytest

from conftest import REPO


def test_quick_toy_pipeline_runs_end_to_end_and_resumes(tmp_path):
    """The one-command toy pipeline in quick mode (tiny steps): every stage runs, results are written,
    and a rerun skips the finished stages."""
    cmd = [sys.executable, "data/toy/run.py", "--quick=True", f"--out={tmp_path}/out", f"--data={tmp_path}/data"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.load(open(tmp_path / "out/results.json"))
    seeds, k = results["seeds"], results["pass_k"]
    assert len(seeds) == 2 and set(results["tables"]) == {"paper", "release"}
    rows = ("stage0", "base", "sft", "rsft", "sft_grpo", "grpo", "sft_notool", "grpo_notool")
    for reward, table in results["tables"].items():
        assert tuple(table) == rows
        for arm, row in table.items():
            if reward == "release" and arm in ("sft_grpo", "grpo_notool"):  # the first reward's only (compare_arms)
                assert row == {}
                continue
            assert len(row["R@1"]["per_seed"]) == (1 if arm in ("stage0", "base") else 2)
            assert 0 <= row["R@1"]["mean"] <= row["R@5"]["mean"] <= 100 and 0 < row["MRR"]["mean"] <= 100
            if arm == "sft":  # sampled k times: the mean hit rate, at most the share with any hit
                for a, b in zip(row["sampled_R@1"]["per_seed"], row["pass@k"]["per_seed"]):
                    assert 0 <= a <= b <= 100
            elif arm != "stage0":  # sampled once
                assert 0 <= row["sampled_R@1"]["mean"] <= 100 and "pass@k" not in row
            if "notool" in arm:
                assert row["tool_call_rate"]["mean"] == 0 == row["sampled_tool_call_rate"]["mean"]  # tools off
            if arm in ("sft_grpo", "grpo", "grpo_notool"):
                assert 0 <= row["zero_var_groups"]["mean"] <= 100 and "heldout_top1_end" in row
    for arm in ("base", "sft", "rsft", "sft_notool"):  # the same policies in both tables: no reward before GRPO
        assert results["tables"]["release"][arm]["R@1"] == results["tables"]["paper"][arm]["R@1"]
    # the sampled evaluation: k trajectories per test query, sample 0 the one a single-sample run draws
    sampled = [json.loads(line) for line in open(tmp_path / f"out/seed{seeds[0]}/sample_sft/trajectories.jsonl")]
    assert len(sampled) == k * results["test_queries"] and {t["sample"] for t in sampled} == set(range(k))
    curves, evals = results["grpo_curves"], results["grpo_heldout_evals"]  # per reward, arm and seed
    for reward, arms in (("paper", ("sft_grpo", "grpo", "grpo_notool")), ("release", ("grpo",))):
        assert tuple(curves[reward]) == arms
        for arm in arms:
            assert [len(curves[reward][arm][str(sd)]) for sd in seeds] == [2, 2]
            assert [[e["step"] for e in evals[reward][arm][str(sd)]] for sd in seeds] == [[0, 1, 2]] * 2
            for sd in seeds:  # the row's policy: the best held-out evaluation's weights (grpo.py --keep_best)
                best = json.load(open(tmp_path / f"out/seed{sd}/{arm}_{reward}/best/best.json"))
                assert best["top1"] == max(e["top1"] for e in evals[reward][arm][str(sd)])
    page = open(tmp_path / "out/results.html").read()
    assert page.count("<svg") == 10 and page.count("<polyline") == (3 + 1) * 2 * 5 and "| SFT + RSFT |" in page
    picture = open(tmp_path / "out/results_curves.svg").read()  # the same charts, one picture for a README
    assert picture.count("<svg") == 1 + 10 and picture.count("<polyline") == (3 + 1) * 2 * 5
    ElementTree.fromstring(picture)  # well-formed XML, as an image viewer needs
    md = open(tmp_path / "out/results.md").read()
    assert "| SFT + RSFT |" in md and "| SFT + GRPO |" in md and "quick mode" in md and "## GRPO reward: release" in md
    assert results["machine"]["matmul_gflops"] > 0 and "GFLOP/s" in md  # the speed the wall times were measured at
    probe = results["base_verdict_probe"]  # its places counted from the drills' text
    drills = [json.loads(line) for line in open(tmp_path / "data/sft/warmup_compare.jsonl")][:probe["drills"]]
    answers = " ".join(d["conversations"][-1]["value"] for d in drills)
    assert probe["drills"] == len(drills) > 0 and "compare drills" in md
    assert probe["yes_places"] == answers.count(": yes,") and probe["no_places"] == answers.count(": no,")
    assert 0 <= probe["yes_right"] <= probe["yes_places"] and 0 <= probe["no_right"] <= probe["no_places"]
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "[sft_" not in again.stdout + again.stderr  # nothing re-run


def test_stages_start_when_their_inputs_are_done_and_share_the_cores(tmp_path, monkeypatch):
    """run.py's scheduler on stub stages (no torch): order follows the stages each one needs, stages that
    are ready together run side by side on one core each, a lone stage gets both, the warm-up waits for a
    free machine, and a failing stage stops the run and names itself."""
    sys.path.insert(0, os.path.join(REPO, "data", "toy"))
    import run
    monkeypatch.setattr(run, "out", str(tmp_path))
    monkeypatch.setattr(run, "cores", 2)
    os.makedirs(tmp_path / "logs")

    def stage(name, needs, seconds=0.3):
        code = (f"import os, time; t = time.time(); time.sleep({seconds}); open(r'{tmp_path / name}', 'w')"
                f".write(f'{{t}} {{time.time()}} {{os.environ[\"OMP_NUM_THREADS\"]}}')")
        return (name, [sys.executable, "-c", code], str(tmp_path / name), needs)

    todo = [stage("a", []), stage("b", ["a"], 0.2), stage("c", ["a"], 1.5), stage("warmup", ["b"]),
            stage("d", ["warmup", "c"])]
    record = run.run_all(todo, str(tmp_path / "seconds.json"))
    spans = {name: open(tmp_path / name).read().split() for name in ("a", "b", "c", "warmup", "d")}
    start = {name: float(v[0]) for name, v in spans.items()}
    end = {name: float(v[1]) for name, v in spans.items()}
    threads = {name: int(v[2]) for name, v in spans.items()}
    assert threads == {"a": 2, "b": 1, "c": 1, "warmup": 2, "d": 2} == record["threads"]
    assert end["a"] <= min(start["b"], start["c"]) and start["c"] < end["b"]  # b and c side by side
    assert start["warmup"] >= end["c"] and start["d"] >= end["warmup"]  # ready after b, it waited for c
    assert record["wall"] < sum(record["seconds"].values())
    again = run.run_all(todo, str(tmp_path / "seconds.json"))  # all done: nothing runs again
    assert again["seconds"] == record["seconds"]

    failing = [stage("e", []), ("f", [sys.executable, "-c", "raise SystemExit(3)"], str(tmp_path / "f"), ["e"])]
    with pytest.raises(SystemExit, match="stage f failed"):
        run.run_all(failing, str(tmp_path / "seconds2.json"))
