"""Coarse -> fine cascade (EMMA's coarse-grained recall before fine-grained classification): a fast
model scores every item of a query, the slow one re-scores only the `keep` best of them.

Each item's probabilities are those of the model that graded it last, and `graded_by` says which.
Items are then ranked by that score, one scale for both models (expected grade). So a kept item the
fine model finds weaker can fall below an item only the coarse model saw. Exact per model: every
probability equals its model's score for that pair alone (both models keep the Scorer contract).
"""

from __future__ import annotations

import argparse
import math
import numbers

import numpy as np

from .ranking import Ranker, ScoreResult
from .validate import check_items


def check_keep(keep) -> float | int:
    """A fraction in (0, 1] (float) or a count >= 1 (int) of each query's items."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep must be a fraction in (0, 1] or a count >= 1, got {type(keep).__name__}")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"keep as a count must be >= 1, got {keep}")
        return int(keep)
    if not 0 < keep <= 1:
        raise ValueError(f"keep as a fraction must be in (0, 1], got {keep}")
    return float(keep)


def keep_value(text: str) -> float | int:
    """argparse type for --keep: "0.2" is a fraction, "5" a count."""
    try:
        return check_keep(float(text) if any(c in text for c in ".eE") else int(text))
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1] or a count >= 1, got {text!r}") from None


class CascadeScorer(Ranker):
    """`Scorer.cascade(coarse, fine, keep)`; thread-safe when both models are (it keeps no state)."""

    def __init__(self, coarse: Ranker, fine: Ranker, keep: float | int = 0.2):
        if coarse.labels != fine.labels or list(coarse.spec.grade_values) != list(fine.spec.grade_values):
            raise ValueError(
                f"a cascade needs two models with the same grades: coarse {coarse.labels} "
                f"{coarse.spec.grade_values}, fine {fine.labels} {fine.spec.grade_values}"
            )
        self.coarse, self.fine, self.keep = coarse, fine, check_keep(keep)
        self.spec = fine.spec

    def score_many(self, batch) -> list[ScoreResult]:
        batch = [(query, check_items(items)) for query, items in batch]
        coarse = self.coarse.score_many(batch)
        picks = [kept_best(r, self.keep) for r in coarse]
        fine = self.fine.score_many([(q, [items[i] for i in pick]) for (q, items), pick in zip(batch, picks)])
        return [merge(c, f, pick) for c, f, pick in zip(coarse, fine, picks)]

    @property
    def encoder(self):
        """The fine model's encoder: its token limits decide what is truncated (the service's 413)."""
        return self.fine.encoder

    def prefix_cache_stats(self) -> dict[str, int]:
        """Both models' LRUs of recent prefixes, added up."""
        a, b = self.coarse.prefix_cache_stats(), self.fine.prefix_cache_stats()
        return {key: a[key] + b[key] for key in a}


def kept_count(n: int, keep: float | int) -> int:
    """How many of a query's `n` items the fine model re-scores (at least one of a non-empty list)."""
    if isinstance(keep, int):
        return min(keep, n)
    return min(n, math.ceil(keep * n - 1e-9))


def kept_best(coarse: ScoreResult, keep: float | int) -> np.ndarray:
    """Positions of the items the fine model re-scores, in input order: the coarse model's best."""
    return np.sort(np.argsort(-coarse.scores, kind="stable")[: kept_count(len(coarse), keep)])


def merge(coarse: ScoreResult, fine: ScoreResult, picks: np.ndarray) -> ScoreResult:
    """The coarse result with the fine model's result for the items at `picks`."""
    probs, scores, grades, truncated = coarse.probs.copy(), coarse.scores.copy(), coarse.grades.copy(), coarse.truncated.copy()
    probs[picks], scores[picks], grades[picks], truncated[picks] = fine.probs, fine.scores, fine.grades, fine.truncated
    graded_by = np.full(len(coarse), "coarse", dtype=object)
    graded_by[picks] = "fine"
    return ScoreResult(probs, scores, grades, truncated, coarse.labels, graded_by)
