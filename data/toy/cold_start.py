"""
Cold-start SFT data for the toy benchmark, written by a teacher that knows the toy's ground truth.

    python data/toy/cold_start.py                   # writes data/toy/sft/{warmup,cold_start}.jsonl and sft/images/
    python data/toy/cold_start.py --use_tools=False --n_warmup=0 --out_dir=data/toy/sft_notool   # the ablation

From the TRAIN split only, in ShareGPT format (LLaMA-Factory, like the released V-Retrver SFT data):
- cold_start.jsonl: one reranking trajectory per train query, in exactly the chat/tool format the policy
  produces (task.build_messages). Most windows hold the positive's whole family (4 images that differ
  only in the tag): the teacher says which candidates match colour, background and corner, calls
  select_images on them, reads each tag in the observation and ranks the positive first. The rest
  (no_tool_fraction) hold a single matching candidate and are answered without tools. A rule filter
  keeps only well-formed trajectories whose answer ranks the positive first.
- warmup.jsonl: short descriptions of freshly rendered images at the prompt, full and crop resolutions. A
  pretrained VLM can already read a small tag once it is shown large enough; a from-scratch toy VLM
  cannot until it is taught, so this stands in for pretrained perception (docs/spec.md §9).
Image paths are relative to data_root; "image_sizes" tells the trainer the resolution of each image.
"""

import json
import os
import random
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data", "toy"))
import common  # noqa: E402
import prepare  # noqa: E402
import task  # noqa: E402
import tools  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
data_root = "data/toy"     # the toy benchmark (prepare.py); record image paths are relative to it
out_dir = "data/toy/sft"   # warmup.jsonl, cold_start.jsonl and images/ go here
window = 5                 # candidates per reranking window (>= 4: a tool window holds a whole family)
no_tool_fraction = 0.2     # share of trajectories whose window has a single coarse match (no tool call)
n_warmup = 6000            # warm-up description records, evenly mixed over prompt, full and crop views (0 = none)
n_windows = 3000           # multi-image warm-up records (warmup_windows.jsonl; 0 = none)
n_restate = 3000           # query-reading warm-up records (warmup_queries.jsonl; 0 = none)
n_compare = 3000           # text-only tag-comparison drills (warmup_compare.jsonl; 0 = none)
use_tools = True           # False: the no-tools ablation's data (no tools in the prompt, no tool calls)
n_train_queries = 0        # train queries to use, one trajectory each (0 = all, both tasks)
blind_marks = ""           # comma-separated marks (e.g. checks,diagonal) the teacher misreads: for a query that wants
                           # one it still looks (select_images), then cannot tell the tags apart and ranks the
                           # matches in window order (kept only when right): an imperfect teacher whose blind spot
                           # SFT inherits and only the outcome reward corrects
blind_rate = 1.0           # share of those queries on which the teacher is blind (the rest it reads as usual);
                           # a mark may carry its own, e.g. checks:1.0,diagonal:0.97
seed = 1337
# -----------------------------------------------------------------------------

PROMPT, TOOL_MIN, TOOL_MAX, FACTOR = 28, 28 * 28 * 4, 112 * 112, 28  # the toy's prompt and tool views
COARSE = ("colour", "background", "corner")
FINAL = re.compile(r"<think>[^<]+</think>\n<answer>\[\d+(, \d+)*\]</answer>", re.DOTALL)
TOOL_TURN = re.compile(r"<think>[^<]+</think>\n<tool_call>\n[^<]+\n</tool_call>", re.DOTALL)


def family(c):
    return tuple(c["attributes"][k] for k in COARSE)


def looks(a):
    """What the prompt view shows of an image: everything but the tag's texture. Terse on purpose: every
    token of the teacher's words is a token the policy generates in each rollout and trains on in each step."""
    return f"{a['colour']} on {a['background']}, {a['corner']}"


def tag(mark):
    return prepare.TAG_WORDS[mark]  # one token each, so a verdict compares two tokens


