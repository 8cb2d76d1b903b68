import json
import random

import numpy as np
import pytest
from PIL import Image

import tools
from common import qwen_resize
from tools import INVALID, TOOL_SPECS, crop_box, parse_tool_call

MIN, MAX = 4 * 28 * 28, 112 * 112  # the toy's tool view (config/toy.py): 4 to 16 tokens


# the tools take the view's pixel limits from their caller; these tests mostly use the toy's
def crop_image(img, bbox, min_pixels=MIN, max_pixels=MAX, factor=28):
    return tools.crop_image(img, bbox, min_pixels, max_pixels, factor)


def select_images(images, indices, min_pixels=MIN, max_pixels=MAX, factor=28):
    return tools.select_images(images, indices, min_pixels, max_pixels, factor)


def execute_tool_call(text, images, min_pixels=MIN, max_pixels=MAX, factor=28, style="release"):
    return tools.execute_tool_call(text, images, min_pixels, max_pixels, factor, style)


RAW = dict(min_pixels=1, max_pixels=10 ** 9, factor=1)  # smart_size leaves any size alone: the raw crop


def coord_image(w, h):
    """Pixel (x, y) is (x, y, 0), so a crop tells exactly which region it came from."""
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8))


def region(img):
    """(left, top, right, bottom) of the coord_image region that img is, checking it is one exact block."""
    a = np.asarray(img).astype(int)
    left, top, w, h = a[0, 0, 0], a[0, 0, 1], a.shape[1], a.shape[0]
    assert (a[..., 0] == left + np.arange(w)[None, :]).all() and (a[..., 1] == top + np.arange(h)[:, None]).all()
    return left, top, left + w, top + h


def rgba_image():
    """112x112: left half fully transparent red, right half opaque blue."""
    a = np.zeros((112, 112, 4), np.uint8)
    a[:, :56] = (255, 0, 0, 0)
    a[:, 56:] = (0, 0, 255, 255)
    return Image.fromarray(a, "RGBA")


QUERY, CAND1, CAND3 = coord_image(112, 112), coord_image(60, 90), rgba_image()
WINDOW = [QUERY, CAND1, None, CAND3]  # query, 3 candidates, candidate 2 text-only


def call(name, **arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def crop_call(bbox, k):
    return call("crop_image", bbox_2d=bbox, target_image=k)

# -----------------------------------------------------------------------------
# crop geometry


@pytest.mark.parametrize("bbox, box", [([0, 0, 0.4, 0.4], (0, 0, 56, 56)), ([0.6, 0.6, 1, 1], (56, 56, 112, 112)),
                                       ([0.6, 0, 1, 0.4], (56, 0, 112, 56)), ([0, 0.6, 0.4, 1], (0, 56, 56, 112))])
def test_canonical_quadrants_of_112(bbox, box):
    assert crop_box(bbox, 112, 112) == box
    assert region(crop_image(QUERY, bbox, **RAW)) == box
    r = execute_tool_call(crop_call(bbox, 0), WINDOW)  # 56x56 is already Qwen-sized: read back untouched
    assert r.valid and r.content == [{"type": "text", "text": "Here is the cropped image. (Image Size: 56x56)\n"},
                                     {"type": "image"}]
    assert region(r.images[0]) == box
    compact = tools.execute_tool_call(crop_call(bbox, 0), WINDOW, MIN, MAX, style="compact")  # the toy's bytes
    assert compact.content[0] == {"type": "text", "text": "Here is the cropped image. (Image Size: 56x56)"}
    assert compact.images[0].tobytes() == r.images[0].tobytes()


def release_box(bbox, w, h):
    """docs/spec.md §2's four steps written out once more, the reference crop_box must match box for box:
    (1) padding min(0.1, 600/side); (2) all four <= 1: normalised, else divided by W and H; (3) padded and
    clamped to [0, 1]; (4) cut at int(x * W), int(y * H). None where no pixel is left (the release crashes)."""
    pad_x, pad_y = min(0.1, 600 / w), min(0.1, 600 / h)
    x1, y1, x2, y2 = bbox if all(v <= 1 for v in bbox) else (bbox[0] / w, bbox[1] / h, bbox[2] / w, bbox[3] / h)
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in (x1 - pad_x, y1 - pad_y, x2 + pad_x, y2 + pad_y))
    box = int(x1 * w), int(y1 * h), int(x2 * w), int(y2 * h)
    return box if box[2] > box[0] and box[3] > box[1] else None


