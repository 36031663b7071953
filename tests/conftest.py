import os
import sys

import pytest

# Tests import helpers (sweep_helpers.py, lm_helpers.py, references.py, misbehaving.py) from this folder.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """The tiny random Llama of lm_helpers' defaults and its BPE tokenizer, saved once per session
    as a checkpoint folder (for --model). Shared: read it, never write into it; a test that needs
    other weights or config saves its own with lm_helpers.checkpoint."""
    import lm_helpers  # here, not above: it skips the test when transformers is not installed

    return lm_helpers.checkpoint(str(tmp_path_factory.mktemp("tiny-model") / "model"))


@pytest.fixture
def seed() -> int:
    """A fresh random seed for the test's inputs (references.new_seed: printed, so a failure shows
    it; CTXBENCH_TEST_SEED=N replays it). Feed it to references.random_qkv."""
    import references

    return references.new_seed()