class Images:
    """Loads pool images once, and saves each derived image (tool output, crop) once under out_dir/images."""

    def __init__(self):
        self.loaded, self.saved = {}, {}

    def load(self, rel):
        if rel not in self.loaded:
            self.loaded[rel] = common.load_image(common.resolve_path(rel, data_root))
        return self.loaded[rel]

    def save(self, img, name):
        """The data_root-relative path of img saved as out_dir/images/{name}.png (one file per name)."""
        if name not in self.saved:
            path = os.path.join(out_dir, "images", f"{name}.png")
            img.save(path, compress_level=1)  # ~21k small images: fast deflate, not the smallest files
            self.saved[name] = os.path.relpath(path, data_root)
        return self.saved[name]


def stem(rel):
    return os.path.splitext(rel)[0].replace("/", "_").replace("\\", "_")


def warmup_records(images):
    """n_warmup single-image descriptions of freshly rendered images (the 384 pool images of the train
    split are too few: a tiny model memorises them), as prompt view, full view and tag crop in turn."""
    rng = np.random.default_rng(seed + 1)  # a stream of its own: no image equals a pool image
    records = []
    for i in range(n_warmup):
        a = {"colour": str(rng.choice(list(prepare.COLOURS))), "background": str(rng.choice(list(prepare.BACKGROUNDS))),
             "corner": str(rng.choice(prepare.CORNERS)), "mark": str(rng.choice(prepare.MARKS))}
        img = prepare.render(a["colour"], a["background"], a["corner"], a["mark"], rng)
        if i % 3 == 0:  # stored at the prompt view's size, as the policy sees candidates
            img, turns, kind = common.qwen_resize(img, PROMPT ** 2, PROMPT ** 2), ("Describe the image.", looks(a)), "prompt"
        elif i % 3 == 1:
            turns, kind = ("Describe the image and its tag.", f"{looks(a)}, {tag(a['mark'])} tag"), "full"
        else:
            img = tools.crop_image(img, prepare.CROP_BOXES[a["corner"]], TOOL_MIN, TOOL_MAX, FACTOR)
            turns, kind = ("Describe the tag.", f"{tag(a['mark'])} tag"), "crop"
        records.append({"conversations": [{"from": "human", "value": "<image>" + turns[0]},
                                          {"from": "gpt", "value": turns[1]}],
                        "images": [images.save(img, f"warmup_{i}")], "image_sizes": [list(img.size)],
                        "kind": kind, "attributes": a})
    return records


def random_attributes(rng):
    return {"colour": str(rng.choice(list(prepare.COLOURS))), "background": str(rng.choice(list(prepare.BACKGROUNDS))),
            "corner": str(rng.choice(prepare.CORNERS)), "mark": str(rng.choice(prepare.MARKS))}


def near(a, rng):
    """a's attributes with exactly one of colour, background and corner changed."""
    key = str(rng.choice(list(COARSE)))
    values = {"colour": list(prepare.COLOURS), "background": list(prepare.BACKGROUNDS), "corner": prepare.CORNERS}[key]
    return {**a, key: str(rng.choice([v for v in values if v != a[key]]))}


