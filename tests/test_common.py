import os

import numpy as np
import pytest
import torch
from PIL import Image

import common


def image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("arch", list(common.ARCHS))
def test_tiny_model_of_each_backbone_runs_with_images(arch, tokenizer):
    patch = common.ARCHS[arch][2]
    factor = patch * common.MERGE
    processor = common.make_processor(tokenizer, patch, factor * factor, 16 * factor * factor)
    model = common.build_tiny_model(arch, tokenizer, seed=0).eval()
    assert isinstance(model, common.ARCHS[arch][0])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a red circle"},
                                         {"type": "image"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    imgs = [common.qwen_resize(image(100, 60), factor * factor, 16 * factor * factor, factor),
            common.qwen_resize(image(30, 30, 1), factor * factor, 16 * factor * factor, factor)]
    batch = processor(text=[text], images=imgs, return_tensors="pt")
    assert batch["mm_token_type_ids"].sum() == (batch["input_ids"] == model.config.image_token_id).sum()
    with torch.no_grad():
        logits = model(**common.model_inputs(batch, "cpu")).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    # the images matter: another image changes the logits after it
    batch2 = processor(text=[text], images=[imgs[0], imgs[0].resize(imgs[1].size)], return_tensors="pt")
    with torch.no_grad():
        logits2 = model(**common.model_inputs(batch2, "cpu")).logits
    assert not torch.allclose(logits[0, -1], logits2[0, -1])


@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize("size", [(28, 28), (112, 112), (100, 60), (500, 20), (3, 3)])
def test_image_token_count_matches_grid(tokenizer, patch, size):
    factor = patch * 2
    min_px, max_px = factor * factor, 64 * factor * factor
    processor = common.make_processor(tokenizer, patch, min_px, max_px)
    img = common.qwen_resize(image(*size), min_px, max_px, factor)
    assert img.width % factor == 0 and img.height % factor == 0 and min_px <= img.width * img.height <= max_px
    batch = processor(text=["x<|vision_start|><|image_pad|><|vision_end|>y"], images=[img], return_tensors="pt")
    t, gh, gw = batch["image_grid_thw"][0].tolist()
    assert (t, gh * patch, gw * patch) == (1, img.height, img.width)  # the processor kept our size
    n_tokens = (batch["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum().item()
    assert n_tokens == gh * gw // 4 == img.width * img.height // (factor * factor)


def test_smart_size_rules():
    assert common.smart_size(112, 112, 28, 784, 784) == (28, 28)
    assert common.smart_size(56, 56, 28, 4 * 784, 10 ** 6) == (56, 56)
    assert common.smart_size(39, 39, 28, 4 * 784, 10 ** 6) == (56, 56)  # below min area: scaled up
    h, w = common.smart_size(1000, 2000, 28, 784, 100 * 784)
    assert h * w <= 100 * 784 and abs(w / h - 2) < 0.3


def test_processor_round_trip(tmp_path, tokenizer):
    processor = common.make_processor(tokenizer, 14, 784, 4 * 784)
    processor.save_pretrained(tmp_path)
    loaded = common.load_processor(str(tmp_path), 784, 4 * 784)
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": [{"type": "image"},
                                                                             {"type": "text", "text": "hi"}]}]
    t1 = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    t2 = loaded.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert t1 == t2 == ("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
                        "<|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")
    img = image(56, 56)
    b1, b2 = processor(text=[t1], images=[img], return_tensors="pt"), loaded(text=[t2], images=[img], return_tensors="pt")
    for k in ("input_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids"):
        assert torch.equal(b1[k], b2[k])
    ids = b1["input_ids"][0].tolist()
    assert tokenizer.decode(ids).replace("<|image_pad|>" * 4, "<|image_pad|>") == t1


def test_saved_tiny_model_reloads_with_identical_logits(tmp_path, tokenizer):
    model = common.build_tiny_model("qwen2_5_vl", tokenizer, seed=1).eval()
    model.save_pretrained(tmp_path)
    reloaded = common.load_model(str(tmp_path)).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert common.attn_implementation() == "sdpa"  # no CUDA here


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"qid": "1:0"}\n\n{"qid": \n')
    with pytest.raises(ValueError, match=r"q.jsonl:3: not valid JSON"):
        common.read_jsonl(str(path))
    path.write_text('{"qid": "1:0"}\n{"x": 1}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: record is missing qid"):
        common.read_jsonl(str(path), required=("qid",))
    path.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match=r"q.jsonl:1: expected a JSON object"):
        common.read_jsonl(str(path))


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "out.jsonl")
    common.write_jsonl(path, [{"a": 1}])

    def broken(f):
        f.write("partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        common.atomic_write(path, broken)
    assert common.read_jsonl(path) == [{"a": 1}]
    assert os.listdir(tmp_path) == ["out.jsonl"]  # no temp file left behind


def test_resumable_read_drops_a_torn_last_line(tmp_path):
    path = str(tmp_path / "r.jsonl")
    common.append_jsonl(path, [{"qid": "a"}, {"qid": "b"}])
    with open(path, "a") as f:
        f.write('{"qid": "c", "ca')  # the run was killed mid-line
    records, done = common.read_jsonl_resumable(path, "qid")
    assert done == {"a", "b"} and len(records) == 2
    common.append_jsonl(path, [{"qid": "c"}])
    assert [r["qid"] for r in common.read_jsonl(path)] == ["a", "b", "c"]


def test_missing_images_are_reported_with_record_ids(tmp_path):
    image(28, 28).save(tmp_path / "ok.png")
    records = [{"did": "1:0", "img_path": "ok.png"}, {"did": "1:1", "img_path": "gone.png"}, {"did": "1:2", "img_path": None}]
    with pytest.raises(FileNotFoundError, match=r"1 missing image.*1:1 -> gone.png"):
        common.check_images(records, "img_path", "did", str(tmp_path))
    common.check_images(records[:1], "img_path", "did", str(tmp_path))


def test_rgba_is_flattened_onto_white(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "a.png")
    assert common.load_image(str(tmp_path / "a.png")).getpixel((0, 0)) == (255, 255, 255)


def test_pick_instruction_is_deterministic():
    instructions = {"1": ["a", "b", "c", "d"]}
    assert [common.pick_instruction(instructions, f"1:{i}") for i in range(5)] == ["a", "b", "c", "d", "a"]
    assert common.pick_instruction(instructions, "2:0") == "" and common.pick_instruction({}, "1:0") == ""
