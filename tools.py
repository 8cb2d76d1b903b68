"""
The two visual tools the reranker may call, their parser and their observations.

The model writes one call per assistant turn, Qwen/Hermes style (generation stops at </tool_call>):

    <tool_call>
    {"name": "crop_image", "arguments": {"bbox_2d": [x1, y1, x2, y2], "target_image": 3}}
    </tool_call>

Image indices: 0 is the query image, i >= 1 is candidate i of the current window.
- select_images {"target_images": [i, ...]}: those images again, at tool resolution (as many as the window has
  images; repeats allowed, as in the release).
- crop_image {"bbox_2d": [x1, y1, x2, y2], "target_image": i} (aliases zoom_in, crop_image_normalized), the
  release's geometry box for box (docs/spec.md §2): padding per axis min(0.1, 600 px / side) in normalised units;
  a box whose four numbers are all <= 1 is normalised, otherwise it is in pixels and divided by the width and
  height; padded, clamped to [0, 1], and cut at int(x * W), int(y * H) (truncation). target_image goes through
  int() first, as in the release ("2" and 2.0 mean 2).
Returned images are resized Qwen-style (common.qwen_resize); the WxH in the text is the (first) returned size.
A malformed call never raises: its observation is INVALID plus a one-line reason made of our own words and
numbers only (a model can spell <|image_pad|>: its text is never echoed), and the rollout goes on.
"""

import json
import math
import os
from dataclasses import dataclass, field

from PIL import Image

from common import load_image, qwen_resize

INVALID = "Your action is not valid, please check the format and try again."
ALIASES = {"select_images": "select_images", "crop_image": "crop_image",
           "zoom_in": "crop_image", "crop_image_normalized": "crop_image"}
PAD, PAD_PX = 0.1, 600.0  # crop padding on each side: 10% of the side, at most 600 px (docs/spec.md §2)
# the prompt styles (docs/spec.md §3, §10); the observations differ only in "compact" (the toy's), which keeps
# the crop text without the release's newline before the image, the bytes the toy was trained on
STYLES = ("release", "release_500", "compact")

# the compact style's tool specs (tools_prompt); their text is frozen: the toy tokenizer holds the whole compact
# system prompt as one token (data/toy/prepare.py), so "up to 4" stays although the tool takes more now
TOOL_SPECS = [
    {"type": "function", "function": {
        "name": "select_images",
        "description": "Look again at up to 4 images at higher resolution.",
        "parameters": {"type": "object", "properties": {
            "target_images": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4,
                              "description": "Image indices: 0 is the query, i is candidate i."}},
            "required": ["target_images"]}}},
    {"type": "function", "function": {
        "name": "crop_image",
        "description": "Zoom into a region of one image.",
        "parameters": {"type": "object", "properties": {
            "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                        "description": "[x1, y1, x2, y2] in pixels, or normalised to [0, 1]."},
            "target_image": {"type": "integer", "description": "Image index: 0 is the query, i is candidate i."}},
            "required": ["bbox_2d", "target_image"]}}},
]


NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def tools_prompt(max_calls=2):
    """The tools block of the system prompt: specs between <tools> tags, the call format, the budget."""
    specs = "\n".join(json.dumps(s) for s in TOOL_SPECS)
    budget = f"At most {NUMBER_WORDS.get(max_calls, max_calls)} tool call{'s' * (max_calls != 1)} in total, one per turn."
    return ("# Tools\n\nYou may call these functions to inspect images (0 is the query image, i is candidate i):\n"
            f"<tools>\n{specs}\n</tools>\n\n"
            "To call one, write a JSON object with its name and arguments inside <tool_call></tool_call> tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n'
            + budget)


@dataclass
class ToolResult:
    valid: bool                 # the call parsed and ran
    name: str | None            # canonical tool name (aliases mapped to crop_image), None if unparsed
    arguments: dict | None      # the model's arguments, None if unparsed
    error: str | None           # one-line reason when invalid
    content: list = field(default_factory=list)  # chat parts for the user turn: text, then {"type": "image"}s
    images: list = field(default_factory=list)   # the returned PIL images, one per image part

