"""
The small shared module every stage imports: models, processor, images, JSONL files, distributed.

Models are the real transformers classes for Qwen2-VL, Qwen2.5-VL and Qwen3-VL, loaded from a local
Hugging Face directory (no hub access, ever) or built tiny from a config for CPU runs.
"""

import json
import math
import os
import random
import tempfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
CHAT_TEMPLATE_PATH = os.path.join(REPO_DIR, "chat_template.jinja")

# model_type in config.json -> (model class, config class, vision patch size)
ARCHS = {
    "qwen2_vl": (Qwen2VLForConditionalGeneration, Qwen2VLConfig, 14),
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig, 14),
    "qwen3_vl": (Qwen3VLForConditionalGeneration, Qwen3VLConfig, 16),
}
MERGE = 2  # 2x2 vision patches are merged into one LLM token in every Qwen-VL
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# the 16 M-BEIR task/dataset pairs the paper averages (docs/spec.md §7), each searched in its local pool
MBEIR_TEST = ["visualnews_task0", "mscoco_task0", "fashion200k_task0", "webqa_task1", "edis_task2", "webqa_task2",
              "visualnews_task3", "mscoco_task3", "fashion200k_task3", "nights_task4", "oven_task6", "infoseek_task6",
              "fashioniq_task7", "cirr_task7", "oven_task8", "infoseek_task8"]


def mbeir_files(kind, names=MBEIR_TEST):
    """Comma-joined M-BEIR test file paths, relative to the M-BEIR root: kind is query, pool or qrels."""
    pattern = {"query": "query/test/mbeir_{}_test.jsonl", "pool": "cand_pool/local/mbeir_{}_cand_pool.jsonl",
               "qrels": "qrels/test/mbeir_{}_test_qrels.txt"}[kind]
    return ",".join(pattern.format(name) for name in names)


def torch_dtype(name):
    """The torch dtype of a dtype setting, or an error naming the setting."""
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]

# -----------------------------------------------------------------------------
# distributed: a handful of visible lines, torchrun sets the environment

def dist_setup():
    """Return (rank, local_rank, world_size, device); init the process group under torchrun."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, world_size, device


def is_rank0():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_rank0():
        print(*args, **kwargs, flush=True)


def dist_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

# -----------------------------------------------------------------------------
# JSONL files: every stage hands off through them

def read_jsonl(path, required=()):
    """Read a JSONL file; a bad line is an error naming the file and line number."""
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise ValueError(f"{path}:{lineno}: record is missing {', '.join(missing)}")
            records.append(rec)
    return records


def atomic_write(path, write_fn, mode="w"):
    """Write through a temp file in the same directory, then rename: readers never see half a file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_jsonl(path, records):
    atomic_write(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in records))


def read_json(path):
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2))


def append_jsonl(path, records):
    """Append whole lines and flush: a resumable stage re-reads what it already wrote."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_resumable(path, key):
    """Records already written by an interrupted run (a torn last line is dropped), and their keys."""
    if not os.path.exists(path):
        return [], set()
    records = []
    with open(path) as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the line a kill cut in half
            raise ValueError(f"{path}:{i + 1}: not valid JSON") from None
    atomic_write(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in records))  # drop the torn line
    return records, {r[key] for r in records}

# -----------------------------------------------------------------------------
# images

def resolve_path(path, root):
    return path if os.path.isabs(path) or not root else os.path.join(root, path)


def check_images(records, path_key, id_key, root):
    """Every image a stage will need exists, or an error lists the records that point at missing ones."""
    missing = [(r[id_key], r[path_key]) for r in records
               if r.get(path_key) and not os.path.exists(resolve_path(r[path_key], root))]
    if missing:
        shown = ", ".join(f"{rid} -> {p}" for rid, p in missing[:5])
        raise FileNotFoundError(f"{len(missing)} missing image(s) (record id -> path): {shown}")


def load_image(path):
    """Open as RGB; RGBA and palette images are flattened onto white."""
    img = Image.open(path)
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, img)
    return img.convert("RGB")


def smart_size(height, width, factor, min_pixels, max_pixels):
    """Qwen-style target size: both sides multiples of factor, area in [min_pixels, max_pixels], aspect kept."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def qwen_resize(img, min_pixels, max_pixels, factor=28):
    """Resize an image the way the Qwen processor would, so the processor then leaves it untouched."""
    h, w = smart_size(img.height, img.width, factor, min_pixels, max_pixels)
    return img if (h, w) == (img.height, img.width) else img.resize((w, h), Image.BICUBIC)

