"""
The whole toy pipeline in one command, on 2 CPU cores, from a fresh clone (after the install line):

    python data/toy/run.py                  # ~15 min on 2 cores (README): out/toy/results.md, .json, .html
    python data/toy/run.py --quick=True --out=out/toy_quick   # minutes: tiny step counts (the smoke test)

prepare -> embed (stage 0) -> retrieve -> vision pretraining + verdict drills + warm-up (the base model: the
toy's stand-in for a pretrained VLM, docs/spec.md §9) -> cold-start SFT -> RSFT -> GRPO, each reranker stage evaluated on the
test split (rollout.py over the stage-0 top 5, then evaluate.py); plus the no-tools ablation, which shares
everything before cold-start SFT: SFT on the same windows without tools, then GRPO without tools.
Every stage is the command a user would type (printed as it starts), run as its own process as soon as
the stages it needs are done: on 2 cores the verdict drills run beside the vision tower's pretraining and
stage 0, and the no-tools branch beside the tools branch, one thread each. A stage whose output exists is
skipped, so a rerun resumes after the last finished stage (the stages resume inside, too); results are
written when all stages are done. Seeds are fixed.
"""

import html
import os
import subprocess
import sys
import time

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
out = "out/toy"            # every stage's output goes under it
data = "data/toy"          # the generated benchmark
quick = False              # tiny step counts and splits: checks the plumbing, not the numbers
seed = 1337
cores = 0                  # CPU cores the stages share (0 = all this process may use)
# -----------------------------------------------------------------------------

TEST = ("query/test/mbeir_toyt2i_task0_test.jsonl,query/test/mbeir_toycir_task7_test.jsonl",
        "cand_pool/test/mbeir_toyt2i_task0_test_cand_pool.jsonl,cand_pool/test/mbeir_toycir_task7_test_cand_pool.jsonl")
TRAIN = ("query/train/mbeir_toyt2i_task0_train.jsonl,query/train/mbeir_toycir_task7_train.jsonl",
         "cand_pool/train/mbeir_toyt2i_task0_train_cand_pool.jsonl,cand_pool/train/mbeir_toycir_task7_train_cand_pool.jsonl")
QRELS = "qrels/test/mbeir_toyt2i_task0_test_qrels.txt,qrels/test/mbeir_toycir_task7_test_qrels.txt"


def settings(quick):
    """Step counts and sizes of every stage: (full run, quick run)."""
    pick = lambda full, small: small if quick else full  # noqa: E731
    return {
        "prepare": [f"--n_train={pick(1536, 24)}", f"--n_test={pick(100, 6)}"],
        "embed": [f"--embed_train_steps={pick(300, 4)}", f"--embed_batch_size={pick(64, 16)}"],
        "cold_start": [f"--n_warmup={pick(6000, 48)}", f"--n_windows={pick(3000, 8)}", f"--n_restate={pick(3000, 8)}",
                       f"--n_compare={pick(3000, 8)}",
                       "--blind_marks=checks"],  # an imperfect teacher: SFT inherits its blind spot, RL corrects it
        "vision": [f"--vision_steps={pick(2000, 4)}"],
        "drills": [f"--epochs={pick(8, 1)}", "--batch_size=32", "--learning_rate=1e-3", "--stop_loss=0.006"],
        "warmup": [f"--epochs={pick(2, 1)}", "--batch_size=32", "--learning_rate=1e-3"],
        "sft": [f"--epochs={pick(0.5, 0.2)}", "--batch_size=8", "--learning_rate=1e-3", "--log_every=50"],
        "rsft": [f"--n_queries={pick(128, 4)}", "--n_samples=4", "--batch_queries=8", "--epochs=1", "--batch_size=8",
                 "--learning_rate=1e-4", "--temperature=0.7", f"--max_new_tokens={pick(256, 48)}", "--require_tool=True"],
        "grpo": [f"--max_steps={pick(30, 2)}", f"--prompts_per_step={pick(8, 2)}", f"--group_size={pick(8, 2)}",
                 "--learning_rate=2e-5", "--warmup_steps=2", "--temperature=0.7", f"--max_new_tokens={pick(256, 48)}", "--micro_batch_size=8"],
        "rerank": ["--batch_queries=100", "--max_response_tokens=2048", f"--max_new_tokens={pick(256, 48)}"],
    }


