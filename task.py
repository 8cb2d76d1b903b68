"""
The reranking task in one place: the prompt a window of candidates is shown in, the sliding window, the
answer format and its parser, where the positive is, the rewards and the rule RSFT keeps a trajectory by.

Pure functions of text and records (no model): engine.py parses answers with them, rollout.py, rsft.py and
grpo.py build prompts and score trajectories with them, and viewer.py and the toy's scripts read the same
definitions instead of importing a trainer. The facts behind each are in docs/spec.md (§1 the window, §3
the prompt, §4 the rewards).
"""

import math
import re

import numpy as np

import common
import tools

# -----------------------------------------------------------------------------
# the prompt (docs/spec.md §3, §10): three styles
#   "release":     the release's prompt, byte for byte: the system_prompt and guideline that
#                  verl-tool/examples/data_preprocess/pixel_reasoner/prepare_lamra_train.py writes (select_images
#                  described as taking exactly one image); the default, for the released checkpoints
#   "release_500": the pair prepare_lamra_train_500.py writes (a step-by-step system prompt, select_images of
#                  several images); the scripts disagree on which one trained the checkpoints (docs/spec.md §10)
#   "compact":     the project's own short wording, with the tool budget in it; the toy's (its tokenizer holds
#                  these exact texts as single tokens, so they are frozen)

SYSTEM_PROMPT = ("You are a retrieval assistant. Given a query and numbered candidates, rank the candidates "
                 "from most to least relevant to the query.")
GUIDELINES = ("Guidelines: rank all candidates from most to least relevant to the query. Think step by step "
              "inside <think></think>, then give the full ranking as <answer>[i1, i2, ...]</answer>.")
TOOL_GUIDELINE = " Small details may be invisible at this resolution: inspect them with the tools first."

# The release's strings are an interface of its checkpoints, copied byte for byte (docs/spec.md §10), quirks
# included: the crop_image line lacks its final "}", and the release_500 system prompt ends in '""' + 2 newlines.
RELEASE_CROP_SPEC = (
    '{"type": "function", "function": {"name": "crop_image", "description": "Zoom in on the image based on the '
    'bounding box coordinates.", "parameters": {"type": "object", "properties": {"bbox_2d": {"type": "array", '
    '"description": "coordinates for bounding box of the area you want to zoom in. minimum value is 0 and maximum '
    'value is the width/height of the image.", "items": {"type": "number"}}, "target_image": {"type": "number", '
    '"description": "The index of the image to crop. Index from 1 to the number of images. Choose 1 to operate on '
    'original image."}}, "required": ["bbox_2d", "target_image"]}}')
RELEASE_SELECT_ONE_SPEC = (
    '{"type": "function", "function": {"name": "select_images", "description": "Select exactly one candidate image '
    'for detailed analysis from the provided candidate list.", "parameters": {"type": "object", "properties": '
    '{"target_images": {"type": "array", "description": "List containing exactly one candidate image index to '
    'select for detailed analysis (e.g., [3] to select candidate 3).", "items": {"type": "integer", "description": '
    '"Candidate image index from 1 to the number of candidates."}, "minItems": 1, "maxItems": 1}}, "required": '
    '["target_images"]}}}')
RELEASE_SELECT_MANY_SPEC = (
    '{"type": "function", "function": {"name": "select_images", "description": "Select specific candidate images '
    'for detailed analysis from the provided candidate list.", "parameters": {"type": "object", "properties": '
    '{"target_images": {"type": "array", "description": "List of candidate image indices to select for detailed '
    'analysis (e.g., [1, 3, 5] to select candidates 1, 3, and 5).", "items": {"type": "integer", "description": '
    '"Candidate image index from 1 to the number of candidates."}}}, "required": ["target_images"]}}}')


