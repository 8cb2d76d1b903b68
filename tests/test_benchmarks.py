"""The paper's benchmarks end to end on synthetic files: the 7B configs against their scripts, M-BEIR's
instruction table, CIRCO and GeneCIS converters, per-query galleries in retrieve.py, evaluate.py's
--benchmark tables, and embed.py's LamRA prompt."""

import importlib
import importlib.util
import json
import os

import numpy as np
import pytest

import common
import embed
import evaluate
from conftest import REPO, run_stage
from configurator import configure


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIGS = {"config/rollout_7b.py": ["rollout"], "config/rsft_7b.py": ["rsft"],
           "config/stage0_7b.py": ["embed", "retrieve", "evaluate"],
           "config/sft_7b.py": ["sft"], "config/grpo_7b.py": ["grpo"]}


@pytest.mark.parametrize("path", sorted(CONFIGS))
def test_7b_configs_apply_to_their_scripts(path):
    """Every key of a config file is a setting of one of its scripts, of the same type, and applies cleanly."""
    ns = {}
    exec(compile(open(os.path.join(REPO, path)).read(), path, "exec"), ns)
    keys = {k for k, v in ns.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
    scripts = [importlib.import_module(name) for name in CONFIGS[path]]
    known = set()
    for module in scripts:
        settings = dict(vars(module))
        configure(settings, [os.path.join(REPO, path)], verbose=False)  # a copy: the module stays as it was
        known |= {k for k in keys if k in vars(module)}
    assert keys <= known, f"{path}: {sorted(keys - known)} are settings of none of {CONFIGS[path]}"


def test_release_inference_settings():
    ns = {}
    exec(open(os.path.join(REPO, "config/rollout_7b.py")).read(), ns)
    assert (ns["top_n"], ns["window"], ns["stride"], ns["max_calls"], ns["temperature"]) == (50, 20, 10, 2, 0.0)
    assert (ns["max_new_tokens"], ns["max_response_tokens"], ns["prompt_style"]) == (4096, 12288, "release")


def test_mbeir_instruction_table():
    instructions = load("data/mbeir/instructions.py", "mbeir_instructions")
    lines = ["query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\tprompt_2\tprompt_3\tprompt_4\n",
             "text\timage\tWebQA\t1\tFind a photo.\tShow an image.\t\t\n",
             "text\ttext\tWebQA\t1\tFind a passage.\tRetrieve text.\tAnswer this.\tRead.\n",
             "image,text\timage\tCIRR\t7\tEdit the image.\t\t\t\n"]
    out = instructions.parse_tsv(lines)
    assert out == {"1:0": ["Find a photo.", "Show an image."], "1:1": ["Find a passage.", "Retrieve text.", "Answer this.", "Read."],
                   "7:7": ["Edit the image."], "7": ["Edit the image."]}  # WebQA has 2 tasks: no plain "1" key
    assert common.pick_instruction(out, "1:5", 1) == "Retrieve text."  # 5 % 4 = 1
    assert common.pick_instruction(out, "7:3", 7) == "Edit the image."
    assert common.pick_instruction(out, "1:5", 2) == ""  # no row for it, no plain key
    with pytest.raises(ValueError, match="tsv:2: unknown modality pair"):
        instructions.parse_tsv([lines[0], "video\timage\tX\t3\tp\n"], "tsv")


def test_lamra_prompt_and_summary_position(tokenizer):
    processor = common.make_processor(tokenizer, 14, 784, 784)
    msgs = embed.item_messages("a red bus", True, "find a similar image", "lamra")
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Find a similar image. a red bus."
                    "\nSummarize above image and sentence in one word: <|im_end|>\n<|im_start|>assistant\n")
    assert embed.item_messages("", True, "", "lamra")[1]["content"][1]["text"] == "\nSummarize above image in one word: "
    assert embed.item_messages("a cat", False, "", "lamra")[1]["content"][0]["text"] == "A cat.\nSummarize above sentence in one word: "
    assert embed.prompt_style(processor) == "compact"  # auto: the toy tokenizer has <emb>
    try:
        embed.embed_prompt = "lamra"
        batch = embed.render_items([("a red circle", None, ""), ("a much longer blue square text", None, "instr")], processor)
    finally:
        embed.embed_prompt = "auto"
    last = batch["attention_mask"].sum(1) - 1
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    for row, pos in enumerate(last.tolist()):  # the summary is the last token of "<|im_start|>assistant\n", no <emb>
        assert batch["input_ids"][row, pos] == newline
        assert tokenizer.convert_tokens_to_ids("<emb>") not in batch["input_ids"][row].tolist()


def write_qrels_and_ranked(tmp_path, ranked_records):
    path = tmp_path / "ranked.jsonl"
    common.write_jsonl(str(path), ranked_records)
    return str(path)


