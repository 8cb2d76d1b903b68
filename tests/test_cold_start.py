import json
import os
import re
import shutil

import pytest
import torch

import common
import prepare
import task
from engine import parse_answer
from conftest import run_stage

N_WARMUP = 60
TAGS = [f"mbeir_{name}_task{task_id}_train" for _, name, task_id in prepare.DATASETS]
MARK_OF_NAME = {v: k for k, v in prepare.TAG_WORDS.items()}


def read_files(out):
    return {name: open(os.path.join(out, name), "rb").read() for name in ("warmup.jsonl", "cold_start.jsonl")}


@pytest.fixture(scope="module")
def sft(toy_data):
    """Run cold_start twice into the toy benchmark's sft/ dir; removed afterwards, since the shared toy dir
    is compared file by file against a fresh prepare run elsewhere."""
    out = os.path.join(toy_data, "sft")
    argv = [f"--data_root={toy_data}", f"--out_dir={out}", f"--n_warmup={N_WARMUP}", "--n_windows=6", "--n_restate=8", "--n_compare=40"]
    _, counts = run_stage("cold_start", argv)
    first = read_files(out)
    _, counts_again = run_stage("cold_start", argv)
    yield {"root": toy_data, "counts": counts, "first": first, "second": read_files(out), "again": counts_again,
           "warmup": common.read_jsonl(os.path.join(out, "warmup.jsonl")),
           "windows": common.read_jsonl(os.path.join(out, "warmup_windows.jsonl")),
           "restate": common.read_jsonl(os.path.join(out, "warmup_queries.jsonl")),
           "compare": common.read_jsonl(os.path.join(out, "warmup_compare.jsonl")),
           "cold": common.read_jsonl(os.path.join(out, "cold_start.jsonl"))}
    shutil.rmtree(out)


@pytest.fixture(scope="module")
def bench(toy_data):
    queries, pools = {}, {}
    for tag in TAGS:
        for q in common.read_jsonl(f"{toy_data}/query/train/{tag}.jsonl"):
            queries[q["qid"]] = q
        for c in common.read_jsonl(f"{toy_data}/cand_pool/train/{tag}_cand_pool.jsonl"):
            pools[c["did"]] = c
    return queries, pools, common.read_json(f"{toy_data}/instructions.json")


def test_deterministic_and_counts(sft):
    assert sft["first"] == sft["second"] and sft["counts"] == sft["again"]
    c = sft["counts"]
    assert c["written"] == 128 and c["filtered"] == 0 and c["warmup"] == N_WARMUP
    assert c["tool"] + c["no_tool"] == c["written"]
    assert abs(c["no_tool"] / c["written"] - 0.2) < 0.05
    assert sum(r["kind"] == "no_tool" for r in sft["cold"]) == c["no_tool"]


def test_images_and_sizes(sft):
    for r in sft["warmup"] + sft["cold"]:
        n = sum(t["value"].count("<image>") for t in r["conversations"])
        assert n == len(r["images"]) == len(r["image_sizes"])
        for path, size in zip(r["images"], r["image_sizes"]):
            assert not os.path.isabs(path) and os.path.exists(os.path.join(sft["root"], path))
            if path.startswith("sft/"):  # images the script saved are stored at the size they are shown
                assert list(common.load_image(os.path.join(sft["root"], path)).size) == size


def test_window_warmup_records(sft):
    """Multi-image records: one verdict per image, in the trajectories' words, images at their view size."""
    assert len(sft["windows"]) == 6
    for i, r in enumerate(sft["windows"]):
        human, gpt = [t["value"] for t in r["conversations"]]
        n = human.count("<image>")
        assert n == len(r["images"]) == len(r["image_sizes"]) == (5 if i % 2 == 0 else 4)
        assert [gpt.count(f"({k}) ") for k in range(1, n + 1)] == [1] * n
        for path, size in zip(r["images"], r["image_sizes"]):
            assert list(common.load_image(os.path.join(sft["root"], path)).size) == size == ([28, 28] if i % 2 == 0 else [112, 112])
        if i % 2 == 0:  # the prompt view: at least one candidate matches the query's colour, background and corner
            assert gpt.count(": match.") >= 1 and gpt.count(": match.") + gpt.count(": no.") == 5
        else:  # a family's 4 tags: exactly one is the query's, and it is ranked first
            wanted = human.split("Query: ")[1].split(" tag.")[0]
            assert wanted in prepare.TAG_WORDS.values()
            assert gpt.count(f", wanted {wanted}: ") == 4 and gpt.count(": yes, ") == 1 and gpt.count(": no, ") == 3
            k_yes = int(re.search(r"candidate (\d): ([a-z ]+), wanted [a-z ]+: yes, best \1\.", gpt).group(1))
            assert re.search(rf"candidate {k_yes}: {wanted}, wanted", gpt)
            assert f"best {k_yes}. So candidate {k_yes} is the match." in gpt
            assert parse_answer(gpt) == [k_yes] + [k for k in range(1, 6) if k != k_yes]


