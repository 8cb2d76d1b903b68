"""
The whole toy pipeline in one command, on 2 CPU cores, from a fresh clone (after the install line):

    python data/toy/run.py                  # see the README for its wall time: out/toy/results.md, .json, .html
    python data/toy/run.py --quick=True --out=out/toy_quick   # minutes: tiny step counts (the smoke test)
    python data/toy/run.py --base=build --ship_base=True      # also rebuild the shipped base model (~12 min more)

prepare -> embed (stage 0) -> retrieve, and from the base model (data/toy/base_model, the toy's stand-in for
a pretrained VLM, docs/spec.md §9; --base=build trains it here: vision pretraining + verdict drills +
warm-up) -> cold-start SFT -> RSFT -> GRPO, plus SFT -> GRPO (the paper's SFT + RL) and the no-tools
ablation (SFT on the same windows without tools, then GRPO without tools). RSFT and GRPO work on the
training queries the cold-start teacher left without a trajectory. Every stage after the base runs once
per seed; every GRPO arm runs with the first reward, compare_arms with the others too. Each policy
reranks the test split (rollout.py over the stage-0 top 5) greedily, scored by evaluate.py, and sampled at
GRPO's temperature (SFT pass_k times).
Every stage is the command a user would type (printed as it starts), run as its own process as soon as
the stages it needs are done, one thread each when two are ready. A stage whose output exists is
skipped, so a rerun resumes after the last finished stage (the stages resume inside, too); results
(data/toy/report.py) are written when all stages are done. Seeds are fixed.
"""

import os
import subprocess
import sys
import time

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data", "toy"))
import common  # noqa: E402
import report  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
out = "out/toy"            # every stage's output goes under it
data = "data/toy"          # the generated benchmark
quick = False              # tiny step counts and splits: checks the plumbing, not the numbers
seed = 1337
cores = 0                  # CPU cores the stages share (0 = all this process may use)
seeds = 2                  # training seeds (seed, seed + 1, ...): every stage after the base model runs once per seed
rewards = "paper,release"  # GRPO's rewards (docs/spec.md §4), one table each: the first runs every GRPO arm, ...
compare_arms = "grpo"      # ... the others these (grpo = SFT + RSFT + GRPO, sft_grpo, grpo_notool): the time budget
pass_k = 8                 # SFT's test samples per query at GRPO's temperature: sampled R@1 (their mean) and pass@k
base = "data/toy/base_model"  # the base model every reranker starts from: the shipped checkpoint, or "build" to
                           # train it here (vision pretraining, verdict drills, warm-up: ~12 min on 2 cores)
ship_base = False          # with base=build: save the built base as data/toy/base_model (bf16) with its probe
# -----------------------------------------------------------------------------

TEST = ("query/test/mbeir_toyt2i_task0_test.jsonl,query/test/mbeir_toycir_task7_test.jsonl",
        "cand_pool/test/mbeir_toyt2i_task0_test_cand_pool.jsonl,cand_pool/test/mbeir_toycir_task7_test_cand_pool.jsonl")
TRAIN = ("query/train/mbeir_toyt2i_task0_train.jsonl,query/train/mbeir_toycir_task7_train.jsonl",
         "cand_pool/train/mbeir_toyt2i_task0_train_cand_pool.jsonl,cand_pool/train/mbeir_toycir_task7_train_cand_pool.jsonl")
QRELS = "qrels/test/mbeir_toyt2i_task0_test_qrels.txt,qrels/test/mbeir_toycir_task7_test_qrels.txt"


