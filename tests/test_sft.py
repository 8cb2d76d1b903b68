import json
import os
import subprocess
import sys

import pytest
import torch

import common
from transformers import AutoTokenizer
from engine import Engine
import tools
import task
from conftest import REPO, TOY_CONFIG, run_stage

TOY_VIEWS = (784, 784), (3136, 12544)  # the toy's prompt and tool views (config/toy.py)

TINY = ["--init_from=scratch", "--n_layer=2", "--n_embd=64", "--n_head=2", "--n_kv_head=1", "--vision_depth=1", "--vision_hidden=32"]


def make_record(toy_data, out, cands=(0, 1, 2), answer="[2, 1, 3]"):
    """A real multi-turn tool-use record: prompt, a crop call, its observation, the answer."""
    images = [f"images/train/pool/{i}.png" for i in cands]
    messages = task.build_messages("a red disc on navy", False, "Find it.", [""] * len(cands), [True] * len(cands), True,
                                   style="compact")
    system, human = task.to_sharegpt(messages)
    call = '<think>too small</think>\n<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [0, 0, 0.4, 0.4], "target_image": 2}}\n</tool_call>'
    result = tools.execute_tool_call(call, [None] + [common.load_image(os.path.join(toy_data, p)) for p in images], 3136, 12544,
                                     style="compact")
    os.makedirs(out, exist_ok=True)
    crop_path = os.path.join(out, "crop.png")
    result.images[0].save(crop_path)
    observation = "".join("<image>" if part["type"] == "image" else part["text"] for part in result.content)
    return {"conversations": [system, human, {"from": "gpt", "value": call}, {"from": "human", "value": observation},
                              {"from": "gpt", "value": f"<think>(2) checks, yes</think>\n<answer>{answer}</answer>"}],
            "images": images + [os.path.relpath(crop_path, toy_data)]}


def test_loss_mask_covers_exactly_the_gpt_turns(toy_data, tokenizer, tmp_path):
    import sft
    record = make_record(toy_data, tmp_path)
    processor = common.make_processor(tokenizer, 14, 784, 12544)
    ex = sft.render(record, processor, toy_data, *TOY_VIEWS)
    ids, mask = ex["input_ids"], ex["loss_mask"]
    # token by token: the masked-in tokens are the two gpt turns, each closed by its <|im_end|>
    spans, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    gpt = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
    assert spans == [v + "<|im_end|>" for v in gpt]
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert all(m == 0 for i, m in zip(ids, mask) if i == image_pad)
    assert sum(i == image_pad for i in ids) == 3 * 1 + 4  # three 28x28 candidates, one 56x56 crop
    # the prompt part is token-for-token what the rollout engine prefills
    engine = Engine(common.build_tiny_model("qwen2_5_vl", tokenizer), processor)
    messages = task.build_messages("a red disc on navy", False, "Find it.", [""] * 3, [True] * 3, True, style="compact")
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    views = [common.qwen_resize(common.load_image(os.path.join(toy_data, p)), 784, 784) for p in record["images"][:3]]
    prompt_ids = engine.encode(text, views)[0]
    assert ids[:len(prompt_ids)] == prompt_ids


def test_bad_records_are_named(toy_data, tmp_path):
    import sft
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": "<image>hi"}], "images": []}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: record 0: 1 <image> placeholders but 0 images"):
        sft.load_records(str(path), "")
    path.write_text(json.dumps({"conversations": [{"from": "robot", "value": "hi"}], "images": []}) + "\n")
    with pytest.raises(ValueError, match=r"record 0: unknown role 'robot'"):
        sft.load_records(str(path), "")


