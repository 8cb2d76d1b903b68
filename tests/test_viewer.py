"""viewer.py on a real trajectory: rollout.py main with a tiny random policy whose turns are scripted
through the logits (a crop call that really runs, then an answer), so the record is exactly what
rollout writes."""

import glob
import html
import importlib
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import common
import prepare
import viewer
import task
from configurator import configure
from conftest import TOY_CONFIG, run_stage

QUERY_FILE = "query/test/mbeir_toycir_task7_test.jsonl"  # composed queries: a query image and text
POOL_FILE = "cand_pool/test/mbeir_toycir_task7_test_cand_pool.jsonl"
TURNS = ['<think>I crop candidate 2.</think>\n<tool_call>\n'
         '{"name": "crop_image", "arguments": {"bbox_2d": [0, 0, 0.4, 0.4], "target_image": 2}}\n</tool_call>',
         "<think>Candidate 2 has the tag.</think>\n<answer>[2, 1, 3]</answer><|im_end|>"]
DATA_URI = "data:image/png;base64,"


def scripted(tokenizer):
    """A logits hook: the policy writes TURNS[i] as its turn after i tool calls."""
    scripts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TURNS]

    def hook(row, logits):
        script = scripts[min(len(row.tool_calls), len(scripts) - 1)]
        forced = torch.full_like(logits, -1e9)
        forced[script[min(len(row.ids) - row.turn_start, len(script) - 1)]] = 0
        return forced
    return hook


@pytest.fixture(scope="module")
def rollout_out(toy_data, tokenizer, tmp_path_factory):
    """One query, window [negative, positive, negative], reranked by rollout.py main with the scripted policy."""
    root = tmp_path_factory.mktemp("viewer")
    model = common.build_tiny_model("qwen2_5_vl", tokenizer, seed=0)
    model.save_pretrained(root / "policy")
    common.make_processor(tokenizer, 14, 784, 12544).save_pretrained(root / "policy")
    query = common.read_jsonl(f"{toy_data}/{QUERY_FILE}")[0]
    pool = common.read_jsonl(f"{toy_data}/{POOL_FILE}")
    positive = query["pos_cand_list"][0]
    others = [c["did"] for c in pool if c["did"] != positive and c["img_path"] != query["query_img_path"]]
    window = [others[0], positive, others[1]]
    common.write_jsonl(str(root / "ranked.jsonl"), [{"qid": query["qid"], "task_id": 7, "cands": window,
                                                     "scores": [3.0, 2.0, 1.0]}])
    rollout = importlib.reload(importlib.import_module("rollout"))
    configure(vars(rollout), [TOY_CONFIG, f"--data_root={toy_data}", f"--policy={root}/policy", f"--ranked_in={root}/ranked.jsonl",
                              f"--out_dir={root}/rerank", "--top_n=3", "--window=3", "--stride=3", "--max_new_tokens=80",
                              f"--query_files={QUERY_FILE}", f"--pool_files={POOL_FILE}"], verbose=False)
    engine_class = rollout.Engine

    class ScriptedEngine(engine_class):
        def generate(self, prompts, *args, **kwargs):
            return super().generate(prompts, *args, **{**kwargs, "logits_hook": scripted(tokenizer)})
    rollout.Engine = ScriptedEngine
    try:
        rollout.main()
    finally:
        rollout.Engine = engine_class
    benchmark = task.load_benchmark(toy_data, QUERY_FILE, POOL_FILE, "instructions.json")
    return f"{root}/rerank/trajectories.jsonl", benchmark, query, {c["did"]: c for c in pool}[positive]