def settings(quick):
    """Step counts and sizes of every stage: (full run, quick run)."""
    pick = lambda full, small: small if quick else full  # noqa: E731
    temperature = 0.7  # RSFT's and GRPO's sampling, and the sampled test evaluation
    return {
        "temperature": temperature,
        "prepare": [f"--n_train={pick(1536, 24)}", f"--n_test={pick(100, 6)}"],
        "embed": [f"--embed_train_steps={pick(300, 4)}", f"--embed_batch_size={pick(64, 16)}"],
        "cold_start": [f"--n_warmup={pick(6000, 48)}", f"--n_windows={pick(3000, 8)}", f"--n_restate={pick(3000, 8)}",
                       f"--n_compare={pick(3000, 8)}",
                       "--blind_marks=checks:0.99,diagonal:0.97"],  # an imperfect teacher (README)
        "vision": [f"--vision_steps={pick(2000, 4)}"],
        "drills": [f"--epochs={pick(8, 1)}", "--batch_size=32", "--learning_rate=1e-3", "--stop_loss=0.006"],
        "warmup": [f"--epochs={pick(2, 1)}", "--batch_size=32", "--learning_rate=1e-3"],
        "sft": [f"--epochs={pick(1.0, 0.2)}", "--batch_size=8", "--learning_rate=1e-3", "--log_every=50"],
        # RSFT and GRPO on the training queries the teacher left without a trajectory (its failures); RSFT keeps
        # only answers that rank the window (rsft.py require_ranking), kept for 8 and 21 of its 64 queries
        # on the two seeds (lab notes)
        "rsft": ["--exclude_queries_in=sft/cold_start.jsonl", f"--n_queries={pick(64, 4)}", "--n_samples=4", "--batch_queries=8", "--epochs=1", "--batch_size=8",
                 "--learning_rate=1e-4", f"--temperature={temperature}", f"--max_new_tokens={pick(256, 48)}", "--require_tool=True"],
        # 16 samples of 2 prompts a step, 30 steps: more groups that hold a rare right verdict, and twice the
        # updates of 4 prompts x 15 steps for the same rollouts (lab notes); 64 held-out training queries of
        # every kind watched every 5 steps, the best one the GRPO row: a later step only on a paired gain over
        # the best so far of z > 2 (a gain of 1 to 6 of the 64 kept three rows below their start: lab notes)
        "grpo": [f"--max_steps={pick(30, 2)}", "--prompts_per_step=2", f"--group_size={pick(16, 2)}",
                 "--learning_rate=1e-4", "--warmup_steps=2", f"--temperature={temperature}", f"--max_new_tokens={pick(256, 48)}",
                 "--micro_batch_size=8", f"--eval_prompts={pick(64, 2)}", f"--eval_every={pick(5, 1)}", "--best_min_z=2.0",
                 "--exclude_queries_in=sft/cold_start.jsonl"],
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
    building = base == "build" or quick  # quick mode builds a tiny base: the build's plumbing, tested in CI
    base_dir, base_stage = (f"{o}/base/model", ["warmup"]) if building else (base, [])
    warmup_data = [] if building else ["--n_warmup=0", "--n_windows=0", "--n_restate=0"]  # only the build needs them
    run = [
        ("prepare", py + ["data/toy/prepare.py", f"--out_dir={d}", f"--seed={seed}"] + s["prepare"], f"{d}/meta.json", []),
        ("cold_start", py + ["data/toy/cold_start.py"] + common_args + [f"--out_dir={d}/sft"] + s["cold_start"] + warmup_data,
         f"{d}/sft/cold_start.jsonl", ["prepare"]),
    ]
    build = [  # the base model, when it is built here
        # the verdict (is the tag read the wanted one?) on its own first: inside the warm-up mix it formed late and
        # only by chance, and once the mix had settled on "no" the drills could not move it; alone it formed after
        # ~300 to ~590 steps of 32 over 3 inits (README). The loss sits near 0.03 while the verdict is at chance
        # (ln 2 on ~2.5 of a drill's ~51 trained tokens) and falls to ~0.004 once it is learned, so the drills
        # stop below 0.006 (~540 of this init's 752 steps). Text only, so they train the scratch model's language
        # model while the vision stage trains its tower (the warm-up joins the two)
        ("drills", py + ["sft.py"] + common_args + ["--init_from=scratch", "--sft_data=sft/warmup_compare.jsonl",
                                                    f"--out_dir={o}/drills", "--freeze_vision=True"] + s["drills"],
         f"{o}/drills/model/trainer_state.json", ["cold_start"]),
        ("vision", py + ["data/toy/vision_pretrain.py"] + common_args + [f"--out_dir={o}/vision"] + s["vision"],
         f"{o}/vision/config.json", ["cold_start"]),
    ]
    stage0 = [
        ("embed", py + ["embed.py"] + common_args + [f"--embed_out_dir={o}/embed", f"--query_files={TEST[0]},{TRAIN[0]}",
                                                      f"--pool_files={TEST[1]},{TRAIN[1]}"] + s["embed"],
         f"{o}/embed/emb/mbeir_toycir_task7_train_cand_pool.npy", ["prepare"]),
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
    ]
    build += [
        # the drills are not in the warm-up's mix: without them the base still judged 476 of 501 right and SFT
        # after it reached the ceiling (README), and the warm-up is 750 steps instead of 938
        ("warmup", py + ["sft.py"] + common_args + [f"--init_from={o}/drills/model", f"--vision_from={o}/vision",
                                                    "--sft_data=sft/warmup.jsonl,sft/warmup_windows.jsonl,sft/warmup_queries.jsonl",
                                                    f"--out_dir={o}/base", "--freeze_vision=True"] + s["warmup"],
         f"{o}/base/model/trainer_state.json", ["drills", "vision"]),
    ]
    # the base model is trained once (the stand-in for a pretrained VLM); every stage after it runs once per
    # seed (SFT's data order, RSFT's and GRPO's samples), and GRPO once per reward
    report.out, report.data = out, data  # the run's directories (report.run_dir, report.eval_dir)
    policies = [("base", base_dir, True, ("base", seed, None))]  # (stage, model dir, tools on, (arm, seed, reward))
    train = []
    for sd in seed_list():
        o_s = f"{o}/seed{sd}"
        at = [f"--seed={sd}"]
        train += [
            (f"sft_{sd}", py + ["sft.py"] + common_args + at + [f"--init_from={base_dir}", "--sft_data=sft/cold_start.jsonl",
                                                               f"--out_dir={o_s}/sft"] + s["sft"],
             f"{o_s}/sft/model/trainer_state.json", base_stage + ["cold_start"]),
            (f"rsft_{sd}", py + ["rsft.py"] + common_args + at + [f"--policy={o_s}/sft/model", f"--out_dir={o_s}/rsft",
                                                                 f"--ranked_train={o}/ranked_train.jsonl"] + s["rsft"],
             f"{o_s}/rsft/model/trainer_state.json", [f"sft_{sd}", "retrieve_train"]),
            (f"sft_notool_{sd}", py + ["sft.py"] + common_args + at + [f"--init_from={base_dir}", "--sft_data=sft_notool/cold_start.jsonl",
                                                                      f"--out_dir={o_s}/sft_notool"] + s["sft"],
             f"{o_s}/sft_notool/model/trainer_state.json", base_stage + ["cold_start_notool"])]
        policies += [(f"{arm}_{sd}", f"{report.run_dir(arm, sd, None)}/model", arm != "sft_notool", (arm, sd, None))
                     for arm in ("sft", "rsft", "sft_notool")]
        for rw in rewards.split(","):
            for arm, start, tools_on in (("grpo", "rsft", True), ("sft_grpo", "sft", True), ("grpo_notool", "sft_notool", False)):
                if rw != rewards.split(",")[0] and arm not in compare_arms.split(","):
                    continue
                tag, run_dir = f"{arm}_{rw}_{sd}", report.run_dir(arm, sd, rw)
                train.append((tag, py + ["grpo.py"] + common_args + at + [
                    f"--policy={o_s}/{start}/model", f"--out_dir={run_dir}", f"--ranked_train={o}/ranked_train.jsonl",
                    f"--reward={rw}", f"--use_tools={tools_on}"] + s["grpo"], f"{run_dir}/model/trainer_state.json",
                    [f"{start}_{sd}", "retrieve_train"]))
                policies.append((tag, f"{run_dir}/best", tools_on, (arm, sd, rw)))  # its best held-out evaluation
    # each policy reranks the test split greedily and samples it pass_k times at GRPO's temperature once it is
    # trained; the evaluations come after every training stage, so that a free core goes to training first
    evals = []
    for tag, policy, tools_on, which in policies:
        trained_by = base_stage if tag == "base" else [tag]
        greedy, sampled = report.eval_dir(*which, "rerank"), report.eval_dir(*which, "sample")
        rerank = [f"--policy={policy}", f"--ranked_in={o}/ranked_test.jsonl", f"--use_tools={tools_on}"] + s["rerank"]
        evals += [
            (f"{tag}_rerank", py + ["rollout.py"] + common_args + rerank + [f"--out_dir={greedy}"],
             f"{greedy}/reranked.jsonl.done", trained_by + ["retrieve_test"]),
            (f"{tag}_eval", py + ["evaluate.py", f"--ranked={greedy}/reranked.jsonl", qrels], f"{greedy}/metrics.json",
             [f"{tag}_rerank"]),
            # pass_k samples for SFT (the headroom GRPO starts from), one for the others (the sampled R@1 alone)
            (f"{tag}_sample", py + ["rollout.py"] + common_args + rerank + [
                f"--out_dir={sampled}", f"--n_samples={pass_k if which[0] == 'sft' else 1}",
                f"--temperature={s['temperature']}"],
             f"{sampled}/reranked.jsonl.done", trained_by + ["retrieve_test"])]
    return run + (build if building else []) + stage0 + train + evals


def seed_list():
    return [seed + i for i in range(seeds)]


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


ALONE = {"warmup"}  # the longest stage that nothing else can run beside: it waits for a free machine, gets every core


def run_all(todo, log_path):
    """Runs the stages as their inputs become ready, several at once when the cores allow: the free cores are
    split between the ready stages (OMP_NUM_THREADS); two stages on one core each get ~1.4x the work done of
    one stage on both (README). With the vision tower frozen the thread count changes a stage's speed and,
    on some CPUs, the float summation order (~1e-6, tests/test_sft.py). Each stage writes its output to
    {out}/logs/{name}.log."""
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
            # always get one, so that their numbers do not depend on how the stages overlapped
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


def save_base(built, record, to="data/toy/base_model"):
    """The built base as the shipped checkpoint: weights in bf16 (as pretrained VLMs ship; the trainers load
    them into fp32), processor and tokenizer, and build.json with its probe and the stages that built it."""
    import shutil
    import torch
    if quick or base != "build":
        raise ValueError("ship_base=True needs base=build and a full run: the shipped base is the full build")
    tmp = to + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    common.load_model(built, dtype=torch.bfloat16).save_pretrained(tmp)
    for name in os.listdir(built):  # tokenizer, processor, chat template: everything but weights and trainer state
        if os.path.isfile(f"{built}/{name}") and not name.endswith(".safetensors") and name != "trainer_state.json" \
                and not os.path.exists(f"{tmp}/{name}"):
            shutil.copy(f"{built}/{name}", f"{tmp}/{name}")
    build_stages = ("prepare", "cold_start", "drills", "vision", "warmup")
    common.write_json(f"{tmp}/build.json", {"command": "python data/toy/run.py --base=build --ship_base=True", "seed": seed,
                                            "verdict_probe": verdict_probe(tmp),  # of the bf16 weights shipped
                                            "stage_seconds": {k: round(record["seconds"][k]) for k in build_stages}})
    shutil.rmtree(to, ignore_errors=True)
    os.rename(tmp, to)
    print(f"saved the base model to {to}")


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
    base_dir = f"{out}/base/model" if base == "build" or quick else base
    if ship_base:
        save_base(base_dir, record)
    probe = verdict_probe(base_dir)  # the base's own drills (a policy's are its trajectories)
    return report.write(seed_list(), rewards.split(","), compare_arms.split(","), pass_k, settings(quick)["temperature"], quick,
                        record, machine, probe)


if __name__ == "__main__":
    configure(globals())
    main()