def window_records(images):
    """n_windows multi-image warm-up records in the trajectories' own words, short (no system prompt): the
    step a tiny model finds hardest is tying "(k)" to the k-th image of a window. Even i: 5 candidates at
    the prompt view, each described and judged against the query's colour, background and corner; odd i:
    a family's 4 members at full resolution (what select_images returns), each tag read and judged."""
    rng = np.random.default_rng(seed + 2)
    records = []
    for i in range(n_windows):
        target = random_attributes(rng)
        if i % 2 == 0:
            n_match = int(rng.integers(1, 5))
            cands = [{**target, "mark": str(rng.choice(prepare.MARKS))} for _ in range(n_match)]
            cands += [near(target, rng) if rng.random() < 0.7 else random_attributes(rng) for _ in range(5 - n_match)]
            rng.shuffle(cands)
            question = (f"Query: {looks(target)}.\nCandidates:" + "".join(f"({k}) <image>" for k in range(1, 6))
                        + "\nDescribe each candidate and say whether it matches.")
            answer = " ".join(f"({k}) {looks(c)}: {'match' if family_of(c) == family_of(target) else 'no'}."
                              for k, c in enumerate(cands, 1))
            size = PROMPT
        else:
            cands = [{**target, "mark": m} for m in rng.permutation(prepare.MARKS)]
            question = (f"Query: {tag(target['mark'])} tag.\nHere are the selected images for detailed "
                        f"analysis. (Image Size: 112x112, Numbered 1 to 4):" + "<image>" * 4)
            marks = [c["mark"] for c in cands]
            answer = tag_turn(list(range(1, 5)), marks, marks.index(target["mark"]) + 1, window=5)
            size = prepare.IMAGE_SIZE
        paths = []
        for k, c in enumerate(cands):
            img = prepare.render(c["colour"], c["background"], c["corner"], c["mark"], rng)
            img = common.qwen_resize(img, size * size, size * size)
            paths.append(images.save(img, f"window_{i}_{k}"))
        records.append({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
                        "images": paths, "image_sizes": [[size, size]] * len(paths), "kind": "window"})
    return records


def restate_records(images):
    """n_restate query-reading records: a fresh toy query (either task's templates, CIR with its reference
    image at the prompt view) and the teacher's restatement of its target, as the trajectories open. A
    pretrained LM copies a word from its prompt for free; a from-scratch one learns it only from many
    examples, and one restated tag word per trajectory was too few (measured: the tag word copied at chance)."""
    rng = np.random.default_rng(seed + 3)
    instructions = common.read_json(common.resolve_path("instructions.json", data_root))
    records = []
    for i in range(n_restate):
        p = random_attributes(rng)
        mark = prepare.MARK_NAMES[p["mark"]]
        if i % 2 == 0:  # text -> image
            tpl = prepare.T2I_TEMPLATES[int(rng.integers(len(prepare.T2I_TEMPLATES)))]
            text, ref, paths, dataset = tpl.format(**{**p, "mark": mark}), None, [], "1"
        else:  # composed: a reference that differs in colour or background
            changed = ["colour", "background"][int(rng.integers(2))]
            values = list(prepare.COLOURS) if changed == "colour" else list(prepare.BACKGROUNDS)
            r = {**p, changed: str(rng.choice([v for v in values if v != p[changed]])), "mark": str(rng.choice(prepare.MARKS))}
            tpls = prepare.CIR_TEMPLATES[changed]
            text = tpls[int(rng.integers(len(tpls)))].format(colour=p["colour"], background=p["background"], mark=mark)
            img = common.qwen_resize(prepare.render(r["colour"], r["background"], r["corner"], r["mark"], rng),
                                     PROMPT ** 2, PROMPT ** 2)
            ref, paths, dataset = {"attributes": r}, [images.save(img, f"restate_{i}")], "2"
        options = instructions[dataset]
        question = "Query:" + ("<image>" if ref else "") + f"{options[int(rng.integers(len(options)))]} {text}" \
            + "\nRestate the query."
        answer = target_sentence(None, {'attributes': p}, ref)
        records.append({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
                        "images": paths, "image_sizes": [[PROMPT, PROMPT]] * len(paths), "kind": "restate",
                        "attributes": p, "reference": ref and ref["attributes"]})
    return records


