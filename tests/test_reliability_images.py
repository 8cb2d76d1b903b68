"""Bad image files (truncated, corrupt, a huge header) are errors naming the file, caught before training
by sft.load_records, and a placeholder in the viewer."""

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import common
import sft
import viewer


def write_truncated_png(path):
    """A real PNG of noise (so it does not compress to nothing), cut in half as an interrupted copy would."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def write_png_header(path, width, height):
    """A valid PNG whose header claims width x height (a decompression-bomb shape) with no pixel data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_truncated_png_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "cut.png"
    write_truncated_png(path)
    with pytest.raises(OSError, match=f"{path}: .*truncated"):
        common.load_image(str(path))
    with pytest.raises(OSError, match=str(path)):
        common.check_image(str(path))


def test_too_large_image_is_an_error_naming_file_and_size(tmp_path):
    bomb, big = tmp_path / "bomb.png", tmp_path / "big.png"
    write_png_header(bomb, 20000, 20000)  # past PIL's own guard: it refuses before we see the size
    write_png_header(big, 10000, 10000)   # under PIL's guard, over ours
    for fn in (common.load_image, common.check_image):
        with pytest.raises(OSError, match=f"{bomb}: .*400000000 pixels.*MAX_IMAGE_PIXELS"):
            fn(str(bomb))
        with pytest.raises(OSError, match=f"{big}: 10000x10000 image is larger than common.MAX_IMAGE_PIXELS"):
            fn(str(big))


def test_the_largest_m_beir_size_loads(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("L", (6400, 4800), 128).save(path)  # one flat channel: quick to write and to decode
    common.check_image(str(path))
    assert common.load_image(str(path)).size == (6400, 4800)


def test_sft_load_records_opens_every_image_first(tmp_path):
    good, cut = tmp_path / "good.png", tmp_path / "cut.png"
    Image.new("RGB", (28, 28), (10, 200, 10)).save(good)
    write_truncated_png(cut)
    data = tmp_path / "data.jsonl"
    turns = [{"from": "human", "value": "<image><image>which?"}, {"from": "gpt", "value": "<answer>[1]</answer>"}]
    data.write_text(json.dumps({"conversations": turns, "images": ["good.png", "good.png"]}) + "\n"
                    + json.dumps({"conversations": turns, "images": ["good.png", "cut.png"]}) + "\n")
    with pytest.raises(OSError, match=r"data.jsonl: record 1: .*cut.png"):
        sft.load_records(str(data), str(tmp_path))


def test_viewer_shows_a_placeholder_for_an_unreadable_image(tmp_path):
    cut, bomb, good = tmp_path / "cut.png", tmp_path / "bomb.png", tmp_path / "good.png"
    write_truncated_png(cut)
    write_png_header(bomb, 20000, 20000)
    Image.new("RGB", (28, 28)).save(good)
    cache = {}
    for path in (cut, bomb):
        assert f"unreadable image: {path}" in viewer.image_html(str(path), 96, cache)
    assert "missing image:" in viewer.image_html(str(tmp_path / "gone.png"), 96, cache)
    assert 'class="im ' in viewer.image_html(str(good), 96, cache)
