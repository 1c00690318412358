"""Latency per query of each darl_infer backend, with pytest-benchmark.

    pytest bench/ --benchmark-only                               # the embedded default model
    DARL_BENCH_CHECKPOINT=DIR pytest bench/ --benchmark-only      # any checkpoint directory
    pytest bench/ --benchmark-only --benchmark-save=NAME; pytest bench/ --benchmark-only --benchmark-compare

Grid: backend (reference, torch, onnx; triton on CUDA only) x dtype (fp32, bf16) x N in {10, 100}
items x instruction in {0, 64, 256} tokens. One benchmark group per (N, instruction), so the
backends and dtypes of one workload sit side by side and --benchmark-compare lines each up with
its own earlier run. Each round scores the next of 3 real queries (bench/workload.py), so a
round is one query's latency; extra_info holds items/s.

bf16 runs only where the CPU multiplies bf16 natively (AVX-512-BF16/AMX) or on CUDA, or when
DARL_BENCH_BF16=1: elsewhere it is tens of times slower than fp32 and the grid would take hours.
Not part of the default test run (pytest.ini's testpaths is tests/); skips when the model is absent.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from pathlib import Path

import pytest
import torch

from darl_infer import Scorer
from darl_infer.checkpoint import DEFAULT_MODEL_DIR, CheckpointSpec
from darl_infer.loading import load_checkpoint_model
from darl_infer.template import Template

from workload import build_cases, darl_onnx_export

CHECKPOINT = Path(os.environ.get("DARL_BENCH_CHECKPOINT", DEFAULT_MODEL_DIR))
QUERIES = 3
ROUNDS = 3
INSTRUCTION_TOKENS = [0, 64, 256]
ITEMS = [10, 100]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT / "darl.json").is_file(), reason=f"no checkpoint at {CHECKPOINT} (the default model is not in place)"
)


def native_bf16() -> bool:
    if torch.cuda.is_available() or os.environ.get("DARL_BENCH_BF16") == "1":
        return True
    flags = next((line.split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.lru_cache(maxsize=None)
def cases():
    """Instruction tokens -> Case with QUERIES queries of max(ITEMS) items."""
    _, tokenizer = backend_model("reference", "fp32")
    built, _ = build_cases(CHECKPOINT, tokenizer, INSTRUCTION_TOKENS, QUERIES, max(ITEMS))
    return {case.instruction_tokens: case for case in built}


@functools.lru_cache(maxsize=None)
def backend_model(backend: str, dtype: str):
    """One model object per (backend, dtype): the torch backend switches its model's attention, so
    the reference backend must not share it. ONNX: the export and its tokenizer."""
    device = torch.device("cuda" if torch.cuda.is_available() and backend == "triton" else "cpu")
    if backend == "onnx":
        from transformers import AutoTokenizer

        from darl_infer.backends.onnx_format import OnnxExport

        export_dir = darl_onnx_export(CHECKPOINT)
        return OnnxExport.load(export_dir), AutoTokenizer.from_pretrained(export_dir)
    return load_checkpoint_model(CHECKPOINT, CheckpointSpec.load(CHECKPOINT), DTYPES[dtype], device)


def scorer(backend: str, dtype: str, instruction_tokens: int) -> Scorer:
    model, tokenizer = backend_model(backend, dtype)
    spec = CheckpointSpec.load(CHECKPOINT)
    spec = dataclasses.replace(spec, template=Template.from_dict(cases()[instruction_tokens].template))
    return Scorer(model, tokenizer, spec, backend=backend)


@pytest.mark.parametrize("instruction_tokens", INSTRUCTION_TOKENS, ids=lambda t: f"instr{t}")
@pytest.mark.parametrize("n_items", ITEMS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", ["reference", "torch", "onnx", "triton"])
def test_latency_per_query(benchmark, backend, dtype, n_items, instruction_tokens):
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("triton runs on CPU only under its interpreter, which is for correctness, not speed")
    if backend == "onnx" and dtype != "fp32":
        pytest.skip("an ONNX export runs in the precision it was exported in (fp32)")
    if dtype == "bf16" and not native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX-512-BF16/AMX); set DARL_BENCH_BF16=1 to run it anyway")
    benchmark.group = f"N={n_items} items, instruction {instruction_tokens} tokens"
    case = cases()[instruction_tokens].subset(QUERIES, n_items)
    run = scorer(backend, dtype, instruction_tokens)
    run.score(case.queries[0]["query"], case.queries[0]["items"][:4])  # warm-up
    queries = itertools.cycle(case.queries)

    def next_query():
        q = next(queries)
        return (q["query"], q["items"]), {}

    benchmark.pedantic(run.score, setup=next_query, rounds=ROUNDS)
    benchmark.extra_info["items_per_s"] = n_items / benchmark.stats.stats.median
