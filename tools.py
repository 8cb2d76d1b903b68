"""
The two visual tools the reranker may call, their parser and their observations.

The model writes one call per assistant turn, Qwen/Hermes style (generation stops at </tool_call>):

    <tool_call>
    {"name": "crop_image", "arguments": {"bbox_2d": [x1, y1, x2, y2], "target_image": 3}}
    </tool_call>

Image indices: 0 is the query image, i >= 1 is candidate i of the current window.
- select_images {"target_images": [i, ...]} (1 to 4 distinct indices): those images again, at tool resolution.
- crop_image {"bbox_2d": [x1, y1, x2, y2], "target_image": i} (aliases zoom_in, crop_image_normalized):
  a box whose four numbers are all <= 1 is normalised to [0, 1], otherwise it is in pixels of the original
  image. The box is padded by 10% of the image size on each side, clamped to the image, grown to at least
  28 px a side (around its centre, inside the image) and cut out. Coordinates become ints with Python's
  round() (nearest integer, ties to even: 86.5 -> 86, 55.5 -> 56), applied once, after padding and clamping.
Returned images are resized Qwen-style (common.qwen_resize); the WxH in the text is the returned size.
A malformed call never raises: its observation is INVALID plus a one-line reason, and the rollout goes on.
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
MAX_SELECT = 4      # select_images takes 1 to 4 indices
MIN_CROP_SIDE = 28  # at least one vision token per crop
PAD = 0.1           # crop padding, as a fraction of the image size, on each side

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
    """A short one-line rendering of a model-written value, for error reasons."""
    if isinstance(v, (list, tuple, dict)):
        return "a JSON array" if isinstance(v, (list, tuple)) else "a JSON object"
    s = json.dumps(v) if v is None or isinstance(v, (bool, int, float)) else repr(v)
    return s if len(s) <= 30 else s[:27] + "..."


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
        return None, None, f"unknown tool {_show(name)}, use select_images or crop_image"
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
    if not _is_int(k):
        raise ValueError(f"{what} must be an integer image index, got {_show(k)}")
    if not 0 <= k < len(images):
        raise ValueError(f"{what} {_show(k)} is out of range (0 to {len(images) - 1})")
    if images[k] is None:
        raise ValueError("image 0, the query, has no image" if k == 0 else f"candidate {k} has no image")


def _bbox(bbox):
    """Four finite floats with x2 > x1 and y2 > y1, or ValueError."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ValueError("bbox_2d must be a list of 4 numbers [x1, y1, x2, y2]")
    if not all(_is_number(v) for v in bbox):
        raise ValueError("bbox_2d must hold numbers only")
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox)
    except OverflowError:  # an integer too big for a float
        raise ValueError("bbox_2d numbers must be finite") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError("bbox_2d numbers must be finite")
    if x2 <= x1 or y2 <= y1:
        raise ValueError("bbox_2d is empty, it needs x2 > x1 and y2 > y1")
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


def _grow(lo, hi, size):
    """Widen [lo, hi) to MIN_CROP_SIDE (or the whole side) around its centre, staying inside [0, size]."""
    side = min(MIN_CROP_SIDE, size)
    if hi - lo >= side:
        return lo, hi
    lo = min(max(int(round((lo + hi) / 2 - side / 2)), 0), size - side)
    return lo, lo + side


def crop_box(bbox, width, height):
    """The integer pixel box (left, top, right, bottom) that crop_image cuts from a width x height image."""
    x1, y1, x2, y2 = _bbox(bbox)
    if max(x1, y1, x2, y2) <= 1:  # normalised
        x1, x2, y1, y2 = x1 * width, x2 * width, y1 * height, y2 * height
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise ValueError(f"bbox_2d lies entirely outside the {width}x{height} image")
    left = int(round(max(0.0, x1 - PAD * width)))
    right = int(round(min(float(width), x2 + PAD * width)))
    top = int(round(max(0.0, y1 - PAD * height)))
    bottom = int(round(min(float(height), y2 + PAD * height)))
    left, right = _grow(left, right, width)
    top, bottom = _grow(top, bottom, height)
    return left, top, right, bottom


def crop_image(img, bbox, min_pixels, max_pixels, factor=28):
    """The padded crop of bbox (normalised or pixels), resized Qwen-style."""
    img = to_rgb(img)
    return qwen_resize(img.crop(crop_box(bbox, img.width, img.height)), min_pixels, max_pixels, factor)


def select_images(images, indices, min_pixels, max_pixels, factor=28):
    """images[i] for each index, in order, resized Qwen-style (1 to 4 distinct existing indices)."""
    if not isinstance(indices, (list, tuple)) or not 1 <= len(indices) <= MAX_SELECT:
        raise ValueError(f"target_images must be a list of 1 to {MAX_SELECT} image indices")
    for k in indices:
        _check_index(images, k, "target_images item")
    if len(set(indices)) != len(indices):
        raise ValueError("target_images has duplicate indices")
    return [qwen_resize(to_rgb(images[k]), min_pixels, max_pixels, factor) for k in indices]

# -----------------------------------------------------------------------------
# one model turn -> one observation

def _size(img):
    return f"{img.width}x{img.height}"


def execute_tool_call(text, images, min_pixels, max_pixels, factor=28):
    """Parse the first tool call of a turn and run it on images (0 = query, i = candidate i, None = no image)."""
    name, args, error = parse_tool_call(text)
    if error is None:
        try:
            if name == "select_images":
                out = select_images(images, _arg(args, "target_images"), min_pixels, max_pixels, factor)
                sizes = [_size(im) for im in out]  # one WxH when all agree, else each in order
                shown = sizes[0] if len(set(sizes)) == 1 else ", ".join(sizes)
                obs = (f"Here are the selected images for detailed analysis. "
                       f"(Image Size: {shown}, Numbered 1 to {len(out)}):")
            else:
                k = _arg(args, "target_image")
                bbox = _arg(args, "bbox_2d")
                _check_index(images, k, "target_image")
                out = [crop_image(images[k], bbox, min_pixels, max_pixels, factor)]
                obs = f"Here is the cropped image. (Image Size: {_size(out[0])})"
        except ValueError as e:
            error = str(e)
    if error is not None:
        reason = " ".join(error.split())  # one line, whatever went in
        return ToolResult(False, name, args, reason, [{"type": "text", "text": f"{INVALID} {reason}"}], [])
    content = [{"type": "text", "text": obs}] + [{"type": "image"} for _ in out]
    return ToolResult(True, name, args, None, content, out)
