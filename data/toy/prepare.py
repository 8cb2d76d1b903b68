"""
The embedded toy benchmark: a small synthetic fine-grained retrieval benchmark in M-BEIR format,
generated deterministically from a seed in seconds, plus a byte-level BPE tokenizer trained on its text.

    python data/toy/prepare.py                      # writes data/toy/{query,cand_pool,qrels,images,tokenizer}
    python data/toy/prepare.py --seed=7 --n_test=50

Every image is 112x112: a big disc in one of 6 colours on a noisy background in one of 4 dark colours
and a small tag near one of the 4 corners: a light disc carrying a dark 8x8 texture, one of 4 (horizontal, vertical
or diagonal 1 px stripes, or checks; equal ink). A family is (colour, background, corner); its 4 members differ only
in the tag's texture: the deciding detail.

Resolutions, and why:
- prompt view 28x28 (max_pixels 784 = one LLM token per image): colour, background and the corner where the
  light tag sits are visible, but the 4x antialiased downscale averages 1 px stripes into the same grey
  dot. Stage-0 retrieval and the reranking prompt see candidates at this resolution. An MLP probe
  trained on the exact prompt-view pixels of the tag's corner reads the texture at about chance (25%;
  tests/test_toy_data.py): the tag's random (even) position and the disc's offset hide the rest.
- tool view: crop_image on the named corner, e.g. bbox [0, 0, 0.4, 0.4] for top-left, pads by 10% of
  the image and returns exactly the 56x56 quadrant at native scale (4 tokens); select_images returns
  the whole 112x112 image (16 tokens). The tag lies inside one 14 px patch of both views (moved by 0-6
  px, in even steps, within it) with its stripes anchored to the pixel grid, so a fixed linear filter of
  the patch reads it: a small vision encoder learns it fast (docs/spec.md §9). Random stripe phases made
  it unreadable by a linear filter, and a from-scratch tower did not learn it in minutes (measured).

Two tasks, each with its own M-BEIR local pool (same images, different dataset ids):
- dataset 1 "toyt2i", task 0 (text -> image): "a red circle with a small plus in its top-left corner".
- dataset 2 "toycir", task 7 (image + text -> image): a reference image from the pool (as in CIRR)
  and "like this one, but blue, with a checkered tag in the corner"; the target keeps the reference's
  corner and its unchanged attribute, changes the colour or the background, and has the named texture.
Train and test have separate pools rendered from different random draws, so no test image is seen in
training; queries are sampled independently per split.
"""

import json
import os
import random
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import task  # noqa: E402
import tools  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = "data/toy"   # where the benchmark is written
seed = 1337            # everything below is a deterministic function of this seed
n_train = 1536         # training queries per task
n_test = 100           # test queries per task
vocab_size = 1024      # BPE vocabulary (before special tokens)
# -----------------------------------------------------------------------------

IMAGE_SIZE = 112
# coarse attributes are strong colours, which a from-scratch encoder learns in minutes at 28x28; shapes
# and faint tints at that size took it far longer (docs/spec.md §9: perception is a tiny model's bottleneck)
BACKGROUNDS = {"navy": (30, 40, 95), "forest": (30, 85, 45), "maroon": (95, 30, 45), "slate": (75, 75, 85)}
COLOURS = {"red": (215, 45, 45), "green": (45, 160, 70), "blue": (50, 90, 215),
           "yellow": (225, 195, 40), "purple": (145, 65, 185), "orange": (235, 130, 30)}
CORNERS = ["top-left", "top-right", "bottom-left", "bottom-right"]
# 8x8 tag textures of 1 px stripes, each half inked: equal ink, and their differences lie at the
# finest frequency, which the 4x antialiased downscale to the prompt view removes
MARKS = ["hstripes", "vstripes", "checks", "diagonal"]
MARK_NAMES = {"hstripes": "a horizontally striped tag", "vstripes": "a vertically striped tag",
              "checks": "a checkered tag", "diagonal": "a diagonally striped tag"}
TAG_WORDS = {"hstripes": "horizontal", "vstripes": "vertical", "checks": "checkered", "diagonal": "diagonal"}  # the teacher's names
CROP_BOXES = {"top-left": [0.0, 0.0, 0.4, 0.4], "top-right": [0.6, 0.0, 1.0, 0.4],
              "bottom-left": [0.0, 0.6, 0.4, 1.0], "bottom-right": [0.6, 0.6, 1.0, 1.0]}