def test_circo_converter_and_map_table(tmp_path, capsys):
    circo = load("data/circo/prepare.py", "circo_prepare")
    root = tmp_path / "circo"
    (root / "annotations").mkdir(parents=True)
    images = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(1, 8)]}
    val = [{"id": 0, "reference_img_id": 1, "relative_caption": "is red", "shared_concept": "car",
            "target_img_id": 2, "gt_img_ids": [2, 3]},
           {"id": 1, "reference_img_id": 4, "relative_caption": "has two dogs", "shared_concept": "dog",
            "target_img_id": 5, "gt_img_ids": [5]}]
    json.dump(images, open(root / "annotations" / "image_info_unlabeled2017.json", "w"))
    json.dump(val, open(root / "annotations" / "val.json", "w"))
    run_stage_module(circo, [f"--circo_dir={root}", "--split=val"])
    queries = common.read_jsonl(str(root / "query" / "circo_val.jsonl"))
    pool = common.read_jsonl(str(root / "cand_pool" / "circo_cand_pool.jsonl"))
    assert [q["qid"] for q in queries] == ["circo:0", "circo:1"] and len(pool) == 7
    assert queries[0]["query_img_path"] == "unlabeled2017/000000000001.jpg" and queries[0]["pos_cand_list"] == ["circo:2", "circo:3"]
    qrels = str(root / "qrels" / "circo_val_qrels.txt")
    assert open(qrels).read() == "circo:0 0 circo:2 1 7\ncirco:0 0 circo:3 1 7\ncirco:1 0 circo:5 1 7\n"
    assert json.load(open(root / "instructions.json")) == {"circo": [circo.INSTRUCTION]}
    # query 0: gts at ranks 1 and 3 -> AP@5 = (1 + 2/3) / 2 = 5/6; query 1: gt at rank 2 -> 1/2; mAP@5 = 2/3
    ranked = write_qrels_and_ranked(tmp_path, [
        {"qid": "circo:0", "cands": ["circo:2", "circo:7", "circo:3", "circo:6"]},
        {"qid": "circo:1", "cands": ["circo:6", "circo:5"]}])
    metrics = run_stage("evaluate", [f"--ranked={ranked}", f"--qrels={qrels}", "--benchmark=circo", "--map_ks=5,10"])[1]
    assert metrics["benchmark"]["rows"] == {"circo": {"mAP@5": 66.67, "mAP@10": 66.67}}
    assert metrics["benchmark"]["average"] == {"mAP@5": 66.67, "mAP@10": 66.67}
    printed = capsys.readouterr().out
    assert "| group | mAP@5 | mAP@10 |" in printed and "| average (1) | 66.67 | 66.67 |" in printed
    with pytest.raises(ValueError, match="val.json entry 0 \\(id 0\\): reference image 99"):
        circo.convert([dict(val[0], reference_img_id=99)], images["images"], "x", "val")


def run_stage_module(module, argv):
    configure(vars(module), argv, verbose=False)
    return module.main()


def genecis_files(tmp_path):
    genecis = load("data/genecis/prepare.py", "genecis_prepare")
    root = tmp_path / "genecis"
    (root / "annotations").mkdir(parents=True)
    attr = [{"reference": {"image_id": 10}, "target": {"image_id": 11}, "condition": "red",
             "gallery": [{"image_id": 12}, {"image_id": 13}]},
            {"reference": {"image_id": 20}, "target": {"image_id": 21}, "condition": "wooden",
             "gallery": [{"image_id": 22}]}]
    obj = [{"reference": {"val_image_id": 5}, "target": {"val_image_id": 6}, "condition": "dog",
            "gallery": [{"val_image_id": 7}, {"val_image_id": 8}]}]
    json.dump(attr, open(root / "annotations" / "change_attribute.json", "w"))
    json.dump(obj, open(root / "annotations" / "focus_object.json", "w"))
    run_stage_module(genecis, [f"--genecis_dir={root}", "--task=change_attribute"])
    run_stage_module(genecis, [f"--genecis_dir={root}", "--task=focus_object"])
    return genecis, root