@pytest.mark.parametrize("w, h, bbox, box", [
    (112, 112, [20, 30, 60, 80], (8, 18, 71, 91)),        # pixels, padded by 11.2 each side, truncated
    (60, 90, [0.5, 0.5, 1, 1], (24, 36, 60, 90)),         # non-square: pad 6 horizontally, 9 vertically
    (60, 90, [10, 20, 40, 50], (3, 10, 46, 59)),          # 10/60 - 0.1 is 0.0666..65 in floats: 3.99.. -> 3
    (60, 90, [0, 0, 1, 1], (0, 0, 60, 90)),               # all <= 1: normalised, the whole image
    (60, 90, [0, 0, 1, 2], (0, 0, 7, 11)),                # 2 > 1: pixels, a tiny box (not grown)
    (50, 50, [0.25, 0.25, 0.75, 0.75], (7, 7, 42, 42)),   # 7.5 -> 7 and 42.5 -> 42: truncation, not rounding
    (100, 100, [0.5, 0.5, 0.5, 0.5], (40, 40, 60, 60)),   # a point: the padding alone
    (112, 112, [0.6, 0, 0.5, 1], (56, 0, 67, 112)),       # inverted by less than the padding: still a crop
    (112, 112, [-50, -50, 30, 30], (0, 0, 41, 41)),       # clamped at the top-left
    (112, 112, [100, 10, 500, 50], (88, 0, 112, 61)),     # clamped right and top
    (112, 112, [100, 100, 112, 112], (88, 88, 112, 112)),
    (6400, 6400, [1000, 1000, 2000, 2000], (400, 400, 2600, 2600)),  # padding capped at 600 px
])
def test_crop_box_by_hand(w, h, bbox, box):
    assert crop_box(bbox, w, h) == box == release_box(bbox, w, h)
    if w * h <= 256 * 256:
        assert region(crop_image(coord_image(w, h), bbox, **RAW)) == box


SIZES = [(90, 60), (60, 90), (112, 112), (1, 1), (2, 3), (7, 1000), (1000, 7), (640, 480), (1024, 1024),
         (3000, 2000), (5999, 6001), (6400, 4800)]


