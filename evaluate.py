"""
Score a ranked JSONL file against M-BEIR-format qrels: print a markdown table and write metrics.json.

    python evaluate.py --ranked=out/mbeir/rerank/reranked.jsonl     # the 16 M-BEIR test sets' qrels by default
    python evaluate.py config/toy.py
    python evaluate.py --ranked=out/toy/ranked_test.jsonl --qrels=data/toy/qrels/test/mbeir_toyt2i_task0_test_qrels.txt,data/toy/qrels/test/mbeir_toycir_task7_test_qrels.txt --out=out/toy/metrics.json
    python evaluate.py --ranked=out/toy/ranked_test.jsonl --qrels=data/toy/qrels/test/mbeir_toyt2i_task0_test_qrels.txt --map_ks=5,10

ranked JSONL, one query per line, candidates best first:
    {"qid": "0:17", "task_id": 0, "cands": ["0:5", "0:9", ...], "scores": [0.91, 0.88, ...]}
qrels, one judgement per line (rel > 0 is a positive), one table row (group) per file and task_id:
    qid 0 did rel task_id
Ids are strings such as "9:123" and are never converted to numbers.
metrics.json: {group: {"n": int, "mbeir_R@5": %, "R@1": %, ...}, "average": {"n": total, "mbeir_R@k": %, ...}}

The paper's table for one benchmark (--benchmark=...): one row per group with the paper's metric, then the
plain mean over groups, printed after the full table and stored in metrics.json under "benchmark":
    mbeir    R@5 per task/dataset pair (R@10 for Fashion200K and FashionIQ); the paper averages 16 pairs
    circo    mAP@K for each K of map_ks (the paper's headline is mAP@5)
    genecis  R@1 within each query's gallery, per task (4 tasks), and their mean
    python evaluate.py --benchmark=mbeir --ranked=out/mbeir/rerank/reranked.jsonl
    python evaluate.py --benchmark=circo --ranked=out/circo/ranked.jsonl --qrels=data/circo/qrels/circo_val_qrels.txt
"""

import json
import os

import common

# ---- config
ranked = "out/mbeir/ranked_test.jsonl"  # ranked JSONL (qid, cands best first, scores)
qrels = ",".join("data/mbeir/" + f for f in common.mbeir_files("qrels").split(","))  # each file (and task_id in it) is one group
out = ""               # metrics.json path ('' = next to ranked as metrics.json)
recall_k = 5           # M-BEIR Recall@k cut-off (hit rate) used unless an override matches
recall_k_overrides = "fashion200k:10,fashioniq:10"  # dataset-name substrings with their own cut-off
map_ks = "5,10,25,50"  # CIRCO mAP@K values
benchmark = ""         # mbeir | circo | genecis: also print the paper's table (headline metric per group, mean)
# ----


def hit_at_k(ranked, positives, k):
    """M-BEIR "Recall@k" is a hit rate: 1 if any positive is in the top k (ranx hit_rate, trec_eval success)."""
    return float(any(c in positives for c in ranked[:k]))


def reciprocal_rank(ranked, positives):
    """1 / (1-based rank of the first positive), 0 if none is retrieved."""
    for rank, c in enumerate(ranked, 1):
        if c in positives:
            return 1.0 / rank
    return 0.0


def average_precision_at_k(ranked, positives, k):
    """CIRCO AP@K = sum_{i<=K} P@i * rel_i / min(K, |GT|).
    A repeated id keeps its slot but is relevant only at its first occurrence, so repeating a positive gains nothing."""
    if not positives:
        return 0.0
    seen, hits, total = set(), 0, 0.0
    for i, c in enumerate(ranked[:k], 1):
        if c in positives and c not in seen:
            hits += 1
            total += hits / i
        seen.add(c)
    return total / min(k, len(positives))


def genecis_recall_at_1(cands, scores, target):
    """GeneCIS R@1 over the query's gallery: 1 only if the target outscores every other candidate (ties count
    against it). target is one id, or a set of ids that all count as the target; 0 if it is not in the gallery."""
    targets = {target} if isinstance(target, str) else set(target)
    target_scores = [s for c, s in zip(cands, scores) if c in targets]
    other_scores = [s for c, s in zip(cands, scores) if c not in targets]
    if not target_scores:
        return 0.0
    return float(not other_scores or max(target_scores) > max(other_scores))


def mbeir_cutoff(group_name):
    """recall_k, or the override whose substring is in the group name (Fashion200K and FashionIQ report R@10)."""
    for pair in recall_k_overrides.split(","):
        if pair.strip():
            substring, k = pair.rsplit(":", 1)
            if substring.strip().lower() in group_name.lower():
                return int(k)
    return recall_k


