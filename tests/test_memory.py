"""memory.py's formulas against real tensors at tiny scale on CPU: the trainer state's bytes after an AdamW
step and the KV cache's bytes (exact), the log-prob chunk's peak (measured with the profiler, within 20%);
and the 7B verdicts it prints."""

import contextlib
import importlib
import io
import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

import common
import memory
from conftest import REPO


class Vocab:
    """Just what common.tiny_config asks of a tokenizer: the test needs no trained BPE."""
    pad_token_id = 0
    ids = {"<|image_pad|>": 290, "<|video_pad|>": 291, "<|vision_start|>": 292, "<|vision_end|>": 293,
           "<|im_end|>": 294}

    def __len__(self):
        return 300

    def convert_tokens_to_ids(self, token):
        return self.ids[token]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen2.5-VL, and its config read back through memory.load_config (the --model_config path)."""
    config = common.tiny_config("qwen2_5_vl", Vocab())
    path = str(tmp_path_factory.mktemp("cfg"))
    config.to_json_file(os.path.join(path, "config.json"))
    torch.manual_seed(0)
    return common.ARCHS["qwen2_5_vl"][0](config), memory.load_config(path)


def settings(**kw):
    s = {"stage": "grpo", "world_size": 1, "gpu_gib": 80.0, "overhead_gib": 0.0, "text_tokens_per_item": 60,
         "system_tokens": 700, "gen_kv_gib": 16.0, "logprob_chunk": 1024, "window": 20, "prompt_max_pixels": 200704,
         "max_response_tokens": 12288, "prompts_per_step": 128, "group_size": 8, "micro_batch_size": 2,
         "batch_size": 1, "max_length": None, "n_samples": 8, "batch_queries": 4, "freeze_vision": True,
         "grad_checkpointing": True, "dtype": "float32"}
    s.update(kw)
    return s


def test_trainer_state_bytes_match_an_adamw_step(tiny):
    model, config = tiny
    parts = memory.count_parts(model)
    assert parts == memory.count_parts(memory.meta_model(config))  # the meta model counts what the real one holds
    assert parts["total"] == sum(p.numel() for p in model.parameters())
    model.model.visual.requires_grad_(False)  # freeze_vision, as the trainers do it
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, 290, (2, 16))
    model(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids)).logits.float().square().mean().backward()
    opt.step()
    measured = {"master": sum(p.nbytes for p in model.parameters()),
                "grads": sum(p.grad.nbytes for p in params),
                "adam": sum(st[k].nbytes for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))}
    predicted = memory.state_bytes(parts["total"], parts["total"] - parts["vision"], world=1)
    assert measured == predicted
    # and the account's resident lines (fp32, one rank) are those numbers
    acc = memory.account(settings(), parts, memory.model_dims(config))
    assert [b for _, _, b in acc["resident"][:3]] == [measured["master"], measured["grads"], measured["adam"]]


@pytest.mark.parametrize("dtype,elem", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_kv_bytes_per_token_match_a_dynamic_cache(tiny, dtype, elem):
    model, config = tiny
    model = model.to(dtype).eval()
    cache, T = common.new_cache(model), 37
    ids = torch.randint(0, 290, (1, T))
    with torch.no_grad():
        model(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids), past_key_values=cache, use_cache=True)
    nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert nbytes == T * memory.kv_bytes_per_token(memory.model_dims(config), elem)
    model.float()


def peak_bytes(fn):
    """Peak of live CPU allocations made inside fn, from the profiler's allocation and free events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def sampled_logprobs(head, hidden, targets, temperature=1.0):
    """Log-probs of the sampled tokens as the trainers compute them: fp32 logits at a temperature."""
    logits = head(hidden).float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)


def chunked_logprobs(head, hidden, targets, chunk):
    """(B, chunk, V) logits at a time, recomputed in backward: the trainers' own chunk function
    (common.token_logprobs runs it this way after the model's forward; docs/spec.md §11)."""
    return torch.cat([checkpoint(common._chunk_logprobs, head, hidden[:, i:i + chunk], targets[:, i:i + chunk], 1.0,
                                 use_reentrant=False) for i in range(0, hidden.shape[1], chunk)], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprob_peak_measured_within_20_percent(dtype):
    B, T, V, H, chunk = 2, 1024, 8192, 32, 128
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False).to(dtype)
    hidden = torch.randn(B, T, H, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    full = peak_bytes(lambda: sampled_logprobs(head, hidden, targets).sum().backward())
    chunked = peak_bytes(lambda: chunked_logprobs(head, hidden, targets, chunk).sum().backward())
    assert abs(full / memory.logprob_bytes(B * T, V) - 1) < 0.2  # measured 1.00
    assert abs(chunked / memory.logprob_bytes(B * chunk, V) - 1) < 0.2  # measured 1.03-1.05 (+ lm_head's grad)
    assert full > 4 * chunked  # the chunks' point


def run(argv):
    module = importlib.reload(memory)  # fresh settings, as a new process would have
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main(argv)
    return out.getvalue()


@pytest.mark.parametrize("config_file,stage", [("grpo_7b.py", "grpo"), ("sft_7b.py", "sft")])
def test_7b_configs_fit_8_gpus_of_80_gib(config_file, stage):
    out = run([os.path.join(REPO, "config", config_file)])
    assert f"memory.py: {stage}," in out
    assert "total 8,292,166,656" in out  # Qwen2.5-VL-7B's published parameter count
    assert f"{stage} on 8 x 80 GiB: fits with" in out
    assert "full (T, vocab) fp32 logits" in out and "does not fit" in out  # without chunked log-probs


def test_stage_is_recognised_or_asked_for():
    assert memory.detect_stage({"group_size", "window"}) == "grpo"
    assert memory.detect_stage({"max_length", "epochs"}) == "sft"
    with pytest.raises(ValueError, match="--stage"):
        run([os.path.join(REPO, "config", "toy.py")])  # one file for every stage
    assert "rollout on 8 x 80 GiB" in run([os.path.join(REPO, "config", "toy.py"), "--stage=rollout"])