def stages(quick):
    """(name, command, the file it leaves when done, the stages it needs first), longest path first: the
    scheduler starts ready stages in this order."""
    s = settings(quick)
    py = [sys.executable]
    o, d = out, data
    common_args = [f"{o}/config.py"]  # config/toy.py with this run's paths and seed (main writes it)
    qrels = "--qrels=" + ",".join(f"{d}/{q}" for q in QRELS.split(","))
    run = [
        ("prepare", py + ["data/toy/prepare.py", f"--out_dir={d}", f"--seed={seed}"] + s["prepare"], f"{d}/meta.json", []),
        ("cold_start", py + ["data/toy/cold_start.py"] + common_args + [f"--out_dir={d}/sft"] + s["cold_start"],
         f"{d}/sft/cold_start.jsonl", ["prepare"]),
        # the verdict (is the tag read the wanted one?) on its own first: inside the warm-up mix it formed late and
        # only by chance, and once the mix had settled on "no" the drills could not move it; alone it formed after
        # ~300 to ~590 steps of 32 over 3 inits (README). The loss sits near 0.03 while the verdict is at chance
        # (ln 2 on ~2.5 of a drill's ~51 trained tokens) and falls to ~0.004 once it is learned, so the drills
        # stop below 0.006 (~540 of this init's 752 steps). Text only, so they train the scratch model's language
        # model while the vision stage trains its tower (the warm-up joins the two)
        ("drills", py + ["sft.py"] + common_args + ["--init_from=scratch", "--sft_data=sft/warmup_compare.jsonl",
                                                    f"--out_dir={o}/drills", "--freeze_vision=True"] + s["drills"],
         f"{o}/drills/model/trainer_state.json", ["cold_start"]),
        ("embed", py + ["embed.py"] + common_args + [f"--embed_out_dir={o}/embed", f"--query_files={TEST[0]},{TRAIN[0]}",
                                                      f"--pool_files={TEST[1]},{TRAIN[1]}"] + s["embed"],
         f"{o}/embed/emb/mbeir_toycir_task7_train_cand_pool.npy", ["prepare"]),
        ("vision", py + ["data/toy/vision_pretrain.py"] + common_args + [f"--out_dir={o}/vision"] + s["vision"],
         f"{o}/vision/config.json", ["cold_start"]),
        ("retrieve_test", py + ["retrieve.py"] + common_args + [f"--emb_dir={o}/embed/emb", f"--ranked={o}/ranked_test.jsonl"],
         f"{o}/ranked_test.jsonl", ["embed"]),
        ("retrieve_train", py + ["retrieve.py"] + common_args + [f"--emb_dir={o}/embed/emb", f"--ranked={o}/ranked_train.jsonl",
                                                                 f"--query_files={TRAIN[0]}", f"--pool_files={TRAIN[1]}"],
         f"{o}/ranked_train.jsonl", ["embed"]),
        ("stage0_eval", py + ["evaluate.py", f"--ranked={o}/ranked_test.jsonl", f"--out={o}/stage0/metrics.json", qrels],
         f"{o}/stage0/metrics.json", ["retrieve_test"]),
        ("cold_start_notool", py + ["data/toy/cold_start.py"] + common_args + [f"--out_dir={d}/sft_notool", "--use_tools=False",
                                                                              "--n_warmup=0", "--n_windows=0", "--n_restate=0",
                                                                              "--n_compare=0"], f"{d}/sft_notool/cold_start.jsonl",
         ["prepare"]),
        # the drills are not in the warm-up's mix: without them the base still judged 476 of 501 right and SFT
        # after it reached the ceiling (README), and the warm-up is 750 steps instead of 938
        ("warmup", py + ["sft.py"] + common_args + [f"--init_from={o}/drills/model", f"--vision_from={o}/vision",
                                                    "--sft_data=sft/warmup.jsonl,sft/warmup_windows.jsonl,sft/warmup_queries.jsonl",
                                                    f"--out_dir={o}/base", "--freeze_vision=True"] + s["warmup"],
         f"{o}/base/model/trainer_state.json", ["drills", "vision"]),
        ("sft", py + ["sft.py"] + common_args + [f"--init_from={o}/base/model", "--sft_data=sft/cold_start.jsonl",
                                                 f"--out_dir={o}/sft"] + s["sft"], f"{o}/sft/model/trainer_state.json", ["warmup"]),
        ("rsft", py + ["rsft.py"] + common_args + [f"--policy={o}/sft/model", f"--out_dir={o}/rsft", f"--ranked_train={o}/ranked_train.jsonl"]
         + s["rsft"], f"{o}/rsft/model/trainer_state.json", ["sft", "retrieve_train"]),
        ("grpo", py + ["grpo.py"] + common_args + [f"--policy={o}/rsft/model", f"--out_dir={o}/grpo", f"--ranked_train={o}/ranked_train.jsonl"]
         + s["grpo"], f"{o}/grpo/model/trainer_state.json", ["rsft"]),
        ("sft_notool", py + ["sft.py"] + common_args + [f"--init_from={o}/base/model", "--sft_data=sft_notool/cold_start.jsonl",
                                                        f"--out_dir={o}/sft_notool"] + s["sft"], f"{o}/sft_notool/model/trainer_state.json",
         ["warmup", "cold_start_notool"]),
        ("grpo_notool", py + ["grpo.py"] + common_args + [f"--policy={o}/sft_notool/model", f"--out_dir={o}/grpo_notool", "--use_tools=False",
                                                          f"--ranked_train={o}/ranked_train.jsonl"] + s["grpo"],
         f"{o}/grpo_notool/model/trainer_state.json", ["sft_notool", "retrieve_train"]),
    ]
    # each policy reranks the test split once it is trained; the reranks come after every training stage in
    # this order, so that a free core goes to the sft -> rsft -> grpo chain first (the longest path)
    reranks = []
    for name, tag, policy, tools_on in [("warmup", "base", f"{o}/base/model", True), ("sft", "sft", f"{o}/sft/model", True),
                                        ("rsft", "rsft", f"{o}/rsft/model", True), ("grpo", "grpo", f"{o}/grpo/model", True),
                                        ("sft_notool", "sft_notool", f"{o}/sft_notool/model", False),
                                        ("grpo_notool", "grpo_notool", f"{o}/grpo_notool/model", False)]:
        reranks.append((f"{tag}_rerank", py + ["rollout.py"] + common_args + [
            f"--policy={policy}", f"--out_dir={o}/rerank_{tag}", f"--ranked_in={o}/ranked_test.jsonl",
            f"--use_tools={tools_on}"] + s["rerank"], f"{o}/rerank_{tag}/reranked.jsonl.done", [name, "retrieve_test"]))
        reranks.append((f"{tag}_eval", py + ["evaluate.py", f"--ranked={o}/rerank_{tag}/reranked.jsonl", qrels],
                        f"{o}/rerank_{tag}/metrics.json", [f"{tag}_rerank"]))
    return run + reranks


