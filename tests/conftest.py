import os

import torch

# Triton fixes compiled vs interpreted when a kernel is defined, i.e. when darl_infer.kernels is
# first imported (the imports below already do): without CUDA, run the kernels in its interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests' tolerances are fp32's: dtype="auto" means fp32 here even on a CPU with native bf16
# (set in the environment so that subprocesses and Ray workers started by tests inherit it)
os.environ.setdefault("DARL_INFER_AUTO_DTYPE", "fp32")

# Tiny test models are all small ops: a second thread only adds synchronisation (measured here:
# one exactness test went from 540 s to under 2 s on a busy 2-core box).
torch.set_num_threads(1)

import random
from pathlib import Path

import pytest

from tiny_models import make_checkpoint, random_text

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ARCHS = ["llama", "qwen2", "gemma3"]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_checkpoint(root / arch, arch, seed=i) for i, arch in enumerate(ARCHS)}


@pytest.fixture
def rng():
    return random.Random(1234)


def ragged_items(rng: random.Random, n: int, max_tokens: int = 64) -> list[str]:
    return [random_text(rng, rng.randint(1, max_tokens)) for _ in range(n)]


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "qbqtc" / "dev.jsonl").is_file():
        pytest.skip("needs ../shared/data (not present outside the project workspace)")
    return SHARED_DATA
