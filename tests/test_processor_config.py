"""The processor reads a checkpoint's own preprocessor config, and the checkpoints we save declare the family's
stock processor so stock loaders read them (docs/spec.md §8, §11)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import common

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def image(seed=0, size=(84, 56)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def pixels(image_processor, imgs):
    out = image_processor(images=imgs, return_tensors="pt")
    return out["pixel_values"].numpy(), out["image_grid_thw"].tolist()


def test_toy_processor_pixels_are_unchanged(toy_data):
    # the toy's tokenizer directory has no preprocessor config: the processor is built as before this change,
    # the stock image processor with its CLIP mean/std (the reference below is how common.py built it at HEAD)
    path = os.path.join(toy_data, "tokenizer")
    assert not {"preprocessor_config.json", "processor_config.json"} & set(os.listdir(path))
    ours = common.load_processor(path, 784, 12544).image_processor
    ref = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, min_pixels=784, max_pixels=12544)
    assert list(ours.image_mean) == list(ref.image_mean) == CLIP_MEAN and list(ours.image_std) == CLIP_STD
    imgs = [image(0), image(1, (112, 112)), image(2, (30, 200))]
    (a, ga), (b, gb) = pixels(ours, imgs), pixels(ref, imgs)
    assert ga == gb and np.array_equal(a, b)


def test_saved_checkpoint_declares_the_stock_classes_and_round_trips(tmp_path, tokenizer):
    processor = common.make_processor(tokenizer, 14, 784, 3136)
    processor.save_pretrained(tmp_path)
    nested = json.loads((tmp_path / "processor_config.json").read_text())
    flat = json.loads((tmp_path / "preprocessor_config.json").read_text())
    tok = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert nested["processor_class"] == flat["processor_class"] == tok["processor_class"] == "Qwen2_5_VLProcessor"
    for cfg in (nested["image_processor"], flat):
        assert cfg["image_processor_type"] == "Qwen2VLImageProcessor"
        assert (cfg["patch_size"], cfg["merge_size"], cfg["temporal_patch_size"]) == (14, 2, 2)
        assert cfg["image_mean"] == CLIP_MEAN and cfg["image_std"] == CLIP_STD
        assert cfg["size"] == {"shortest_edge": 784, "longest_edge": 3136}
    assert (flat["min_pixels"], flat["max_pixels"]) == (784, 3136)  # the keys transformers 4.x reads
    loaded = common.load_processor(str(tmp_path), 784, 3136)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    texts = [p.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) for p in (processor, loaded)]
    b1, b2 = (p(text=[t], images=[image()], return_tensors="pt") for p, t in zip((processor, loaded), texts))
    assert texts[0] == texts[1] and b1["input_ids"].tolist() == b2["input_ids"].tolist()
    assert np.array_equal(b1["pixel_values"].numpy(), b2["pixel_values"].numpy())
    wider = common.load_processor(str(tmp_path), 784, 12544)  # the arguments set the pixel limits
    assert dict(wider.image_processor.size) == {"shortest_edge": 784, "longest_edge": 12544}


def write_qwen3_like(path, tokenizer):
    """A directory as a Qwen3-VL checkpoint ships it: patch 16, mean/std 0.5, flat preprocessor_config.json."""
    tokenizer.save_pretrained(path)
    common.build_tiny_model("qwen3_vl", tokenizer).config.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
        "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "size": {"longest_edge": 16777216, "shortest_edge": 65536}}))


def test_reads_the_checkpoints_own_mean_std_and_patch(tmp_path, tokenizer):
    write_qwen3_like(tmp_path, tokenizer)
    ip = common.load_processor(str(tmp_path), 1024, 4096).image_processor
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (16, 2, 2)
    assert dict(ip.size) == {"shortest_edge": 1024, "longest_edge": 4096}  # ours, not the file's
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    values, grid = pixels(ip, [white])
    assert grid == [[1, 4, 4]] and np.allclose(values, 1.0)  # (1 - 0.5) / 0.5, by hand; CLIP would give ~1.9-2.1
    black = pixels(ip, [Image.new("RGB", (64, 64))])[0]
    assert np.allclose(black, -1.0)
    resaved = tmp_path / "resaved"
    common.load_processor(str(tmp_path), 1024, 4096).save_pretrained(resaved)
    flat = json.loads((resaved / "preprocessor_config.json").read_text())
    assert flat["processor_class"] == "Qwen3VLProcessor" and flat["image_mean"] == [0.5, 0.5, 0.5]
    assert flat["patch_size"] == 16


STOCK_LOAD = r"""
import json, sys
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
from transformers.models.auto.processing_auto import processor_class_from_name
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
path = sys.argv[1]
assert not any("nanoretrver" in m or m in ("common", "task", "tools") for m in sys.modules)
out = {"config": type(AutoConfig.from_pretrained(path)).__name__,
       "tokenizer": type(AutoTokenizer.from_pretrained(path)).__name__,
       "auto_image_processor": type(AutoImageProcessor.from_pretrained(path)).__name__,
       "model": type(AutoModelForImageTextToText.from_pretrained(path)).__name__}
ip = Qwen2VLImageProcessorPil.from_pretrained(path + "/preprocessor_config.json")  # the flat file alone
out["flat"] = [list(ip.image_mean), ip.patch_size, ip.size["longest_edge"]]
declared = json.load(open(path + "/processor_config.json"))["processor_class"]
out["processor_class"] = processor_class_from_name(declared).__name__
try:  # the stock processor needs torchvision for its video half (docs/spec.md §11): absent here
    from transformers import AutoProcessor
    out["auto_processor"] = type(AutoProcessor.from_pretrained(path)).__name__
except ImportError as e:
    out["auto_processor"] = "needs torchvision" if "orchvision" in str(e) else repr(e)
print(json.dumps(out))
"""


def test_stock_transformers_loads_what_we_save(tmp_path, tokenizer):
    model = common.build_tiny_model("qwen2_5_vl", tokenizer)
    model.save_pretrained(tmp_path)
    common.make_processor(tokenizer, 14, 784, 12544, arch="qwen2_5_vl").save_pretrained(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", STOCK_LOAD, str(tmp_path)], capture_output=True, text=True,
                         cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["config"] == "Qwen2_5_VLConfig" and out["tokenizer"] == "Qwen2Tokenizer"
    assert out["model"] == "Qwen2_5_VLForConditionalGeneration"
    assert out["auto_image_processor"].startswith("Qwen2VLImageProcessor")
    assert out["flat"] == [CLIP_MEAN, 14, 12544]
    assert out["processor_class"] == "Qwen2_5_VLProcessor"
    assert out["auto_processor"] in ("Qwen2_5_VLProcessor", "needs torchvision")


@pytest.mark.parametrize("arch, declared", [("qwen2_vl", "Qwen2VLProcessor"), ("qwen2_5_vl", "Qwen2_5_VLProcessor"),
                                            ("qwen3_vl", "Qwen3VLProcessor")])
def test_each_family_declares_its_processor(tmp_path, tokenizer, arch, declared):
    common.make_processor(tokenizer, common.ARCHS[arch][2], 784, 3136, arch=arch).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == declared
    by_patch = {14: "Qwen2_5_VLProcessor", 16: "Qwen3VLProcessor"}  # without arch: the family guessed by patch size
    assert common.make_processor(tokenizer, common.ARCHS[arch][2]).stock_class == by_patch[common.ARCHS[arch][2]]
