"""
A per-GPU memory account of a stage, to read before renting GPUs: the peak of each phase and its parts,
in GiB, for a world size, and the margin on the GPU.

    python memory.py config/grpo_7b.py
    python memory.py config/sft_7b.py
    python memory.py config/grpo_7b.py --world_size=16 --gpu_gib=141
    python memory.py --stage=rsft --model_config=checkpoints/Qwen2.5-VL-7B-Instruct/config.json
    python memory.py config/toy.py --stage=grpo --model_config=out/toy/rsft/model

The model is built on the meta device from its config (no weights, no download; Qwen2-VL, Qwen2.5-VL or
Qwen3-VL), so every parameter count is exact; without --model_config it is Qwen2.5-VL-7B (QWEN25_VL_7B
below, docs/spec.md §11). The stage is recognised from the config file's keys (or set --stage). Settings
this file leaves at None take the stage script's default, then grpo.py's (window, response budget).

The account, per rank (N = all parameters, N_tr = the trained ones: without the vision tower and its
merger when freeze_vision; W = world_size; P = prompt tokens; bf16 = 2 B, 4 B when dtype is float32):
- resident through a trainer's step, FSDP2 mixed precision (docs/spec.md §11): fp32 master parameters
  4 B x N / W, fp32 gradients 4 B x N_tr / W, AdamW exp_avg + exp_avg_sq 8 B x N_tr / W, and
  overhead_gib for the CUDA context, NCCL buffers and allocator slack (an estimate). The gradients are
  counted in generation too, an upper bound: zero_grad(set_to_none=True) frees them between steps.
- generation (grpo; rsft and rollout sample with a plain bf16 model and no trainer state): the whole
  policy in bf16 on every rank (2 B x N, engine.unsharded); the KV cache of one chunk (the engine
  fills a chunk with whole groups whose worst-case rows, P + max_response_tokens each, fit gen_kv_gib,
  at least one group; KV per token = 2 (K, V) x layers x KV heads x head_dim x 2 B); the prefill of
  the chunk's prompts, one layer at a time: prompts x P x (4 hidden + 3 intermediate) x 2 B (an
  estimate: residual, normed input, attention output, MLP tensors).
- training, per micro-batch of B sequences of T tokens (grpo, rsft: P + max_response_tokens; sft:
  min(max_length, P + max_response_tokens)): the FSDP root unit (embeddings, final norm, lm_head) stays
  gathered in bf16 through forward and backward (FSDP2 never reshards the root after forward), with
  lm_head's unsharded bf16 gradient; 2 decoder-layer units in flight (bf16), and one unit's unsharded
  gradient in bf16 plus its fp32 copy for the reduce-scatter (reduce_dtype float32). With
  grad_checkpointing: the saved layer inputs L x B x T x hidden x 2 B; one layer's recomputed
  activations B x T x (16 hidden + 3 intermediate) x 2 B (an estimate; flash attention, so no T x T
  scores); the log-prob block: the trainer's logits of logprob_chunk positions of each sequence at a
  time, B x chunk x vocab x 4 B x 3 (fp32 logits, softmax, gradient; tests/test_memory.py measures
  3.0-3.2 x B x chunk x vocab x 4 B). Without checkpointing, L layers' activations. The block and the
  recompute are summed, an upper bound (the block is gone before the layers' backward).
- the peak is the max over the phases; "fits" if it is at most gpu_gib.
- P (an estimate): (window + 1 query) items x (prompt_max_pixels / (28 x 28) image tokens, 32 x 32 for
  Qwen3-VL, + text_tokens_per_item) + system_tokens for the system prompt, tools and guideline.

Not counted: the vision tower's transient activations (frozen: nothing saved; it runs before the
language layers' activations build up), sampling logits (rows x vocab x 4 B), the data loader.
For comparison it prints the same run without each of the trainers' memory fixes: pure bf16 weights
and AdamW state (no fp32 master), full (T, vocab) fp32 logits, and all of a rank's rows in one
generation batch with a rectangular cache.
"""

import ast
import math
import os
import sys

import torch

import common
from configurator import configure

