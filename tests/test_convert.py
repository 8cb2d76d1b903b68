"""data/vretrver/convert.py: released V-Retrver parquet rows -> our query/pool/qrels/ranked JSONL."""

import importlib.util
import io
import json
import os
import sys
import types

import pytest
from PIL import Image

import common
import evaluate
import task
from configurator import configure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("vretrver_convert", os.path.join(REPO, "data", "vretrver", "convert.py"))
convert = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert)

HAVE_PYARROW = importlib.util.find_spec("pyarrow") is not None


def png_bytes(color, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def make_rows():
    info = lambda **kw: {"extra_info": kw, "prompt": [{"role": "user", "content": "..."}], "images": []}
    return [
        info(qid="9:17", ground_truth_position=2, num_candidates=3, query_image="mbeir_images/q17.jpg",
             query_text="Retrieve a similar image. A red bus.",
             candidate_images=["mbeir_images/a.jpg", "mbeir_images/b.jpg", "mbeir_images/c.jpg"],
             candidate_texts=["", "", ""]),
        info(qid="9:18", ground_truth_position=1, num_candidates=3,
             query_image={"bytes": png_bytes("red"), "path": "q18.png"}, query_text="Like this but blue.",
             candidate_images=[{"bytes": png_bytes("blue"), "path": None}, "mbeir_images/b.jpg",
                               {"bytes": None, "path": "mbeir_images/d.jpg"}],
             candidate_texts=["", "", "a dog"]),
        info(qid="9:19", ground_truth_position=2, num_candidates=2, query_image=None,
             query_text="Which caption describes the photo?", candidate_images=None,
             candidate_texts=["a cat on a mat", "a dog in the park"]),
    ]


def test_convert_rows(tmp_path):
    image_dir = str(tmp_path / "images")
    rows = make_rows()
    queries, pool, qrels, ranked, _ = convert.convert_rows(rows, "9", image_dir, task_id=3)
    by_did = {c["did"]: c for c in pool}
    assert [q["qid"] for q in queries] == ["9:17", "9:18", "9:19"]
    assert [q["query_modality"] for q in queries] == ["image,text", "image,text", "text"]
    assert queries[0]["query_img_path"] == "mbeir_images/q17.jpg"  # paths stay as given
    assert queries[2]["query_img_path"] is None
    assert all(q["task_id"] == 3 and q["neg_cand_list"] == [] for q in queries)
    # embedded bytes are written as PNG under image_dir, referenced by absolute path
    q_img = queries[1]["query_img_path"]
    assert os.path.isabs(q_img) and q_img.startswith(image_dir) and q_img.endswith(".png")
    assert common.load_image(q_img).getpixel((0, 0)) == (255, 0, 0)
    # the pool holds distinct candidates only (mbeir_images/b.jpg is shared by rows 0 and 1)
    assert len(pool) == 3 + 2 + 2 and len(by_did) == len(pool)
    assert ranked[0]["cands"][1] == ranked[1]["cands"][1]
    assert all(d.startswith("9:") for d in by_did)
    for row, q, r, line in zip(rows, queries, ranked, qrels):
        info = row["extra_info"]
        assert r["qid"] == q["qid"] and r["task_id"] == 3 and len(r["cands"]) == info["num_candidates"]
        assert r["scores"] == sorted(r["scores"], reverse=True) and len(set(r["scores"])) == len(r["scores"])
        assert r["cands"][info["ground_truth_position"] - 1] == q["pos_cand_list"][0]
        assert line == f"{q['qid']} 0 {q['pos_cand_list'][0]} 1 3"
        for did, img, txt in zip(r["cands"], info["candidate_images"] or [None] * 2, info["candidate_texts"]):
            assert by_did[did]["txt"] == txt
            if isinstance(img, str):
                assert by_did[did]["img_path"] == img
    row1 = [by_did[d] for d in ranked[1]["cands"]]
    assert row1[0]["img_path"].startswith(image_dir) and row1[0]["modality"] == "image"
    assert row1[2] == {"did": row1[2]["did"], "txt": "a dog", "img_path": "mbeir_images/d.jpg", "modality": "image,text"}
    text_only = [by_did[d] for d in ranked[2]["cands"]]
    assert all(c["img_path"] is None and c["modality"] == "text" for c in text_only)
    # stable: the same rows give the same ids, wherever the images are written
    again = convert.convert_rows(rows, "9", str(tmp_path / "elsewhere"), task_id=3)
    assert [r["cands"] for r in again[3]] == [r["cands"] for r in ranked]


def test_qid_fallback_and_task_id_from_extra_info(tmp_path):
    rows = make_rows()
    for row, qid in zip(rows, ["a", "b", "c"]):
        row["extra_info"]["qid"] = qid
    rows[2]["extra_info"]["task_id"] = 5
    queries, _, qrels, _, _ = convert.convert_rows(rows, 4, str(tmp_path))
    assert [q["qid"] for q in queries] == ["4:0", "4:1", "4:2"]  # non-numeric release qids: the row index
    assert [q["src_qid"] for q in queries] == ["a", "b", "c"]
    assert [q["task_id"] for q in queries] == [0, 0, 5] and qrels[2].endswith(" 1 5")


@pytest.mark.parametrize("change, message", [
    (lambda i: i.pop("candidate_texts"), "missing candidate_texts"),
    (lambda i: i.update(num_candidates="x"), "must be integers"),
    (lambda i: i.update(num_candidates=2), "num_candidates 2"),
])
def test_bad_row_is_named(tmp_path, change, message):
    rows = make_rows()
    change(rows[1]["extra_info"])
    with pytest.raises(ValueError, match=message) as e:
        convert.convert_rows(rows, "9", str(tmp_path))
    assert "row 1 (qid '9:18')" in str(e.value)


def write_with_main(tmp_path, monkeypatch, parquet_path, rows=None):
    """Run main() on a parquet file; given rows, a stand-in for pyarrow returns them instead."""
    if rows is not None:
        pq = types.SimpleNamespace(read_table=lambda path: types.SimpleNamespace(to_pylist=lambda: rows))
        monkeypatch.setitem(sys.modules, "pyarrow", types.SimpleNamespace(parquet=pq))
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", pq)
    out = tmp_path / "jsonl"
    configure(vars(convert), [f"--parquet={parquet_path}", f"--out_dir={out}", "--dataset_id=9"], verbose=False)
    convert.main()
    return out


def check_outputs(out, rows, name):
    queries, pool, instructions = task.load_benchmark(
        str(out), f"query/{name}.jsonl", f"cand_pool/{name}_cand_pool.jsonl", "instructions.json")
    assert instructions == {"9": [""]} and common.pick_instruction(instructions, "9:17") == ""
    ranked = evaluate.load_ranked(str(out / "ranked" / f"{name}.jsonl"))
    groups = evaluate.load_qrels(str(out / "qrels" / f"{name}_qrels.txt"))
    assert list(groups) == [evaluate.qrels_group_name(f"{name}_qrels.txt")] == ["fashioniq_task7"]
    positives = groups["fashioniq_task7"]
    assert len(ranked) == len(rows) == len(queries) == len(positives)
    for r, row in zip(ranked, rows):
        pos = r["cands"][row["extra_info"]["ground_truth_position"] - 1]
        assert positives[r["qid"]] == {pos} and queries[r["qid"]]["pos_cand_list"] == [pos]
        assert all(d in pool for d in r["cands"])
        # the records feed the rollout's prompt builder as they are
        prompt = task.window_prompt(queries[r["qid"]], [pool[d] for d in r["cands"]], instructions,
                                       lambda p: Image.new("RGB", (56, 56)), True, 784, 784, 28)
        text = "".join(p.get("text", "") for p in prompt["messages"][1]["content"])
        assert row["extra_info"]["query_text"] in text
        n_images = (row["extra_info"]["query_image"] is not None) + sum(
            x is not None for x in row["extra_info"]["candidate_images"] or [])
        assert len(prompt["prompt_images"]) == n_images


def test_main_writes_files_the_stages_read(tmp_path, monkeypatch):
    rows, name = make_rows(), "fashioniq_task7_test"
    out = write_with_main(tmp_path, monkeypatch, tmp_path / f"{name}.parquet", rows)
    check_outputs(out, rows, name)
    assert len(os.listdir(out / "images" / name)) == 2  # the two embedded images


@pytest.mark.skipif(not HAVE_PYARROW, reason="pyarrow is not installed")
def test_parquet_round_trip(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = make_rows()
    for row in rows:  # one parquet type per column: images as HF dicts throughout
        info = row["extra_info"]
        as_dict = lambda v: v if isinstance(v, dict) or v is None else {"bytes": None, "path": v}
        info["query_image"] = as_dict(info["query_image"])
        info["candidate_images"] = [as_dict(v) for v in info["candidate_images"] or [None] * info["num_candidates"]]
    path = tmp_path / "fashioniq_task7_test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = write_with_main(tmp_path, monkeypatch, path)
    check_outputs(out, pq.read_table(path).to_pylist(), "fashioniq_task7_test")


def test_main_without_pyarrow_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails even if something else installed it
    with pytest.raises(SystemExit) as e:
        convert.main()
    assert str(e.value.code) == ("pyarrow is needed to read parquet: pip install pyarrow "
                                 "(it is not a dependency of nanoretrver)")


def test_out_of_window_positive_is_kept_as_a_miss(tmp_path):
    rows = make_rows()
    rows[1]["extra_info"]["ground_truth_position"] = 0   # not in the window, no hit list: unknown positive
    rows[2]["extra_info"]["ground_truth_position"] = 7
    queries, _, qrels, ranked, stats = convert.convert_rows(rows, "9", str(tmp_path))
    assert [q["qid"] for q in queries] == ["9:17", "9:18", "9:19"]  # kept, not an error
    assert queries[1]["pos_cand_list"] == ["9:unranked:18"] and "9:18 0 9:unranked:18 1 0" in qrels
    assert stats["no_positive"] == 2
    groups = {"g": {line.split()[0]: {line.split()[2]} for line in qrels}}
    metrics = evaluate.evaluate(ranked, groups)
    assert metrics["g"]["R@5"] == pytest.approx(100 / 3, abs=0.01)  # the two unknown positives count as misses


def hit(img, txt=""):
    return {"candidate_images": img, "candidate_texts": txt}


def test_hit_list_is_the_ranked_list_and_prompt_is_kept(tmp_path):
    rows = make_rows()[:1]
    # the stage-0 top 5: the window (a, b, c) is its top 3; the positive b is at position 2 of both
    rows[0]["hit"] = [hit("mbeir_images/a.jpg"), hit("mbeir_images/b.jpg"), hit("mbeir_images/c.jpg"),
                      hit("mbeir_images/e.jpg"), hit("mbeir_images/f.jpg")]
    queries, pool, qrels, ranked, _ = convert.convert_rows(rows, "9", str(tmp_path), hit_depth=4)
    by_did = {c["did"]: c for c in pool}
    assert [by_did[d]["img_path"] for d in ranked[0]["cands"]] == [f"mbeir_images/{x}.jpg" for x in "abce"]
    assert len(pool) == 4 and queries[0]["pos_cand_list"] == [ranked[0]["cands"][1]]  # hits past hit_depth unread
    assert queries[0]["release_prompt"] == [{"role": "user", "content": "..."}]
    # a ground truth past the window points into the hit list
    rows[0]["extra_info"]["ground_truth_position"] = 5
    queries, pool, qrels, ranked, stats = convert.convert_rows(rows, "9", str(tmp_path), hit_depth=4)
    positive = queries[0]["pos_cand_list"][0]
    assert {c["did"]: c for c in pool}[positive]["img_path"] == "mbeir_images/f.jpg"
    assert positive not in ranked[0]["cands"] and stats["gt_past_window"] == 1  # outside the top 4: a miss


def test_mbeir_ids_and_all_positives(tmp_path):
    mq = [{"qid": "9:500", "query_txt": "like this but blue", "query_img_path": "mbeir_images/q18.png",
           "query_modality": "image,text", "pos_cand_list": ["9:2", "9:7"], "task_id": 7},
          {"qid": "9:501", "query_txt": "a red bus", "query_img_path": "mbeir_images/q17.jpg",
           "query_modality": "image,text", "pos_cand_list": ["9:1"], "task_id": 7}]
    mp = [{"did": f"9:{i}", "txt": "", "img_path": f"mbeir_images/{x}.jpg", "modality": "image"}
          for i, x in enumerate("abcdefgh")]
    mbeir = convert.MBeirIndex(mq, mp)
    rows = make_rows()[:2]
    rows[0]["extra_info"]["qid"] = "9:501"  # found by qid
    rows[0]["extra_info"]["candidate_images"] = [f"/remote/authors/M-BEIR/mbeir_images/{x}.jpg" for x in "abc"]
    rows[1]["extra_info"]["qid"] = "release-2"  # found by image path (absolute) and text
    rows[1]["extra_info"]["query_image"] = "/remote/authors/M-BEIR/mbeir_images/q18.png"
    rows[1]["extra_info"]["query_text"] = "Find a similar image. Like this but blue."
    rows[1]["extra_info"]["candidate_images"] = ["/remote/authors/M-BEIR/mbeir_images/c.jpg",
                                                 "/remote/authors/M-BEIR/mbeir_images/x.jpg", "/remote/authors/d.png"]
    rows[1]["extra_info"]["candidate_texts"] = ["", "", ""]
    queries, pool, qrels, ranked, stats = convert.convert_rows(rows, "9", str(tmp_path), task_id=7, mbeir=mbeir)
    assert [q["qid"] for q in queries] == ["9:501", "9:500"]
    assert ranked[0]["cands"] == ["9:0", "9:1", "9:2"]
    assert ranked[1]["cands"][0] == "9:2" and all(len(d) == 18 for d in ranked[1]["cands"][1:])  # unmatched: hashed
    assert queries[1]["pos_cand_list"] == [ranked[1]["cands"][0], "9:7"]  # the window's and M-BEIR's
    assert queries[1]["query_img_path"] == "mbeir_images/q18.png" and queries[1]["query_txt"] == "like this but blue"
    assert "9:500 0 9:7 1 7" in qrels and "9:501 0 9:1 1 7" in qrels
    assert {c["did"]: c for c in pool}["9:7"]["img_path"] == "mbeir_images/h.jpg"
    assert stats["queries_matched"] == 2 and stats["cands_matched"] == 4


def test_remap_rewrites_paths_and_names_unmatched(tmp_path):
    spec = importlib.util.spec_from_file_location("vretrver_remap", os.path.join(REPO, "data", "vretrver", "remap.py"))
    remap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(remap)
    fix = remap.Remapper("/remote/a/:imgs/,/remote/b:/data/b")
    records = [{"conversations": [], "images": ["/remote/a/q.jpg", "/remote/b/tool/1.png"]}]
    assert remap.remap_sft_records(records, fix)[0]["images"] == ["imgs/q.jpg", "/data/b/tool/1.png"]
    fix.check("sft.json")
    row = {"images": [{"image": "/remote/a/q.jpg"}], "hit": [hit("/remote/a/h.jpg")],
           "extra_info": json.dumps({"query_image": "/remote/a/q.jpg", "candidate_images": ["/remote/b/c.jpg"]})}
    row = remap.remap_row(row, fix)
    assert row["images"] == [{"image": "imgs/q.jpg"}] and row["hit"][0]["candidate_images"] == "imgs/h.jpg"
    assert json.loads(row["extra_info"]) == {"query_image": "imgs/q.jpg", "candidate_images": ["/data/b/c.jpg"]}
    queries, *_ = convert.convert_rows(make_rows()[:1], "9", str(tmp_path), fix=fix)
    with pytest.raises(ValueError, match="match no remap prefix.*mbeir_images/q17.jpg"):
        fix.check("rl.parquet")
