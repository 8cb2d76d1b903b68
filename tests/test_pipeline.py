import json
import os
import subprocess
import sys

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
