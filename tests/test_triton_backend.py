"""Scorer(backend="triton") end to end against the reference backend (each pair alone through HF).

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py), so
the tiny models and item counts stay small.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import ragged_items
from darl_infer import Scorer
from darl_infer.backends import triton_backend
from darl_infer.backends.chunking import length_sorted_chunks
from darl_infer.kernels import classification_head, gated_activation, rms_norm, rotary, shared_prefix_attention
from darl_infer.kernels._triton import HAS_TRITON
from tiny_models import random_text

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(scope="module")
def scorers(tiny_checkpoints):
    cache = {}

    def get(arch, backend, **options):
        key = (arch, backend, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = Scorer.from_pretrained(tiny_checkpoints[arch], backend=backend, dtype="fp32", **options)
        return cache[key]

    return get


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])  # Qwen2: biases on the fused q/k/v projection
def test_triton_matches_reference(scorers, arch, rng):
    query = random_text(rng, 5)
    items = ragged_items(rng, 6, max_tokens=20)
    ref = scorers(arch, "reference").score(query, items)
    fast = scorers(arch, "triton", token_budget=40).score(query, items)  # several chunks
    assert np.abs(fast.probs - ref.probs).max() <= 1e-4
    np.testing.assert_allclose(fast.scores, ref.scores, atol=2e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_half_precision_within_tolerance_of_the_fp32_oracle(tiny_checkpoints, scorers, arch, dtype, backend, rng):
    """On the default device (CUDA where there is one, the fast paths' home): bf16 and fp16 scores of
    items chunked and packed with another query's stay within DESIGN.md's 2e-2 of the fp32 oracle."""
    scorer = Scorer.from_pretrained(tiny_checkpoints[arch], backend=backend, dtype=dtype, token_budget=40)
    batch = [(random_text(rng, 4), ragged_items(rng, 7, max_tokens=20)), (random_text(rng, 2), ragged_items(rng, 3, max_tokens=9))]
    for (query, items), got in zip(batch, scorer.score_many(batch)):
        assert np.abs(got.probs - scorers(arch, "reference").score(query, items).probs).max() <= 2e-2


def count_launches(monkeypatch, kernel) -> list:
    launches = []
    run = kernel.run

    def counted(*args, **kwargs):
        launches.append(1)
        return run(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", counted)
    return launches


def test_triton_backend_launches_the_kernels(scorers, monkeypatch, rng):
    scorer = scorers("llama", "triton", token_budget=40)
    attention = count_launches(monkeypatch, shared_prefix_attention._shared_prefix_attention_kernel)
    head = count_launches(monkeypatch, classification_head._classification_head_kernel)
    norm = count_launches(monkeypatch, rms_norm._rms_norm_kernel)
    rotations = count_launches(monkeypatch, rotary._rotary_kernel)
    mlp = count_launches(monkeypatch, gated_activation._gated_activation_kernel)
    query, items = random_text(rng, 5), ragged_items(rng, 6, max_tokens=20)
    enc = scorer.encoder.encode(query, items)
    n_chunks = len(length_sorted_chunks([len(s) for s in enc.suffixes], 40))
    assert n_chunks > 1
    scorer.score(query, items)
    n_layers = scorer.backend.model.config.num_hidden_layers
    assert len(attention) == n_layers * (1 + n_chunks)  # the prefix pass, then every chunk of items
    assert len(head) == n_chunks
    assert len(norm) == n_chunks * (2 * n_layers + 1)  # Llama: two norms per layer and the final one, per pass
    assert len(rotations) == n_chunks * 2 * n_layers  # q and k of each layer, per pass
    assert len(mlp) == n_chunks * n_layers


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_triton_score_many_packs_queries_and_matches_reference(scorers, monkeypatch, arch, rng):
    """Several queries in one call: their prefixes in one pass, all their items in another, the
    attention kernel launched once per query segment of that pass."""
    batch = [(random_text(rng, 3), ragged_items(rng, 3, max_tokens=12)), ("w9", []),
             (random_text(rng, 9), ragged_items(rng, 2, max_tokens=12))]
    scorer = scorers(arch, "triton", token_budget=10**6)
    attention = count_launches(monkeypatch, shared_prefix_attention._shared_prefix_attention_kernel)
    head = count_launches(monkeypatch, classification_head._classification_head_kernel)
    results = scorer.score_many(batch)
    n_layers = scorer.backend.model.config.num_hidden_layers
    assert len(head) == 1 and len(attention) == n_layers * (1 + 2)  # prefixes; items: one segment per query
    reference = scorers(arch, "reference")
    for (query, items), got in zip(batch, results):
        if items:
            assert np.abs(got.probs - reference.score(query, items).probs).max() <= 1e-4
        else:
            assert got.probs.shape == (0, 3)


def test_swapped_modules_run_hf_forward_outside_a_pass(scorers, tiny_checkpoints):
    """The model a triton scorer runs still trains: outside darl_infer's passes its modules run HF's
    forward, whose gradients reach every projection (the kernels have no backward)."""
    from transformers import AutoModelForSequenceClassification

    model = scorers("gemma3", "triton").backend.model
    untouched = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoints["gemma3"], attn_implementation="eager")
    ids = torch.tensor([[5, 6, 7, 8]])
    model.set_attn_implementation("eager")  # the attention hook serves darl_infer's passes only
    try:
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits, untouched(input_ids=ids).logits)
        logits.sum().backward()
        layer = model.model.layers[0]
        assert all(p.grad is not None for p in (layer.self_attn.q_proj.weight, layer.mlp.up_proj.weight, layer.input_layernorm.weight))
    finally:
        model.set_attn_implementation("darl_infer")
        model.zero_grad(set_to_none=True)


def test_threads_sharing_a_triton_scorer_get_the_sequential_results(scorers, rng):
    """Triton launches from several threads at once (the autotuner and the interpreter keep launch
    state on shared objects): every call still gets exactly its sequential result."""
    scorer = scorers("llama", "triton", token_budget=40)
    jobs = [(random_text(rng, 3), ragged_items(rng, 3, max_tokens=12)) for _ in range(6)]
    sequential = [scorer.score(query, items).probs for query, items in jobs]
    with ThreadPoolExecutor(max_workers=3) as pool:
        threaded = list(pool.map(lambda job: scorer.score(*job).probs, jobs))
    for got, want in zip(threaded, sequential):
        assert np.array_equal(got, want)


def test_triton_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(triton_backend, "INTERPRETED", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"needs a CUDA device.*TRITON_INTERPRET=1.*backend='torch'"):
        triton_backend.check_triton_can_run(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="set after darl_infer.kernels was imported"):
        triton_backend.check_triton_can_run(torch.device("cpu"))


def test_triton_without_triton_says_what_to_install(monkeypatch):
    monkeypatch.setattr(triton_backend, "HAS_TRITON", False)
    with pytest.raises(ImportError, match=r"darl-infer\[gpu\]"):
        triton_backend.check_triton_can_run(torch.device("cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choice")
def test_auto_never_picks_triton_on_cpu(tiny_checkpoints):
    assert Scorer.from_pretrained(tiny_checkpoints["llama"]).backend.name == "torch"
