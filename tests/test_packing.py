"""Multi-prefix packing (`Scorer.score_many`) and the LRU of recent prefixes.

score_many packs the prefixes of all its queries into one forward pass and the items of all its
queries together: every item must still get the reference backend's score for its pair alone and
`score(query, items)`'s for its query alone, whatever the mix, order, duplicates, empty item lists
and token budget. An LRU hit hands out the very K/V tensors the miss computed.
"""

import random

import numpy as np
import pytest
import torch

from conftest import ARCHS, ragged_items
from darl_infer import Scorer
from darl_infer.backends import onednn_mlp
from darl_infer.backends.chunking import length_sorted_chunks, pass_size, prefix_rounds
from darl_infer.backends.prefix_cache import PrefixLRU
from tiny_models import random_text


@pytest.fixture(scope="module")
def scorers(tiny_checkpoints):
    cache = {}

    def get(arch, backend="torch", **options):
        key = (arch, backend, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = Scorer.from_pretrained(tiny_checkpoints[arch], backend=backend, dtype="fp32", **options)
        return cache[key]

    return get


def mixed_batch(seed) -> list[tuple[str, list[str]]]:
    """Queries of several lengths, one repeated with other items, one repeated exactly, one without
    items, an item repeated inside a query."""
    rng = random.Random(seed)
    q = [random_text(rng, n) for n in (1, 5, 12, 3)]
    dup = ragged_items(rng, 1, max_tokens=20)
    return [
        (q[0], ragged_items(rng, 7, max_tokens=30)),
        (q[1], []),
        (q[2], ragged_items(rng, 1, max_tokens=40)),
        (q[0], ragged_items(rng, 4, max_tokens=10)),
        (q[3], ragged_items(rng, 9, max_tokens=25) + dup + dup),
        (q[2], ragged_items(rng, 3, max_tokens=40)),
        (q[2], ragged_items(rng, 3, max_tokens=40)),
    ]


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max()) if a.size else 0.0


@pytest.fixture(scope="module")
def reference_results(scorers):
    """The oracle (each pair alone through HF) for each arch's mixed batch, computed once."""
    cache = {}

    def get(arch):
        if arch not in cache:
            batch = mixed_batch(arch)
            cache[arch] = batch, [scorers(arch, "reference").score(query, items) for query, items in batch]
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("token_budget", [1, 23, 10**9])  # below one item ... everything in one pass
def test_score_many_equals_reference_and_each_query_alone(scorers, reference_results, arch, token_budget):
    batch, reference = reference_results(arch)
    scorer = scorers(arch, token_budget=token_budget)
    packed = scorer.score_many(batch)
    assert [len(r) for r in packed] == [len(items) for _, items in batch]
    for (query, items), got, ref in zip(batch, packed, reference):
        assert max_diff(got.probs, ref.probs) <= 1e-5
        assert max_diff(got.probs, scorer.score(query, items).probs) <= 1e-5
        np.testing.assert_allclose(got.scores, ref.scores, atol=2e-5)
        assert np.array_equal(got.truncated, ref.truncated)
    # the same entries in another order give each entry the same result
    order = [4, 0, 6, 2, 1, 5, 3]
    for n, got in zip(order, scorer.score_many([batch[n] for n in order])):
        assert max_diff(got.probs, packed[n].probs) <= 1e-5


def test_score_many_of_nothing(scorers):
    scorer = scorers("llama")
    assert scorer.score_many([]) == []
    (empty,) = scorer.score_many([("w1", [])])
    assert empty.probs.shape == (0, 3)