def test_genecis_converter_galleries_retrieval_and_r1_table(tmp_path, capsys):
    genecis, root = genecis_files(tmp_path)
    qa = common.read_jsonl(str(root / "query" / "genecis_change_attribute.jsonl"))
    assert qa[0]["query_img_path"] == "change_attribute/10_0_0.jpg" and qa[0]["query_txt"] == "red"
    assert qa[0]["gallery"] == ["change_attribute:11_0_1", "change_attribute:12_0_2", "change_attribute:13_0_3"]
    assert qa[1]["pos_cand_list"] == ["change_attribute:21_1_1"] and len(qa[1]["gallery"]) == 2
    qo = common.read_jsonl(str(root / "query" / "genecis_focus_object.jsonl"))
    assert qo[0]["query_img_path"] == "val2017/000000000005.jpg" and qo[0]["gallery"][0] == "focus_object:000000000006"
    assert json.load(open(root / "instructions.json"))["change_attribute"] == \
        [genecis.INSTRUCTIONS["change_attribute"]]
    # embeddings by hand: each query sees only its own gallery, even where another pool item scores higher
    emb = root / "emb"
    emb.mkdir()
    pool_a = [c["did"] for c in common.read_jsonl(str(root / "cand_pool" / "genecis_change_attribute_cand_pool.jsonl"))]
    assert pool_a == ["change_attribute:11_0_1", "change_attribute:12_0_2", "change_attribute:13_0_3",
                      "change_attribute:21_1_1", "change_attribute:22_1_2"]
    vec = {d: v for d, v in zip(pool_a, np.eye(5, dtype=np.float32))}
    np.save(emb / "genecis_change_attribute_cand_pool.npy", np.stack([vec[d] for d in pool_a]))
    json.dump(pool_a, open(emb / "genecis_change_attribute_cand_pool.ids.json", "w"))
    # query 0 prefers 12 (a gallery item, wrong) then the target 11; query 1 prefers 12 (not in its gallery), then 21
    q = np.array([[0.5, 0.9, 0, 0, 0], [0, 1.0, 0, 0.7, 0.2]], dtype=np.float32)
    np.save(emb / "genecis_change_attribute.npy", q)
    json.dump([r["qid"] for r in qa], open(emb / "genecis_change_attribute.ids.json", "w"))
    ranked = str(tmp_path / "ranked.jsonl")
    run_stage("retrieve", [f"--data_root={root}", "--query_files=query/genecis_change_attribute.jsonl",
                           "--pool_files=cand_pool/genecis_change_attribute_cand_pool.jsonl", f"--emb_dir={emb}",
                           "--top_k=50", f"--ranked={ranked}"])
    rows = common.read_jsonl(ranked)
    assert rows[0]["cands"] == ["change_attribute:12_0_2", "change_attribute:11_0_1", "change_attribute:13_0_3"]
    assert rows[0]["scores"] == [0.9, 0.5, 0.0]
    assert rows[1]["cands"] == ["change_attribute:21_1_1", "change_attribute:22_1_2"]  # 12 is not in its gallery
    # the object task: its target ties with a gallery image (a tie counts against the target)
    rows.append({"qid": "focus_object:0", "cands": ["focus_object:000000000006", "focus_object:000000000007"],
                 "scores": [0.4, 0.4]})
    common.write_jsonl(ranked, rows)
    qrels = ",".join(str(root / "qrels" / f"genecis_{t}_qrels.txt") for t in ("change_attribute", "focus_object"))
    metrics = run_stage("evaluate", [f"--ranked={ranked}", f"--qrels={qrels}", "--benchmark=genecis"])[1]
    assert metrics["benchmark"]["rows"] == {"genecis_change_attribute": {"R@1": 50.0}, "genecis_focus_object": {"R@1": 0.0}}
    assert metrics["benchmark"]["average"] == {"R@1": 25.0}
    assert "| average (2) | 25.00 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="gallery names change_attribute:99"):
        import retrieve
        retrieve.search_gallery(q[0], np.eye(5, dtype=np.float32), {d: i for i, d in enumerate(pool_a)},
                                ["change_attribute:99"], "change_attribute:0", "pool", 5)


def test_mbeir_table_uses_each_pairs_cutoff_and_the_plain_mean(tmp_path, capsys):
    webqa = tmp_path / "mbeir_webqa_task1_test_qrels.txt"
    webqa.write_text("1:1 0 1:10 1 1\n1:2 0 1:20 1 1\n")
    fiq = tmp_path / "mbeir_fashioniq_task7_test_qrels.txt"
    fiq.write_text("7:1 0 7:100 1 7\n")
    ranked = write_qrels_and_ranked(tmp_path, [
        {"qid": "1:1", "cands": ["1:10"]},                                   # webqa hit at 1
        {"qid": "1:2", "cands": [f"1:{i}" for i in range(30, 36)] + ["1:20"]},  # rank 7: a miss at R@5
        {"qid": "7:1", "cands": [f"7:{i}" for i in range(1, 8)] + ["7:100"]}])  # rank 8: a hit at R@10
    out = tmp_path / "m.json"
    metrics = run_stage("evaluate", [f"--ranked={ranked}", f"--qrels={webqa},{fiq}", "--benchmark=mbeir", f"--out={out}"])[1]
    summary = metrics["benchmark"]
    assert summary["rows"] == {"webqa_task1": {"R@k": 50.0}, "fashioniq_task7": {"R@k": 100.0}}
    assert summary["cutoffs"] == {"webqa_task1": "5", "fashioniq_task7": "10"} and summary["average"] == {"R@k": 75.0}
    assert json.load(open(out))["benchmark"]["average"] == {"R@k": 75.0}
    printed = capsys.readouterr().out
    assert "| webqa_task1 | R@5 | 50.00 |" in printed and "| fashioniq_task7 | R@10 | 100.00 |" in printed
    assert "| average (2) | - | 75.00 |" in printed and "the paper's M-BEIR average is over 16" in printed
    try:
        with pytest.raises(ValueError, match="benchmark='beir'"):
            run_stage("evaluate", [f"--ranked={ranked}", f"--qrels={webqa}", "--benchmark=beir"])
    finally:
        importlib.reload(evaluate)  # the failed run left its settings in the module