def release_tool_block(select_spec):
    """The Hermes-style tool block of the release's system prompts, around its two tool signatures."""
    return ("You may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{RELEASE_CROP_SPEC}\n{select_spec}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


RELEASE_INTRO = "You are a helpful assistant for multimodal retrieval tasks."
RELEASE_SYSTEM = RELEASE_INTRO + "\n\n# Tools\n\n" + release_tool_block(RELEASE_SELECT_ONE_SPEC)
RELEASE_GUIDELINE_HEAD = (
    "Guidelines: You are given a query (which can be text, image, or both) and multiple candidate items (which can "
    "be text, image, or both). Your task is to evaluate each candidate against the query and select the best match.")
RELEASE_GUIDELINE_TOOLS = (
    " Determine if it is beneficial to employ the given visual operations (tools). You can use the following tools:\n"
    "1. `crop_image`: Zoom in on specific areas of the query image or selected candidate images for detailed "
    "analysis\n"
    "2. `select_images`: Select specific candidate images from the provided list for detailed comparison\n\n")
RELEASE_GUIDELINE_TAIL = (
    "Analyze the visual and textual features step by step and provide your final answer in the format:\n"
    "<think>Your reasoning process here</think><answer>Directly answer with the most matching number</answer>")
RELEASE_GUIDELINE = RELEASE_GUIDELINE_HEAD + RELEASE_GUIDELINE_TOOLS + RELEASE_GUIDELINE_TAIL

RELEASE_500_INTRO = (
    RELEASE_INTRO + " Your goal is to evaluate a query (which can be text, image, or both) against multiple "
    "candidate items (which can be text, image, or both) and select the best matching candidate.")
RELEASE_500_STEPS = (
    "## Step-by-Step Analysis Process\n"
    "1. **Analyze All Text and Image Content**: \n"
    "First, thoroughly examine the textual and visual features of the query and each candidate. For text, read and "
    "understand the content, context, and key points. For images, observe objects, colors, layout, and any relevant "
    "details.\n"
    "Compare the query to each candidate individually, noting similarities and differences.\n\n"
    "2. **Assess Analysis Difficulty**:\n"
    "Identify if any candidate image has areas that are hard to analyze due to small size, blurriness, or complex "
    "details. This may require using `crop_image` to zoom in for a closer look.\n"
    "If multiple candidates are similarly matching or difficult to distinguish, consider using `select_images` to "
    "focus on a subset for detailed comparison.\n\n"
    "3. **Decide on Tool Usage**:\n"
    "Use `crop_image` only if zooming in on a specific image region would provide critical information not "
    "available in the initial view. This tool is best for single images with high analysis difficulty.\n"
    "Use `select_images` only if you need to narrow down candidates for in-depth analysis, such as when visual "
    "features are subtle or multiple images require side-by-side inspection.\n"
    "Tools should be employed sparingly; only when they significantly enhance your ability to evaluate the match."
    "\n\n"
    "4. **Perform Final Evaluation**:\n"
    "After any tool usage, integrate the new insights into your analysis.\n"
    "Select the candidate that best matches the query based on all available information.")
RELEASE_500_SYSTEM = (RELEASE_500_INTRO + "\n\n" + RELEASE_500_STEPS + "\n\n## Tools \n"
                      + release_tool_block(RELEASE_SELECT_MANY_SPEC) + '""\n\n')
RELEASE_500_GUIDELINE_HEAD = ("Guidelines:Always begin by analyzing the query and all candidates in detail, covering "
                              "both text and image components.\n")
RELEASE_500_GUIDELINE_TOOLS = ("Use tools only when analysis is challenging and additional visual inspection would "
                               "lead to a more accurate match.\n")
RELEASE_500_GUIDELINE_TAIL = (
    "After analysis, provide your reasoning in <think> tags and the final answer in <answer> tags. The answer should "
    "be the only number index of the most matching candidate (e.g., <think>Your reasoning process here</think>"
    "<answer>1</answer>).\n")
RELEASE_500_GUIDELINE = RELEASE_500_GUIDELINE_HEAD + RELEASE_500_GUIDELINE_TOOLS + RELEASE_500_GUIDELINE_TAIL


def system_and_guideline(style, use_tools, max_calls=2):
    """(system prompt, guideline) of a style. The release has no text-only prompt: without tools, ours drops its
    tool block and tool sentences (the "no tools" ablation, docs/spec.md §4). The release's prompts state no
    tool budget, so max_calls only shows in the compact one."""
    if style == "release":
        return ((RELEASE_SYSTEM, RELEASE_GUIDELINE) if use_tools else
                (RELEASE_INTRO, RELEASE_GUIDELINE_HEAD + " " + RELEASE_GUIDELINE_TAIL))
    if style == "release_500":
        return ((RELEASE_500_SYSTEM, RELEASE_500_GUIDELINE) if use_tools else
                (RELEASE_500_INTRO, RELEASE_500_GUIDELINE_HEAD + RELEASE_500_GUIDELINE_TAIL))
    if style == "compact":
        return (SYSTEM_PROMPT + ("\n\n" + tools.tools_prompt(max_calls) if use_tools else ""),
                GUIDELINES + (TOOL_GUIDELINE if use_tools else ""))
    raise ValueError(f"prompt_style={style!r}: expected one of {', '.join(tools.STYLES)}")


def lamra_format(text):
    """A query or candidate text as the release's user turns show it (LamRA's M-BEIR loader, UniIR's
    format_string): carriage returns dropped, outer whitespace then outer double quotes stripped, the first
    letter upper case, and a final period unless it already ends in . ? or ! (docs/spec.md §10)."""
    text = (text or "").replace("\r", "").strip().strip('"')
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".?!" else text + "."


def build_messages(query_text, has_query_image, instruction, cand_texts, cand_has_image, use_tools, max_calls=2,
                   style="release"):
    """Chat messages of one window. Images come in placeholder order: query first, then candidates.
    The release's user turn: Query:<image>{instruction} {query}Candidates:(1) <image>{text}(2) ...\\n\\n{guideline},
    texts through lamra_format (the instruction alone, then with the query); the compact one as before."""
    system, guideline = system_and_guideline(style, use_tools, max_calls)
    content = [{"type": "text", "text": "Query:"}]
    if has_query_image:
        content.append({"type": "image"})
    if style == "compact":
        content.append({"type": "text", "text": f"{instruction} {query_text}".strip() + "\nCandidates:"})
    else:
        query = lamra_format(f"{lamra_format(instruction)} {query_text}")
        content.append({"type": "text", "text": query + "Candidates:"})
    for i, (text, has_image) in enumerate(zip(cand_texts, cand_has_image), 1):
        content.append({"type": "text", "text": f"({i}) "})
        if has_image:
            content.append({"type": "image"})
        if style == "compact":
            content.append({"type": "text", "text": text or ""})
        elif lamra_format(text):
            content.append({"type": "text", "text": lamra_format(text)})
    content.append({"type": "text", "text": "\n\n" + guideline})
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def to_sharegpt(messages):
    """Chat messages -> ShareGPT turns (LLaMA-Factory style): image parts become <image> placeholders."""
    role = {"system": "system", "user": "human", "assistant": "gpt"}
    turns = []
    for m in messages:
        content = m["content"] if isinstance(m["content"], str) else "".join(
            "<image>" if part["type"] == "image" else part["text"] for part in m["content"])
        turns.append({"from": role[m["role"]], "value": content})
    return turns


def load_benchmark(root, query_files, pool_files, instructions_file):
    """Queries by qid, candidates by did (M-BEIR JSONL) and the task instructions."""
    files = [f for f in query_files.split(",") if f], [f for f in pool_files.split(",") if f]
    queries = {q["qid"]: q for f in files[0] for q in common.read_jsonl(common.resolve_path(f, root), required=("qid",))}
    pool = {c["did"]: c for f in files[1] for c in common.read_jsonl(common.resolve_path(f, root), required=("did",))}
    instructions = common.read_json(common.resolve_path(instructions_file, root)) if instructions_file else {}
    return queries, pool, instructions


def drop_queries(ranked, files, data_root, where):
    """The ranked records (from the file `where`) whose qid is in none of files: comma-separated JSONL paths
    under data_root, e.g. the cold-start SFT data, so that RSFT and GRPO work on the queries the teacher left
    without a trajectory (docs/spec.md §5)."""
    if not files:
        return ranked
    taught = {r["qid"] for f in files.split(",") for r in common.read_jsonl(common.resolve_path(f, data_root), required=("qid",))}
    left = [r for r in ranked if r["qid"] not in taught]
    if not left:
        raise ValueError(f"exclude_queries_in={files}: it holds every query of {where}, none is left")
    return left


def check_ranked(ranked, queries, pool, depth, where):
    """Every ranked qid is a known query and each of its first `depth` candidates a known pool item, checked
    before any work so that a bad record is named up front, not found mid-run."""
    for r in ranked:
        if r["qid"] not in queries:
            raise ValueError(f"{where}: qid {r['qid']} is in none of the query files")
        missing = [d for d in r["cands"][:depth] if d not in pool]
        if missing:
            raise ValueError(f"{where}: qid {r['qid']} ranks {missing[0]}, which is in none of the pool files")


def window_prompt(q, cands, instructions, load, use_tools, min_pixels, max_pixels, factor, max_calls=2, style="release"):
    """The prompt of one window: messages, prompt-view images, original images for the tools, the paths of the
    prompt images (query first, then candidates) and the style (the tools' observations follow it).
    load(path) -> original image."""
    q_img = load(q["query_img_path"]) if q.get("query_img_path") else None
    c_imgs = [load(c["img_path"]) if c.get("img_path") else None for c in cands]
    messages = build_messages(q.get("query_txt") or "", q_img is not None, common.pick_instruction(instructions, q["qid"], q.get("task_id")),
                              [c.get("txt") or "" for c in cands], [im is not None for im in c_imgs], use_tools, max_calls,
                              style)
    return {"messages": messages, "tool_images": [q_img] + c_imgs, "style": style,
            "prompt_images": [common.qwen_resize(im, min_pixels, max_pixels, factor) for im in [q_img] + c_imgs if im is not None],
            "prompt_paths": ([q["query_img_path"]] if q_img else []) + [c["img_path"] for c in cands if c.get("img_path")]}

# -----------------------------------------------------------------------------
# the sliding window (docs/spec.md §1)

def window_starts(n, size, step):
    """Back to front: n=50, size=20, step=10 -> [30, 20, 10, 0]."""
    if size < 1 or step < 1:
        raise ValueError(f"window={size} and stride={step} must both be at least 1")
    starts = list(range(max(n - size, 0), -1, -step))
    return starts if starts[-1] == 0 else starts + [0]


def merge_window(order, start, size, answer):
    """Reorder order[start:start+size] by a 1-based answer: drop duplicates and out-of-range numbers,
    append the missing candidates in their previous order; None keeps the previous order."""
    block = order[start:start + size]
    if answer is None:
        return list(order)
    picked = []
    for i in answer:
        if 1 <= i <= len(block) and block[i - 1] not in picked:
            picked.append(block[i - 1])
    picked += [c for c in block if c not in picked]
    return order[:start] + picked + order[start + size:]


def window_order(dids, key):
    """A window's candidates in a random order fixed by key (e.g. seed, step, prompt index): a resumed run sees
    the same. Training prompts use it: stage 0 was trained on the training queries, so its order there would
    be a shortcut (the positive sits first more often than on test queries)."""
    return [dids[i] for i in np.random.default_rng(key).permutation(len(dids))]


def positive_position(dids, positives):
    """1-based position of the first positive among a window's candidate ids, or None (no positive shown)."""
    positives = set(positives or ())
    return next((i for i, did in enumerate(dids, 1) if did in positives), None)

# -----------------------------------------------------------------------------
# the answer (docs/spec.md §1, §4)

FORMAT = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)