def grid_boxes(rng, w, h):
    """Normalised, pixel, degenerate, inverted, outside and huge boxes, ints and floats."""
    n = lambda: rng.choice([0, 1, 0.5, 0.1, 0.9, rng.random(), round(rng.random(), 2)])  # noqa: E731
    p = lambda side: rng.choice([rng.randrange(-side, 2 * side + 2), rng.uniform(-side, 2 * side), side])  # noqa: E731
    boxes = [[n(), n(), n(), n()] for _ in range(40)]                       # normalised (any order)
    boxes += [[p(w), p(h), p(w), p(h)] for _ in range(40)]                  # pixels (any order, outside too)
    boxes += [[min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])] for b in boxes]  # in order
    boxes += [[x, y, x, y] for x, y in [(0, 0), (1, 1), (0.5, 0.5), (w, h), (w // 2, h // 3)]]  # degenerate
    boxes += [[-2, -2, -1, -1], [-0.5, -0.5, -0.1, -0.1], [2 * w, 2 * h, 3 * w, 3 * h], [1.5, 0, 2, 1],
              [0, 0, 10 ** 9, 10 ** 9], [-1e9, -1e9, 1e9, 1e9], [0.99, 0.99, 1, 1], [1, 1, 1, 1]]  # outside, huge
    return boxes


def test_crop_box_matches_the_release_geometry_on_a_grid():
    rng = random.Random(7)
    n_crops = n_empty = 0
    for w, h in SIZES:
        for bbox in grid_boxes(rng, w, h):
            ref = release_box(bbox, w, h)
            if ref is None:  # the release crashes: we answer with an error, naming the size, never the box
                with pytest.raises(ValueError, match=f"no pixels of the {w}x{h} image"):
                    crop_box(bbox, w, h)
                n_empty += 1
            else:
                assert crop_box(bbox, w, h) == ref, (w, h, bbox)
                n_crops += 1
    assert n_crops > 1000 and n_empty > 300, (n_crops, n_empty)


def test_crop_pixels_are_the_box():
    rng = random.Random(8)
    for w, h in [(90, 60), (60, 90), (112, 112), (2, 3), (255, 7)]:
        img = coord_image(w, h)
        for bbox in grid_boxes(rng, w, h):
            ref = release_box(bbox, w, h)
            if ref is not None:
                assert region(crop_image(img, bbox, **RAW)) == ref


def test_toy_quadrants_are_pixel_identical_to_the_old_geometry():
    # the toy's canonical crops (data/toy/prepare.py CROP_BOXES, 112x112) under the old rule (10% padding,
    # round(), grown to 28) were the native quadrants; the release's geometry gives the same pixels
    boxes = {"top-left": [0.0, 0.0, 0.4, 0.4], "top-right": [0.6, 0.0, 1.0, 0.4],
             "bottom-left": [0.0, 0.6, 0.4, 1.0], "bottom-right": [0.6, 0.6, 1.0, 1.0]}
    old = {"top-left": (0, 0, 56, 56), "top-right": (56, 0, 112, 56), "bottom-left": (0, 56, 56, 112),
           "bottom-right": (56, 56, 112, 112)}
    import prepare
    assert prepare.CROP_BOXES == boxes and prepare.IMAGE_SIZE == 112
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8))
    for corner, bbox in boxes.items():
        assert crop_box(bbox, 112, 112) == old[corner]
        new = crop_image(img, bbox, MIN, MAX)  # the toy's tool view
        assert new.size == (56, 56) and new.tobytes() == img.crop(old[corner]).tobytes()


@pytest.mark.parametrize("k", [2, "2", 2.0, 2.7, " 2 "])
def test_target_image_goes_through_int(k):
    images = [QUERY, CAND1, CAND3]
    r = execute_tool_call(crop_call([0, 0, 0.5, 0.5], k), images)
    ref = execute_tool_call(crop_call([0, 0, 0.5, 0.5], 2), images)
    assert r.valid and r.content == ref.content and r.images[0].tobytes() == ref.images[0].tobytes()


@pytest.mark.parametrize("factor", [28, 32])
def test_returned_images_are_qwen_sized(factor):
    lo, hi = 4 * factor * factor, 128 * 128
    for bbox, k in [([0, 0, 0.4, 0.4], 0), ([0.1, 0.2, 0.9, 0.3], 0), ([5, 5, 55, 85], 1), ([0.5, 0.5, 0.51, 0.9], 1),
                    ([0, 0, 1, 1], 3)]:
        r = execute_tool_call(crop_call(bbox, k), WINDOW, lo, hi, factor)
        assert r.valid, r.error
        (img,) = r.images
        assert img.width % factor == 0 and img.height % factor == 0 and lo <= img.width * img.height <= hi
        assert r.content[0]["text"] == f"Here is the cropped image. (Image Size: {img.width}x{img.height})\n"
        src = tools.to_rgb(WINDOW[k])
        assert img.tobytes() == qwen_resize(src.crop(crop_box(bbox, src.width, src.height)), lo, hi, factor).tobytes()
    assert execute_tool_call(crop_call([0, 0, 0.4, 0.4], 0), WINDOW, factor=32).images[0].size == (64, 64)
    assert execute_tool_call(call("select_images", target_images=[0]), WINDOW, factor=32).images[0].size == (96, 96)


def test_aliases_give_the_same_crop():
    ref = execute_tool_call(crop_call([0.1, 0.1, 0.5, 0.6], 1), WINDOW)
    for alias in ("zoom_in", "crop_image_normalized"):
        r = execute_tool_call(call(alias, bbox_2d=[0.1, 0.1, 0.5, 0.6], target_image=1), WINDOW)
        assert r.valid and r.name == "crop_image" and r.content == ref.content
        assert r.images[0].tobytes() == ref.images[0].tobytes()

# -----------------------------------------------------------------------------
# select_images, RGBA


def test_select_images_text_order_and_sizes():
    r = execute_tool_call(call("select_images", target_images=[1]), WINDOW)
    assert r.valid and r.name == "select_images" and r.arguments == {"target_images": [1]}
    assert r.content == [{"type": "text", "text": "Here are the selected images for detailed analysis. "
                          "(Image Size: 56x84, Numbered 1 to 1):"}, {"type": "image"}]
    r = execute_tool_call(call("select_images", target_images=[3, 0]), WINDOW)
    assert r.content[0]["text"] == ("Here are the selected images for detailed analysis. "
                                    "(Image Size: 112x112, Numbered 1 to 2):")
    assert [p["type"] for p in r.content] == ["text", "image", "image"]
    assert r.images[0].tobytes() == tools.to_rgb(CAND3).tobytes() and r.images[1].tobytes() == QUERY.tobytes()
    r = execute_tool_call(call("select_images", target_images=[3, 1]), WINDOW)
    assert r.content[0]["text"] == ("Here are the selected images for detailed analysis. "
                                    "(Image Size: 112x112, Numbered 1 to 2):")  # the first one's, as the release
    four = [QUERY, CAND1, coord_image(30, 30), CAND3]
    r = execute_tool_call(call("select_images", target_images=[2, 0, 3, 1]), four)
    assert r.valid and len(r.images) == 4
    assert r.content[0]["text"] == ("Here are the selected images for detailed analysis. "
                                    "(Image Size: 56x56, Numbered 1 to 4):")
    assert [im.size for im in r.images] == [(56, 56), (112, 112), (112, 112), (56, 84)]
    assert [im.size for im in select_images(four, [1, 2])] == [(56, 84), (56, 56)]
    for style in tools.STYLES:  # no style changes the select text
        assert execute_tool_call(call("select_images", target_images=[1]), WINDOW, style=style).content[0]["text"] == (
            "Here are the selected images for detailed analysis. (Image Size: 56x84, Numbered 1 to 1):")


def test_select_images_takes_repeats_up_to_the_window():
    r = execute_tool_call(call("select_images", target_images=[1, 1, 0, 3]), WINDOW)  # as many as WINDOW's 4 slots
    assert r.valid and [im.size for im in r.images] == [(56, 84), (56, 84), (112, 112), (112, 112)]
    r = execute_tool_call(call("select_images", target_images=[1] * 5), WINDOW)
    assert not r.valid and "more than 4 indices" in r.error


def test_rgba_is_flattened_onto_white(tmp_path):
    (img,) = execute_tool_call(call("select_images", target_images=[3]), WINDOW).images
    a = np.asarray(img)
    assert img.mode == "RGB" and (a[:, :50] == 255).all() and (a[:, 62:] == (0, 0, 255)).all()
    crop = np.asarray(crop_image(CAND3, [0, 0, 0.3, 1], **RAW))
    assert (crop == 255).all()
    path = tmp_path / "rgba.png"
    CAND3.save(path)
    assert np.asarray(crop_image(str(path), [0, 0, 0.3, 1], **RAW)).min() == 255  # paths go through load_image

# -----------------------------------------------------------------------------
# errors and parsing

ERRORS = [
    ("I think candidate 2 is best.", WINDOW, "no <tool_call> block"),
    ('<tool_call>\n{"name": "select_images", "arguments": {"target_images": [1]}}', WINDOW, "not closed"),
    ("<tool_call>{name: select_images}</tool_call>", WINDOW, "not valid JSON"),
    ("<tool_call>" + "[" * 100000 + "</tool_call>", WINDOW, "not valid JSON"),
    ("<tool_call>[1, 2]</tool_call>", WINDOW, "JSON object"),
    ('<tool_call>{"arguments": {}}</tool_call>', WINDOW, "string name"),
    ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', WINDOW, "string name"),
    (call("rotate_image", angle=90), WINDOW, "unknown tool name, use select_images or crop_image"),
    (call("<|image_pad|>"), WINDOW, "unknown tool name, use"),
    ('<tool_call>{"name": "crop_image"}</tool_call>', WINDOW, "arguments object"),
    ('<tool_call>{"name": "crop_image", "arguments": "[0,0,1,1]"}</tool_call>', WINDOW, "arguments object"),
    (call("select_images"), WINDOW, "missing argument target_images"),
    (call("crop_image", target_image=1), WINDOW, "missing argument bbox_2d"),
    (call("crop_image", bbox_2d=[0, 0, 1, 1]), WINDOW, "missing argument target_image"),
    (crop_call([0, 0, 1, 1], True), WINDOW, "integer image index, got true"),
    (crop_call([0, 0, 1, 1], "1.0"), WINDOW, "integer image index, got a string"),
    (crop_call([0, 0, 1, 1], "<|image_pad|>"), WINDOW, "integer image index, got a string"),
    (crop_call([0, 0, 1, 1], None), WINDOW, "integer image index, got null"),
    (crop_call([0, 0, 1, 1], [1]), WINDOW, "integer image index, got a JSON array"),
    (crop_call([0, 0, 1, 1], float("nan")), WINDOW, "integer image index, got nan"),
    (crop_call([0, 0, 1, 1], 1e300), WINDOW, "target_image 100000000000000005250476025... is out of range"),
    (crop_call([0, 0, 1, 1], -1), WINDOW, "out of range (0 to 3)"),
    (crop_call([0, 0, 1, 1], 4), WINDOW, "out of range (0 to 3)"),
    (crop_call([0, 0, 1, 1], 2), WINDOW, "candidate 2 has no image"),
    (crop_call([0, 0, 1, 1], 0), [None, CAND1], "the query, has no image"),
    (crop_call([0, 0, 1], 1), WINDOW, "4 numbers"),
    (crop_call({"x1": 0}, 1), WINDOW, "4 numbers"),
    (crop_call(["0", "0", "1", "1"], 1), WINDOW, "numbers only"),
    (crop_call([0, 0, "<|image_pad|>", 1], 1), WINDOW, "numbers only"),
    (crop_call([0, 0, None, 1], 1), WINDOW, "numbers only"),
    (crop_call([0, 0, True, 1], 1), WINDOW, "numbers only"),
    (crop_call([0, 0, float("nan"), 1], 1), WINDOW, "finite"),
    (crop_call([0, 0, float("inf"), 1], 1), WINDOW, "finite"),
    ('<tool_call>{"name": "crop_image", "arguments": {"bbox_2d": [0, 0, 1e400, 5], "target_image": 1}}</tool_call>',
     WINDOW, "finite"),
    (crop_call([0, 0, 10 ** 400, 5], 1), WINDOW, "finite"),
    (crop_call([0.9, 0, 0.1, 1], 1), WINDOW, "no pixels of the 60x90 image"),     # inverted past the padding
    (crop_call([0, 0.9, 1, 0.1], 1), WINDOW, "no pixels of the 60x90 image"),
    (crop_call([200, 200, 300, 300], 0), WINDOW, "no pixels of the 112x112 image"),  # outside: clamped to an edge
    (crop_call([-0.5, -0.5, -0.1, -0.1], 1), WINDOW, "no pixels of the 60x90 image"),
    (crop_call([-100, 10, -80, 20], 1), WINDOW, "no pixels"),
    (call("select_images", target_images=[]), WINDOW, "non-empty list"),
    (call("select_images", target_images=[0, 1, 3, 0, 1]), WINDOW, "more than 4 indices"),
    (call("select_images", target_images=3), WINDOW, "non-empty list"),
    (call("select_images", target_images="1"), WINDOW, "non-empty list"),
    (call("select_images", target_images=[True]), WINDOW, "integer image index, got true"),
    (call("select_images", target_images=["<|image_pad|>"]), WINDOW, "integer image index, got a string"),
    (call("select_images", target_images=[1, 2]), WINDOW, "candidate 2 has no image"),
    (call("select_images", target_images=[1.0]), WINDOW, "integer image index"),
    (call("select_images", target_images=[7]), WINDOW, "out of range"),
    (crop_call([0, 0, 1, 1], 10 ** 4000), WINDOW, "target_image 100000000000000000000000000... is out of range"),
]


@pytest.mark.parametrize("text, images, reason", ERRORS, ids=[e[2][:30] for e in ERRORS])
def test_invalid_calls_give_the_fixed_observation(text, images, reason):
    r = execute_tool_call(text, images)
    assert not r.valid and r.images == [] and reason in r.error
    assert r.content == [{"type": "text", "text": f"{INVALID} {r.error}"}]
    assert r.content[0]["text"].startswith("Your action is not valid, please check the format and try again. ")
    assert "\n" not in r.content[0]["text"] and "<|" not in r.content[0]["text"] and "'" not in r.error


def test_parser_takes_the_first_block():
    text = ("Let me look closer.</tool_call>\n<tool_call>  \n\n" + json.dumps(
        {"name": "zoom_in", "arguments": {"bbox_2d": [0, 0, 1, 1], "target_image": 1}}) + "\n \n</tool_call>"
        + call("select_images", target_images=[1]) + "<tool_call>{garbage")
    assert parse_tool_call(text) == ("crop_image", {"bbox_2d": [0, 0, 1, 1], "target_image": 1}, None)
    assert execute_tool_call(text, WINDOW).valid
    bad_first = "<tool_call>oops</tool_call>" + call("select_images", target_images=[1])
    assert not execute_tool_call(bad_first, WINDOW).valid
    assert parse_tool_call(None)[2] == "the turn is not text"


def test_tools_prompt():
    p = tools.tools_prompt()
    inner = p.split("<tools>\n")[1].split("\n</tools>")[0].split("\n")
    assert [json.loads(line) for line in inner] == TOOL_SPECS
    assert [s["function"]["name"] for s in TOOL_SPECS] == ["select_images", "crop_image"]
    assert "<tool_call>" in p and "At most two tool calls in total, one per turn." in p
    assert len(p) < 1500

# -----------------------------------------------------------------------------
# fuzz: whatever the model writes, nothing raises and every result is well formed

NAMES = ["select_images", "crop_image", "zoom_in", "crop_image_normalized"]
BAD_NAMES = ["Crop_Image", "", "select", "crop_image ", "\u4e2d"]
KEYS = ["bbox_2d", "target_image", "target_images", "name", "arguments", "x"]


def random_json(rng, depth=0):
    r = rng.random()
    if r < 0.15 and depth < 4:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(6))]
    if r < 0.25 and depth < 4:
        return {rng.choice(KEYS): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}
    return rng.choice([0, 1, 2, 3, -1, 10 ** 30, -(10 ** 30), 10 ** 400, 0.5, -0.5, 1e308, -1e308, float("nan"),
                       float("inf"), -float("inf"), True, False, None, "1", "0.5", "", "NaN", "\n</tool_call>",
                       rng.uniform(-2, 2), rng.uniform(-200, 300), rng.randrange(-5, 200)])