# -----------------------------------------------------------------------------
# processor: image-only, works without torchvision, chat template from this repo

class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor minus the video processor (whose constructor needs torchvision).

    Its text side is the same for Qwen2-VL, Qwen2.5-VL and Qwen3-VL images: each <|image_pad|> becomes
    (grid_h * grid_w / 4) copies, and mm_token_type_ids marks them (without it the model silently
    falls back to 1-D positions)."""
    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


def make_processor(tokenizer, patch_size=14, min_pixels=28 * 28, max_pixels=1024 * 28 * 28):
    with open(CHAT_TEMPLATE_PATH) as f:
        template = f.read()
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=MERGE,
                                               min_pixels=min_pixels, max_pixels=max_pixels)
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def load_processor(path, min_pixels, max_pixels):
    """Processor for a local model or tokenizer directory; pixel limits are always explicit."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"processor {path!r}: no such local directory (nothing is ever downloaded)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return make_processor(tokenizer, model_patch_size(path), min_pixels, max_pixels)

# -----------------------------------------------------------------------------
# training: batches, FSDP2 sharding and checkpoints, shared by sft.py, rsft.py and grpo.py

def collate(examples, processor, image_token_id, pad_id):
    """Right-padded batch with pixel values; a batch without images gets a dummy one (mask 0). An example's
    images are (path, (w, h)) views (sft.render) or images already at their size (the engine's trajectories)."""
    views = [v for ex in examples for v in ex["images"]]
    ids = [list(ex["input_ids"]) for ex in examples]
    masks = [list(ex["loss_mask"]) for ex in examples]
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    images = [v if isinstance(v, Image.Image) else load_view(*v) for v in views]
    if not images:  # FSDP: every rank must run the vision tower in every step (docs/spec.md §8)
        images = [Image.new("RGB", (factor, factor))]
        dummy = processor.tokenizer("<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False)["input_ids"]  # 1 token
        ids[0] += dummy
        masks[0] += [0] * len(dummy)
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(ids), width, dtype=torch.long)
    loss_mask = torch.zeros(len(ids), width, dtype=torch.long)
    for b, (x, m) in enumerate(zip(ids, masks)):
        input_ids[b, :len(x)] = torch.tensor(x)
        attn[b, :len(x)] = 1
        loss_mask[b, :len(m)] = torch.tensor(m)
    pixels = processor.image_processor(images=images, return_tensors="pt")
    return {"input_ids": input_ids, "attention_mask": attn, "loss_mask": loss_mask,
            "mm_token_type_ids": (input_ids == image_token_id).long(),
            "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}


def load_view(path, size):
    img = load_image(path)
    return img if img.size == tuple(size) else img.resize(tuple(size), Image.BICUBIC)


def shard(model, world_size):
    """FSDP2 under torchrun: the vision tower, each decoder layer, then the root; one process keeps the plain model."""
    if world_size == 1:
        return model
    from torch.distributed.fsdp import fully_shard
    fully_shard(model.model.visual)  # its own unit: a frozen tower never shares a parameter group with trained weights
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def save_checkpoint(model, processor, optimizer, step, path, world_size, stopped_at=None):
    """HF-format model (full state dict) and the optimizer state, written by rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if is_rank0():
        model.save_pretrained(path, state_dict=model_state)
        processor.save_pretrained(path)
        atomic_write(os.path.join(path, "trainer_state.pt"), lambda f: torch.save(
            {"step": step, "stopped_at": stopped_at, "optimizer": optim_state}, f), mode="wb")
    if world_size > 1:
        dist.barrier()


def load_trainer_state(model, optimizer, path):
    """Restore the optimizer from {path}/trainer_state.pt; returns the state dict (step, stopped_at, ...)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state

# -----------------------------------------------------------------------------
# models

def attn_implementation():
    """flash_attention_2 only when CUDA and the package are both present, else PyTorch sdpa."""
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def check_local_dir(path, what="model"):
    """A checkpoint is a local directory: a missing one is an error naming it (nothing is ever downloaded)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what} {path!r}: no such local checkpoint directory (with a config.json); "
                                "checkpoints load from local paths only, nothing is downloaded")


def model_type(path):
    check_local_dir(path)
    with open(os.path.join(path, "config.json")) as f:
        mt = json.load(f).get("model_type")
    if mt not in ARCHS:
        raise ValueError(f"{path}/config.json: model_type {mt!r} is not one of {', '.join(ARCHS)}")
    return mt


def model_patch_size(path):
    return ARCHS[model_type(path)][2] if os.path.exists(os.path.join(path, "config.json")) else 14


def load_model(path, dtype=torch.float32, device="cpu", attn=None):
    """A real checkpoint (or one we saved) from a local directory, with its real transformers class."""
    model_class = ARCHS[model_type(path)][0]
    model = model_class.from_pretrained(path, dtype=dtype, attn_implementation=attn or attn_implementation())
    return model.to(device)


def tiny_config(arch, tokenizer, n_layer=4, n_embd=128, n_head=4, n_kv_head=2, vision_depth=2,
                vision_hidden=64, vision_heads=2):
    """A from-scratch config of the real class, small enough to train on a laptop CPU."""
    _, config_class, patch = ARCHS[arch]
    head_dim = n_embd // n_head
    half = head_dim // 2  # mrope_section splits the rotary half of head_dim into (t, h, w)
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(vocab_size=len(tokenizer), hidden_size=n_embd, intermediate_size=4 * n_embd,
                num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                max_position_embeddings=4096, bos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                               "mrope_section": mrope},
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    vision = dict(depth=vision_depth, num_heads=vision_heads, patch_size=patch, spatial_merge_size=MERGE,
                  temporal_patch_size=2, out_hidden_size=n_embd)
    if arch == "qwen2_vl":
        vision.update(embed_dim=vision_hidden, hidden_size=n_embd, mlp_ratio=2)
    elif arch == "qwen2_5_vl":
        vision.update(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, window_size=112,
                      fullatt_block_indexes=list(range(vision_depth)))
    else:  # qwen3_vl: deepstack features from the given vision layers feed the first LLM layers
        text.update(head_dim=head_dim)
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      num_position_embeddings=64, deepstack_visual_indexes=[0])
    return config_class(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def build_tiny_model(arch, tokenizer, seed=0, **sizes):
    torch.manual_seed(seed)
    config = tiny_config(arch, tokenizer, **sizes)
    return ARCHS[arch][0](config)


def model_inputs(batch, device):
    """The keys the model's forward takes, moved to the device."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    return {k: batch[k].to(device) for k in keys if k in batch and batch[k] is not None}


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def pick_instruction(instructions, qid):
    """M-BEIR has 4 instructions per dataset/task; the original samples one at random, we pick by qid."""
    options = instructions.get(qid.split(":")[0]) if instructions else None
    return options[int(qid.split(":")[1]) % len(options)] if options else ""


def new_cache(model):
    """An empty KV cache for the model's language part (transformers 5.23: no cache_position argument,
    positions go in as position_ids)."""
    from transformers import DynamicCache
    return DynamicCache(config=model.config.get_text_config())