@pytest.fixture(scope="module")
def sft_data(toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sftdata")
    records = [make_record(toy_data, out / f"r{i}", cands=(i, i + 1, i + 2), answer=f"[{i % 3 + 1}, 1, 2]") for i in range(4)]
    common.write_jsonl(str(out / "data.jsonl"), records)
    return str(out / "data.jsonl")


def test_right_padded_loss_equals_each_record_alone(toy_data, tokenizer, tmp_path):
    """Right padding changes nothing: each row's summed loss in a padded micro-batch equals the loss of that
    record run alone (no padding at all); records of different lengths, images and a crop."""
    import sft
    processor = common.make_processor(tokenizer, 14, 784, 12544)
    model = common.build_tiny_model("qwen2_5_vl", tokenizer, seed=0).eval()
    records = [make_record(toy_data, tmp_path / "a", cands=(0, 1, 2, 3, 4)),
               make_record(toy_data, tmp_path / "b", cands=(5, 6), answer="[1, 2]")]
    examples = [sft.render(r, processor, toy_data, *TOY_VIEWS) for r in records]
    assert len(examples[0]["input_ids"]) > len(examples[1]["input_ids"]) + 10  # the second row is padded
    args = (processor, model.config.image_token_id, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        together, n_together = sft.token_loss_sum(model, common.collate(examples, *args), "cpu")
        alone = [sft.token_loss_sum(model, common.collate([ex], *args), "cpu") for ex in examples]
    assert int(n_together) == sum(int(n) for _, n in alone) == sum(sum(ex["loss_mask"][1:]) for ex in examples)
    assert torch.allclose(together, sum(loss for loss, _ in alone), rtol=1e-5)


def test_tiny_sft_overfits_a_handful_of_records(toy_data, sft_data, tmp_path):
    args = [TOY_CONFIG, f"--data_root={toy_data}", f"--sft_data={sft_data}", f"--tokenizer_dir={toy_data}/tokenizer",
            f"--out_dir={tmp_path}", "--epochs=40", "--batch_size=2", "--learning_rate=3e-3", "--warmup_frac=0.05",
            "--log_every=1000", "--freeze_vision=False"] + TINY
    import importlib
    import sft
    sft = importlib.reload(sft)  # fresh defaults, then this test's settings
    from configurator import configure
    configure(vars(sft), args, verbose=False)
    model, processor = sft.build_model(sft.init_from, "cpu", torch.float32)
    examples = [sft.render(r, processor, toy_data, *TOY_VIEWS) for r in sft.load_records(sft_data, toy_data)]
    losses = sft.train(model, processor, examples, str(tmp_path / "model"), {k: getattr(sft, k) for k in sft.TRAIN_KEYS}, 0, 1, "cpu")
    assert losses[-1] < losses[0] / 10
    # the checkpoint is a Hugging Face directory that reloads with identical logits
    reloaded = common.load_model(str(tmp_path / "model")).eval()
    model.eval()
    batch = common.collate(examples[:2], processor, model.config.image_token_id, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        a = model(**common.model_inputs(batch, "cpu")).logits
        b = reloaded(**common.model_inputs(batch, "cpu")).logits
    assert torch.equal(a, b)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sft(args, nproc, threads=1):
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
           if nproc > 1 else [sys.executable]) + [os.path.join(REPO, "sft.py")] + args
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("freeze_vision, dtype", [(False, "float32"), (True, "float32"), (True, "bfloat16")])
def test_fsdp_two_ranks_equal_one_rank(toy_data, sft_data, tmp_path, freeze_vision, dtype):
    """The same global batch (2 micro-batches): 2 gloo ranks x 1 vs 1 process x grad_accum 2. In bf16 (fp32
    masters, bf16 compute, fp32 reduction) the one process runs as a 1-rank FSDP group: the same arithmetic up
    to the order of the gradient sum, so the saved bf16 weights agree to bf16 rounding."""
    base = [TOY_CONFIG, f"--data_root={toy_data}", f"--sft_data={sft_data}", f"--tokenizer_dir={toy_data}/tokenizer",
            "--epochs=2", "--batch_size=1", "--learning_rate=1e-3", f"--freeze_vision={freeze_vision}", "--warmup_frac=0.5",
            f"--dtype={dtype}"] + TINY
    run_sft(base + [f"--out_dir={tmp_path}/one", "--grad_accum=2"], 1)
    run_sft(base + [f"--out_dir={tmp_path}/two", "--grad_accum=1"], 2)
    one = common.load_model(f"{tmp_path}/one/model").state_dict()
    two = common.load_model(f"{tmp_path}/two/model").state_dict()
    assert one.keys() == two.keys()
    if dtype == "float32":
        assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    else:
        from safetensors import safe_open
        with safe_open(f"{tmp_path}/two/model/model.safetensors", framework="pt") as f:  # saved in dtype
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert all(torch.allclose(one[k].float(), two[k].float(), rtol=1e-2, atol=1e-3) for k in one)
    if freeze_vision:  # the frozen tower is saved as it was built
        init = common.build_tiny_model("qwen2_5_vl", AutoTokenizer.from_pretrained(f"{toy_data}/tokenizer"), seed=1337,
                                       n_layer=2, n_embd=64, n_head=2, n_kv_head=1, vision_depth=1, vision_hidden=32).state_dict()
        saved = common.torch_dtype(dtype)  # the checkpoint holds the weights in dtype
        assert all(torch.equal(init[k].to(saved).float(), two[k].float()) for k in init if "visual" in k)


def test_resume_continues_where_it_stopped(toy_data, sft_data, tmp_path):
    base = [TOY_CONFIG, f"--data_root={toy_data}", f"--sft_data={sft_data}", f"--tokenizer_dir={toy_data}/tokenizer",
            "--batch_size=2", "--learning_rate=1e-3", "--warmup_frac=0.01", "--min_lr_frac=1.0"] + TINY  # constant lr
    run_stage("sft", base + [f"--out_dir={tmp_path}/straight", "--epochs=4"])
    run_stage("sft", base + [f"--out_dir={tmp_path}/resumed", "--epochs=2"])
    assert common.read_json(f"{tmp_path}/resumed/model/trainer_state.json")["step"] == 4
    run_stage("sft", base + [f"--out_dir={tmp_path}/resumed", "--epochs=4"])  # picks up at step 4 of 8
    a = common.load_model(f"{tmp_path}/straight/model").state_dict()
    b = common.load_model(f"{tmp_path}/resumed/model").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_vision_from_takes_the_tower_of_another_checkpoint(toy_data, sft_data, tmp_path):
    """The toy trains its vision tower and its language model apart (data/toy/run.py); the warm-up joins them:
    the tower and projector come from vision_from, the language model from init_from, and a frozen tower stays
    exactly the donor's through training."""
    sizes = dict(n_layer=2, n_embd=64, n_head=2, n_kv_head=1, vision_depth=1, vision_hidden=32)
    donor = common.build_tiny_model("qwen2_5_vl", AutoTokenizer.from_pretrained(f"{toy_data}/tokenizer"), seed=7, **sizes)
    donor.save_pretrained(tmp_path / "donor")
    args = [TOY_CONFIG, f"--data_root={toy_data}", f"--sft_data={sft_data}", f"--tokenizer_dir={toy_data}/tokenizer",
            f"--vision_from={tmp_path}/donor", "--epochs=1", "--batch_size=2", "--learning_rate=1e-3",
            "--freeze_vision=True"] + TINY
    run_stage("sft", args + [f"--out_dir={tmp_path}/joined"])
    joined = common.load_model(f"{tmp_path}/joined/model").state_dict()
    want = donor.state_dict()
    scratch = common.build_tiny_model("qwen2_5_vl", AutoTokenizer.from_pretrained(f"{toy_data}/tokenizer"), seed=1337,
                                      **sizes).state_dict()
    visual = [k for k in want if "visual" in k]
    assert visual and all(torch.equal(joined[k], want[k]) for k in visual)
    assert not torch.equal(want["model.visual.merger.mlp.0.weight"], scratch["model.visual.merger.mlp.0.weight"])
    assert not torch.equal(joined["lm_head.weight"], want["lm_head.weight"])  # the language model is not the donor's


def test_thread_count_barely_changes_the_trained_weights(toy_data, sft_data, tmp_path):
    """data/toy/run.py gives a stage 1 or 2 threads depending on what runs beside it; with the vision tower frozen
    (every policy stage) the weights come out the same up to float summation order. Bit for bit on one AMD
    EPYC; on an Intel Xeon (both AVX-512) 25 of 45 tensors differed by up to 6.2e-6 after these 2 epochs
    (measured). A trained tower's differ more (measured), so run.py pins the threads of embed and vision."""
    args = [TOY_CONFIG, f"--data_root={toy_data}", f"--sft_data={sft_data}", f"--tokenizer_dir={toy_data}/tokenizer",
            "--epochs=2", "--batch_size=2", "--learning_rate=1e-3", "--freeze_vision=True"] + TINY
    weights = []
    for threads in (1, 2):
        run_sft(args + [f"--out_dir={tmp_path}/t{threads}"], 1, threads)
        weights.append(common.load_model(f"{tmp_path}/t{threads}/model").state_dict())
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-4


def test_stop_loss_ends_training_early_and_a_rerun_adds_nothing(toy_data, sft_data, tmp_path):
    """stop_loss ends the run once the mean loss of the last 25 steps is below it; the checkpoint says where,
    and a rerun (resume) trains no further."""
    args = [TOY_CONFIG, f"--data_root={toy_data}", f"--sft_data={sft_data}", f"--tokenizer_dir={toy_data}/tokenizer",
            f"--out_dir={tmp_path}", "--epochs=100", "--batch_size=2", "--learning_rate=3e-3", "--warmup_frac=0.05",
            "--log_every=1000", "--stop_loss=1.0"] + TINY
    run_stage("sft", args)
    state = common.read_json(tmp_path / "model/trainer_state.json")
    assert 25 <= state["stopped_at"] < state["step"]
    before = common.load_model(str(tmp_path / "model")).state_dict()
    run_stage("sft", args)
    after = common.load_model(str(tmp_path / "model")).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert common.read_json(tmp_path / "model/trainer_state.json")["stopped_at"] == state["stopped_at"]
