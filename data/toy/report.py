"""
The toy pipeline's results, written by data/toy/run.py once its stages are done: out/toy/results.md, .json
and .html, read from the stages' own files (metrics.json, trajectories.jsonl, GRPO's log.jsonl and eval.jsonl).

One table per GRPO reward. Each policy's test R@1 greedy (rollout.py at temperature 0, scored by evaluate.py)
and sampled at GRPO's temperature (SFT: pass_k samples per query, sampled R@1 is their mean hit rate and pass@k the
share of queries with a hit in any; the other policies: one sample), with the trajectories' format validity, tool-call rate and mean reward
(the table's reward). GRPO rows add the share of zero-variance groups over training and the greedy top-1 on
the held-out training prompts at its first, last and best evaluation (grpo.py --eval_prompts): a GRPO row is
the policy of its best evaluation (grpo.py --keep_best), the start policy when no step beat it. Every number after
the base model is the mean over the seeds, the seeds' own values in brackets. results.html draws GRPO's curves.
"""

import html
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import task  # noqa: E402

out = "out/toy"            # the run's outputs and benchmark: data/toy/run.py sets both to its own
data = "data/toy"

TEST_QUERIES = ("query/test/mbeir_toyt2i_task0_test.jsonl", "query/test/mbeir_toycir_task7_test.jsonl")
ROWS = [("stage-0 (embedder)", "stage0"), ("warm-up base, zero-shot", "base"), ("SFT", "sft"), ("SFT + RSFT", "rsft"),
        ("SFT + GRPO", "sft_grpo"), ("SFT + RSFT + GRPO", "grpo"), ("no tools: SFT", "sft_notool"),
        ("no tools: SFT + GRPO", "grpo_notool")]
GRPO_ARMS = ("sft_grpo", "grpo", "grpo_notool")
CURVES = ("reward", "top1", "tool_rate", "zero_std_groups")  # GRPO's per-step log values drawn in results.html
COLOURS = {"sft_grpo": "#2a9d3f", "grpo": "#1f6fd1", "grpo_notool": "#e07b00"}


def run_dir(arm, sd, reward):
    """A trained policy's run directory under out (GRPO arms once per reward)."""
    return f"{out}/seed{sd}/{arm}_{reward}" if arm in GRPO_ARMS else f"{out}/seed{sd}/{arm}"


def eval_dir(arm, sd, reward, kind):
    """A policy's test rerank: kind rerank (greedy) or sample (pass_k samples at GRPO's temperature)."""
    if arm == "base":
        return f"{out}/{kind}_base"
    return f"{out}/seed{sd}/{kind}_{arm}_{reward}" if arm in GRPO_ARMS else f"{out}/seed{sd}/{kind}_{arm}"


def positives():
    found = {}
    for name in TEST_QUERIES:
        found.update({q["qid"]: q["pos_cand_list"] for q in common.read_jsonl(f"{data}/{name}")})
    return found


def trajectory_stats(path, tools_on, reward, pos):
    """Format validity, tool-call rate, mean generated tokens and mean reward over a rerank's trajectories,
    and per (query, window) the hits (positive ranked first) of its samples."""
    trajs = common.read_jsonl(path)
    rewards, hits = [], {}
    for t in trajs:
        positive = task.positive_position(t["window"], pos[t["qid"]])
        rewards += task.group_rewards([t["final_text"]], [t["n_valid_calls"]], positive, reward, tools_on)
        hits.setdefault((t["qid"], t["window_start"]), []).append(task.positive_rank(t["final_text"], positive) == 1)
    n = max(1, len(trajs))
    return {"format_valid": 100 * sum(task.is_well_formed(t["final_text"]) for t in trajs) / n,
            "tool_call_rate": 100 * sum(t["n_valid_calls"] > 0 for t in trajs) / n,
            "mean_generated_tokens": sum(t["n_generated"] for t in trajs) / n, "mean_reward": sum(rewards) / n}, hits