# -----------------------------------------------------------------------------
# parsing and argument checks (model-written values are untrusted: check types before touching them)

def _show(v):
    """A model-written value for an error reason: a number or JSON constant we parsed, else only its type.
    Never the model's own characters: it can spell a control token such as <|image_pad|> (docs/spec.md §2)."""
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    if isinstance(v, (int, float)):
        s = repr(v)
        return s if len(s) <= 30 else s[:27] + "..."
    return {str: "a string", list: "a JSON array", dict: "a JSON object"}.get(type(v), "a value of another type")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_tool_call(text):
    """(canonical name, arguments, None) from the FIRST <tool_call> block of a turn, or (.., .., reason)."""
    if not isinstance(text, str):
        return None, None, "the turn is not text"
    start = text.find("<tool_call>")
    if start < 0:
        return None, None, "no <tool_call> block found"
    end = text.find("</tool_call>", start)
    if end < 0:
        return None, None, "the <tool_call> block is not closed with </tool_call>"
    try:
        call = json.loads(text[start + len("<tool_call>"):end].strip())
    except (ValueError, RecursionError):
        return None, None, "the tool call is not valid JSON"
    if not isinstance(call, dict):
        return None, None, "the tool call must be a JSON object with name and arguments"
    name = call.get("name")
    if not isinstance(name, str):
        return None, None, "the tool call needs a string name"
    if name not in ALIASES:
        return None, None, "unknown tool name, use select_images or crop_image"
    args = call.get("arguments")
    if not isinstance(args, dict):
        return None, None, "the tool call needs an arguments object"
    return ALIASES[name], args, None


def _arg(args, key):
    if key not in args:
        raise ValueError(f"missing argument {key}")
    return args[key]


def _check_index(images, k, what):
    """Raise ValueError unless k indexes an image that exists (0 = query, i = candidate i)."""
    if not _is_int(k):  # deviation: the release's isinstance(True, int) takes true as image 1
        raise ValueError(f"{what} must be an integer image index, got {_show(k)}")
    if not 0 <= k < len(images):
        raise ValueError(f"{what} {_show(k)} is out of range (0 to {len(images) - 1})")
    if images[k] is None:
        raise ValueError("image 0, the query, has no image" if k == 0 else f"candidate {k} has no image")


def _target_index(k):
    """target_image through int(), as the release does (docs/spec.md §2): 2, 2.0, "2" (and 2.7) mean 2."""
    if isinstance(k, bool):  # deviation: the release's int(True) is 1, but true is no image index
        raise ValueError(f"target_image must be an integer image index, got {_show(k)}")
    if isinstance(k, (int, float, str)):
        try:
            return int(k)
        except (ValueError, OverflowError):  # "2.0", "x", nan, inf: the release rejects them too
            pass
    raise ValueError(f"target_image must be an integer image index, got {_show(k)}")


def _bbox(bbox):
    """Four finite floats, or ValueError. Order is not checked: the release pads and clamps any box."""
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise ValueError("bbox_2d must be a list of 4 numbers [x1, y1, x2, y2]")
    # deviation: the release takes true/false as 1/0 (Python compares them as numbers); a box of booleans is
    # a malformed call, so it is told so
    if not all(_is_number(v) for v in bbox):
        raise ValueError("bbox_2d must hold numbers only")
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox)
    except OverflowError:  # an integer too big for a float: the release's float() raises too
        raise ValueError("bbox_2d numbers must be finite") from None
    # deviation: the release crops NaN and infinite coordinates somehow (a NaN's result even depends on the
    # argument order of max()); no such box means a region, so it is an error
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError("bbox_2d numbers must be finite")
    return x1, y1, x2, y2

# -----------------------------------------------------------------------------
# the tools themselves (pure: images in, images out; a bad argument is a ValueError)

def to_rgb(img):
    """RGB PIL image from a PIL image or a path; transparency is flattened onto white."""
    if isinstance(img, (str, os.PathLike)):
        return load_image(img)
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


def _clamp01(v):
    return min(max(0.0, v), 1.0)