ROWS = [("stage-0 (embedder)", "stage0", None), ("warm-up base, zero-shot", "base", "warmup"), ("SFT", "sft", "sft"),
        ("SFT + RSFT", "rsft", "rsft"), ("SFT + RSFT + GRPO", "grpo", "grpo"),
        ("no tools: SFT", "sft_notool", "sft_notool"), ("no tools: SFT + GRPO", "grpo_notool", "grpo_notool")]


def trajectory_stats(path, tools_on):
    """Answer-format validity, tool-call rate, mean generated tokens and mean GRPO reward (paper variant, the
    reward that stage's GRPO would give) over a rerank's trajectories."""
    import task
    trajs = common.read_jsonl(path)
    positives = {}
    for name in TEST[0].split(","):
        positives.update({q["qid"]: q["pos_cand_list"] for q in common.read_jsonl(f"{data}/{name}")})
    rewards = []
    for t in trajs:
        positive = task.positive_position(t["window"], positives[t["qid"]])
        rewards += task.group_rewards([t["final_text"]], [t["n_valid_calls"]], positive, "paper", tools_on)
    n = max(1, len(trajs))
    return {"format_valid": 100 * sum(task.is_well_formed(t["final_text"]) for t in trajs) / n,
            "tool_call_rate": 100 * sum(t["n_valid_calls"] > 0 for t in trajs) / n,
            "mean_generated_tokens": sum(t["n_generated"] for t in trajs) / n,
            "mean_reward": sum(rewards) / n}


