"""
The trajectory viewer: the trajectories.jsonl that rollout.py writes, as ONE self-contained HTML page
(no scripts, no external resources; each image file inlined once, as a base64 PNG data URI in a CSS class,
so the candidates that recur across windows are not repeated) to read what the reranker saw, wrote,
called and answered.

    python viewer.py --trajectories=out/mbeir/rerank/trajectories.jsonl --out=out/mbeir/viewer.html
    python viewer.py config/toy.py --trajectories=out/toy/rerank_grpo/trajectories.jsonl --out=out/toy/viewer_grpo.html --max_queries=50

One section per trajectory (one window of one query): the query (instruction, text, image), the window's
candidates numbered 1..K as in the prompt with the positive marked, each assistant turn as raw text
(tags kept visible) followed by its tool call and the observation images it got back, the final ranking,
the stop reason and the reward grpo.py gives the trajectory. A summary line on top covers them all.
"""

import base64
import html
import io
import json

import common
import task
from configurator import configure

# -----------------------------------------------------------------------------
data_root = "data/mbeir"   # candidate and query image paths and the file lists below are relative to it
query_files = common.mbeir_files("query")  # the files rollout.py read
pool_files = common.mbeir_files("pool")
instructions_file = "instructions.json"  # the instruction shown with the query, as in the prompt ('' = none)
trajectories = "out/mbeir/rerank/trajectories.jsonl"  # rollout.py's output
out = "out/mbeir/viewer.html"  # the page
max_queries = 50           # the trajectories of the first this many qids, in file order (0 = all)
thumb_size = 96            # px, displayed side of every image (small images are scaled up, pixelated)
reward = "paper"           # paper | release: the task.group_rewards variant
# -----------------------------------------------------------------------------

REQUIRED = ("qid", "window", "images", "turns", "final_text", "answer", "tool_calls", "observations",
            "n_valid_calls", "stop_reason")
STYLE = """body{font-family:sans-serif;margin:16px;background:#fafafa;color:#222}
.traj{background:#fff;border:1px solid #ccc;border-radius:6px;padding:10px;margin:14px 0}
.cands,.obs-images,.ranking{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
.cand{text-align:center;border:3px solid transparent;padding:2px;font-size:12px;max-width:140px}
.cand.pos{border-color:#1a9c3a;background:#e6f6ea}
.cand.repeat{opacity:.4}
.cand .im{margin:0 auto}.obs-images figure{margin:0;font-size:11px;text-align:center}
.im{display:block;image-rendering:pixelated;background:#eee no-repeat center/contain}
pre.turn{white-space:pre-wrap;background:#f1f3f7;padding:6px;margin:6px 0;border-left:3px solid #4a6fd1}
.call{font-family:monospace;font-size:13px;padding:4px;margin:4px 0 4px 16px}
.call.ok{background:#e6f6ea}.call.bad{background:#fde8e8}
.obs{margin-left:16px;font-size:13px;color:#555}
.missing{display:inline-block;border:1px dashed #c00;color:#c00;font-size:11px;padding:4px;word-break:break-all}
.tag{font-weight:bold;color:#1a9c3a}.meta{color:#555;font-size:13px}"""


def esc(value):
    return html.escape(str(value))


