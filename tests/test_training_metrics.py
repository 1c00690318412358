"""Evaluation metrics against independent implementations (scikit-learn, a per-sample ECE loop)."""

import math

import numpy as np
import pytest

from darl_infer.training.metrics import easy_negative_metrics, expected_calibration_error, relevance_metrics, roc_auc

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


def pairwise_oracle(scores, labels, queries):
    """Every ordered pair of items of one query with different labels, one at a time."""
    correct = total = 0
    for i in range(len(scores)):
        for j in range(len(scores)):
            if queries[i] == queries[j] and labels[i] > labels[j]:
                total += 1
                correct += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    return correct / total, total


def test_pairwise_accuracy_and_auc_match_independent_implementations():
    rng = np.random.default_rng(1)
    n, queries = 200, [f"q{i % 17}" for i in range(200)]
    labels = rng.integers(0, 3, n)
    scores = np.round(rng.normal(size=n) + 0.5 * labels, 1)  # rounded: ties occur and count half
    m = relevance_metrics(np.eye(3)[labels], scores, labels, queries)
    expected, pairs = pairwise_oracle(scores, labels, queries)
    assert m["pairwise_accuracy"] == pytest.approx(expected) and m["pairwise_pairs"] == pairs
    pos, neg = scores[labels > 0], rng.normal(size=50).round(1)
    truth = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    assert roc_auc(pos, neg) == pytest.approx(sklearn_metrics.roc_auc_score(truth, np.r_[pos, neg]))


def test_easy_negative_metrics_against_sklearn():
    rng = np.random.default_rng(2)
    own_queries = [f"q{i % 7}" for i in range(40)]
    own_labels, own_scores = rng.integers(0, 3, 40), rng.normal(size=40)
    foreign_queries = [f"q{i % 5}" for i in range(25)]  # q5, q6 get no foreign items
    foreign_probs = rng.dirichlet(np.ones(3), 25)
    foreign_scores = foreign_probs @ np.array([0.0, 1.0, 2.0])
    m = easy_negative_metrics(own_scores, own_labels, own_queries, foreign_probs, foreign_scores, foreign_queries)
    assert m["irrelevant_rate"] == pytest.approx(np.mean(foreign_probs.argmax(1) == 0))
    shown = [i for i, q in enumerate(own_queries) if q in set(foreign_queries) and own_labels[i] > 0]
    truth = np.r_[np.ones(len(shown)), np.zeros(25)]
    assert m["auc"] == pytest.approx(sklearn_metrics.roc_auc_score(truth, np.r_[own_scores[shown], foreign_scores]))
    per_query = []
    for q in sorted(set(foreign_queries)):
        own = [i for i, x in enumerate(own_queries) if x == q]
        foreign = [i for i, x in enumerate(foreign_queries) if x == q]
        gains = np.r_[2.0 ** own_labels[own] - 1, np.zeros(len(foreign))]
        ranked = np.r_[own_scores[own], foreign_scores[foreign]]
        per_query.append(1.0 if gains.sum() == 0 else sklearn_metrics.ndcg_score([gains], [ranked], k=10))
    assert m["ndcg@10"] == pytest.approx(np.mean(per_query))
    assert m["queries"] == 5 and m["n"] == 25
