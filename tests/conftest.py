import importlib
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CONFIG = os.path.join(REPO, "config", "toy.py")  # the stages' defaults are the real runs: tests start from the toy
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "data", "toy"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from configurator import configure  # noqa: E402


def run_stage(module_name, argv):
    """Run a stage script in-process: fresh module (so defaults are reset), configured from argv, main()."""
    module = importlib.reload(importlib.import_module(module_name))
    configure(vars(module), argv, verbose=False)
    return module, module.main()


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """A small toy benchmark (same generator, fewer queries), shared by the tests of a session."""
    root = tmp_path_factory.mktemp("toy")
    run_stage("prepare", [f"--out_dir={root}", "--n_train=64", "--n_test=12"])
    return str(root)


@pytest.fixture(scope="session")
def tokenizer(toy_data):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.join(toy_data, "tokenizer"))