def test_page_shows_query_candidates_turns_tool_images_and_reward(rollout_out, toy_data):
    path, (queries, pool, instructions), query, positive = rollout_out
    records = viewer.load_trajectories(path, queries)
    rec = records[0]
    assert rec["tool_calls"][0]["valid"] and rec["answer"] == [2, 1, 3] and rec["stop_reason"] == "stop"
    page = viewer.render_html(records, queries, pool, toy_data, instructions)
    assert html.escape(query["query_txt"]) in page
    # each image file is inlined once: the query image, the 3 candidates, the crop
    assert page.count(DATA_URI) == 1 + 3 + 1
    assert page.count('class="im ') == 1 + 3 + 1 + 3  # shown: query, candidates, crop, final ranking
    assert "<b>crop_image</b>" in page and "crop of candidate 2" in page
    assert "&lt;think&gt;I crop candidate 2.&lt;/think&gt;\n&lt;tool_call&gt;" in page and "<think>" not in page
    assert '<div class="cand pos">' in page and '(2) <span class="tag">positive</span>' in page
    # paper reward: 0.2 format + 0.8 rank 1 + 0.2 rank 1 with a valid call
    assert "positive (candidate 2) at rank 1" in page and "reward (paper): 1.200" in page
    assert "mean reward (paper) 1.200" in page and "top-1 rate 100.0%" in page and "tool-call rate 100.0%" in page


def test_missing_image_is_a_placeholder(rollout_out, toy_data, tmp_path):
    path, (queries, pool, instructions), _, _ = rollout_out
    rec = viewer.load_trajectories(path, queries)[0]
    gone = str(tmp_path / "deleted_crop.png")
    rec["images"][-1]["path"] = gone
    page = viewer.render_html([rec], queries, pool, toy_data, instructions)
    assert f"missing image: {gone}" in page and page.count(DATA_URI) == 1 + 3


def test_main_writes_the_page_and_a_bad_record_names_its_line(rollout_out, toy_data, tmp_path):
    path, _, query, _ = rollout_out
    args = [TOY_CONFIG, f"--data_root={toy_data}", f"--query_files={QUERY_FILE}", f"--pool_files={POOL_FILE}",
            f"--out={tmp_path}/page.html"]
    run_stage("viewer", args + [f"--trajectories={path}"])
    page = open(tmp_path / "page.html").read()
    assert page.startswith("<!DOCTYPE html>") and "1 trajectories of 1 queries" in page
    good = open(path).read()
    (tmp_path / "bad.jsonl").write_text(good + good.replace('"turns"', '"turnz"'))
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*turns"):
        run_stage("viewer", args + [f"--trajectories={tmp_path}/bad.jsonl"])
    (tmp_path / "stranger.jsonl").write_text(good.replace(query["qid"], "9:9"))
    with pytest.raises(ValueError, match=r"stranger\.jsonl:1: qid '9:9'"):
        run_stage("viewer", args + [f"--trajectories={tmp_path}/stranger.jsonl"])


def find_chromium():
    names = ["chromium", "chromium-browser", "chromium-headless-shell", "google-chrome", "chrome", "headless_shell"]
    playwright = os.path.expanduser("~/.cache/ms-playwright")
    found = [shutil.which(n) for n in names] + sorted(
        glob.glob(f"{playwright}/*/chrome-linux/chrome") + glob.glob(f"{playwright}/*/chrome-linux/headless_shell")
        + glob.glob(f"{playwright}/*/chrome-headless-shell-linux64/chrome-headless-shell"))
    return next((f for f in found if f), None)


def test_screenshot_shows_the_images(rollout_out, toy_data, tmp_path):
    chrome = find_chromium()
    if chrome is None:
        pytest.skip("no Chromium found: apt-get install chromium-headless-shell (or chromium), "
                    "or pip install playwright && python -m playwright install chromium")
    path, (queries, pool, instructions), _, positive = rollout_out
    html_path, png = tmp_path / "page.html", tmp_path / "page.png"
    html_path.write_text(viewer.render_html(viewer.load_trajectories(path, queries), queries, pool, toy_data, instructions))
    cmd = [chrome, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}/profile",
           f"--screenshot={png}", "--window-size=1200,1600", f"file://{html_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.exists(), f"{chrome} wrote no screenshot (rc {out.returncode}): {out.stderr[-2000:]}"
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 50  # not a blank page
    disc = np.array(prepare.COLOURS[positive["attributes"]["colour"]])
    near = (np.abs(pixels - disc).max(axis=1) <= 15).sum()  # the toy discs are drawn with a little noise
    assert near > 1000, f"only {near} pixels of the {positive['attributes']['colour']} disc colour"