def decoder_calls(scorer, batch) -> int:
    """Forward passes of the decoder while `scorer` scores `batch`."""
    model = scorer.backend.model
    calls = []
    handle = getattr(model, model.base_model_prefix).register_forward_hook(lambda *args: calls.append(1))
    try:
        scorer.score_many(batch)
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prefixes_and_items_in_one_pass_when_they_fit(scorers, arch):
    rng = random.Random(arch)
    batch = [(random_text(rng, rng.randint(1, 6)), ragged_items(rng, rng.randint(1, 10), max_tokens=12)) for _ in range(8)]
    assert decoder_calls(scorers(arch, token_budget=10**6), batch) == 1  # the 8 prefixes and all their items
    cached = scorers(arch, token_budget=10**6, prefix_cache_mb=1)
    decoder_calls(cached, batch)
    assert decoder_calls(cached, batch) == 1  # the prefixes come from the LRU
    # a budget below every prefix and item: each item runs alone, its query's first with the prefix
    assert decoder_calls(scorers(arch, token_budget=1), batch) == sum(len(items) for _, items in batch)


def test_prefix_rounds_hold_distinct_prefixes_under_the_budget():
    prefixes = [[1, 2, 3], [4, 5], [1, 2, 3], [6, 7, 8, 9], [4, 5], [10] * 12, [11]]
    assert prefix_rounds(prefixes, 10) == [[0, 1, 2, 3, 4], [5], [6]]  # repeats count once; 12 > 10 runs alone
    assert prefix_rounds(prefixes, 1) == [[0], [1], [2], [3], [4], [5], [6]]
    assert prefix_rounds(prefixes, 10**6) == [list(range(7))]
    assert length_sorted_chunks([5, 1, 3], 4) == [[1, 2], [0]]


def test_pass_sizes_are_few_and_at_most_a_sixteenth_more():
    sizes = {pass_size(t, 4096) for t in range(1, 4097)}
    assert len(sizes) < 120  # 4,096 token counts, ~100 pass sizes: oneDNN builds each size's matmuls once
    for t in range(1, 4097):
        assert t <= pass_size(t, 4096) <= max(t + 15, t * 17 // 16) and pass_size(pass_size(t, 4096), 4096) == pass_size(t, 4096)
    assert pass_size(2380, 4096) == 2432 and pass_size(300, 4096) == 304 and pass_size(4000, 4096) == 4096
    assert pass_size(4000, 3000) == 4000 and pass_size(2990, 3000) == 3000  # past the budget only if the tokens are


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_bf16_cpu_passes_are_padded_to_pass_sizes_by_a_filler_item(tiny_checkpoints, scorers, dtype):
    """In bf16, on a CPU that runs it natively (oneDNN's matmuls), each CPU forward pass runs
    pass_size(its tokens) tokens: a filler item after the real ones, its grades dropped; fp32 passes,
    and bf16 ones elsewhere, run as they come."""
    scorer = Scorer.from_pretrained(tiny_checkpoints["gemma3"], backend="torch", dtype=dtype)
    padded = scorer.backend.pads_passes
    assert padded == (dtype == "bf16" and onednn_mlp.used_for(torch.bfloat16))
    model = scorer.backend.model
    lengths = []
    handle = getattr(model, model.base_model_prefix).register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[-1]), with_kwargs=True
    )
    rng = random.Random(5)
    query, items = random_text(rng, 4), ragged_items(rng, 13, max_tokens=30)
    encoded = scorer.encoder.encode(query, items)
    tokens = len(encoded.prefix) + sum(map(len, encoded.suffixes))
    assert pass_size(tokens, scorer.backend.token_budget) > tokens  # the case this test is for
    try:
        result = scorer.score(query, items)
    finally:
        handle.remove()
    # the prefix and the items in one pass
    assert lengths == [pass_size(tokens, scorer.backend.token_budget) if padded else tokens]
    assert result.probs.shape == (13, 3)
    reference = scorers("gemma3", backend="reference").score(query, items)
    assert max_diff(result.probs, reference.probs) <= (2e-2 if dtype == "bf16" else 1e-5)


# --- the LRU of recent prefixes ------------------------------------------------------------------


class Blob:
    def __init__(self, nbytes):
        self.nbytes = nbytes