# -----------------------------------------------------------------------------
model_config = ""          # a checkpoint's config.json (or its directory); "" = Qwen2.5-VL-7B (QWEN25_VL_7B)
stage = ""                 # grpo | sft | rsft | rollout; "" = recognised from the config file's keys
world_size = 8             # ranks the trainer shards over (FSDP2)
gpu_gib = 80.0             # memory per GPU
overhead_gib = 2.0         # CUDA context, NCCL buffers, allocator slack (an estimate)
text_tokens_per_item = 60  # prompt estimate: text tokens per candidate (and the query) ...
system_tokens = 700        # ... and for the system prompt, tool signatures and guideline
# the stages' settings: None = the stage script's default, else grpo.py's
gen_kv_gib = None          # the engine's KV budget per generation chunk, per rank (16.0)
logprob_chunk = None       # positions per log-prob chunk in the trainers (1024)
window = None
prompt_max_pixels = None
max_response_tokens = None
prompts_per_step = None
group_size = None
micro_batch_size = None
batch_size = None
max_length = None
n_samples = None
batch_queries = None
freeze_vision = None
grad_checkpointing = None
dtype = None
# -----------------------------------------------------------------------------

DEFAULTS = {"gen_kv_gib": 16.0, "logprob_chunk": 1024}  # until the stage scripts declare them
ALIASES = {"gen_kv_gib": "kv_budget_gib"}  # a stage script may name it as engine.Engine's argument
STAGE_KEYS = {"grpo": {"group_size", "prompts_per_step"}, "rsft": {"n_samples", "keep_per_query"},
              "rollout": {"top_n", "stride", "ranked_in"}, "sft": {"max_length", "sft_data", "init_from"}}
TRAINS = {"grpo": True, "sft": True, "rsft": True, "rollout": False}
GENERATES = {"grpo": True, "sft": False, "rsft": True, "rollout": True}

# Qwen2.5-VL-7B-Instruct's config.json, the parts that shape memory (docs/spec.md §11)
QWEN25_VL_7B = {
    "model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 128000, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                      "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                      "hidden_act": "silu"},
}

# ---- the model --------------------------------------------------------------------------------------

def load_config(path=""):
    """The transformers config of a config.json (or a checkpoint directory), or Qwen2.5-VL-7B's."""
    if not path:
        d = QWEN25_VL_7B
    else:
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        d = common.read_json(path)
    if d.get("model_type") not in common.ARCHS:
        raise ValueError(f"{path or 'config'}: model_type {d.get('model_type')!r} is not one of {', '.join(common.ARCHS)}")
    return common.ARCHS[d["model_type"]][1].from_dict(d)


def meta_model(config):
    """The real model class on the meta device: every shape, no memory."""
    with torch.device("meta"):
        return common.ARCHS[config.model_type][0](config)


def count_parts(model):
    """Parameters per FSDP unit as checkpoint.shard cuts them: the vision tower (with its merger), each decoder
    layer, the root (the rest: embeddings, final norm, lm_head; a tied lm_head counts once)."""
    inner = model.model
    total = common.count_params(model)
    vision = common.count_params(inner.visual)
    layers = [common.count_params(layer) for layer in inner.language_model.layers]
    lm_head = model.lm_head.weight.numel()
    return {"total": total, "vision": vision, "layers": layers, "root": total - vision - sum(layers),
            "lm_head": lm_head}


def model_dims(config):
    t, v = config.get_text_config(), config.vision_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return {"layers": t.num_hidden_layers, "hidden": t.hidden_size, "intermediate": t.intermediate_size,
            "kv_heads": t.num_key_value_heads, "head_dim": head_dim, "vocab": t.vocab_size,
            "token_pixels": (common.ARCHS[config.model_type][2] * common.MERGE) ** 2,
            "vision_depth": v.depth, "vision_hidden": getattr(v, "embed_dim", None) or v.hidden_size}  # Qwen2-VL: embed_dim

# ---- the formulas (tests/test_memory.py checks them against real tensors) ---------------------------

def state_bytes(n_total, n_trained, world, master=4, optimizer=4):
    """Sharded trainer state per rank: master parameters, gradients (in the master dtype), AdamW's two moments."""
    return {"master": master * n_total / world, "grads": master * n_trained / world,
            "adam": 2 * optimizer * n_trained / world}


def kv_bytes_per_token(dims, elem=2):
    return 2 * dims["layers"] * dims["kv_heads"] * dims["head_dim"] * elem  # K and V, every layer


def logprob_bytes(positions, vocab):
    """Peak of the sampled-token log-probs over `positions` positions: fp32 logits, softmax, gradient."""
    return positions * vocab * 4 * 3