def verdict_probe(model_dir, n=200):
    """The toy's fragile skill, measured directly: teacher-forced on the first n compare drills, how many of the
    " yes" and of the " no" verdict tokens the model predicts (argmax). A base model that says the same word
    everywhere leaves the verdict to SFT, which has then ranked at stage 0 however well it read the tags (README)."""
    import torch
    import sft
    processor = common.load_processor(model_dir, 784, 784)  # the drills hold no images
    tok = processor.tokenizer
    model = common.load_model(model_dir).eval()
    words = {w: tok(" " + w, add_special_tokens=False)["input_ids"] for w in ("yes", "no")}
    assert all(len(ids) == 1 for ids in words.values()), words
    drills = common.read_jsonl(f"{data}/sft/warmup_compare.jsonl")[:n]
    right = {w: [0, 0] for w in words}  # word -> [predicted, places]
    for i in range(0, len(drills), 8):
        examples = [sft.render(r, processor, data, (784, 784), (784, 784)) for r in drills[i:i + 8]]
        batch = common.collate(examples, processor, model.config.image_token_id, tok.pad_token_id)
        with torch.no_grad():
            predicted = model(**common.model_inputs(batch, "cpu")).logits[:, :-1].argmax(-1)  # (B, T-1)
        target, trained = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:] == 1
        for w, (token,) in words.items():
            at = trained & (target == token)
            right[w][0] += int((predicted[at] == token).sum())
            right[w][1] += int(at.sum())
    return {"drills": len(drills), "yes_right": right["yes"][0], "yes_places": right["yes"][1],
            "no_right": right["no"][0], "no_places": right["no"][1]}


def machine_speed():
    """This machine's fp32 matmul speed (best of 5, 1024x1024, torch's threads), written next to the wall
    times: the same stages have taken up to ~4x longer on one 2-core machine than on another."""
    import torch
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return {"matmul_gflops": round(2 * 1024 ** 3 / best / 1e9, 1), "threads": torch.get_num_threads()}


