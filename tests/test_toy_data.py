import hashlib
import os

import numpy as np
import pytest
import torch

import common
import prepare
import tools
import task
from conftest import run_stage


def tree_digest(root):
    digest = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return digest


def test_prepare_is_deterministic(tmp_path, toy_data):
    run_stage("prepare", [f"--out_dir={tmp_path}", "--n_train=64", "--n_test=12"])
    assert tree_digest(tmp_path) == tree_digest(toy_data)
    run_stage("prepare", [f"--out_dir={tmp_path / 'other'}", "--n_train=64", "--n_test=12", "--seed=1"])
    assert tree_digest(tmp_path / "other") != tree_digest(toy_data)


def test_files_follow_mbeir_format(toy_data):
    for split, n in [("train", 64), ("test", 12)]:
        for dataset_id, name, task_id in prepare.DATASETS:
            tag = f"mbeir_{name}_task{task_id}_{split}"
            queries = common.read_jsonl(f"{toy_data}/query/{split}/{tag}.jsonl",
                                        required=("qid", "query_txt", "query_img_path", "query_modality",
                                                  "pos_cand_list", "neg_cand_list", "task_id"))
            pool = common.read_jsonl(f"{toy_data}/cand_pool/{split}/{tag}_cand_pool.jsonl",
                                     required=("did", "txt", "img_path", "modality"))
            assert len(queries) == n and len(pool) == 384
            dids = {c["did"] for c in pool}
            assert all(d.startswith(f"{dataset_id}:") for d in dids) and len(dids) == len(pool)
            common.check_images(pool, "img_path", "did", toy_data)
            common.check_images(queries, "query_img_path", "qid", toy_data)
            qrels = open(f"{toy_data}/qrels/{split}/{tag}_qrels.txt").read().split("\n")[:-1]
            for q, line in zip(queries, qrels, strict=True):
                assert q["qid"].startswith(f"{dataset_id}:") and q["task_id"] == task_id
                assert q["pos_cand_list"][0] in dids and q["query_txt"]
                assert line.split() == [q["qid"], "0", q["pos_cand_list"][0], "1", str(task_id)]
                assert q["query_modality"] == ("text" if task_id == 0 else "image,text")
                assert (q["query_img_path"] is None) == (task_id == 0)
    # separate renders per split: no test image equals a train image
    train = {hashlib.sha256(open(os.path.join(toy_data, "images/train/pool", f), "rb").read()).hexdigest()
             for f in os.listdir(os.path.join(toy_data, "images/train/pool"))}
    test = {hashlib.sha256(open(os.path.join(toy_data, "images/test/pool", f), "rb").read()).hexdigest()
            for f in os.listdir(os.path.join(toy_data, "images/test/pool"))}
    assert not train & test


def test_tokenizer_has_single_token_tags(tokenizer):
    for tag in prepare.SPECIAL_TOKENS + prepare.TAG_TOKENS:
        ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, tag
    text = '<tool_call>\n{"name": "crop_image"}\n</tool_call><|im_end|>'
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


@pytest.mark.parametrize("use_tools", [True, False])
def test_fixed_prompt_text_is_one_token_each(tokenizer, use_tools):
    # the whole system prompt is one token, the guidelines another; the rest of the prompt is plain BPE
    messages = task.build_messages("a red disc", False, "Find it.", ["", ""], [True, True], use_tools, style="compact")
    text = common.make_processor(tokenizer).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    fixed = {tokenizer.convert_tokens_to_ids(t): t for t in prepare.fixed_prompt_text()}
    used = [fixed[i] for i in ids if i in fixed]
    system = task.SYSTEM_PROMPT + ("\n\n" + tools.tools_prompt() if use_tools else "")
    guidelines = "\n\n" + task.GUIDELINES + (task.TOOL_GUIDELINE if use_tools else "")
    assert used == [system, guidelines]  # the longest fixed text wins where two start at the same place
    rest = text.replace(system, "").replace(guidelines, "")
    assert len(ids) == 2 + len(tokenizer(rest, add_special_tokens=False)["input_ids"])


def test_canonical_crop_is_the_native_quadrant():
    # crop_image pads the box by 10% of the image on each side and clamps: [0, 0, 0.4, 0.4] -> (0, 0, 56, 56)
    S = prepare.IMAGE_SIZE
    for corner, (x1, y1, x2, y2) in prepare.CROP_BOXES.items():
        box = [max(0, x1 * S - 0.1 * S), max(0, y1 * S - 0.1 * S), min(S, x2 * S + 0.1 * S), min(S, y2 * S + 0.1 * S)]
        assert [round(v) for v in box] == [0 if x1 == 0 else 56, 0 if y1 == 0 else 56,
                                           56 if x1 == 0 else 112, 56 if y1 == 0 else 112], corner


def probe_accuracy(features, labels, seed=0):
    """Held-out accuracy of a small MLP trained on the features: how much of the label the view holds."""
    torch.manual_seed(seed)
    x = torch.tensor(np.array(features), dtype=torch.float32)
    y = torch.tensor(labels)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n_train = int(0.8 * len(y))
    mlp = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    opt = torch.optim.Adam(mlp.parameters(), 1e-3, weight_decay=1e-4)
    for _ in range(600):
        i = torch.randint(0, n_train, (128,))
        loss = torch.nn.functional.cross_entropy(mlp(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (mlp(x[n_train:]).argmax(-1) == y[n_train:]).float().mean().item()


def test_deciding_detail_needs_the_tool_view():
    """The tag texture is unreadable at the prompt view (28x28) but readable in the canonical crop."""
    rng = np.random.default_rng(0)
    prompt_view, crop_view, labels = [], [], []
    for _ in range(1500):
        mark = int(rng.integers(4))
        img = prepare.render("red", "navy", "top-left", prepare.MARKS[mark], rng)
        small = np.asarray(common.qwen_resize(img, 784, 784), dtype=np.float32) / 255
        prompt_view.append(small[:10, :10].ravel())  # the tag's corner of the prompt view, exact pixels
        crop = np.asarray(img.crop((0, 0, 56, 56)), dtype=np.float32) / 255
        crop_view.append(crop[14:28, 14:28].ravel())  # the one 14 px patch that holds the tag
        labels.append(mark)
    assert probe_accuracy(crop_view, labels) > 0.95
    assert probe_accuracy(prompt_view, labels) < 0.5  # chance is 0.25