def compare_records():
    """n_compare text-only drills of the verdict step, in the trajectories' words: the read tags are given in
    the question, the answer copies each next to the wanted one and says yes or no. In a trajectory only 1 tag
    in 4 is the wanted one, and a policy trained on trajectories alone said "no" to every tag (measured: 0 of
    200 test trajectories said yes, though it read all 796 tags right); here half of the lines are a yes. A drill
    with a yes ends in the trajectories' conclusion, which names the last line's running "best"."""
    rng = np.random.default_rng(seed + 4)
    names = [tag(m) for m in prepare.MARKS]
    records = []
    for _ in range(n_compare):
        wanted = str(rng.choice(names))
        ks = sorted(int(k) for k in rng.choice(np.arange(1, 6), int(rng.integers(1, 5)), replace=False))
        reads = [wanted if rng.random() < 0.5 else str(rng.choice([n for n in names if n != wanted])) for _ in ks]
        question = f"Wanted: {wanted} tag. Read: " + " ".join(f"({k}) {r}." for k, r in zip(ks, reads)) \
            + "\nCompare each tag with the wanted one."
        lines, best = verdict_lines(ks, reads, wanted)
        answer = " ".join(lines) + (f" So candidate {best} is the match." if best != "none" else "")
        records.append({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
                        "images": [], "image_sizes": [], "kind": "compare"})
    return records


def verdict_lines(ks, reads, wanted):
    """One line per selected image: candidate k's tag as read, next to the wanted one, the verdict, and the
    running "best" (the candidate of the latest yes so far, "none" before one). The conclusion then copies the
    number a few tokens back, from the last line, instead of finding the line that said yes: a tiny LM found
    a yes 3-4 lines back at chance (measured: with the yes on line 1, 18 of 56 test conclusions were right,
    on lines 3-4, 98 of 99). Each line's best copies this line's k or the previous line's best, both a fixed
    number of tokens back. Returns (lines, the last best)."""
    lines, best = [], "none"
    for i, (k, read) in enumerate(zip(ks, reads), 1):
        best = k if read == wanted else best
        lines.append(f"({i}) candidate {k}: {read}, wanted {wanted}: {'yes' if read == wanted else 'no'}, best {best}.")
    return lines, best


def tag_turn(selected, marks, k_pos, window):
    """The turn after select_images: each selected candidate's tag read next to the wanted one, so that the
    yes/no verdict compares two phrases a few tokens apart (a tiny LM did not learn to compare a read tag with
    the restatement 100+ tokens back: its verdicts stayed at the majority "no"), then the ranking."""
    wanted = tag(marks[selected.index(k_pos)])
    lines, best = verdict_lines(selected, [tag(m) for m in marks], wanted)
    assert best == k_pos, "a family holds the wanted tag once"
    answer = [k_pos] + [k for k in selected if k != k_pos] + [k for k in range(1, window + 1) if k not in selected]
    return f"<think>{' '.join(lines)} So candidate {k_pos} is the match.</think>\n<answer>{answer}</answer>"


def family_of(a):
    return tuple(a[k] for k in COARSE)


def target_sentence(q, pos, ref):
    """What the query asks for, in the teacher's words: the coarse part in the very words of the candidate
    lines (each match/no verdict compares two equal-shaped phrases), then the tag."""
    p = pos["attributes"]
    if ref is None:
        return f"Wanted: {looks(p)}, {tag(p['mark'])} tag."
    change = f"made {p['colour']}" if ref["attributes"]["colour"] != p["colour"] else f"put on {p['background']}"
    return f"Wanted: the reference {change}, so {looks(p)}, {tag(p['mark'])} tag."


def numbers(ks):
    ks = [str(k) for k in ks]
    return ks[0] if len(ks) == 1 else ", ".join(ks[:-1]) + " and " + ks[-1]