def parse_answer(text):
    """The first <answer>...</answer> as a list of 1-based candidate numbers: a bracketed list "[3, 1, 2]", or
    the single number the release's prompts ask for ("3" -> [3]: that candidate first, the rest kept in
    order by merge_window); None if there is none or it does not parse."""
    start = text.find("<answer>")
    end = text.find("</answer>", start)
    if start < 0 or end < 0:
        return None
    body = text[start + len("<answer>"):end].strip()
    if body.isdigit():
        return [int(body)]
    if not (body.startswith("[") and body.endswith("]")):
        return None
    try:
        return [int(x) for x in body[1:-1].split(",") if x.strip()]
    except ValueError:
        return None


def is_well_formed(text):
    """<think>...</think> then an answer that parses (the full format reward's condition)."""
    think = text.find("<think>")
    end = text.find("</think>", think)
    return think >= 0 and end >= 0 and text.find("<answer>", end) >= 0 and parse_answer(text[end:]) is not None


def positive_rank(text, positive):
    """1-based position of the positive in the answer of text (first occurrence), or None."""
    answer = parse_answer(text[text.find("</think>"):]) if "</think>" in text else None
    return answer.index(positive) + 1 if answer and positive in answer else None

# -----------------------------------------------------------------------------
# rewards: pure functions of the policy's own text, never of observation text (docs/spec.md §4)

