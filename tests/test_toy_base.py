"""The toy's shipped base model (data/toy/base_model): the stand-in for downloading a pretrained VLM, built once by
`python data/toy/run.py --base=build --ship_base=True` (~12 min on 2 cores, too long to rebuild in this suite;
the quick pipeline test runs the build's stages at tiny sizes). Checked here: it is the real class at the toy's
size, its tokenizer is the one prepare.py trains, and its verdict probe, recomputed now, is the one its build
recorded."""
import json
import os
import sys

import torch

import common
from conftest import REPO, run_stage

BASE = os.path.join(REPO, "data", "toy", "base_model")


def test_the_shipped_base_is_the_toy_model_its_build_recorded(tmp_path, monkeypatch):
    record = json.load(open(os.path.join(BASE, "build.json")))
    model = common.load_model(BASE)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    config = {}
    exec(open(os.path.join(REPO, "config", "toy.py")).read(), config)
    assert (model.config.text_config.hidden_size, model.config.text_config.num_hidden_layers) == (config["n_embd"], config["n_layer"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # stored in bf16, trained in fp32
    # the tokenizer prepare.py trains on the full benchmark (the run's --n_train and --n_test)
    data = tmp_path / "data"
    run_stage("prepare", [f"--out_dir={data}", "--n_train=1536", "--n_test=100", f"--seed={record['seed']}"])
    shipped = json.load(open(os.path.join(BASE, "tokenizer.json")))
    built = json.load(open(data / "tokenizer" / "tokenizer.json"))
    assert shipped["model"]["vocab"] == built["model"]["vocab"] and shipped["model"]["merges"] == built["model"]["merges"]
    # the verdict probe on the first 200 compare drills, as run.py computes it after every run
    run_stage("cold_start", [f"--data_root={data}", f"--out_dir={data}/sft", "--n_warmup=0", "--n_windows=0",
                             "--n_restate=0", "--n_compare=200", f"--seed={record['seed']}"])
    sys.path.insert(0, os.path.join(REPO, "data", "toy"))
    import run
    monkeypatch.setattr(run, "data", str(data))
    probe = run.verdict_probe(BASE)
    assert probe == record["verdict_probe"]