def trajectory(q, pos, window_cands, use_tool, images, instruction, ref, blind=False):
    """One ShareGPT record: the rollout's prompt, then the teacher's turns (tool call, observation, answer).
    blind: the teacher looks at the matches as usual but cannot read this query's tag in the observation: it
    ranks them in window order (the policy keeps looking; only what it concludes from the look is wrong)."""
    q_path = q.get("query_img_path")
    messages = task.build_messages(q.get("query_txt") or "", bool(q_path), instruction,
                                      [c.get("txt") or "" for c in window_cands], [True] * len(window_cands), use_tool,
                                      style="compact")
    turns = task.to_sharegpt(messages)
    paths = ([q_path] if q_path else []) + [c["img_path"] for c in window_cands]
    sizes = [[PROMPT, PROMPT] for _ in paths]
    k_pos = window_cands.index(pos) + 1
    fam = [k for k, c in enumerate(window_cands, 1) if family(c) == family(pos)]
    rest = [k for k in range(1, len(window_cands) + 1) if k not in fam]
    # one line per candidate in the warm-up's own words, then the verdict: a layout a tiny model learns fast
    seen = " ".join(f"({k}) {looks(c['attributes'])}: {'match' if k in fam else 'no'}."
                    for k, c in enumerate(window_cands, 1))
    intro = f"{target_sentence(q, pos, ref)} {seen}"
    if len(fam) == 1:
        think = f"{intro} Only candidate {k_pos} matches."
    elif not use_tool:  # the no-tools ablation: the tags cannot be read, the teacher still ranks the positive first
        think = f"{intro} Candidates {numbers(fam)} match; their tags are too small to tell apart here."
    if len(fam) == 1 or not use_tool:
        answer = [k_pos] + [k for k in fam if k != k_pos] + rest
        turns.append({"from": "gpt", "value": f"<think>{think}</think>\n<answer>{answer}</answer>"})
        return turns, paths, sizes
    call = json.dumps({"name": "select_images", "arguments": {"target_images": fam}})
    # the wanted tag said again right before the call: the next turn copies it from a few tokens back
    think = f"{intro} The tags of {numbers(fam)} are too small here: look closer for a {tag(pos['attributes']['mark'])} tag."
    turn1 = f"<think>{think}</think>\n<tool_call>\n{call}\n</tool_call>"
    tool_images = [images.load(q_path) if q_path else None] + [images.load(c["img_path"]) for c in window_cands]
    result = tools.execute_tool_call(turn1, tool_images, TOOL_MIN, TOOL_MAX, FACTOR, style="compact")
    obs = task.to_sharegpt([{"role": "user", "content": result.content}])[0]
    for k, im in zip(fam, result.images):
        paths.append(images.save(im, f"select_{stem(window_cands[k - 1]['img_path'])}_{im.width}x{im.height}"))
        sizes.append([im.width, im.height])
    turn3 = tag_turn(fam, [window_cands[k - 1]["attributes"]["mark"] for k in fam], k_pos, len(window_cands))
    if blind:
        turn3 = f"<think>The tags look alike to me; I rank {numbers(fam)} in the order shown.</think>\n<answer>{fam + rest}</answer>"
    turns += [{"from": "gpt", "value": turn1}, obs, {"from": "gpt", "value": turn3}]
    return turns, paths, sizes


def well_formed(turns, tool_images, k_pos, n):
    """The rule filter: every gpt turn well formed, tool calls valid, the answer a permutation with k_pos first."""
    gpt = [t["value"] for t in turns if t["from"] == "gpt"]
    for text in gpt[:-1]:
        if not TOOL_TURN.fullmatch(text) or text.count("<tool_call>") != 1:
            return False
        if tools.parse_tool_call(text)[2] is not None or not tools.execute_tool_call(
                text, tool_images, TOOL_MIN, TOOL_MAX, FACTOR, style="compact").valid:
            return False
    answer = task.parse_answer(gpt[-1])
    return bool(FINAL.fullmatch(gpt[-1])) and answer is not None and sorted(answer) == list(range(1, n + 1)) \
        and answer[0] == k_pos