def random_box(rng):
    r = rng.random()
    if r < 0.4:  # normalised, usually sane
        x1, x2, y1, y2 = sorted(rng.random() for _ in range(2)) + sorted(rng.random() for _ in range(2))
        return [round(v, rng.randrange(1, 4)) for v in (x1, y1, x2, y2)]
    if r < 0.7:  # pixels, usually sane, sometimes outside the image
        x1, x2, y1, y2 = sorted(rng.randrange(-40, 160) for _ in range(2)) + sorted(
            rng.randrange(-40, 160) for _ in range(2))
        return [x1, y1, x2, y2]
    if r < 0.85:
        return [rng.uniform(-1, 2) for _ in range(rng.randrange(7))]
    return random_json(rng)


def random_index(rng):
    if rng.random() < 0.7:
        return rng.choice([0, 1, 3])
    return rng.choice([2, -1, 4, 7, 1.0, True, "1", None, 10 ** 20, [1]])


def random_args(rng):
    """A random mix of the argument keys with values of any type."""
    args = {}
    if rng.random() < 0.9:
        args["bbox_2d"] = random_box(rng)
    if rng.random() < 0.9:
        args["target_image"] = random_index(rng)
    if rng.random() < 0.6:
        args["target_images"] = [random_index(rng) for _ in range(rng.choice([1, 1, 2, 3, 4, 0, 5, 6]))]
    for _ in range(rng.randrange(2)):
        args[rng.choice(KEYS)] = random_json(rng)
    return args


