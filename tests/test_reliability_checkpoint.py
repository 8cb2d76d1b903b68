"""Checkpoints are one unit: a kill at any point of a save leaves the previous checkpoint or the new one (and a
rerun ends where a straight run does); a torn or mismatched trainer state is an error naming the file; no
pickle is ever read; stop_loss's window survives a resume."""
import os
import pickle

import pytest
import torch

import checkpoint
import common
from conftest import TOY_CONFIG, run_stage
from test_sft import TINY, sft_data  # noqa: F401  (the fixture)


class Killed(Exception):
    pass


def args_for(toy_data, sft_data, out, *extra):  # noqa: F811
    return [TOY_CONFIG, f"--data_root={toy_data}", f"--sft_data={sft_data}", f"--tokenizer_dir={toy_data}/tokenizer",
            f"--out_dir={out}", "--batch_size=2", "--learning_rate=1e-3", "--warmup_frac=0.01", "--min_lr_frac=1.0",
            "--epochs=4", "--save_every=2", "--log_every=1000"] + TINY + list(extra)


def weights(path):
    return common.load_model(str(path)).state_dict()


def same(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.mark.parametrize("kill_at", ["shard", "rename"])
def test_a_kill_during_a_save_loses_nothing(toy_data, sft_data, tmp_path, monkeypatch, kill_at):  # noqa: F811
    """kill_at="shard": while the 2nd checkpoint's trainer state is written (the 1st stays in place);
    "rename": between moving the 1st checkpoint aside and moving the 2nd into place (recovery finishes it)."""
    run_stage("sft", args_for(toy_data, sft_data, tmp_path / "straight"))
    out, saves = tmp_path / "killed", []
    real_replace = os.replace
    from safetensors.torch import save_file as real

    def save_file(tensors, path, metadata=None):
        saves.append(path)
        if kill_at == "shard" and len(saves) == 2:
            open(path, "wb").write(b"half a file")  # torn, then the process dies
            raise Killed
        real(tensors, path, metadata=metadata)

    def replace(src, dst):
        if kill_at == "rename" and len(saves) == 2 and str(src).endswith("model.tmp"):
            raise Killed  # the old checkpoint is already at model.old, the new one complete in model.tmp
        real_replace(src, dst)

    monkeypatch.setattr("safetensors.torch.save_file", save_file)
    monkeypatch.setattr(common.os, "replace", replace)
    with pytest.raises(Killed):
        run_stage("sft", args_for(toy_data, sft_data, out))
    monkeypatch.undo()
    expected = 2 if kill_at == "shard" else 4  # the step the rerun resumes from
    assert checkpoint.read_trainer_state(str(out / "model"))["step"] == expected
    assert not os.path.exists(f"{out}/model.tmp") and not os.path.exists(f"{out}/model.old")
    run_stage("sft", args_for(toy_data, sft_data, out))
    assert same(weights(tmp_path / "straight/model"), weights(out / "model"))


def test_a_torn_or_mismatched_trainer_state_is_named(toy_data, sft_data, tmp_path):  # noqa: F811
    run_stage("sft", args_for(toy_data, sft_data, tmp_path, "--epochs=1"))
    shard = tmp_path / "model/trainer_state/rank0.safetensors"
    state = common.read_json(tmp_path / "model/trainer_state.json")
    common.write_json(tmp_path / "model/trainer_state.json", dict(state, step=state["step"] - 1))
    with pytest.raises(ValueError, match=f"{shard}: holds step {state['step']}"):
        run_stage("sft", args_for(toy_data, sft_data, tmp_path, "--epochs=2"))
    common.write_json(tmp_path / "model/trainer_state.json", state)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{shard}: cannot read"):
        run_stage("sft", args_for(toy_data, sft_data, tmp_path, "--epochs=2"))


def test_resume_reads_no_pickle(toy_data, sft_data, tmp_path, monkeypatch):  # noqa: F811
    """A checkpoint is JSON and safetensors only: resuming with pickle and torch.load disabled works, so a
    planted pickle in a checkpoint directory is never executed."""
    run_stage("sft", args_for(toy_data, sft_data, tmp_path, "--epochs=1"))
    files = {os.path.relpath(os.path.join(d, f), tmp_path / "model") for d, _, fs in os.walk(tmp_path / "model") for f in fs}
    assert not [f for f in files if f.endswith((".pt", ".pkl", ".bin"))] and "trainer_state/rank0.safetensors" in files

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    run_stage("sft", args_for(toy_data, sft_data, tmp_path, "--epochs=2"))
    assert common.read_json(tmp_path / "model/trainer_state.json")["step"] > 0


def test_stop_loss_window_survives_a_resume(toy_data, sft_data, tmp_path, monkeypatch):  # noqa: F811
    """Killed after the checkpoint of step 10, the rerun stops at the same step as a straight run (the last 25
    losses are part of the checkpoint)."""
    extra = ("--epochs=100", "--learning_rate=3e-3", "--stop_loss=1.0", "--save_every=10")
    run_stage("sft", args_for(toy_data, sft_data, tmp_path / "straight", *extra))
    straight = common.read_json(tmp_path / "straight/model/trainer_state.json")["stopped_at"]
    assert straight > 30
    real_save = checkpoint.save_checkpoint

    def save_then_die(model, processor, optimizer, step, *args, **kwargs):
        real_save(model, processor, optimizer, step, *args, **kwargs)
        if step == 30:
            raise Killed
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run_stage("sft", args_for(toy_data, sft_data, tmp_path / "resumed", *extra))
    monkeypatch.undo()
    run_stage("sft", args_for(toy_data, sft_data, tmp_path / "resumed", *extra))
    assert common.read_json(tmp_path / "resumed/model/trainer_state.json")["stopped_at"] == straight
