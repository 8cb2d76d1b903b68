"""
Can a toy checkpoint see? Greedy descriptions of held-out TEST pool images in the three warm-up views
(cold_start.py's warm-up prompts), scored against the images' attributes.

    python data/toy/perception.py --policy=out/toy/base/model

prompt view (28x28): colour, background and corner must all be named; full view (112x112): colour,
background and the tag's texture; crop (the tag's 56x56 quadrant): the texture.
"""

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data", "toy"))
import common  # noqa: E402
import prepare  # noqa: E402
from engine import Engine  # noqa: E402
import tools  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
data_root = "data/toy"
pool_file = "cand_pool/test/mbeir_toyt2i_task0_test_cand_pool.jsonl"  # held-out images
policy = "out/toy/base/model"
n_images = 96              # images per view
seed = 1337
# -----------------------------------------------------------------------------

QUESTIONS = {"prompt": "Describe the image.", "full": "Describe the image and its tag.", "crop": "Describe the tag."}


def correct(view, text, a):
    """Does a description name what this view must show? (cold_start.py's answers, matched by words)"""
    texture = f"{prepare.TAG_WORDS[a['mark']]} tag" in text
    coarse = f"{a['colour']} on {a['background']}, {a['corner']}" in text
    return coarse if view == "prompt" else coarse and texture if view == "full" else texture


def view_of(img, view, a):
    if view == "prompt":
        return common.qwen_resize(img, 784, 784)
    return tools.crop_image(img, prepare.CROP_BOXES[a["corner"]], 3136, 12544) if view == "crop" else img


def main():
    pool = common.read_jsonl(common.resolve_path(pool_file, data_root))
    picked = np.random.default_rng(seed).choice(len(pool), min(n_images, len(pool)), replace=False)
    model = common.load_model(policy).eval()
    engine = Engine(model, common.load_processor(policy, 784, 12544), use_tools=False)
    scores = {}
    for view, question in QUESTIONS.items():
        prompts, attrs = [], []
        for i in picked:
            a = pool[i]["attributes"]
            img = view_of(common.load_image(common.resolve_path(pool[i]["img_path"], data_root)), view, a)
            prompts.append({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                            "prompt_images": [img], "tool_images": [None]})
            attrs.append(a)
        texts = [t["final_text"] for t in engine.generate(prompts, max_new_tokens=40)]
        scores[view] = float(np.mean([correct(view, t, a) for t, a in zip(texts, attrs)]))
        print(f"{view:6s} {scores[view]:.3f}  e.g. {texts[0]!r}")
    return scores


if __name__ == "__main__":
    configure(globals())
    main()
