"""Evaluate a Scorer on labelled JSONL files: what users get, through the same scoring path."""

from __future__ import annotations

import numpy as np

from .data import Pair, group_by_query
from .metrics import relevance_metrics


def evaluate_pairs(scorer, pairs: list[Pair]) -> dict:
    probs = np.empty((len(pairs), len(scorer.labels)), dtype=np.float32)
    scores = np.empty(len(pairs), dtype=np.float32)
    for query, idx in group_by_query(pairs).items():
        result = scorer.score(query, [pairs[i].item for i in idx])
        probs[idx], scores[idx] = result.probs, result.scores
    labels = np.array([p.label for p in pairs])
    return relevance_metrics(probs, scores, labels, [p.query for p in pairs])
