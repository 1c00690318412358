"""DASA: OOD detectors separate a shifted cluster; the selector honours the budget, stays diverse
and reads no label it did not select."""

import json

import numpy as np
import pytest

from darl_infer.training.dasa import (
    DETECTORS,
    OODDetector,
    k_center_greedy,
    rank_average,
    read_pool,
    select,
    select_random,
)
from darl_infer.jsonl import DataError

D, K = 8, 3


def auroc(in_scores, out_scores):
    """P(score_out > score_in) + 0.5 P(tie): Mann-Whitney U by explicit pairwise comparison."""
    a, b = np.asarray(in_scores)[:, None], np.asarray(out_scores)[None, :]
    return float(((b > a).sum() + 0.5 * (b == a).sum()) / (a.size * b.size))


def id_samples(rng, n):
    """Three classes with means 4*e_k; the head reads the class directions (a trained head's logits)."""
    labels = rng.integers(0, K, n)
    x = rng.normal(size=(n, D))
    x[np.arange(n), labels] += 4.0
    return x, labels


def head(x):
    return x[:, :K]


@pytest.fixture
def clusters():
    rng = np.random.default_rng(0)
    train_x, train_y = id_samples(rng, 400)
    test_x, _ = id_samples(rng, 200)
    shift = np.zeros(D)
    shift[K:] = 3.0  # a cluster moved along directions the classes do not use
    ood_x = rng.normal(size=(200, D)) + shift
    return train_x, train_y, test_x, ood_x


@pytest.mark.parametrize("name", DETECTORS)
def test_each_detector_separates_a_shifted_cluster(clusters, name):
    train_x, train_y, test_x, ood_x = clusters
    det = OODDetector.fit(train_x, train_y, K, knn_k=5)
    s_in = det.scores(test_x, head(test_x), [name])[name]
    s_out = det.scores(ood_x, head(ood_x), [name])[name]
    assert auroc(s_in, s_out) > 0.9


def test_rank_average_of_all_detectors_separates_too(clusters):
    train_x, train_y, test_x, ood_x = clusters
    det = OODDetector.fit(train_x, train_y, K)
    x = np.concatenate([test_x, ood_x])
    combined = rank_average(det.scores(x, head(x)))
    assert auroc(combined[: len(test_x)], combined[len(test_x) :]) > 0.9


def test_mahalanobis_and_knn_match_brute_force_formulas(clusters):
    train_x, train_y, test_x, _ = clusters
    det = OODDetector.fit(train_x, train_y, K, knn_k=7, shrinkage=0.0)
    means = np.stack([train_x[train_y == k].mean(0) for k in range(K)])
    centred = train_x - means[train_y]
    cov = centred.T @ centred / len(train_x)
    want = [min(float((x - m) @ np.linalg.solve(cov, x - m)) for m in means) for x in test_x[:20]]
    assert np.allclose(det.mahalanobis(test_x[:20]), want)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    bank = unit(train_x)
    want_knn = [np.sort(np.linalg.norm(bank - unit(x), axis=1))[6] for x in test_x[:20]]
    assert np.allclose(det.knn(test_x[:20]), want_knn)


def test_energy_and_msp_formulas():
    logits = np.array([[2.0, 0.0, -1.0], [0.1, 0.1, 0.1]])
    assert np.allclose(OODDetector.energy(logits), -np.log(np.exp(logits).sum(1)))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert np.allclose(OODDetector.msp(logits), -p.max(1))


def test_unknown_detector_is_refused(clusters):
    train_x, train_y, test_x, _ = clusters
    with pytest.raises(ValueError, match="unknown OOD detector"):
        OODDetector.fit(train_x, train_y, K).scores(test_x, head(test_x), ["odin"])