def crop_box(bbox, width, height):
    """The integer pixel box (left, top, right, bottom) that crop_image cuts from a width x height image:
    the release's geometry, step for step (docs/spec.md §2). Degenerate, inverted and outside boxes become
    crops at the edge as in the release; one left with no pixels is an error (where the release crashes)."""
    x1, y1, x2, y2 = _bbox(bbox)
    pad_x, pad_y = min(PAD, PAD_PX / width), min(PAD, PAD_PX / height)  # normalised units
    if not (x1 <= 1 and y1 <= 1 and x2 <= 1 and y2 <= 1):  # pixels (the same float steps as the release)
        x1, y1, x2, y2 = x1 / width, y1 / height, x2 / width, y2 / height
    x1, y1 = _clamp01(x1 - pad_x), _clamp01(y1 - pad_y)
    x2, y2 = _clamp01(x2 + pad_x), _clamp01(y2 + pad_y)
    left, top, right, bottom = int(x1 * width), int(y1 * height), int(x2 * width), int(y2 * height)
    if right <= left or bottom <= top:  # the release's resize of an empty crop fails (PIL refuses right < left)
        raise ValueError(f"bbox_2d selects no pixels of the {width}x{height} image after padding and clamping")
    return left, top, right, bottom


def crop_image(img, bbox, min_pixels, max_pixels, factor=28):
    """The padded crop of bbox (normalised or pixels), resized Qwen-style. Unlike the old rule, a tiny crop is
    not grown: qwen_resize brings it to at least factor x factor, as the release's resize does."""
    img = to_rgb(img)
    return qwen_resize(img.crop(crop_box(bbox, img.width, img.height)), min_pixels, max_pixels, factor)


def select_images(images, indices, min_pixels, max_pixels, factor=28):
    """images[i] for each index, in order, resized Qwen-style (repeats allowed, as in the release)."""
    if not isinstance(indices, list) or not indices:  # the release fails on an empty list too
        raise ValueError("target_images must be a non-empty list of image indices")
    # The release sets no cap (its response budget bounds the tokens), but every image is resized before the
    # engine can check that budget, so [1, 1, 1, ...] x 10^5 would cost minutes and gigabytes first. At most
    # as many indices as the window has images (query + candidates): every selection of distinct images fits.
    if len(indices) > len(images):
        raise ValueError(f"target_images has more than {len(images)} indices, the number of images here")
    for k in indices:  # the release takes ints as they are here, no int() (but see _check_index on booleans)
        _check_index(images, k, "target_images item")
    return [qwen_resize(to_rgb(images[k]), min_pixels, max_pixels, factor) for k in indices]

# -----------------------------------------------------------------------------
# one model turn -> one observation

def _size(img):
    return f"{img.width}x{img.height}"


def execute_tool_call(text, images, min_pixels, max_pixels, factor=28, style="release"):
    """Parse the first tool call of a turn and run it on images (0 = query, i = candidate i, None = no image).
    style is the prompt style (STYLES): "compact" writes the crop text without the release's newline."""
    if style not in STYLES:
        raise ValueError(f"style={style!r}: expected one of {', '.join(STYLES)}")
    name, args, error = parse_tool_call(text)
    if error is None:
        try:
            if name == "select_images":
                out = select_images(images, _arg(args, "target_images"), min_pixels, max_pixels, factor)
                # the release names the first image's size only, whatever the others' (docs/spec.md §2)
                obs = (f"Here are the selected images for detailed analysis. "
                       f"(Image Size: {_size(out[0])}, Numbered 1 to {len(out)}):")
            else:
                k = _target_index(_arg(args, "target_image"))
                bbox = _arg(args, "bbox_2d")
                _check_index(images, k, "target_image")
                out = [crop_image(images[k], bbox, min_pixels, max_pixels, factor)]
                obs = f"Here is the cropped image. (Image Size: {_size(out[0])})" + ("" if style == "compact" else "\n")
        except ValueError as e:
            error = str(e)
    if error is not None:
        reason = " ".join(error.split())  # one line, whatever went in
        return ToolResult(False, name, args, reason, [{"type": "text", "text": f"{INVALID} {reason}"}], [])
    content = [{"type": "text", "text": obs}] + [{"type": "image"} for _ in out]
    return ToolResult(True, name, args, None, content, out)
