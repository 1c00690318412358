"""Evaluate a model on labelled pairs: the dev metrics, plus `easy_negatives` (foreign items).

One report for every path: `evaluate_pairs` scores through a Scorer (what users get, `darl-eval`),
the trainer through its in-memory model; both hand `report` a function from pairs to probabilities.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .data import Pair, group_by_query
from .metrics import easy_negative_metrics, relevance_metrics
from .negatives import ForeignItems

ProbsOf = Callable[[list[tuple[str, str]]], np.ndarray]  # (query, item) pairs -> (N, K) probabilities

NEGATIVE_QUERIES = 200    # queries of a dev file that get foreign items (seeded draw)
NEGATIVES_PER_QUERY = 5   # foreign items per such query


def foreign_pairs(pairs: list[Pair], negative_queries: int = NEGATIVE_QUERIES,
                  negatives_per_query: int = NEGATIVES_PER_QUERY, seed: int = 0) -> list[tuple[str, str]]:
    """(query, item of another, unrelated query of the same file) for `negative_queries` of the
    file's queries (a seeded draw), `negatives_per_query` items each."""
    queries = sorted(group_by_query(pairs))
    chosen = np.random.default_rng(seed).permutation(len(queries))[:negative_queries]
    foreign = ForeignItems(pairs, seed)
    return [(queries[i], item) for i in sorted(chosen) for item in foreign.draw(queries[i], negatives_per_query)]


def report(
    probs_of: ProbsOf, pairs: list[Pair], grade_values: list[float],
    negative_queries: int = NEGATIVE_QUERIES, negatives_per_query: int = NEGATIVES_PER_QUERY, seed: int = 0,
) -> dict:
    """relevance_metrics of `pairs`, and under "easy_negatives" how `negatives_per_query` items of
    other, unrelated queries of the same file are graded for `negative_queries` of its queries."""
    shown = foreign_pairs(pairs, negative_queries, negatives_per_query, seed)
    values = np.array(grade_values, dtype=np.float32)
    probs = probs_of([(p.query, p.item) for p in pairs] + shown)
    own_probs, foreign_probs = probs[: len(pairs)], probs[len(pairs) :]
    labels = np.array([p.label for p in pairs])
    metrics = relevance_metrics(own_probs, own_probs @ values, labels, [p.query for p in pairs])
    metrics["easy_negatives"] = {
        **easy_negative_metrics(own_probs @ values, labels, [p.query for p in pairs],
                                foreign_probs, foreign_probs @ values, [q for q, _ in shown]),
        "per_query": negatives_per_query,
        "seed": seed,
    }
    return metrics


def scorer_probs(scorer) -> ProbsOf:
    """Probabilities of pairs through `scorer`, each query's items in one `score` call."""

    def probs_of(pairs: list[tuple[str, str]]) -> np.ndarray:
        probs = np.empty((len(pairs), len(scorer.labels)), dtype=np.float32)
        for query, idx in group_by_query([Pair(q, i, 0) for q, i in pairs]).items():
            probs[idx] = scorer.score(query, [pairs[i][1] for i in idx]).probs
        return probs

    return probs_of


def evaluate_pairs(scorer, pairs: list[Pair], **options) -> dict:
    return report(scorer_probs(scorer), pairs, scorer.spec.grade_values, **options)