DATASETS = [(1, "toyt2i", 0), (2, "toycir", 7)]  # (dataset id, name, M-BEIR task id)
INSTRUCTIONS = {
    0: ["Retrieve the image that matches the description.",
        "Find the picture described by this text.",
        "Which image fits the following description?",
        "Identify the image this sentence describes."],
    7: ["Retrieve the image that looks like the given image but with the described change.",
        "Find the picture that matches this image after the requested modification.",
        "Modify the reference image as described and retrieve the result.",
        "Which image is the given one, changed as the text says?"],
}
T2I_TEMPLATES = [
    "a {colour} disc on a {background} background with {mark} in the {corner} corner",
    "A {colour} disc on {background}; the small tag in its {corner} corner is {mark}.",
    "Find the {colour} disc over a {background} background that has {mark} near the {corner} corner.",
    "{colour} disc, {background} background, {corner} corner marked with {mark}",
    "Show me a disc in {colour} on {background} with {mark} drawn at the {corner}.",
    "I want the {colour} disc on the {background} background whose {corner} tag is {mark}.",
]
CIR_TEMPLATES = {
    "colour": ["Make the disc {colour} and give it {mark} in the corner.",
               "Like this one, but {colour}, with {mark} in the corner.",
               "The same background with a {colour} disc; the tag should be {mark}.",
               "Change the colour to {colour} and the tag to {mark}."],
    "background": ["Put it on a {background} background and give it {mark} in the corner.",
                   "Like this one, but on {background}, with {mark} in the corner.",
                   "The same disc on a {background} background; the tag should be {mark}.",
                   "Change the background to {background} and the tag to {mark}."],
}


def mark_pattern(mark, x0, y0):
    """The 8x8 tag texture at (x0, y0): 1 px stripes or checks anchored to the image's pixel grid, so the
    tag's position never changes the texture's phase (a fixed filter reads it); exactly 32 pixels inked."""
    yy, xx = np.mgrid[y0:y0 + 8, x0:x0 + 8]
    if mark == "hstripes":
        return yy % 2 == 0
    if mark == "vstripes":
        return xx % 2 == 0
    if mark == "checks":
        return (xx + yy) % 2 == 0
    return (xx + yy) % 4 < 2  # diagonal