def random_call_text(rng):
    name = rng.choice(NAMES) if rng.random() < 0.85 else rng.choice(BAD_NAMES + [random_json(rng)])
    if rng.random() < 0.4:  # arguments of the right shape for the tool
        if name == "select_images":
            args = {"target_images": rng.sample([0, 1, 3], rng.randint(1, 3))}
        else:
            args = {"bbox_2d": random_box(rng), "target_image": rng.choice([0, 1, 3])}
    else:
        args = random_args(rng)
    call_ = {"name": name, "arguments": args if rng.random() < 0.95 else random_json(rng)}
    body = json.dumps(call_ if rng.random() < 0.95 else random_json(rng))
    text = rng.choice(["", "I will zoom in.\n", "<think>hm</think>\n"]) + f"<tool_call>\n{body}\n</tool_call>"
    r = rng.random()
    if r < 0.1:
        text = text[:rng.randrange(len(text) + 1)]  # truncated anywhere, tags included
    elif r < 0.15:
        i = rng.randrange(len(text) + 1)
        text = text[:i] + rng.choice("{}[]\",:<>/\n") + text[i:]
    elif r < 0.2:
        text += text  # two blocks
    return text


def random_garbage(rng):
    alphabet = list('<>{}[]":,0123456789.-eE /\n\tabcxyz\u00e9\u4e2d\x00') + ["<tool_call>", "</tool_call>", "null",
                                                                                "NaN", '"name"', '"arguments"']
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))