def results(record, machine):
    times, threads = record["seconds"], record["threads"]
    rows = []
    for label, tag, trained_by in ROWS:
        metric_dir = f"{out}/stage0" if tag == "stage0" else f"{out}/rerank_{tag}"
        m = common.read_json(f"{metric_dir}/metrics.json")["average"]
        row = {"stage": label, "R@1": m["R@1"], "R@5": m["R@5"], "MRR": m["MRR"]}
        if tag == "stage0":
            row.update(format_valid=None, tool_call_rate=None, mean_generated_tokens=None, mean_reward=None,
                       train_seconds=round(times.get("embed", 0)))
        else:
            row.update(trajectory_stats(f"{metric_dir}/trajectories.jsonl", "notool" not in tag))
            train = times.get(trained_by, 0) + (times.get("vision", 0) + times.get("drills", 0) if trained_by == "warmup" else 0)
            row["train_seconds"] = round(train)
            row["rerank_seconds"] = round(times.get(f"{tag}_rerank", 0))
        rows.append(row)
    fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = ["| stage | R@1 | R@5 | MRR | mean reward | format valid % | tool-call rate % | mean generated tokens | train s | rerank s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {fmt(r['R@1'])} | {fmt(r['R@5'])} | {fmt(r['MRR'])} | {fmt(r['mean_reward'], 3)} | {fmt(r['format_valid'])} | "
                     f"{fmt(r['tool_call_rate'])} | {fmt(r['mean_generated_tokens'], 0)} | {r['train_seconds']} | "
                     f"{r.get('rerank_seconds', '-')} |")
    probe = verdict_probe(f"{out}/base/model")  # the base's own drills (a policy's are its trajectories)
    total = record["wall"]
    md = (f"# Toy results ({'quick mode: plumbing only' if quick else 'full run'})\n\n"
          f"Test split of the toy benchmark, 200 queries, rerank of the stage-0 top 5. Wall time of the whole run "
          f"(this machine): {total / 60:.1f} min; its fp32 matmul speed: {machine['matmul_gflops']:.0f} GFLOP/s "
          f"on {machine['threads']} threads.\n\n" + "\n".join(lines) + "\n\nBase model's verdicts, teacher-forced on the "
          f"first {probe['drills']} compare drills: \"yes\" right in {probe['yes_right']} of {probe['yes_places']}, "
          f"\"no\" in {probe['no_right']} of {probe['no_places']}.\n\nStage wall times in s (threads); stages ran side "
          "by side on the cores, so they sum to more than the whole: "
          + ", ".join(f"{k} {v:.0f} ({threads[k]})" for k, v in times.items()) + "\n")
    curves = {run: common.read_jsonl(f"{out}/{run}/log.jsonl") for run in ("grpo", "grpo_notool")}
    md += "\nGRPO per step (reward, top-1, tool-call rate, zero-variance groups): " + "; ".join(
        f"{run} " + ", ".join(f"[{s['reward']:.3f} {s['top1']:.2f} {s['tool_rate']:.2f} {s['zero_std_groups']:.2f}]" for s in log)
        for run, log in curves.items()) + " (the curves: results.html)\n"
    common.atomic_write(f"{out}/results.md", lambda f: f.write(md))
    write_html(md, curves)
    common.write_json(f"{out}/results.json", {"rows": rows, "stage_seconds": times, "stage_threads": threads,
                                                "total_seconds": total, "quick": quick, "grpo_curves": curves,
                                                "machine": machine, "base_verdict_probe": probe})
    print(md)
    return rows


CURVES = ("reward", "top1", "tool_rate", "zero_std_groups")  # GRPO's per-step log values drawn in results.html
COLOURS = {"grpo": "#1f6fd1", "grpo_notool": "#e07b00"}


def svg_chart(title, series):
    """One line chart as inline SVG: series = {run: [y per step]}, y scaled to the values' own range."""
    w, h, pad = 300, 150, 28
    values = [v for ys in series.values() for v in ys] or [0.0]
    lo, hi = min(values + [0.0]), max(values + [1.0])
    steps = max((len(ys) for ys in series.values()), default=1)
    x = lambda i: pad + (w - 2 * pad) * (i / max(1, steps - 1))  # noqa: E731
    y = lambda v: h - pad - (h - 2 * pad) * ((v - lo) / (hi - lo or 1))  # noqa: E731
    lines = [f'<polyline fill="none" stroke="{COLOURS.get(run, "#444")}" stroke-width="2" '
             f'points="{" ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(ys))}"/>' for run, ys in series.items()]
    axes = (f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#999"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#999"/>'
            f'<text x="{pad}" y="16" font-size="12">{title}</text>'
            f'<text x="2" y="{pad + 4}" font-size="10">{hi:.2f}</text><text x="2" y="{h - pad}" font-size="10">{lo:.2f}</text>'
            f'<text x="{w - pad - 30}" y="{h - 8}" font-size="10">step {steps - 1}</text>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">{axes}{"".join(lines)}</svg>'


def write_html(md, curves):
    """results.html: the results and GRPO's training curves (grpo.py's log.jsonl) as pictures, no dependency."""
    legend = " ".join(f'<span style="color:{COLOURS[r]}">&#9632; {r}</span>' for r in curves)
    charts = "".join(svg_chart(k, {run: [step[k] for step in log] for run, log in curves.items()}) for k in CURVES)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>toy results</title></head><body>"
            f"<h2>GRPO training curves</h2><p>{legend}</p><div>{charts}</div>"
            f"<pre>{html.escape(md)}</pre></body></html>")
    common.atomic_write(f"{out}/results.html", lambda f: f.write(page))


ALONE = {"warmup"}  # the longest stage that nothing else can run beside: it waits for a free machine, gets every core


