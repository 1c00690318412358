"""What every scorer returns and offers: `ScoreResult`, and `score` / `rank` / `predict` (the API
of sentence-transformers' CrossEncoder) on top of a scorer's own `score_many`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .pairs import group_by_query
from .validate import check_int, check_items, check_text


@dataclass
class ScoreResult:
    probs: np.ndarray      # (N, K) probability of each grade
    scores: np.ndarray     # (N,) expected grade value, sum_k p_k * v_k
    grades: np.ndarray     # (N,) argmax grade index
    truncated: np.ndarray  # (N,) the query or the item was cut to its token limit
    labels: list[str]
    graded_by: np.ndarray | None = None  # (N,) "coarse" or "fine" for a cascade; None for one model

    def __len__(self) -> int:
        return len(self.scores)


class Ranker:
    """`score`, `rank` and `predict` for a subclass that has `labels` and `score_many`."""

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    def score_many(self, batch) -> list[ScoreResult]:
        raise NotImplementedError

    def score(self, query: str, items) -> ScoreResult:
        """Scores of `items` (any ordered iterable of str, read once; see validate.check_items) for `query`."""
        return self.score_many([(query, items)])[0]

    def rank(self, query: str, items, top_k: int | None = None, return_documents: bool = False) -> list[dict]:
        """Items best first, as `[{"corpus_id", "score", "grade"[, "graded_by"][, "text"]}]`
        (CrossEncoder.rank's shape). `top_k`: keep the best k (None: all)."""
        if top_k is not None:
            check_int(top_k, "top_k", 0)
        items = check_items(items)
        result = self.score(query, items)
        order = np.argsort(-result.scores, kind="stable")[:top_k]
        ranked = []
        for i in order:
            row = {"corpus_id": int(i), "score": float(result.scores[i]), "grade": int(result.grades[i])}
            if result.graded_by is not None:
                row["graded_by"] = str(result.graded_by[i])
            if return_documents:
                row["text"] = items[i]
            ranked.append(row)
        return ranked

    def predict(self, pairs) -> np.ndarray:
        """Expected-grade scores of (query, item) pairs in input order; each query's prefix runs once."""
        pairs = list(pairs)
        for n, pair in enumerate(pairs):
            if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
                raise TypeError(f"pairs[{n}] must be a (query, item) pair")
            check_text(pair[0], f"pairs[{n}][0] (query)")
            check_text(pair[1], f"pairs[{n}][1] (item)")
        scores = np.empty(len(pairs), dtype=np.float32)
        groups = group_by_query(query for query, _ in pairs)
        results = self.score_many([(query, [pairs[n][1] for n in idx]) for query, idx in groups.items()])
        for idx, result in zip(groups.values(), results):
            scores[idx] = result.scores
        return scores
