"""Evaluation metrics against independent implementations (scikit-learn, a per-sample ECE loop)."""

import math

import numpy as np
import pytest

from darl_infer.training.metrics import expected_calibration_error, relevance_metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def ece_oracle(probs, labels, bins=15):
    """Per-sample loop: bin b holds confidences in ((b)/bins, (b+1)/bins]."""
    sums = [[0, 0.0, 0.0] for _ in range(bins)]  # count, correct, confidence
    for p, y in zip(probs, labels):
        conf = max(p)
        b = max(0, math.ceil(conf * bins) - 1)
        sums[b][0] += 1
        sums[b][1] += float(int(np.argmax(p)) == y)
        sums[b][2] += conf
    n = len(labels)
    return sum(c / n * abs(k / c - s / c) for c, k, s in sums if c)


def test_metrics_match_independent_implementations():
    rng = np.random.default_rng(0)
    n, queries = 300, [f"q{i % 23}" for i in range(300)]
    logits = rng.normal(size=(n, 3)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 3, n)
    labels[[q == "q0" for q in queries]] = 2  # make sure no query is all-irrelevant by chance only
    scores = probs @ np.array([0.0, 1.0, 2.0])
    m = relevance_metrics(probs, scores, labels, queries)
    preds = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(labels, preds))
    assert m["per_grade_f1"] == pytest.approx(list(sklearn_metrics.f1_score(labels, preds, average=None)))
    assert m["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(labels, preds, average="macro"))
    assert m["ece"] == pytest.approx(ece_oracle(probs, labels))
    per_query = []
    for q in sorted(set(queries)):
        idx = [i for i, x in enumerate(queries) if x == q]
        gains = 2.0 ** labels[idx] - 1
        if gains.sum() == 0:
            per_query.append(1.0)
        else:
            per_query.append(sklearn_metrics.ndcg_score([gains], [scores[idx]], k=10))
    assert m["ndcg@10"] == pytest.approx(np.mean(per_query))
    assert m["n"] == n


def test_ece_is_zero_when_confidence_equals_accuracy_and_large_when_overconfident():
    # 10 samples at confidence 0.8 with 8 right: perfectly calibrated
    probs = np.tile([0.8, 0.1, 0.1], (10, 1))
    labels = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    overconfident = np.tile([0.99, 0.005, 0.005], (10, 1))
    assert expected_calibration_error(overconfident, labels) == pytest.approx(0.19)
