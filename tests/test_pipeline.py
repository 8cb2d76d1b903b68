import json
import os
import subprocess
import sys

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
    stages = [r["stage"] for r in results["rows"]]
    assert stages[0].startswith("stage-0") and "SFT + RSFT + GRPO" in stages and "no tools: SFT + GRPO" in stages
    for row in results["rows"]:
        assert 0 <= row["R@1"] <= row["R@5"] <= 100 and 0 < row["MRR"] <= 100
        if row["format_valid"] is not None:
            assert 0 <= row["format_valid"] <= 100 and 0 <= row["tool_call_rate"] <= 100
    no_tools = [r for r in results["rows"] if r["stage"].startswith("no tools")]
    assert all(r["tool_call_rate"] == 0 for r in no_tools)  # tools are off in the ablation
    curves = results["grpo_curves"]  # GRPO's per-step log, both arms, drawn in results.html
    assert [len(curves[run]) for run in ("grpo", "grpo_notool")] == [2, 2] and all("zero_std_groups" in s for s in curves["grpo"])
    page = open(tmp_path / "out/results.html").read()
    assert page.count("<svg") == 4 and page.count("<polyline") == 8 and "| SFT + RSFT |" in page
    md = open(tmp_path / "out/results.md").read()
    assert "| SFT + RSFT |" in md and "quick mode" in md
    assert results["machine"]["matmul_gflops"] > 0 and "GFLOP/s" in md  # the speed the wall times were measured at
    probe = results["base_verdict_probe"]  # its places counted from the drills' text
    drills = [json.loads(line) for line in open(tmp_path / "data/sft/warmup_compare.jsonl")][:probe["drills"]]
    answers = " ".join(d["conversations"][-1]["value"] for d in drills)
    assert probe["drills"] == len(drills) > 0 and "compare drills" in md
    assert probe["yes_places"] == answers.count(": yes,") and probe["no_places"] == answers.count(": no,")
    assert 0 <= probe["yes_right"] <= probe["yes_places"] and 0 <= probe["no_right"] <= probe["no_places"]
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "[sft]" not in again.stdout + again.stderr  # nothing re-run


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