def format_reward(text):
    """0.5 for <think>...</think>...<answer>...</answer>, 0.5 more if the answer parses: a list of ints, or the
    single number a release-style prompt asks for (docs/spec.md §4)."""
    match = FORMAT.search(text)
    if not match:
        return 0.0
    return 0.5 + 0.5 * (parse_answer(text[text.find("</think>", match.start()):]) is not None)


def rank_reward(k, cutoff=None):
    """exp(-(k-1)^2 / 2): 1, 0.61, 0.14, ... for k = 1, 2, 3; 0 if missing or k > cutoff."""
    if k is None or (cutoff is not None and k > cutoff):
        return 0.0
    return math.exp(-((k - 1) ** 2) / 2.0)


def group_rewards(final_texts, n_valid_calls, positive, variant="paper", tools_on=True):
    """Rewards of one group of G trajectories (final assistant text, valid tool calls) for one prompt."""
    ks = [positive_rank(t, positive) for t in final_texts]
    fmt = [format_reward(t) for t in final_texts]
    if variant == "paper":
        out = [0.2 * f + 0.8 * rank_reward(k, cutoff=5) for f, k in zip(fmt, ks)]
        if tools_on:
            out = [r + 0.2 * (k == 1 and n > 0) - 0.1 * max(0, n - 1) for r, k, n in zip(out, ks, n_valid_calls)]
        return out
    if variant != "release":
        raise ValueError(f"reward={variant!r}: expected 'paper' or 'release'")
    out = [0.3 * f + 0.7 * rank_reward(k) for f, k in zip(fmt, ks)]
    if tools_on:
        tool_rate = sum(n > 0 for n in n_valid_calls) / len(n_valid_calls)
        curiosity = 0.6 * (0.6 - tool_rate) if tool_rate < 0.6 else 0.0
        out = [r + (curiosity if n > 0 else 0.0) - (0.05 * (n - 1) if n > 1 else 0.0) for r, n in zip(out, n_valid_calls)]
        out = [min(1.5, max(-0.5, r)) for r in out]
    return out

