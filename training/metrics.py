"""Evaluation metrics for graded relevance: accuracy, macro-F1, per-grade F1, ECE, NDCG@10."""

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


def relevance_metrics(probs: np.ndarray, scores: np.ndarray, labels: np.ndarray, queries: list[str]) -> dict:
    num_labels = probs.shape[1]
    preds = probs.argmax(axis=1)
    per_grade = f1_per_grade(labels, preds, num_labels)
    by_query: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        by_query.setdefault(q, []).append(i)
    ndcg = [ndcg_at_k(scores[idx], labels[idx].astype(float)) for idx in map(np.array, by_query.values())]
    return {
        "accuracy": float((preds == labels).mean()),
        "macro_f1": float(np.mean(per_grade)),
        "per_grade_f1": per_grade,
        "ece": expected_calibration_error(probs, labels),
        "ndcg@10": float(np.mean(ndcg)),
        "n": int(len(labels)),
    }