def load_ranked(path):
    """Read and check a ranked JSONL file; returns a list of dicts with qid, cands and scores."""
    records, line_of_qid = [], {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON record ({e.msg})") from None
            if not isinstance(record, dict) or "qid" not in record or not isinstance(record.get("cands"), list):
                raise ValueError(f"{where}: a record needs a 'qid' and a 'cands' list")
            record["qid"] = qid = str(record["qid"])
            record["cands"] = [str(c) for c in record["cands"]]
            if record.get("scores") is None:  # no scores: the list order is the only signal
                record["scores"] = [-float(i) for i in range(len(record["cands"]))]
            if len(record["scores"]) != len(record["cands"]):
                raise ValueError(f"{where}: {len(record['cands'])} cands but {len(record['scores'])} scores")
            if qid in line_of_qid:
                raise ValueError(f"{where}: qid {qid!r} already appeared on line {line_of_qid[qid]}")
            line_of_qid[qid] = lineno
            records.append(record)
    return records


def qrels_group_name(path):
    """mbeir_fashioniq_task7_test_qrels.txt -> fashioniq_task7"""
    name = os.path.basename(path)
    name = name[len("mbeir_"):] if name.startswith("mbeir_") else name
    name = name[:-len("_qrels.txt")] if name.endswith("_qrels.txt") else os.path.splitext(name)[0]
    for split in ("_test", "_val", "_train"):
        if name.endswith(split):
            return name[:-len(split)]
    return name


def load_qrels(paths):
    """Read qrels files (a list or a comma-separated string) into {group: {qid: set of positive dids}}."""
    paths = [p.strip() for p in paths.split(",") if p.strip()] if isinstance(paths, str) else paths
    groups = {}
    for path in paths:
        positives_by_task = {}  # task_id -> {qid: set(did)}
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                cols = line.split()
                if len(cols) != 5:
                    raise ValueError(f"{path}:{lineno}: expected 5 columns 'qid 0 did rel task_id', got {len(cols)}")
                qid, _, did, rel, task_id = cols
                try:
                    rel = float(rel)
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: relevance {rel!r} is not a number") from None
                if rel > 0:
                    positives_by_task.setdefault(task_id, {}).setdefault(qid, set()).add(did)
        if not positives_by_task:
            raise ValueError(f"{path}: no positive judgements (rel > 0), so no queries to evaluate")
        base = qrels_group_name(path)
        for task_id, positives in positives_by_task.items():
            name = base
            if len(positives_by_task) > 1 and not base.endswith(f"_task{task_id}"):
                name = f"{base}_task{task_id}"
            if name in groups:
                raise ValueError(f"{path}: group {name!r} is already defined by an earlier qrels file")
            groups[name] = positives
    return groups


def query_metrics(cands, scores, positives, cutoff, ks):
    """Every metric of one query, as fractions in [0, 1]; the first key is the M-BEIR headline."""
    values = {f"mbeir_R@{cutoff}": hit_at_k(cands, positives, cutoff)}
    for k in (1, 5, 10):
        values[f"R@{k}"] = hit_at_k(cands, positives, k)
    values["MRR"] = reciprocal_rank(cands, positives)
    for k in ks:
        values[f"mAP@{k}"] = average_precision_at_k(cands, positives, k)
    values["GeneCIS_R@1"] = genecis_recall_at_1(cands, scores, positives)
    return values


def evaluate(ranked_records, qrels_by_group, exact=None):
    """Metrics per group and their plain average over groups, as percentages rounded to 2 decimals.
    exact, a dict if given, receives each group's unrounded means (fractions), for exact averages."""
    if not qrels_by_group:
        raise ValueError("no qrels groups to evaluate")
    by_qid = {}
    for record in ranked_records:
        if record["qid"] in by_qid:
            raise ValueError(f"qid {record['qid']!r} appears twice in the ranked records")
        by_qid[record["qid"]] = record
    ks = [int(k) for k in str(map_ks).split(",") if k.strip()]
    no_ranking = {"cands": [], "scores": []}
    metrics, fractions, judged = {}, {}, set()  # fractions: unrounded group means, so the average is exact
    for group, positives_by_qid in qrels_by_group.items():
        cutoff, sums, missing = mbeir_cutoff(group), {}, []
        for qid, positives in positives_by_qid.items():
            judged.add(qid)
            if qid not in by_qid:
                missing.append(qid)  # an unranked query is an empty ranking: a miss on every metric
            record = by_qid.get(qid, no_ranking)
            for name, value in query_metrics(record["cands"], record["scores"], positives, cutoff, ks).items():
                sums[name] = sums.get(name, 0.0) + value
        n = len(positives_by_qid)
        if missing:
            print(f"warning: {group}: {len(missing)} of {n} qrels queries are not in the ranked file, "
                  f"counted as misses (e.g. {', '.join(missing[:5])})")
        fractions[group] = {name: s / n for name, s in sums.items()}
        metrics[group] = {"n": n, **{name: round(100 * f, 2) for name, f in fractions[group].items()}}
    unjudged = len(set(by_qid) - judged)
    if unjudged:
        print(f"note: {unjudged} ranked queries are in no qrels file and were ignored")
    # the headline averages each group's own cut-off; every other metric is a plain mean over groups
    headline = [next(iter(f.values())) for f in fractions.values()]
    average = {"n": sum(m["n"] for m in metrics.values()), "mbeir_R@k": round(100 * sum(headline) / len(headline), 2)}
    for name in list(next(iter(fractions.values())))[1:]:
        average[name] = round(100 * sum(f[name] for f in fractions.values()) / len(fractions), 2)
    metrics["average"] = average
    if exact is not None:
        exact.update(fractions)
    return metrics


def format_table(metrics):
    """A markdown table: one row per group, then the average; column k is each group's M-BEIR cut-off."""
    columns = [c for c in metrics["average"] if c != "n"]
    lines = ["| group | n | k | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for group, m in metrics.items():
        headline_key = next(key for key in m if key.startswith("mbeir_R@"))
        k = "-" if group == "average" else headline_key.split("@")[1]
        values = [m[headline_key]] + [m[c] for c in columns[1:]]
        lines.append(f"| {group} | {m['n']} | {k} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines)


BENCHMARKS = ("mbeir", "circo", "genecis")


def headline_columns(name, group):
    """The paper's metric(s) of one group: (column label, key in the group's metrics) pairs."""
    if name == "mbeir":
        return [("R@k", f"mbeir_R@{mbeir_cutoff(group)}")]
    if name == "circo":
        return [(f"mAP@{k}", f"mAP@{k}") for k in str(map_ks).split(",") if k.strip()]
    if name == "genecis":
        return [("R@1", "GeneCIS_R@1")]
    raise ValueError(f"benchmark={name!r}: expected one of {', '.join(BENCHMARKS)}")


def benchmark_summary(metrics, exact, name):
    """{"name", "rows": {group: {label: %}}, "average": {label: %}, ...}: the paper's table. The average is the
    plain mean over groups of the unrounded group values (exact: evaluate()'s fractions)."""
    groups = list(exact)
    columns = {g: headline_columns(name, g) for g in groups}
    rows = {g: {label: metrics[g][key] for label, key in columns[g]} for g in groups}
    average = {}
    for i, (label, _) in enumerate(columns[groups[0]]):  # column i: each group's own key (M-BEIR: its own k)
        average[label] = round(100 * sum(exact[g][columns[g][i][1]] for g in groups) / len(groups), 2)
    cutoffs = {g: columns[g][0][1].split("@")[1] for g in groups} if name == "mbeir" else {}
    return {"name": name, "rows": rows, "average": average, "cutoffs": cutoffs, "n_groups": len(groups)}


def format_benchmark(summary):
    """The paper-style markdown table: one row per group, the mean last."""
    labels = list(summary["average"])
    mbeir = summary["name"] == "mbeir"
    head = ["group", "metric" if mbeir else None] + ([summary["name"] + " score"] if mbeir else labels)
    head = [h for h in head if h]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for g, row in summary["rows"].items():
        cells = [g] + ([f"R@{summary['cutoffs'][g]}"] if mbeir else []) + [f"{row[lab]:.2f}" for lab in labels]
        lines.append("| " + " | ".join(cells) + " |")
    avg = [f"average ({summary['n_groups']})"] + (["-"] if mbeir else []) + [f"{summary['average'][lab]:.2f}" for lab in labels]
    lines.append("| " + " | ".join(avg) + " |")
    return "\n".join(lines)


def main():
    if not ranked or not qrels:
        raise ValueError("set --ranked=path/to/ranked.jsonl and --qrels=a_qrels.txt[,b_qrels.txt,...]")
    if benchmark and benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark={benchmark!r}: expected one of {', '.join(BENCHMARKS)} or ''")
    exact = {}
    metrics = evaluate(load_ranked(ranked), load_qrels(qrels), exact)
    print(format_table(metrics))
    if benchmark:
        summary = benchmark_summary(metrics, exact, benchmark)
        print(f"\n{benchmark}, the paper's metric per group and the plain mean:\n" + format_benchmark(summary))
        if benchmark == "mbeir" and summary["n_groups"] != 16:
            print(f"note: {summary['n_groups']} groups; the paper's M-BEIR average is over 16 task/dataset pairs")
        metrics["benchmark"] = summary
    out_path = out or os.path.join(os.path.dirname(ranked), "metrics.json")
    common.write_json(out_path, metrics)
    print(f"wrote {out_path}")
    return metrics


if __name__ == "__main__":
    from configurator import configure
    config = configure(globals())
    main()