def test_fuzz_never_raises_and_results_are_well_formed():
    rng = random.Random(1234)
    windows = [WINDOW, WINDOW, [None, CAND1, None, CAND3], [QUERY]]
    settings = [(28, 4 * 28 * 28, 112 * 112), (32, 4 * 32 * 32, 128 * 128)]
    n_valid = n_invalid = 0
    for i in range(2500):
        text = random_garbage(rng) if rng.random() < 0.2 else random_call_text(rng)
        factor, lo, hi = settings[i % 2]
        r = execute_tool_call(text, rng.choice(windows), lo, hi, factor)
        assert isinstance(r, tools.ToolResult)
        if r.valid:
            n_valid += 1
            assert r.error is None and len(r.images) >= 1
            assert [p["type"] for p in r.content] == ["text"] + ["image"] * len(r.images)
            assert r.content[0]["text"].startswith("Here ")
            for img in r.images:
                assert img.mode == "RGB" and img.width % factor == 0 and img.height % factor == 0
                # a crop at an edge can be 1 px thin, as in the release; Qwen's resize then keeps the short side at
                # one factor and the area can pass max_pixels (the release's resize does the same)
                assert lo <= img.width * img.height and (img.width * img.height <= hi or min(img.size) == factor)
        else:
            n_invalid += 1
            assert r.images == [] and len(r.content) == 1 and "\n" not in r.error
            assert r.content[0]["text"] == f"{INVALID} {r.error}"
    assert n_valid > 250 and n_invalid > 250, (n_valid, n_invalid)