def main():
    assert window >= 4, "a tool window holds the positive's whole family of 4"
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    instructions = common.read_json(common.resolve_path("instructions.json", data_root))
    queries, pools = [], {}
    for dataset_id, name, task_id in prepare.DATASETS:
        tag = f"mbeir_{name}_task{task_id}_train"
        queries += common.read_jsonl(common.resolve_path(f"query/train/{tag}.jsonl", data_root))
        pool_file = common.resolve_path(f"cand_pool/train/{tag}_cand_pool.jsonl", data_root)
        pools[str(dataset_id)] = common.read_jsonl(pool_file)
    index = {d: ({c["did"]: c for c in pool}, {c["img_path"]: c for c in pool}) for d, pool in pools.items()}
    families = {d: [family(c) for c in pool] for d, pool in pools.items()}  # computed once, not per query
    if 0 < n_train_queries < len(queries):
        queries = [queries[i] for i in sorted(rng.sample(range(len(queries)), n_train_queries))]
    images = Images()
    warmup, windows, restate = warmup_records(images), window_records(images), restate_records(images)
    compare = compare_records()

    no_tool = set(rng.sample(range(len(queries)), round(no_tool_fraction * len(queries))))
    blind_draws = random.Random(seed + 5)  # a stream of its own: the other records are the same at any blind_rate
    blind = {m.split(":")[0]: float(m.split(":")[1]) if ":" in m else blind_rate for m in blind_marks.split(",") if m}
    records, n_filtered = [], 0
    for i, q in enumerate(queries):
        pool, fams = pools[q["qid"].split(":")[0]], families[q["qid"].split(":")[0]]
        by_did, by_path = index[q["qid"].split(":")[0]]
        pos = by_did[q["pos_cand_list"][0]]
        ref = by_path[q["query_img_path"]] if q.get("query_img_path") else None
        fam = [c for c, f in zip(pool, fams) if f == family(pos)]
        if i in no_tool:
            others = [c for c, f in zip(pool, fams) if f != family(pos)]
            cands = [pos] + rng.sample(others, window - 1)
        else:
            near = [c for c, f in zip(pool, fams) if sum(a != b for a, b in zip(f, family(pos))) == 1]
            rng.shuffle(fam)  # the family first, as stage 0 ranks it (its top 4 is the family for every toy query)
            cands = fam + rng.sample(near, window - len(fam))
        if i in no_tool:
            rng.shuffle(cands)
        turns, paths, sizes = trajectory(q, pos, cands, use_tools, images,
                                         common.pick_instruction(instructions, q["qid"]), ref,
                                         blind=blind_draws.random() < blind.get(pos["attributes"]["mark"], 0.0))
        tool_images = [images.load(ref["img_path"]) if ref else None] + [images.load(c["img_path"]) for c in cands]
        k_pos = cands.index(pos) + 1
        if not well_formed(turns, tool_images, k_pos, window):
            n_filtered += 1
            continue
        records.append({"conversations": turns, "images": paths, "image_sizes": sizes, "qid": q["qid"],
                        "positive": k_pos, "cands": [c["did"] for c in cands],
                        "kind": "no_tool" if i in no_tool or not use_tools else "tool"})

    if warmup:
        common.write_jsonl(os.path.join(out_dir, "warmup.jsonl"), warmup)
    if windows:
        common.write_jsonl(os.path.join(out_dir, "warmup_windows.jsonl"), windows)
    if restate:
        common.write_jsonl(os.path.join(out_dir, "warmup_queries.jsonl"), restate)
    if compare:
        common.write_jsonl(os.path.join(out_dir, "warmup_compare.jsonl"), compare)
    common.write_jsonl(os.path.join(out_dir, "cold_start.jsonl"), records)
    counts = {"written": len(records), "filtered": n_filtered, "warmup": len(warmup),
              "tool": sum(r["kind"] == "tool" for r in records),
              "no_tool": sum(r["kind"] == "no_tool" for r in records), "saved_images": len(images.saved)}
    print(f"cold_start.jsonl: {counts['written']} trajectories written ({counts['tool']} tool, "
          f"{counts['no_tool']} no-tool), {n_filtered} filtered; warmup.jsonl: {len(warmup)} records; "
          f"{len(images.saved)} images saved under {os.path.join(out_dir, 'images')}")
    return counts


if __name__ == "__main__":
    configure(globals())
    main()
