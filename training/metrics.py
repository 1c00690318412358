"""Evaluation metrics for graded relevance: accuracy, macro-F1, per-grade F1, ECE, NDCG@10, and
the two that a ranking stage needs and that one- or two-item dev queries cannot saturate: pairwise
accuracy within a query, and how foreign items (`easy_negatives`) are graded and ranked."""

from __future__ import annotations

import numpy as np


def f1_per_grade(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> list[float]:
    out = []
    for k in range(num_labels):
        tp = np.sum((preds == k) & (labels == k))
        fp = np.sum((preds == k) & (labels != k))
        fn = np.sum((preds != k) & (labels == k))
        out.append(float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0)
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins (Guo et al. 2017, "On Calibration of Modern NNs")."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def ndcg_at_k(scores: np.ndarray, gains: np.ndarray, k: int = 10) -> float:
    """NDCG@k with exponential gain 2^rel - 1 (Jarvelin & Kekalainen 2002); 1.0 when no item is relevant."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ranked = gains[np.argsort(-scores, kind="stable")][:k]
    ideal = np.sort(gains)[::-1][:k]
    idcg = float(((2.0**ideal - 1) * discounts[: len(ideal)]).sum())
    if idcg == 0:
        return 1.0
    return float(((2.0**ranked - 1) * discounts[: len(ranked)]).sum() / idcg)


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney U / (n+ n-))."""
    if not len(positive) or not len(negative):
        return float("nan")
    negative = np.sort(negative)
    below = np.searchsorted(negative, positive, side="left")
    not_above = np.searchsorted(negative, positive, side="right")
    return float((below + 0.5 * (not_above - below)).sum() / (len(positive) * len(negative)))


def pairwise_accuracy(scores: np.ndarray, labels: np.ndarray, groups: list[np.ndarray]) -> tuple[float, int]:
    """Share of a query's item pairs with different labels that the scores order correctly (ties
    half), over all such pairs of all queries; and how many pairs that was."""
    correct, total = 0.0, 0
    for idx in groups:
        s, y = scores[idx], labels[idx]
        higher = y[:, None] > y[None, :]
        n = int(higher.sum())
        if n:
            diff = s[:, None] - s[None, :]
            correct += float(((diff > 0) & higher).sum() + 0.5 * ((diff == 0) & higher).sum())
            total += n
    return (correct / total if total else float("nan")), total


def query_groups(queries: list[str]) -> dict[str, np.ndarray]:
    by_query: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        by_query.setdefault(q, []).append(i)
    return {q: np.array(idx) for q, idx in by_query.items()}


def easy_negative_metrics(
    own_scores: np.ndarray, own_labels: np.ndarray, own_queries: list[str],
    foreign_probs: np.ndarray, foreign_scores: np.ndarray, foreign_queries: list[str],
) -> dict:
    """How items that unrelated queries retrieved fare when shown for a query:
    irrelevant_rate -- share of them graded irrelevant (argmax grade 0);
    auc -- P(an own item the raters graded weak or strong outscores a foreign item), pooled;
    ndcg@10 -- per query over its own items (their labels) plus its foreign items (gain 0),
    averaged over the queries that got foreign items."""
    own = query_groups(own_queries)
    foreign = query_groups(foreign_queries)
    ndcg = [
        ndcg_at_k(np.concatenate([own_scores[own[q]], foreign_scores[idx]]),
                  np.concatenate([own_labels[own[q]].astype(float), np.zeros(len(idx))]))
        for q, idx in foreign.items()
    ]
    relevant_own = np.concatenate([own[q] for q in foreign]) if foreign else np.array([], dtype=int)
    relevant_own = relevant_own[own_labels[relevant_own] > 0]
    return {
        "irrelevant_rate": float((foreign_probs.argmax(axis=1) == 0).mean()) if len(foreign_probs) else float("nan"),
        "auc": roc_auc(own_scores[relevant_own], foreign_scores),
        "ndcg@10": float(np.mean(ndcg)) if ndcg else float("nan"),
        "queries": len(foreign),
        "n": int(len(foreign_scores)),
    }


def relevance_metrics(probs: np.ndarray, scores: np.ndarray, labels: np.ndarray, queries: list[str]) -> dict:
    num_labels = probs.shape[1]
    preds = probs.argmax(axis=1)
    per_grade = f1_per_grade(labels, preds, num_labels)
    groups = list(query_groups(queries).values())
    ndcg = [ndcg_at_k(scores[idx], labels[idx].astype(float)) for idx in groups]
    pairwise, n_pairs = pairwise_accuracy(scores, labels, groups)
    return {
        "accuracy": float((preds == labels).mean()),
        "macro_f1": float(np.mean(per_grade)),
        "per_grade_f1": per_grade,
        "ece": expected_calibration_error(probs, labels),
        "ndcg@10": float(np.mean(ndcg)),
        "pairwise_accuracy": pairwise,
        "pairwise_pairs": n_pairs,
        "n": int(len(labels)),
    }
