"""One Scorer shared by several threads: every call gives exactly what it gives alone, and the
oracle's scores. Nothing a call does may leak into another (no per-call change of shared modules)."""

import random
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import ragged_items
from darl_infer import Scorer
from tiny_models import random_text


@pytest.fixture
def fast_thread_switching():
    """Switch threads every 10 µs instead of 5 ms, so calls interleave inside each forward pass."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_threads_sharing_a_scorer_get_the_sequential_results(tiny_checkpoints, arch, fast_thread_switching):
    scorer = Scorer.from_pretrained(tiny_checkpoints[arch], backend="torch", token_budget=48)  # several chunks a call
    model = scorer.backend.model
    decoder = getattr(model, model.base_model_prefix)
    norm = decoder.norm
    rng = random.Random(arch)
    jobs = [(random_text(rng, rng.randint(1, 8)), ragged_items(rng, rng.randint(1, 10), max_tokens=24)) for _ in range(24)]
    sequential = [scorer.score(query, items).probs for query, items in jobs]

    for _ in range(3):
        with ThreadPoolExecutor(max_workers=4) as pool:
            threaded = list(pool.map(lambda job: scorer.score(*job).probs, jobs))
        for n, (got, want) in enumerate(zip(threaded, sequential)):
            assert np.array_equal(got, want), f"job {n}: max |Δprob| {np.abs(got - want).max():.3g} under threads"
    assert decoder.norm is norm  # the shared model is as it was

    reference = Scorer.from_pretrained(tiny_checkpoints[arch], backend="reference")
    for (query, items), got in zip(jobs, sequential):
        assert np.abs(got - reference.score(query, items).probs).max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_threads_sharing_a_scorer_with_its_prefix_lru(tiny_checkpoints, arch, fast_thread_switching):
    """Threads hit and fill one LRU at once: `score` gives what a Scorer without LRU gives, to
    rounding (a miss scores its first items in its prefix's pass, a hit without the prefix's rows:
    same K/V, passes of another size), `score_many` the same to the tolerance."""
    cached = Scorer.from_pretrained(tiny_checkpoints[arch], backend="torch", token_budget=48, prefix_cache_mb=1)
    plain = Scorer.from_pretrained(tiny_checkpoints[arch], backend="torch", token_budget=48)
    rng = random.Random(arch)
    queries = [random_text(rng, rng.randint(1, 8)) for _ in range(4)]  # repeated: hits and misses race
    jobs = [(rng.choice(queries), ragged_items(rng, rng.randint(1, 6), max_tokens=16)) for _ in range(16)]
    want = [plain.score(query, items).probs for query, items in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda job: cached.score(*job).probs, jobs))
        many = list(pool.map(lambda n: cached.score_many(jobs[n : n + 4]), range(0, len(jobs), 4)))
    for n, (g, w) in enumerate(zip(got, want)):
        assert np.abs(g - w).max() <= 1e-6, f"job {n}: max |Δprob| {np.abs(g - w).max():.3g}"
    for n, result in enumerate(r for results in many for r in results):
        assert np.abs(result.probs - want[n]).max() <= 1e-5
    stats = cached.prefix_cache_stats()
    assert stats["hits"] > 0 and stats["entries"] == len(set(q for q, _ in jobs))
