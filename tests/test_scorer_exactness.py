"""The contract: the torch backend's scores equal the reference (each pair alone through HF)."""

import random

import numpy as np
import pytest

from conftest import ARCHS, ragged_items
from darl_infer import Scorer
from tiny_models import random_text

pytestmark = pytest.mark.parametrize("arch", ARCHS)


@pytest.fixture(scope="module")
def scorers(tiny_checkpoints):
    cache = {}

    def get(arch, backend, dtype="fp32", **options):
        key = (arch, backend, dtype, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = Scorer.from_pretrained(tiny_checkpoints[arch], backend=backend, dtype=dtype, **options)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference_case(scorers):
    """Query, ragged items and the oracle's result, computed once per (arch, n)."""
    cache = {}

    def get(arch, n):
        if (arch, n) not in cache:
            rng = random.Random(f"{arch}-{n}")
            query, items = random_text(rng, rng.randint(1, 12)), ragged_items(rng, n)
            cache[arch, n] = query, items, scorers(arch, "reference").score(query, items)
        return cache[arch, n]

    return get


@pytest.mark.parametrize("n", [1, 7, 257])
@pytest.mark.parametrize("token_budget", [1, 37, 10**9])  # one item per chunk ... all in one chunk
def test_torch_matches_reference_fp32(scorers, reference_case, arch, n, token_budget):
    query, items, ref = reference_case(arch, n)
    fast = scorers(arch, "torch", token_budget=token_budget).score(query, items)
    assert np.abs(fast.probs - ref.probs).max() <= 1e-5
    np.testing.assert_allclose(fast.scores, ref.scores, atol=2e-5)


def test_torch_matches_reference_bf16(scorers, arch, rng):
    query = random_text(rng, 6)
    items = ragged_items(rng, 20)
    ref = scorers(arch, "reference", "bf16").score(query, items)
    fast = scorers(arch, "torch", "bf16", token_budget=64).score(query, items)
    assert np.abs(fast.probs - ref.probs).max() <= 2e-2


def test_item_order_and_company_do_not_change_scores(scorers, arch, rng):
    query = random_text(rng, 5)
    items = ragged_items(rng, 30)
    scorer = scorers(arch, "torch", token_budget=100)
    together = scorer.score(query, items).probs
    perm = np.random.default_rng(0).permutation(len(items))
    shuffled = scorer.score(query, [items[i] for i in perm]).probs
    assert np.abs(shuffled - together[perm]).max() <= 1e-5
    for i in (0, 13, 29):
        alone = scorer.score(query, [items[i]]).probs[0]
        assert np.abs(alone - together[i]).max() <= 1e-5


def test_expected_score_and_grade_follow_probs(scorers, arch, rng):
    result = scorers(arch, "torch").score(random_text(rng, 4), ragged_items(rng, 9))
    np.testing.assert_allclose(result.probs.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(result.scores, result.probs @ np.arange(3.0), atol=1e-6)
    assert np.array_equal(result.grades, result.probs.argmax(1))