def run_all(todo, log_path):
    """Runs the stages as their inputs become ready, several at once when the cores allow: the free cores are
    split between the ready stages (OMP_NUM_THREADS); two stages on one core each get ~1.4x the work done of
    one stage on both (README). With the vision tower frozen the thread count changes a stage's speed, not
    its numbers (tests/test_sft.py). Each stage writes its output to {out}/logs/{name}.log."""
    ncores = cores or len(os.sched_getaffinity(0))
    record = common.read_json(log_path) if os.path.exists(log_path) else {"seconds": {}, "threads": {}, "wall": 0.0}
    wall_before, t_start = record["wall"], time.time()  # a resumed run adds its wall time to the earlier ones'
    finished = {name for name, _, done, _ in todo if os.path.exists(done)}
    pending = [s for s in todo if s[0] not in finished]
    running = {}  # name -> (process, log file, start time, threads, done path)
    bar = tqdm(total=len(todo), initial=len(finished), desc="toy pipeline", unit="stage")
    while pending or running:
        for name, (proc, log, t0, threads, done) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0:
                for other in running.values():
                    other[0].terminate()
                with open(log.name) as f:
                    tail = f.read()[-3000:]
                raise SystemExit(f"{tail}\nstage {name} failed (exit {proc.returncode}), log: {log.name}")
            if done.endswith(".done"):  # rollout.py resumes on its own: mark the stage finished only here
                common.atomic_write(done, lambda f: f.write("done\n"))
            record["seconds"][name], record["threads"][name] = time.time() - t0, threads
            record["wall"] = wall_before + time.time() - t_start
            common.write_json(log_path, record)
            finished.add(name)
            bar.update()
            tqdm.write(f"[{name}] done in {record['seconds'][name]:.0f}s")
        ready = [s for s in pending if all(n in finished for n in s[3])]
        free = ncores - sum(r[3] for r in running.values())
        starting = ready[:free]
        if any(s[0] in ALONE for s in ready) or any(name in ALONE for name in running):
            starting = [s for s in ready if s[0] in ALONE][:1] if not running else []
        for k, (name, cmd, done, _) in enumerate(starting):
            threads = free // len(starting) + (k < free % len(starting))
            # a trained vision tower's gradients depend on the thread count (tests/test_sft.py): these two stages
            # always get one, so that a rerun gives the same numbers however the stages overlapped
            threads = 1 if name in ("embed", "vision") else threads
            log = open(f"{out}/logs/{name}.log", "w")
            tqdm.write(f"\n[{name}] ({threads} thread{'s' * (threads > 1)}, log {log.name}) {' '.join(cmd[1:])}")
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
            running[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log, time.time(),
                             threads, done)
            pending.remove((name, cmd, done, _))
        if pending and not starting and not running:
            raise SystemExit(f"stages {[s[0] for s in pending]} wait for stages that never run")
        time.sleep(0.2)
    bar.close()
    return record


def write_run_config():
    """{out}/config.py: config/toy.py plus this run's paths and seed, the config file every stage gets."""
    with open("config/toy.py") as f:
        config = f.read()
    config += (f"\n# written by data/toy/run.py: this run's paths and seed\ndata_root = {data!r}\n"
               f"tokenizer_dir = {data + '/tokenizer'!r}\nseed = {seed}\nembed_out_dir = {out + '/embed'!r}\n"
               f"emb_dir = {out + '/embed/emb'!r}\nranked = {out + '/ranked_test.jsonl'!r}\n"
               f"ranked_in = {out + '/ranked_test.jsonl'!r}\nranked_train = {out + '/ranked_train.jsonl'!r}\n"
               f"qrels = {','.join(f'{data}/{q}' for q in QRELS.split(','))!r}\n")
    common.atomic_write(f"{out}/config.py", lambda f: f.write(config))


def main():
    os.chdir(ROOT)
    os.makedirs(f"{out}/logs", exist_ok=True)
    write_run_config()
    machine = machine_speed()
    record = run_all(stages(quick), f"{out}/stage_seconds.json")
    return results(record, machine)


if __name__ == "__main__":
    configure(globals())
    main()