def image_html(path, size, cache):
    """A box showing the image, or a placeholder naming a missing/unreadable file. Each file is inlined once,
    as a PNG data URI in a CSS class (cache: path -> (class, URI), or why it cannot be shown), so images that
    recur cost nothing."""
    if path not in cache:
        try:
            img = common.load_image(path)
        except FileNotFoundError:
            cache[path] = "missing"
        except OSError:  # common.ImageError: truncated, corrupt or too large; one bad file never stops the page
            cache[path] = "unreadable"
        else:
            img.thumbnail((2 * size, 2 * size))  # big originals shrink; small ones are scaled up by the browser
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            cache[path] = (f"i{len(cache)}", "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    if isinstance(cache[path], str):
        return f'<span class="missing" style="width:{size}px">{cache[path]} image: {esc(path)}</span>'
    return f'<span class="im {cache[path][0]}" role="img" title="{esc(path)}" style="width:{size}px;height:{size}px"></span>'


def candidate_html(number, cand, is_positive, data_root, size, cache, extra_class=""):
    picture = image_html(common.resolve_path(cand["img_path"], data_root), size, cache) if cand.get("img_path") else ""
    label = f"({number})" + (' <span class="tag">positive</span>' if is_positive else "")
    text = f"<div>{esc(cand['txt'])}</div>" if cand.get("txt") else ""
    return f'<div class="cand{" pos" if is_positive else ""}{extra_class}">{picture}<div>{label}</div>{text}</div>'


def split_observation_images(rec):
    """The observation images of each tool call, in order. The record's images are the prompt images, then
    every observation's images; each observation's text has one <image> placeholder per image it returned."""
    counts = [obs.count("<image>") for obs in rec["observations"]]
    first = len(rec["images"]) - sum(counts)  # the prompt images come first
    per_call = []
    for n in counts:
        per_call.append(rec["images"][first:first + n])
        first += n
    return per_call


def observation_captions(call, n_images):
    """What each returned image shows, in the prompt's numbering (0 = the query, i = candidate i)."""
    name = lambda k: "query" if k == 0 else f"candidate {k}"
    args = call.get("arguments") or {}
    if call.get("name") == "select_images":
        return [name(k) for k in args.get("target_images", [])][:n_images] + [""] * n_images
    return [f"crop of {name(args.get('target_image'))}"] * n_images


def score(rec, query, variant):
    """(positive's 1-based index in the window or None, its rank in the answer or None, grpo reward)."""
    positive = task.positive_position(rec["window"], query.get("pos_cand_list"))  # as grpo.py picks it
    answer = rec["answer"] or []
    rank = answer.index(positive) + 1 if positive in answer else None
    value = task.group_rewards([rec["final_text"]], [rec["n_valid_calls"]], positive, variant)[0]
    return positive, rank, value


def trajectory_html(rec, query, pool, instructions, data_root, size, variant, cache):
    positive, rank, value = score(rec, query, variant)
    instruction = common.pick_instruction(instructions, rec["qid"], query.get("task_id"))
    parts = [f'<div class="traj"><h3>query {esc(rec["qid"])} &middot; window from {esc(rec.get("window_start", 0))}</h3>',
             f'<p><i>{esc(instruction)}</i> {esc(query.get("query_txt") or "")}</p>']
    if query.get("query_img_path"):
        parts.append(image_html(common.resolve_path(query["query_img_path"], data_root), size, cache))
    parts.append('<h4>candidates</h4><div class="cands">')
    for i, did in enumerate(rec["window"], 1):
        parts.append(candidate_html(i, pool.get(did, {"txt": f"{did}: not in the pool files"}), i == positive,
                                    data_root, size, cache))
    parts.append("</div><h4>turns</h4>")
    observation_images = split_observation_images(rec)
    for t, turn in enumerate(rec["turns"]):
        parts.append(f'<pre class="turn">{esc(turn)}</pre>')
        if t >= len(rec["tool_calls"]):
            continue
        call = rec["tool_calls"][t]  # turn t ended with </tool_call>: call t ran on it
        status = "valid" if call["valid"] else f"invalid: {call.get('error')}"
        parts.append(f'<div class="call {"ok" if call["valid"] else "bad"}">tool call {t + 1}: '
                     f'<b>{esc(call["name"] or "(unparsed)")}</b> {esc(json.dumps(call.get("arguments")))} '
                     f'&rarr; {esc(status)}</div>')
        if t < len(rec["observations"]):  # a call past max_calls (or past the token budget) has none
            images = observation_images[t]
            figures = "".join(f'<figure>{image_html(im["path"], size, cache)}{esc(caption)}</figure>'
                              for im, caption in zip(images, observation_captions(call, len(images))))
            parts.append(f'<div class="obs">{esc(rec["observations"][t].replace("<image>", ""))}'
                         f'<div class="obs-images">{figures}</div></div>')
        else:
            parts.append('<div class="obs">(no observation: the trajectory ended at this call)</div>')
    parts.append("<h4>final ranking</h4>")
    if rec["answer"] is None:
        parts.append("<p>no parsable &lt;answer&gt;: the window keeps its previous order</p>")
    else:
        seen, items = set(), []
        for n in rec["answer"]:
            if 1 <= n <= len(rec["window"]):
                items.append(candidate_html(n, pool.get(rec["window"][n - 1], {}), n == positive, data_root, size // 2,
                                            cache, " repeat" if n in seen else ""))
                seen.add(n)
            else:
                items.append(f'<div class="cand missing">({esc(n)}) out of range</div>')
        parts.append(f'<div class="ranking">{"".join(items)}</div>')
    where = "no positive in this window" if positive is None else (
        f"positive (candidate {positive}) at rank {rank}" if rank else f"positive (candidate {positive}) not ranked")
    parts.append(f'<p class="meta">{where} &middot; stop reason: {esc(rec["stop_reason"])} &middot; '
                 f'valid tool calls: {rec["n_valid_calls"]} &middot; reward ({esc(variant)}): {value:.3f}</p></div>')
    return "\n".join(parts)


def render_html(records, queries, pool, data_root, instructions=None, thumb_size=96, reward="paper", title="trajectories"):
    """The whole page for trajectory records (rollout.py's schema); queries by qid, pool by did."""
    cache = {}  # path -> (CSS class, data URI) or why not: candidates recur across windows and queries
    scores = [score(r, queries[r["qid"]], reward) for r in records]
    n = max(len(records), 1)
    summary = (f"{len(records)} trajectories of {len({r['qid'] for r in records})} queries &middot; "
               f"mean reward ({esc(reward)}) {sum(s[2] for s in scores) / n:.3f} &middot; "
               f"top-1 rate {sum(s[1] == 1 for s in scores) / n:.1%} &middot; "
               f"tool-call rate {sum(r['n_valid_calls'] > 0 for r in records) / n:.1%}")
    body = [trajectory_html(r, queries[r["qid"]], pool, instructions or {}, data_root, thumb_size, reward, cache)
            for r in records]
    images = "".join(f"\n.{c}{{background-image:url({uri})}}" for c, uri in (v for v in cache.values() if isinstance(v, tuple)))
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{esc(title)}</title><style>{STYLE}{images}</style>'
            f'</head><body><h2>{esc(title)}</h2><p class="meta">{summary}</p>\n' + "\n".join(body) + "\n</body></html>\n")


def load_trajectories(path, queries, max_queries=0):
    """The records of the first max_queries qids; a record missing a key or naming an unknown qid is an
    error with its line number."""
    records, order = [], {}  # qid -> its position among the distinct qids
    for lineno, rec in enumerate(common.read_jsonl(path, required=REQUIRED), 1):  # rollout writes no blank lines
        if rec["qid"] not in queries:
            raise ValueError(f"{path}:{lineno}: qid {rec['qid']!r} is in none of the query files")
        order.setdefault(rec["qid"], len(order))
        if not max_queries or order[rec["qid"]] < max_queries:  # all windows of a kept query
            records.append(rec)
    return records


def main():
    queries, pool, instructions = task.load_benchmark(data_root, query_files, pool_files, instructions_file)
    records = load_trajectories(trajectories, queries, max_queries)
    page = render_html(records, queries, pool, data_root, instructions, thumb_size, reward, title=trajectories)
    common.atomic_write(out, lambda f: f.write(page))
    print(f"wrote {len(records)} trajectories to {out}")


if __name__ == "__main__":
    configure(globals())
    main()
