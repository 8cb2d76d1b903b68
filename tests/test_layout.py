"""The repository's shape, checked: who may import whom, real defaults in the stage scripts, a repository
that cites only its own docs, and a README that stays a guide."""
import ast
import glob
import importlib
import os
import re

from conftest import REPO

LIBRARY = {"configurator": set(), "common": set(), "checkpoint": {"common"}, "tools": {"common"}, "task": {"common", "tools"},
           "engine": {"common", "tools", "task"}}  # module -> the library modules it may import
STAGES = ["embed", "retrieve", "rollout", "sft", "rsft", "grpo", "evaluate", "viewer"]
# the two places that use another stage's code on purpose, each for the stage's own work, not a helper:
# rsft.py fine-tunes through sft.train (one trainer, not two); the toy pipeline probes its base model on
# drills rendered exactly as sft.py trains on them (sft.render)
TRAINER_REUSE = {("rsft", "sft"), ("data/toy/run", "sft")}
PROJECT = set(LIBRARY) | set(STAGES) | {"bench"}


def imports_of(path):
    """The project modules a file imports (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & (PROJECT | {"prepare", "cold_start"})


def test_import_graph_has_no_back_edges():
    """Library modules import only the layers below them; a stage imports the library, never another stage
    (except rsft -> sft's trainer); the toy's data scripts import the library and each other, never a stage."""
    edges = {}
    for path in glob.glob(f"{REPO}/*.py") + glob.glob(f"{REPO}/data/*/*.py"):
        name = os.path.relpath(path, REPO).removesuffix(".py")
        edges[name] = imports_of(path) - {os.path.basename(name)}
    for name, deps in edges.items():
        if name in LIBRARY:
            assert deps <= LIBRARY[name], f"{name} imports {deps - LIBRARY[name]}"
        elif name in STAGES:  # (bench.py measures stages' functions and may import them)
            bad = {d for d in deps if d not in LIBRARY and (name, d) not in TRAINER_REUSE}
            assert not bad, f"{name} imports the stage(s) {bad}"
        elif name.startswith("data/"):
            bad = {d for d in deps - set(LIBRARY) - {"prepare", "cold_start"} if (name, d) not in TRAINER_REUSE}
            assert not bad, f"{name} imports the stage(s) {bad}"
    assert edges["rsft"] >= {"sft", "task", "engine"} and "grpo" not in edges["viewer"]  # the graph was read


def test_stage_defaults_are_the_real_runs():
    """No stage script defaults to the toy: every toy value comes from config/toy.py."""
    modules = {name: importlib.reload(importlib.import_module(name)) for name in STAGES}  # fresh: other tests configure them
    for name, module in modules.items():
        toy = {k: v for k, v in vars(module).items()
               if not k.startswith("_") and isinstance(v, str) and ("data/toy" in v or "out/toy" in v)}
        assert not toy, f"{name}.py defaults to toy paths: {toy}"
    grpo, rollout, sft = modules["grpo"], modules["rollout"], modules["sft"]
    assert (rollout.top_n, rollout.window, rollout.stride, rollout.max_calls) == (50, 20, 10, 2)
    assert (grpo.group_size, grpo.prompts_per_step, grpo.learning_rate, grpo.window) == (8, 128, 1e-6, 20)
    assert (sft.learning_rate, sft.epochs, sft.dtype, sft.freeze_vision) == (1e-5, 2.0, "bfloat16", True)
    assert rollout.prompt_max_pixels >= 448 * 448 and rollout.max_response_tokens == 12288


OUTSIDE_NOTES = "REFER" + "ENCE"  # the team's notes outside the repository (spelled in two, so this file passes its own grep)


def test_the_repository_cites_only_its_own_docs():
    spec = open(f"{REPO}/docs/spec.md").read()
    sections = set(re.findall(r"^## §(\d+)", spec, re.M))
    files = glob.glob(f"{REPO}/*.py") + glob.glob(f"{REPO}/data/*/*.py") + glob.glob(f"{REPO}/config/*.py")
    cited = 0
    for path in files:
        text = open(path).read()
        assert OUTSIDE_NOTES not in text, f"{path} cites a file outside the repository"
        for n in re.findall(r"docs/spec\.md §(\d+)", text):
            assert n in sections, f"{path} cites docs/spec.md §{n}, which does not exist"
            cited += 1
    assert cited >= 10


def test_readme_is_a_guide():
    size = os.path.getsize(f"{REPO}/README.md")
    assert size <= 15 * 1024, f"README.md is {size} bytes: lab notes go to docs/"
    readme = open(f"{REPO}/README.md").read()
    for path in set(re.findall(r"\b((?:config|docs|data/\w+)/[\w.]+\.(?:py|md))\b", readme)):
        assert os.path.exists(f"{REPO}/{path}"), f"README names {path}, which does not exist"