def policy_row(arm, sd, reward, pos):
    """One policy's numbers: greedy R@1/R@5/MRR and trajectory stats, sampled R@1 and pass@k, GRPO's extras."""
    if arm == "stage0":
        m = common.read_json(f"{out}/stage0/metrics.json")["average"]
        return {"R@1": m["R@1"], "R@5": m["R@5"], "MRR": m["MRR"]}
    tools_on = "notool" not in arm
    greedy = eval_dir(arm, sd, reward, "rerank")
    m = common.read_json(f"{greedy}/metrics.json")["average"]
    row = {"R@1": m["R@1"], "R@5": m["R@5"], "MRR": m["MRR"]}
    stats, _ = trajectory_stats(f"{greedy}/trajectories.jsonl", tools_on, reward, pos)
    row.update(stats)
    sampled, hits = trajectory_stats(f"{eval_dir(arm, sd, reward, 'sample')}/trajectories.jsonl", tools_on, reward, pos)
    row["sampled_R@1"] = 100 * sum(sum(h) / len(h) for h in hits.values()) / max(1, len(hits))
    if min(len(h) for h in hits.values()) > 1:  # SFT's k samples (one elsewhere: no pass@k)
        row["pass@k"] = 100 * sum(any(h) for h in hits.values()) / max(1, len(hits))
    row["sampled_tool_call_rate"] = sampled["tool_call_rate"]
    if arm in GRPO_ARMS:
        log = common.read_jsonl(f"{run_dir(arm, sd, reward)}/log.jsonl")
        evals = common.read_jsonl(f"{run_dir(arm, sd, reward)}/eval.jsonl")
        row["zero_var_groups"] = 100 * sum(s["zero_std_groups"] for s in log) / max(1, len(log))
        row["heldout_top1_start"], row["heldout_top1_end"] = 100 * evals[0]["top1"], 100 * evals[-1]["top1"]
        row["heldout_top1_min"] = 100 * min(e["top1"] for e in evals)
        best = common.read_json(f"{run_dir(arm, sd, reward)}/best/best.json")  # the evaluation whose weights the row is
        row["heldout_top1_best"], row["best_step"] = 100 * best["top1"], best["step"]
    return row


def mean_row(rows):
    """The seeds' rows -> {key: (mean, [per seed])}."""
    return {k: (sum(r[k] for r in rows) / len(rows), [r[k] for r in rows]) for k in rows[0]}


def cell(v, p=1):
    if v is None:
        return "-"
    mean, per_seed = v
    if len(per_seed) == 1:
        return f"{mean:.{p}f}"
    return f"{mean:.{p}f} ({', '.join(f'{x:.{p}f}' for x in per_seed)})"


def reward_table(reward, seeds, pos, grpo_arms):
    """The rows of one reward's table: {arm: {key: (mean, per seed)}} (stage 0 and the base: one value; a GRPO
    arm not run with this reward: empty)."""
    table = {}
    for _, arm in ROWS:
        per_seed = seeds if arm not in ("stage0", "base") else seeds[:1]
        table[arm] = {} if arm in GRPO_ARMS and arm not in grpo_arms else mean_row([policy_row(arm, sd, reward, pos) for sd in per_seed])
    return table