def render(colour, background, corner, mark, rng):
    """One 112x112 image; rng jitters the tints, disc size/position and the tag position/ink."""
    S = IMAGE_SIZE
    tint = np.array(BACKGROUNDS[background]) + rng.integers(-6, 7)
    pixels = np.clip(tint + rng.integers(-6, 7, size=(S, S, 1)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    cx, cy = 56 + rng.integers(-3, 4), 56 + rng.integers(-3, 4)
    r = int(rng.integers(24, 31))
    fill = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLOURS[colour])
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    # the tag: an 8x8 texture inside the 14 px patch [14, 28) from its corner (mirrored for right and
    # bottom), on a light disc that makes the corner visible at the prompt view; the disc's own random
    # offset keeps it from telling where the texture's stripes lie
    jx, jy = 2 * int(rng.integers(0, 4)), 2 * int(rng.integers(0, 4))  # even shifts keep the grid phase
    x0 = 14 + jx if "left" in corner else S - 22 - jx
    y0 = 14 + jy if "top" in corner else S - 22 - jy
    dx, dy = x0 + 4 + rng.uniform(-2, 2), y0 + 4 + rng.uniform(-2, 2)
    light = int(rng.integers(220, 250))
    draw.ellipse([dx - 11, dy - 11, dx + 11, dy + 11], fill=(light, light, light))
    pixels = np.asarray(img).copy()
    texture = pixels[y0:y0 + 8, x0:x0 + 8]
    texture[mark_pattern(mark, x0, y0)] = int(rng.integers(0, 30))
    return Image.fromarray(pixels)


def families():
    return [(c, b, k) for c in COLOURS for b in BACKGROUNDS for k in CORNERS]


def make_split(split, n_queries, rng, root):
    """Render this split's pool and reference images and write its queries, pools and qrels."""
    pool = [(c, b, k, m) for (c, b, k) in families() for m in MARKS]  # 384 images
    os.makedirs(os.path.join(root, "images", split, "pool"), exist_ok=True)
    img_paths = []
    for i, attrs in enumerate(pool):
        path = f"images/{split}/pool/{i}.png"
        render(*attrs, rng).save(os.path.join(root, path))
        img_paths.append(path)
    texts = []
    for dataset_id, name, task_id in DATASETS:
        tag = f"mbeir_{name}_task{task_id}_{split}"
        cands = [{"did": f"{dataset_id}:{i}", "txt": "", "img_path": p, "modality": "image",
                  "attributes": dict(zip(["colour", "background", "corner", "mark"], pool[i]))}
                 for i, p in enumerate(img_paths)]
        queries, qrels = [], []
        for n in range(n_queries):
            target = int(rng.integers(len(pool)))
            colour, background, corner, mark = pool[target]
            q = {"qid": f"{dataset_id}:{n}", "query_txt": "", "query_img_path": None, "query_modality": "text",
                 "pos_cand_list": [f"{dataset_id}:{target}"], "neg_cand_list": [], "task_id": task_id}
            if task_id == 0:
                tpl = T2I_TEMPLATES[int(rng.integers(len(T2I_TEMPLATES)))]
                q["query_txt"] = tpl.format(colour=colour, background=background, corner=corner, mark=MARK_NAMES[mark])
            else:
                # the reference (a pool image) differs from the target in one coarse attribute and any texture
                changed = ["colour", "background"][int(rng.integers(2))]
                ref_colour, ref_background = colour, background
                if changed == "colour":
                    ref_colour = str(rng.choice([c for c in COLOURS if c != colour]))
                else:
                    ref_background = str(rng.choice([b for b in BACKGROUNDS if b != background]))
                ref_path = img_paths[pool.index((ref_colour, ref_background, corner, str(rng.choice(MARKS))))]
                tpls = CIR_TEMPLATES[changed]
                tpl = tpls[int(rng.integers(len(tpls)))]
                q.update(query_txt=tpl.format(colour=colour, background=background, mark=MARK_NAMES[mark]),
                         query_img_path=ref_path, query_modality="image,text")
            queries.append(q)
            qrels.append(f"{q['qid']} 0 {q['pos_cand_list'][0]} 1 {task_id}")
            texts.append(q["query_txt"])
        write_jsonl(os.path.join(root, "query", split, f"{tag}.jsonl"), queries)
        write_jsonl(os.path.join(root, "cand_pool", split, f"{tag}_cand_pool.jsonl"), cands)
        write_text(os.path.join(root, "qrels", split, f"{tag}_qrels.txt"), "\n".join(qrels) + "\n")
    return texts


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def write_text(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# Qwen's special tokens (<|...|>) plus the tags our prompts use, each a single token.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
TAG_TOKENS = ["<tool_call>", "</tool_call>", "<tools>", "</tools>", "<think>", "</think>",
              "<answer>", "</answer>", "<emb>"]


def prompt_corpus():
    """Text the later stages put around queries (prompts, tool calls, observations, answers), so the
    tokenizer encodes it compactly. Any text still encodes: the BPE falls back to bytes."""
    lines = [f"({i}) " for i in range(1, 51)] + [f"[{', '.join(map(str, range(1, k + 1)))}]" for k in range(1, 21)]
    for corner, box in CROP_BOXES.items():
        for i in range(0, 21):
            lines.append(json.dumps({"name": "crop_image", "arguments": {"bbox_2d": box, "target_image": i}}))
    for i in range(0, 21):
        lines.append(json.dumps({"name": "select_images", "arguments": {"target_images": [i, i + 1]}}))
    lines += ["user", "assistant", "system"] * 20
    lines += [task.SYSTEM_PROMPT, tools.tools_prompt(), task.GUIDELINES + task.TOOL_GUIDELINE] * 50  # in every reranking example
    lines += ["Here is the cropped image. (Image Size: 56x56)",
              "Here are the selected images for detailed analysis. (Image Size: 112x112, Numbered 1 to 2):",
              "Your action is not valid, please check the format and try again.",
              "You are a retrieval assistant. Rank the candidates from most to least relevant to the query.",
              "Query: Candidates: Guidelines: rank all candidates, answer as",
              "Summarize above image in one word: Summarize above sentence in one word:",
              "The mark is too small to see here, so I zoom into the corner. Candidate matches the query."]
    lines += [f"{c} disc {b} background {k} tag {MARK_NAMES[m]} corner" for b in BACKGROUNDS for c in COLOURS
              for k in CORNERS for m in MARKS]
    # the toy teacher's words (data/toy/cold_start.py), so its trajectories are short in tokens too
    lines += [f"Wanted: {c} on {b}, {k}, {TAG_WORDS[m]} tag. (1) {c} on {b}, {k}: match. (2) {c} on {b}, {k}: no."
              for b in BACKGROUNDS for c in COLOURS for k in CORNERS for m in MARKS]
    lines += [f"(1) candidate 2: {TAG_WORDS[m]}, wanted {TAG_WORDS[n]}: yes, best 2. (2) candidate 3: {TAG_WORDS[n]}, "
              f"wanted {TAG_WORDS[m]}: no, best none. So candidate 2 is the match." for m in MARKS for n in MARKS] * 10
    lines += ["Wanted: the reference made red, so red on navy. Wanted: the reference put on navy, so red on navy.",
              "The tags of 1, 2, 3 and 4 are too small here: look closer for a diagonal tag.",
              "Only candidate 1 matches. Candidates 1, 2, 3 and 4 match; their tags are too small to tell apart here.",
              "Describe the image. Describe the image and its tag. Describe the tag. Restate the query.",
              "Describe each candidate and say whether it matches.",
              "Wanted: vertical tag. Read: (1) checkered. (2) vertical. Compare each tag with the wanted one."] * 20
    for tpls in INSTRUCTIONS.values():
        lines += tpls
    return lines


def fixed_prompt_text():
    """Prompt text that is the same in every reranking example: the system prompt (with and without the
    tool specs) and the guidelines that end the user turn. The toy tokenizer holds each as one token: a
    from-scratch toy cannot read it anyway, and as BPE text the tool system prompt alone is ~360 tokens,
    half of every reranking sequence, which the training and generation stages paid for on every row."""
    return [task.SYSTEM_PROMPT + "\n\n" + tools.tools_prompt(), task.SYSTEM_PROMPT,
            "\n\n" + task.GUIDELINES + task.TOOL_GUIDELINE, "\n\n" + task.GUIDELINES]


def train_tokenizer(texts, root):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", errors="replace")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})  # endoftext is the pad token
    tok.add_tokens(TAG_TOKENS)  # like Qwen's <tool_call>: single tokens that decoding keeps
    tok.add_tokens([AddedToken(text, normalized=False) for text in fixed_prompt_text()])
    tok.save_pretrained(os.path.join(root, "tokenizer"))
    return tok


def main():
    rng = np.random.default_rng(seed)
    random.seed(seed)
    texts = []
    for split, n in [("train", n_train), ("test", n_test)]:
        texts += make_split(split, n, rng, out_dir)
    meta = {"seed": seed, "image_size": IMAGE_SIZE, "colours": list(COLOURS), "backgrounds": list(BACKGROUNDS), "corners": CORNERS,
            "marks": MARKS, "mark_names": MARK_NAMES, "crop_boxes": CROP_BOXES,
            "prompt_max_pixels": 28 * 28, "tool_max_pixels": IMAGE_SIZE * IMAGE_SIZE}
    write_text(os.path.join(out_dir, "meta.json"), json.dumps(meta, indent=2))
    instructions = {str(d): INSTRUCTIONS[t] for d, _, t in DATASETS}  # dataset id -> 4 task instructions
    write_text(os.path.join(out_dir, "instructions.json"), json.dumps(instructions, indent=2))
    tok = train_tokenizer(texts + prompt_corpus(), out_dir)
    print(f"toy benchmark in {out_dir}: {len(families()) * len(MARKS)} pool images per split, "
          f"{n_train}/{n_test} train/test queries per task, tokenizer of {len(tok)} tokens")


if __name__ == "__main__":
    configure(globals())
    main()
