"""data/vretrver/convert.py: released V-Retrver parquet rows -> our query/pool/qrels/ranked JSONL."""

import importlib.util
import io
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
    queries, pool, qrels, ranked = convert.convert_rows(rows, "9", image_dir, task_id=3)
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
    queries, _, qrels, _ = convert.convert_rows(rows, 4, str(tmp_path))
    assert [q["qid"] for q in queries] == ["4:0", "4:1", "4:2"]  # non-numeric release qids: the row index
    assert [q["src_qid"] for q in queries] == ["a", "b", "c"]
    assert [q["task_id"] for q in queries] == [0, 0, 5] and qrels[2].endswith(" 1 5")


@pytest.mark.parametrize("change, message", [
    (lambda i: i.pop("candidate_texts"), "missing candidate_texts"),
    (lambda i: i.update(ground_truth_position=0), "outside 1..3"),
    (lambda i: i.update(ground_truth_position=4), "outside 1..3"),
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