@pytest.mark.parametrize("budget", [0, 1, 7, 50, 500])
def test_selection_honours_the_budget(clusters, budget):
    train_x, train_y, test_x, ood_x = clusters
    pool = np.concatenate([test_x, ood_x])
    det = OODDetector.fit(train_x, train_y, K)
    chosen = select(rank_average(det.scores(pool, head(pool))), pool, budget, train_x)
    assert len(chosen) == min(budget, len(pool)) == len(set(chosen))
    assert all(0 <= i < len(pool) for i in chosen)
    rand = select_random(len(pool), budget, seed=3)
    assert len(rand) == min(budget, len(pool)) == len(set(rand))
    assert rand == select_random(len(pool), budget, seed=3)


def test_selection_prefers_ood_and_skips_near_duplicates(clusters):
    train_x, train_y, test_x, ood_x = clusters
    det = OODDetector.fit(train_x, train_y, K)
    base = np.concatenate([test_x, ood_x])
    most_ood = base[np.argmax(rank_average(det.scores(base, head(base))))]
    duplicates = most_ood + np.random.default_rng(1).normal(scale=1e-4, size=(20, D))
    pool = np.concatenate([base, duplicates])
    score = rank_average(det.scores(pool, head(pool)))
    # without the diversity guard, the duplicates are the top scorers
    dup_range = range(len(test_x) + len(ood_x), len(pool))
    top = set(np.argsort(-score)[:10].tolist())
    assert len(top & set(dup_range)) >= 5
    chosen = select(score, pool, 10, train_x)
    assert len(set(chosen) & set(dup_range)) <= 1
    assert all(i >= len(test_x) for i in chosen)  # every pick is out-of-distribution


def test_k_center_greedy_picks_the_point_farthest_from_the_centres():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    assert k_center_greedy(x, 1, initial_centres=np.array([[1.0, 0.0]])) == [3]
    assert sorted(k_center_greedy(x, 2, initial_centres=np.array([[1.0, 0.0]]))) == [2, 3]


def write_pool(path, labels):
    path.write_text("".join(json.dumps({"query": f"q{i // 3}", "item": f"item {i}", "label": y}) + "\n" for i, y in enumerate(labels)))


class RecordingList(list):
    """A list that records which indices were read."""

    def __init__(self, values):
        super().__init__(values)
        self.read = set()

    def __getitem__(self, i):
        self.read.add(i)
        return super().__getitem__(i)

    def __iter__(self):
        raise AssertionError("the whole label list was iterated")


def test_pool_reveals_only_selected_labels(tmp_path, clusters):
    train_x, train_y, test_x, ood_x = clusters
    feats = np.concatenate([test_x, ood_x])
    write_pool(tmp_path / "pool.jsonl", [i % 3 for i in range(len(feats))])
    pool = read_pool(tmp_path / "pool.jsonl")
    pool._raw_labels = RecordingList(pool._raw_labels)
    det = OODDetector.fit(train_x, train_y, K)
    chosen = select(rank_average(det.scores(feats, head(feats))), feats, 12, train_x)
    pairs = pool.reveal(chosen)
    assert pool._raw_labels.read == set(chosen) == pool.revealed
    assert [p.label for p in pairs] == [i % 3 for i in chosen]
    assert [p.item for p in pairs] == [f"item {i}" for i in chosen]


def test_unselected_bad_labels_are_never_read_but_a_selected_one_is_an_error(tmp_path):
    write_pool(tmp_path / "pool.jsonl", [0, "secret", 2, 7, 1])
    pool = read_pool(tmp_path / "pool.jsonl")  # unread labels are not validated
    assert [p.label for p in pool.reveal([0, 2, 4])] == [0, 2, 1]
    with pytest.raises(DataError, match=r"pool.jsonl:4: label 7"):
        pool.reveal([3])
    assert 3 not in pool.revealed


def test_pool_bad_input_names_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"query": "a", "item": "b"}\n{"query": "a", "item": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        read_pool(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no pairs"):
        read_pool(tmp_path / "empty.jsonl")