def test_lru_evicts_least_recently_used_by_bytes():
    lru = PrefixLRU(100)
    a, b, c = Blob(40), Blob(40), Blob(40)
    lru.put("a", a)
    lru.put("b", b)
    assert lru.get("a") is a  # now b is the least recently used
    lru.put("c", c)
    assert lru.get("b") is None and lru.get("a") is a and lru.get("c") is c
    lru.put("huge", Blob(101))  # over the whole budget: not kept, nothing evicted for it
    lru.put("a", Blob(40))  # already there: kept as it was
    assert lru.get("huge") is None and lru.get("a") is a
    assert lru.stats() == {"hits": 4, "misses": 2, "evictions": 1, "entries": 2, "bytes": 80, "max_bytes": 100}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lru_hit_reuses_the_miss_tensors_and_scores_the_same(scorers, reference_results, arch):
    batch, reference = reference_results(arch)
    scorer = scorers(arch, token_budget=40, prefix_cache_mb=1)
    before = scorer.prefix_cache_stats()
    missed = scorer.score_many(batch)
    middle = scorer.prefix_cache_stats()
    stored = {key: kv for key, (kv, _) in scorer._prefix_lru._entries.items()}
    hit = scorer.score_many(batch)
    after = scorer.prefix_cache_stats()
    assert stored and {key: kv for key, (kv, _) in scorer._prefix_lru._entries.items()} == stored  # the very PrefixKV (eq: identity)
    # each distinct prefix is computed once; a later round of the same call that needs it again hits
    lookups = middle["hits"] - before["hits"] + middle["misses"] - before["misses"]
    assert middle["misses"] - before["misses"] == len({query for query, items in batch if items})
    assert after["hits"] - middle["hits"] == lookups and after["misses"] == middle["misses"]
    # the miss scored its first chunk in the prefixes' pass (JointPass), the hit without them: the
    # same K/V, passes of another size, so equal up to the matmuls' rounding
    for got, want, ref in zip(hit, missed, reference):
        assert max_diff(got.probs, want.probs) <= 1e-6
        assert max_diff(got.probs, ref.probs) <= 1e-5
    query, items = batch[0]
    assert np.array_equal(scorer.score(query, items).probs, scorer.score(query, items).probs)  # two hits: bit-identical


def test_lru_keeps_what_fits_in_its_bytes(tiny_checkpoints):
    """64-token queries: ~59 KB of K/V each in the tiny Llama, so a 1 MiB LRU holds 17 of 20."""
    scorer = Scorer.from_pretrained(tiny_checkpoints["llama"], backend="torch", prefix_cache_mb=1)
    rng = random.Random(7)
    queries = [random_text(rng, 64) for _ in range(20)]
    scorer.score_many([(query, ["w1"]) for query in queries])
    stats = scorer.prefix_cache_stats()
    per_prefix = stats["bytes"] // stats["entries"]
    assert stats["max_bytes"] == 2**20 and stats["misses"] == 20 and stats["hits"] == 0
    assert stats["entries"] == 2**20 // per_prefix and stats["evictions"] == 20 - stats["entries"]
    encoded = scorer.encoder.encode(queries[0], ["w1"])
    config = scorer.backend.model.config  # K and V, fp32, every layer
    assert per_prefix == len(encoded.prefix) * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4
    scorer.score(queries[0], ["w2"])  # the oldest was evicted
    scorer.score(queries[-1], ["w2"])  # the newest is there
    assert scorer.prefix_cache_stats()["misses"] == 21 and scorer.prefix_cache_stats()["hits"] == 1


def test_no_lru_by_default(scorers):
    scorer = scorers("llama")
    scorer.score("w1", ["w2"])
    assert scorer.prefix_cache_stats() == {"hits": 0, "misses": 0, "evictions": 0, "entries": 0, "bytes": 0, "max_bytes": 0}