def markdown_table(table, pass_k, temperature):
    g = lambda row, k, p=1: cell(row.get(k), p)  # noqa: E731
    lines = [f"| stage | R@1 greedy | R@1 sampled (T {temperature}) | pass@{pass_k} | MRR | mean reward | format valid % | "
             "tool calls % | zero-var groups % | held-out greedy top-1: first → last eval; best (its step) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, arm in ROWS:
        r = table[arm]
        watch = "-" if "heldout_top1_start" not in r else (
            f"{g(r, 'heldout_top1_start')} → {g(r, 'heldout_top1_end')}; {g(r, 'heldout_top1_best')} "
            f"(step {', '.join(str(x) for x in r['best_step'][1])})")
        lines.append(f"| {label} | {g(r, 'R@1')} | {g(r, 'sampled_R@1')} | {g(r, 'pass@k')} | {g(r, 'MRR')} | "
                     f"{g(r, 'mean_reward', 3)} | {g(r, 'format_valid')} | {g(r, 'tool_call_rate')} | "
                     f"{g(r, 'zero_var_groups')} | {watch} |")
    return "\n".join(lines)


def margins(table):
    """The orderings the toy is built to show, as differences of the seeds' mean greedy R@1."""
    r1 = {arm: row["R@1"][0] for arm, row in table.items() if row}
    pairs = {"RSFT - SFT": ("rsft", "sft"), "SFT+RSFT+GRPO - SFT+RSFT": ("grpo", "rsft"), "SFT+GRPO - SFT": ("sft_grpo", "sft"),
             "GRPO with tools - GRPO without": ("grpo", "grpo_notool")}
    found = {name: r1[a] - r1[b] for name, (a, b) in pairs.items() if a in r1 and b in r1}
    return {**found, "SFT pass@k - SFT sampled R@1": table["sft"]["pass@k"][0] - table["sft"]["sampled_R@1"][0]}


def svg_chart(title, series):
    """One line chart as inline SVG: series = {name: (colour, dashed, [(x, y)...])}, y scaled to the values' range."""
    w, h, pad = 300, 150, 28
    points = [p for _, _, ps in series.values() for p in ps] or [(0, 0.0)]
    lo, hi = min([y for _, y in points] + [0.0]), max([y for _, y in points] + [1.0])
    xmax = max(x for x, _ in points) or 1
    x = lambda v: pad + (w - 2 * pad) * v / xmax  # noqa: E731
    y = lambda v: h - pad - (h - 2 * pad) * ((v - lo) / (hi - lo or 1))  # noqa: E731
    dash = ' stroke-dasharray="5,3"'
    lines = [f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash if dashed else ""} '
             f'points="{" ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in ps)}"/>' for colour, dashed, ps in series.values()]
    axes = (f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#999"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#999"/>'
            f'<text x="{pad}" y="16" font-size="12">{title}</text>'
            f'<text x="2" y="{pad + 4}" font-size="10">{hi:.2f}</text><text x="2" y="{h - pad}" font-size="10">{lo:.2f}</text>'
            f'<text x="{w - pad - 30}" y="{h - 8}" font-size="10">step {xmax}</text>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">{axes}{"".join(lines)}</svg>'


def reward_charts(curves, evals, seeds):
    """The charts of one reward's GRPO arms: each CURVES value per step, then the held-out greedy top-1; one
    colour per arm, the first seed solid, the others dashed."""
    arms = list(curves)
    charts = [svg_chart(key, {f"{a} {sd}": (COLOURS[a], i > 0, [(s["step"], s[key]) for s in curves[a][sd]])
                              for a in arms for i, sd in enumerate(seeds)}) for key in CURVES]
    return charts + [svg_chart("held-out greedy top1", {f"{a} {sd}": (COLOURS[a], i > 0, [(e["step"], e["top1"]) for e in evals[a][sd]])
                                                        for a in arms for i, sd in enumerate(seeds)})]


def write_html(md, curves, evals, seeds):
    """results.html: GRPO's training curves (grpo.py's log.jsonl) and held-out greedy top-1 (eval.jsonl) per
    reward, then the results as text; results_curves.svg: the same charts as one picture (a row per reward)."""
    body, rows = [], []
    w, h, top = 300, 150, 22  # svg_chart's size, and a legend line above each row
    for i, reward in enumerate(curves):
        charts = reward_charts(curves[reward], evals[reward], seeds)
        legend = " ".join(f'<span style="color:{COLOURS[a]}">&#9632; {a}</span>' for a in curves[reward])
        body.append(f"<h2>GRPO, reward {reward}</h2><p>{legend} (seed {seeds[0]} solid, others dashed)</p><div>{''.join(charts)}</div>")
        y0 = i * (h + top)
        legend = " ".join(f'<tspan fill="{COLOURS[a]}">&#9632; {a}</tspan>' for a in curves[reward])
        rows.append(f'<text x="4" y="{y0 + 15}" font-size="12">GRPO, reward {reward}: {legend} (seed {seeds[0]} solid, '
                    f'others dashed)</text>' + "".join(c.replace("<svg ", f'<svg x="{j * w}" y="{y0 + top}" ', 1)
                                                       for j, c in enumerate(charts)))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>toy results</title></head><body>"
            f"{''.join(body)}<pre>{html.escape(md)}</pre></body></html>")
    common.atomic_write(f"{out}/results.html", lambda f: f.write(page))
    picture = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * (len(CURVES) + 1)}" height="{len(curves) * (h + top)}">'
               f'<rect width="100%" height="100%" fill="white"/>{"".join(rows)}</svg>')
    common.atomic_write(f"{out}/results_curves.svg", lambda f: f.write(picture))