def test_compare_records(sft):
    """Text-only verdict drills: each read tag copied next to the wanted one, yes exactly when they are equal."""
    assert len(sft["compare"]) == 40
    n_yes = n_lines = 0
    for r in sft["compare"]:
        human, gpt = [t["value"] for t in r["conversations"]]
        assert r["images"] == [] and "<image>" not in human
        wanted = re.match(r"Wanted: ([a-z]+) tag\. Read: ", human).group(1)
        given = re.findall(r"\((\d)\) ([a-z]+)\.", human)
        lines = re.findall(r"\((\d)\) candidate (\d): ([a-z]+), wanted ([a-z]+): (yes|no), best (\d|none)\.", gpt)
        assert [(k, read) for _, k, read, _, _, _ in lines] == given and 1 <= len(lines) <= 4
        assert [int(i) for i, *_ in lines] == list(range(1, len(lines) + 1))
        for j, (_, k, read, w, verdict, best) in enumerate(lines):
            assert w == wanted and (verdict == "yes") == (read == wanted)
            # the running best, computed another way: the last yes among lines 0..j
            yes_so_far = [kk for _, kk, rr, *_ in lines[:j + 1] if rr == wanted]
            assert best == (yes_so_far[-1] if yes_so_far else "none")
        last_best = lines[-1][5]
        assert gpt.endswith(f"So candidate {last_best} is the match." if last_best != "none" else "none.")
        n_yes += sum(line[4] == "yes" for line in lines)
        n_lines += len(lines)
    assert 0.3 < n_yes / n_lines < 0.7  # balanced, unlike the trajectories' 1 in 4


def test_restate_records(sft):
    """Query-reading records: a fresh query in the benchmark's templates, the target restated in the teacher's words."""
    assert len(sft["restate"]) == 8
    for i, r in enumerate(sft["restate"]):
        human, gpt = [t["value"] for t in r["conversations"]]
        a, ref = r["attributes"], r["reference"]
        assert human.startswith("Query:") and human.endswith("\nRestate the query.")
        assert prepare.MARK_NAMES[a["mark"]] in human
        assert gpt.startswith("Wanted: ") and gpt.endswith(f"{a['colour']} on {a['background']}, {a['corner']}, "
                                                           f"{prepare.TAG_WORDS[a['mark']]} tag.")
        if i % 2 == 0:  # text -> image: every attribute is in the text
            assert ref is None and r["images"] == [] and all(a[k] in human for k in ("colour", "background", "corner"))
        else:  # composed: the reference differs in colour or background; the text names only the change
            assert human.startswith("Query:<image>") and r["image_sizes"] == [[28, 28]] and ref["corner"] == a["corner"]
            changed = [k for k in ("colour", "background") if ref[k] != a[k]]
            assert len(changed) == 1 and a[changed[0]] in human and a["corner"] not in human
            assert list(common.load_image(os.path.join(sft["root"], r["images"][0])).size) == [28, 28]


def test_warmup_describes_its_images(sft):
    kinds = [r["kind"] for r in sft["warmup"]]
    assert kinds.count("prompt") == kinds.count("full") == kinds.count("crop") == N_WARMUP // 3
    sizes = {"prompt": [[28, 28]], "full": [[112, 112]], "crop": [[56, 56]]}
    for r in sft["warmup"]:
        human, gpt = [t["value"] for t in r["conversations"]]
        a = r["attributes"]
        assert [t["from"] for t in r["conversations"]] == ["human", "gpt"] and r["image_sizes"] == sizes[r["kind"]]
        base = f"{a['colour']} on {a['background']}, {a['corner']}"
        if r["kind"] == "crop":
            assert human == "<image>Describe the tag." and gpt == f"{prepare.TAG_WORDS[a['mark']]} tag"
        elif r["kind"] == "prompt":
            assert human == "<image>Describe the image." and gpt == base
        else:
            assert human == "<image>Describe the image and its tag."
            assert gpt == base + f", {prepare.TAG_WORDS[a['mark']]} tag"