def layer_activation_bytes(tokens, dims, elem=2):
    """One decoder layer's activations for backward (an estimate: norms, q/k/v/o, MLP gate/up/act)."""
    return tokens * (16 * dims["hidden"] + 3 * dims["intermediate"]) * elem


def prefill_bytes(tokens, dims, elem=2):
    """One decoder layer's live tensors in a no-grad forward (an estimate: residual, normed input, attention
    output, MLP up, act and product), the largest of the prefill's transients."""
    return tokens * (4 * dims["hidden"] + 3 * dims["intermediate"]) * elem


def prompt_tokens(s, dims):
    per_image = s["prompt_max_pixels"] // dims["token_pixels"]
    return (s["window"] + 1) * (per_image + s["text_tokens_per_item"]) + s["system_tokens"]

# ---- the account ------------------------------------------------------------------------------------

def account(s, parts, dims, fp32_master=True, chunked_logprobs=True, chunked_generation=True):
    """{phase: [(label, formula, bytes)]} for the stage in s; 'resident' is added to each trainer phase."""
    elem = 4 if s["dtype"] == "float32" else 2
    W, N = s["world_size"], parts["total"]
    n_tr = N - parts["vision"] if s["freeze_vision"] else N
    layer = max(parts["layers"])
    out = {}
    if TRAINS[s["stage"]]:
        m = 4 if fp32_master else elem
        st = state_bytes(N, n_tr, W, master=m, optimizer=m)
        name = "fp32" if m == 4 else "bf16"
        out["resident"] = [
            (f"{name} master parameters", f"{m} B x {N:,} / {W}", st["master"]),
            (f"{name} gradients (trained)", f"{m} B x {n_tr:,} / {W}", st["grads"]),
            (f"{name} AdamW exp_avg + exp_avg_sq", f"{2 * m} B x {n_tr:,} / {W}", st["adam"])]
    overhead = ("runtime overhead (estimate)", "overhead_gib", s["overhead_gib"] * 2 ** 30)
    out.setdefault("resident", []).append(overhead)

    P = prompt_tokens(s, dims)
    row_T = P + s["max_response_tokens"]
    if GENERATES[s["stage"]]:
        kv_tok = kv_bytes_per_token(dims, elem)
        samples, rows = gen_rows(s)
        fit = int(s["gen_kv_gib"] * 2 ** 30 // (kv_tok * row_T))  # worst-case rows within the budget
        groups = max(1, fit // samples)  # the engine never splits a group; a group over the budget runs alone
        chunk_rows = min(rows, groups * samples) if chunked_generation else rows
        prompts = chunk_rows // samples  # prefilled once per chunk, then copied for their samples
        out["generation"] = [
            ("whole policy in bf16 on every rank", f"{elem} B x {N:,}", elem * N),
            (f"KV cache, {chunk_rows} rows x {row_T:,} tokens", f"{kv_tok:,} B/token", chunk_rows * row_T * kv_tok),
            (f"prefill of {prompts} prompt(s), one layer (estimate)", f"{prompts} x {P:,} tokens",
             prefill_bytes(prompts * P, dims, elem))]
        out["_gen"] = {"fit": fit, "rows": rows, "chunk_rows": chunk_rows, "chunks": math.ceil(rows / chunk_rows),
                       "kv_tok": kv_tok, "samples": samples}
    if TRAINS[s["stage"]]:
        B = s["micro_batch_size"] if s["stage"] == "grpo" else s["batch_size"]
        T = row_T if s["max_length"] is None or s["stage"] == "grpo" else min(s["max_length"], row_T)
        L, h = dims["layers"], dims["hidden"]
        chunk = B * (min(s["logprob_chunk"], T) if chunked_logprobs else T)  # a (B, chunk, V) block
        items = [
            ("root unit gathered (embed, norm, lm_head)", f"{elem} B x {parts['root']:,}", elem * parts["root"]),
            ("lm_head's unsharded gradient", f"{elem} B x {parts['lm_head']:,}", elem * parts["lm_head"]),
            ("2 decoder-layer units in flight", f"2 x {elem} B x {layer:,}", 2 * elem * layer),
            ("one unit's gradient + fp32 reduce copy", f"({elem} + 4) B x {layer:,}", (elem + 4) * layer)]
        if s["grad_checkpointing"]:
            items += [("saved layer inputs", f"{L} x {B} x {T:,} x {h} x {elem} B", L * B * T * h * elem),
                      ("one layer recomputed (estimate)", f"{B} x {T:,} x (16 h + 3 i) x {elem} B",
                       layer_activation_bytes(B * T, dims, elem))]
        else:
            items += [("all layers' activations (estimate)", f"{L} x {B} x {T:,} x (16 h + 3 i) x {elem} B",
                       L * layer_activation_bytes(B * T, dims, elem))]
        if not s["freeze_vision"]:  # a trained tower keeps its (checkpointed) block inputs: 4 patches per token
            patches = 4 * B * (s["window"] + 1) * (s["prompt_max_pixels"] // dims["token_pixels"])
            depth, vh = dims["vision_depth"], dims["vision_hidden"]
            items.append(("vision tower saved inputs", f"{depth} x {patches:,} patches x {vh} x {elem} B",
                          depth * patches * vh * elem))
        items.append(("log-prob chunk (fp32 logits, softmax, grad)" if chunked_logprobs else "full fp32 logits, softmax, grad",
                      f"{B} x {chunk // B:,} x {dims['vocab']:,} x 4 B x 3", logprob_bytes(chunk, dims["vocab"])))
        out["training"] = items
        out["_train"] = {"B": B, "T": T, "P": P, "row_T": row_T}
    return out


def gen_rows(s):
    """(samples per prompt, rows one rank generates per step or generate() call)."""
    if s["stage"] == "grpo":
        return s["group_size"], s["prompts_per_step"] // s["world_size"] * s["group_size"]
    if s["stage"] == "rsft":
        return s["n_samples"], s["batch_queries"] * s["n_samples"]
    return 1, s["batch_queries"]  # rollout: greedy, one row per query window


def phase_totals(acc, stage):
    """{phase: bytes}: a trainer's phases carry the resident state; rsft's and rollout's sampling model has none."""
    resident = sum(b for _, _, b in acc["resident"])
    overhead = acc["resident"][-1][2]
    totals = {}
    for phase in ("generation", "training"):
        if phase in acc:
            base = resident if (phase == "training" or stage == "grpo") else overhead
            totals[phase] = base + sum(b for _, _, b in acc[phase])
    return totals


def gib(nbytes):
    return nbytes / 2 ** 30


def verdict(peak, gpu_gib):
    margin = gpu_gib - gib(peak)
    if margin < 0:
        return f"does not fit: {-margin:.1f} GiB over {gpu_gib:g} GiB"
    return f"fits with {margin:.1f} GiB margin ({100 * margin / gpu_gib:.0f}%)"

# ---- settings ---------------------------------------------------------------------------------------

def literal_settings(path):
    """A stage script's literal settings (its module-level NAME = literal lines), read without importing it."""
    out = {}
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except (ValueError, TypeError):  # a computed default (common.mbeir_files(...)): not a number we need
                pass
    return out


def config_file_keys(argv):
    keys = set()
    for arg in argv:
        if not arg.startswith("--"):
            ns = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), ns)
            keys |= {k for k in ns if not k.startswith("_")}
    return keys


def detect_stage(keys):
    found = sorted(name for name, marks in STAGE_KEYS.items() if keys & marks)
    if len(found) != 1:
        what = f"keys of several stages ({', '.join(found)})" if found else "no stage's keys"
        raise ValueError(f"the config has {what}: pass --stage=grpo|sft|rsft|rollout")
    return found[0]


def fill_defaults(s):
    """Settings left at None: the stage script's default, else grpo.py's, else DEFAULTS."""
    own = literal_settings(os.path.join(common.REPO_DIR, f"{s['stage']}.py"))
    grpo = literal_settings(os.path.join(common.REPO_DIR, "grpo.py"))
    for k, v in s.items():
        if v is None:
            names = [k, ALIASES[k]] if k in ALIASES else [k]
            found = [d[n] for d in (own, grpo) for n in names if n in d]
            s[k] = found[0] if found else DEFAULTS.get(k)
    return s

# ---- the report -------------------------------------------------------------------------------------

def report(s, parts, dims):
    line = lambda label, formula, b: print(f"  {label:<48} {formula:<40} {gib(b):7.2f}")
    acc = account(s, parts, dims)
    totals = phase_totals(acc, s["stage"])
    print(f"parameters (exact): total {parts['total']:,} = vision {parts['vision']:,}"
          f"{' (frozen)' if s['freeze_vision'] else ''} + {len(parts['layers'])} layers x {max(parts['layers']):,}"
          f" + root {parts['root']:,} (lm_head {parts['lm_head']:,})")
    P = prompt_tokens(s, dims)
    print(f"prompt (estimate): ({s['window']} candidates + query) x ({s['prompt_max_pixels'] // dims['token_pixels']:,}"
          f" image tokens at {s['prompt_max_pixels']:,} px + {s['text_tokens_per_item']} text) + {s['system_tokens']}"
          f" = {P:,} tokens; + max_response_tokens {s['max_response_tokens']:,} = {P + s['max_response_tokens']:,}")
    title = "resident through a step (FSDP2 mixed precision)" if TRAINS[s["stage"]] else "resident"
    print(f"{title + ', per rank of ' + str(s['world_size']):<91} {'GiB':>7}")
    for item in acc["resident"]:
        line(*item)
    if "generation" in acc:
        g = acc["_gen"]
        print(f"generation (engine.unsharded; KV budget gen_kv_gib {s['gen_kv_gib']:g} per chunk)"
              + ("" if s["stage"] == "grpo" else ", sampling model only: no trainer state"))
        for item in acc["generation"]:
            line(*item)
        print(f"  -> {g['fit']} rows of {P + s['max_response_tokens']:,} tokens fit the budget"
              f" ({g['kv_tok'] * (P + s['max_response_tokens'])  / 2 ** 30:.2f} GiB each)"
              + (f", i.e. {g['chunk_rows'] // g['samples']} whole group(s) of {g['samples']}" if g["samples"] > 1 else "")
              + f"; {g['rows']} rows per rank ({g['rows'] // g['samples']} prompts x {g['samples']})"
              f" -> {g['chunks']} chunk(s) of {g['chunk_rows']} rows")
        print(f"  {'phase peak':<89} {gib(totals['generation']):7.2f}")
    if "training" in acc:
        t = acc["_train"]
        how = "grad checkpointing" if s["grad_checkpointing"] else "no checkpointing"
        T_note = (f"T = prompt + response = {t['T']:,}" if s["max_length"] is None or s["stage"] == "grpo" else
                  f"T = min(max_length {s['max_length']:,}, prompt + response {t['row_T']:,}) = {t['T']:,}")
        print(f"training ({how}; micro-batch {t['B']} x {T_note}; logprob_chunk {s['logprob_chunk']})")
        for item in acc["training"]:
            line(*item)
        print(f"  {'phase peak':<89} {gib(totals['training']):7.2f}")
    phase = max(totals, key=totals.get)
    peak = totals[phase]
    print(f"peak per rank: {gib(peak):.2f} GiB ({phase}) of {s['gpu_gib']:g} GiB")
    print(f"{s['stage']} on {s['world_size']} x {s['gpu_gib']:g} GiB: {verdict(peak, s['gpu_gib'])}")
    print("without each fix (alone):")
    variants = [("pure bf16 weights and AdamW state (no fp32 master)", {"fp32_master": False}, TRAINS[s["stage"]])]
    variants.append(("full (T, vocab) fp32 logits, no log-prob chunks", {"chunked_logprobs": False}, TRAINS[s["stage"]]))
    variants.append(("all of a rank's rows in one batch, rectangular cache", {"chunked_generation": False},
                     GENERATES[s["stage"]]))
    for label, flags, applies in variants:
        if not applies:
            continue
        other = phase_totals(account(s, parts, dims, **flags), s["stage"])
        p = max(other.values())
        print(f"  {label:<56} peak {gib(p):7.2f} GiB ({gib(p - peak):+.2f}): {verdict(p, s['gpu_gib'])}")
    return peak


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    g = globals()
    # memory.py reads only a few of each stage's keys: the rest of a stage's config file is skipped quietly
    settings = configure(g, argv, verbose=False)
    settings["stage"] = settings["stage"] or detect_stage(config_file_keys(argv))
    if settings["stage"] not in STAGE_KEYS:
        raise ValueError(f"stage={settings['stage']!r}: expected grpo, sft, rsft or rollout")
    s = fill_defaults(settings)
    config = load_config(s["model_config"])
    parts, dims = count_parts(meta_model(config)), model_dims(config)
    print(f"memory.py: {s['stage']}, {s['model_config'] or 'Qwen2.5-VL-7B (built in)'}, dtype {s['dtype']}")
    return report(s, parts, dims)


if __name__ == "__main__":
    main()