def write(seeds, rewards, compare_arms, pass_k, temperature, quick, record, machine, probe):
    """results.md, .json and .html from the finished stages' files. rewards[0] ran every GRPO arm, the others
    compare_arms. record: run.py's stage times."""
    pos = positives()
    grpo_arms = {r: [a for a in GRPO_ARMS if r == rewards[0] or a in compare_arms] for r in rewards}
    tables = {reward: reward_table(reward, seeds, pos, grpo_arms[reward]) for reward in rewards}
    curves = {r: {a: {sd: common.read_jsonl(f"{run_dir(a, sd, r)}/log.jsonl") for sd in seeds} for a in grpo_arms[r]} for r in rewards}
    evals = {r: {a: {sd: common.read_jsonl(f"{run_dir(a, sd, r)}/eval.jsonl") for sd in seeds} for a in grpo_arms[r]} for r in rewards}
    times, threads, total = record["seconds"], record["threads"], record["wall"]
    n_test = sum(len(common.read_jsonl(f"{data}/{name}")) for name in TEST_QUERIES)
    md = (f"# Toy results ({'quick mode: plumbing only' if quick else 'full run'})\n\n"
          f"Test split of the toy benchmark, {n_test} queries, rerank of the stage-0 top 5; seeds {', '.join(map(str, seeds))} "
          f"(the mean, each seed's value in brackets; stage 0 and the base model are trained once). Wall time of the "
          f"whole run (this machine): {total / 60:.1f} min; its fp32 matmul speed: {machine['matmul_gflops']:.0f} GFLOP/s "
          f"on {machine['threads']} threads.\n")
    for reward, table in tables.items():
        md += f"\n## GRPO reward: {reward}\n\nGRPO arms run with this reward: {', '.join(grpo_arms[reward])} (the others: -).\n\n" \
            + markdown_table(table, pass_k, temperature) + "\n\nMargins (mean greedy R@1): " \
            + ", ".join(f"{k} {v:+.1f}" for k, v in margins(table).items()) + "\n"
    md += (f"\nBase model's verdicts, teacher-forced on the first {probe['drills']} compare drills: \"yes\" right in "
           f"{probe['yes_right']} of {probe['yes_places']}, \"no\" in {probe['no_right']} of {probe['no_places']}.\n\n"
           "Stage wall times in s (threads); stages ran side by side on the cores, so they sum to more than the whole: "
           + ", ".join(f"{k} {v:.0f} ({threads[k]})" for k, v in times.items()) + "\n")
    common.atomic_write(f"{out}/results.md", lambda f: f.write(md))
    write_html(md, curves, evals, seeds)
    common.write_json(f"{out}/results.json", {
        "tables": {r: {arm: {k: {"mean": v[0], "per_seed": v[1]} for k, v in row.items()} for arm, row in t.items()}
                   for r, t in tables.items()},
        "margins": {r: margins(t) for r, t in tables.items()}, "seeds": seeds, "pass_k": pass_k, "temperature": temperature,
        "grpo_curves": curves, "grpo_heldout_evals": evals, "stage_seconds": times, "stage_threads": threads,
        "total_seconds": total, "quick": quick, "machine": machine, "base_verdict_probe": probe, "test_queries": n_test})
    print(md)
    return tables