def test_trajectories(sft, bench):
    queries, pools, instructions = bench
    for r in sft["cold"]:
        q = queries[r["qid"]]
        prefix = r["qid"].split(":")[0] + ":"
        by_path = {c["img_path"]: c for d, c in pools.items() if d.startswith(prefix)}
        has_q = q["query_img_path"] is not None
        cands = [by_path[p] for p in r["images"][int(has_q):int(has_q) + 5]]  # window from the image paths
        assert [c["did"] for c in cands] == r["cands"]
        messages = task.build_messages(q["query_txt"], has_q, common.pick_instruction(instructions, q["qid"]),
                                          [""] * 5, [True] * 5, True, style="compact")
        turns = r["conversations"]
        assert turns[:2] == task.to_sharegpt(messages)
        assert r["images"][:int(has_q)] == ([q["query_img_path"]] if has_q else [])
        assert r["image_sizes"][:int(has_q) + 5] == [[28, 28]] * (int(has_q) + 5)
        # the positive, recomputed from the pool attributes (query text + family)
        pos = [k for k, c in enumerate(cands, 1) if c["did"] == q["pos_cand_list"][0]]
        a = pools[q["pos_cand_list"][0]]["attributes"]
        assert pos == [r["positive"]] and prepare.MARK_NAMES[a["mark"]] in q["query_txt"]
        family = [k for k, c in enumerate(cands, 1)
                  if all(c["attributes"][x] == a[x] for x in ("colour", "background", "corner"))]
        final = turns[-1]["value"]
        answer = parse_answer(final)
        assert answer[0] == r["positive"] and sorted(answer) == [1, 2, 3, 4, 5]
        assert re.fullmatch(r"<think>[^<]+</think>\n<answer>\[[\d, ]+\]</answer>", final)
        if r["kind"] == "no_tool":
            assert [t["from"] for t in turns] == ["system", "human", "gpt"] and family == pos
            assert len(r["images"]) == int(has_q) + 5
            continue
        assert [t["from"] for t in turns] == ["system", "human", "gpt", "human", "gpt"]
        assert len(family) == 4
        call = json.loads(turns[2]["value"].split("<tool_call>\n")[1].split("\n</tool_call>")[0])
        assert call == {"name": "select_images", "arguments": {"target_images": family}}
        assert turns[3]["value"] == ("Here are the selected images for detailed analysis. (Image Size: 112x112, "
                                     "Numbered 1 to 4):" + "<image>" * 4)
        assert r["image_sizes"][-4:] == [[112, 112]] * 4 and len(r["images"]) == int(has_q) + 9
        reads = re.findall(r"\((\d)\) candidate (\d): ([a-z]+), wanted ([a-z]+): (yes|no), best (\d|none)\.", final)
        assert [(int(i), int(k)) for i, k, *_ in reads] == list(enumerate(family, 1))
        for _, k, name, wanted, verdict, best in reads:
            assert MARK_OF_NAME[name] == cands[int(k) - 1]["attributes"]["mark"] and MARK_OF_NAME[wanted] == a["mark"]
            assert (verdict == "yes") == (int(k) == r["positive"])
            assert best == (str(r["positive"]) if family.index(int(k)) >= family.index(r["positive"]) else "none")
        assert final.split("</think>")[0].endswith(f"best {r['positive']}. So candidate {r['positive']} is the match.")
        assert answer[:4] == [r["positive"]] + [k for k in family if k != r["positive"]]
        if has_q:
            ref = by_path[q["query_img_path"]]["attributes"]
            changed = "colour" if ref["colour"] != a["colour"] else "background"
            assert ref["corner"] == a["corner"]
            assert f"Wanted: the reference {'made' if changed == 'colour' else 'put on'} {a[changed]}, so " \
                in turns[2]["value"]
        # the wanted tag is restated right before the call
        assert turns[2]["value"].split("</think>")[0].endswith(f"look closer for a {prepare.TAG_WORDS[a['mark']]} tag.")


def test_n_train_queries(toy_data):
    out = os.path.join(toy_data, "sft_subset")
    try:
        _, counts = run_stage("cold_start", [f"--data_root={toy_data}", f"--out_dir={out}", "--n_warmup=3",
                                             "--n_train_queries=10", "--no_tool_fraction=0.5"])
        assert counts["written"] == 10 and counts["no_tool"] == 5 and counts["warmup"] == 3
        recs = common.read_jsonl(os.path.join(out, "cold_start.jsonl"))
        assert len({r["qid"] for r in recs}) == 10
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_perception_scoring_on_hand_made_descriptions():
    import perception
    a = {"colour": "red", "background": "navy", "corner": "top-left", "mark": "checks"}
    assert perception.correct("prompt", "red on navy, top-left<|im_end|>", a)
    assert not perception.correct("prompt", "red on navy, top-right", a)
    assert perception.correct("full", "red on navy, top-left, checkered tag", a)
    assert not perception.correct("full", "red on slate, top-left, checkered tag", a)
    assert perception.correct("crop", "checkered tag", a)
    assert not perception.correct("crop", "vertical tag", a)