# -----------------------------------------------------------------------------
# rejection sampling (docs/spec.md §1)

def is_ranking(answer, n_candidates):
    """An answer the prompt asked for: one candidate number, or all n_candidates of them, each once. The merge
    rule tolerates duplicates, out-of-range numbers and gaps; a sampled answer like [4, 1, 2, 4, 4, 5] that
    happens to put the positive first is still not one to train on (docs/spec.md §1)."""
    return (len(answer) in (1, n_candidates) and len(set(answer)) == len(answer)
            and all(1 <= a <= n_candidates for a in answer))


def accepted(traj, positive, require_tool=False, n_candidates=None):
    """RSFT keeps a trajectory that stopped on its own, is well formed and ranks the positive first (and,
    with n_candidates, answers with a ranking of the window, is_ranking; with require_tool, made a valid
    tool call)."""
    if positive is None:
        return False
    final = traj["final_text"]
    ok = traj["stop_reason"] == "stop" and is_well_formed(final)
    answer = parse_answer(final[final.find("</think>"):]) if ok else None
    ok = ok and bool(answer) and answer[0] == positive and (n_candidates is None or is_ranking(answer, n_candidates))
    return ok and (traj["n_valid_calls"] > 0 or not require_tool)


def paired_gain(hits, best_hits):
    """(wins - losses) / sqrt(wins + losses) of one evaluation's top-1 hits (0 or 1 per held-out prompt) against
    the best's on the same prompts: a sign test's z; 0.0 where they agree on every prompt."""
    wins = sum(h > b for h, b in zip(hits, best_hits))
    losses = sum(h < b for h, b in zip(hits, best_hits))
    return (wins - losses) / (wins + losses) ** 0.5 if wins + losses else 0.0