def test_vision_pretrain_trains_the_tower_only_and_saves_a_policy(sft, tmp_path):
    from transformers import AutoTokenizer
    out = str(tmp_path / "vision")
    small = ["--n_layer=2", "--n_embd=64", "--n_head=2", "--n_kv_head=1", "--vision_depth=1", "--vision_hidden=32"]
    _, accuracy = run_stage("vision_pretrain", [f"--data_root={sft['root']}", f"--tokenizer_dir={sft['root']}/tokenizer",
                                                f"--out_dir={out}", "--vision_steps=3", "--vision_batch_size=4", "--seed=5"] + small)
    assert {"colour/prompt", "mark/full", "mark/crop"} <= set(accuracy) and all(0 <= v <= 1 for v in accuracy.values())
    trained = common.load_model(out).state_dict()
    init = common.build_tiny_model("qwen2_5_vl", AutoTokenizer.from_pretrained(f"{sft['root']}/tokenizer"), seed=5,
                                   n_layer=2, n_embd=64, n_head=2, n_kv_head=1, vision_depth=1, vision_hidden=32).state_dict()
    for k in init:  # the language model is untouched, the vision tower moved
        same = torch.equal(init[k], trained[k])
        assert same if "visual" not in k else True
    assert any(not torch.equal(init[k], trained[k]) for k in init if "visual" in k)
    assert not os.path.exists(out + ".tmp")


def test_a_blind_teacher_looks_then_guesses_the_marks_it_cannot_read(toy_data, tmp_path, bench):
    """blind_marks: for queries that want a mark the teacher cannot read it looks closer as usual, then ranks the
    matches in window order; the rule filter keeps only the guesses that happened to be right. blind_rate
    leaves some of those queries read properly, and every other record is the same at any blind_rate."""
    queries, pools, _ = bench
    argv = [f"--data_root={toy_data}", "--n_warmup=0", "--n_windows=0", "--n_restate=0", "--n_compare=0",
            "--blind_marks=checks,diagonal"]
    mark = lambda r: pools[queries[r["qid"]]["pos_cand_list"][0]]["attributes"]["mark"]  # noqa: E731
    runs = {}
    for rate in (1.0, 0.5):
        _, counts = run_stage("cold_start", argv + [f"--out_dir={tmp_path}/{rate}", f"--blind_rate={rate}"])
        runs[rate] = (counts, common.read_jsonl(str(tmp_path / f"{rate}/cold_start.jsonl")))
    counts, records = runs[1.0]
    guessed = [r for r in records if "look alike" in r["conversations"][-1]["value"]]
    assert counts["filtered"] > 0 and guessed  # most blind guesses were wrong and filtered out
    for r in guessed:
        assert mark(r) in ("checks", "diagonal")
        assert len(r["conversations"]) == 5 and "select_images" in r["conversations"][2]["value"]  # it looked
        assert task.parse_answer(r["conversations"][-1]["value"])[0] == r["positive"]  # a kept guess is a right one
    for r in records:  # a blind teacher never reads a tag it cannot see
        if mark(r) in ("checks", "diagonal") and len(r["conversations"]) == 5:
            assert r in guessed
    seeing = [r for r in records if mark(r) not in ("checks", "diagonal")]
    assert sum(len(r["conversations"]) == 5 for r in seeing) > 0.7 * len(seeing)  # the rest still look closer
    half = runs[0.5][1]
    read = [r for r in half if mark(r) in ("checks", "diagonal") and len(r["conversations"]) == 5
            and "look alike" not in r["conversations"][-1]["value"]]
    assert read and len([r for r in half if r in guessed]) < len(guessed)  # at rate 0.5 some blind marks are read
    same = lambda r: (r["qid"], r["conversations"], r["cands"], r["positive"])  # noqa: E731  (image dirs differ)
    assert [same(r) for r in half if mark(r) not in ("checks", "diagonal")] == [same(r) for r in seeing]
    # a rate per mark: checks always unread, diagonal always read
    run_stage("cold_start", argv[:-1] + [f"--out_dir={tmp_path}/per_mark", "--blind_marks=checks:1.0,diagonal:0.0"])
    per_mark = common.read_jsonl(str(tmp_path / "per_mark/cold_start.jsonl"))
    looked_alike = {mark(r) for r in per_mark if "look alike" in r["conversations"][-1]["value"]}
    assert looked_alike == {"checks"} and any(mark(r) == "diagonal" and len(r["conversations"]) == 5 for r in per_mark)
