"""DASA: pick the unlabeled pool samples the training distribution covers least, under a budget.

1. Features: the model's own last-token hidden state (pre-head) and logits (see features.py).
2. OOD detectors, each giving a score where higher = farther from the training data:
   - Mahalanobis distance to the nearest class-conditional mean under one shared covariance
     (Lee et al. 2018, "A Simple Unified Framework for Detecting OOD Samples"), with the
     covariance shrunk towards a scaled identity (Ledoit & Wolf 2004) because the ID bank can
     hold fewer samples than the hidden size.
   - Energy, -logsumexp(logits) (Liu et al. 2020, "Energy-based Out-of-distribution Detection").
   - Distance to the k-th nearest ID neighbour of the L2-normalised feature (Sun et al. 2022,
     "Out-of-Distribution Detection with Deep Nearest Neighbors").
   - Negative max softmax probability (Hendrycks & Gimpel 2017).
   Detectors are combined by averaging their rank percentiles over the pool, so no scale dominates.
3. Selection: the `candidate_factor * budget` highest-scoring pool samples, then k-center greedy
   (Sener & Savarese 2018, "Active Learning for CNNs: A Core-Set Approach") among them with the
   ID bank as initial centres: each pick is the candidate farthest from both the ID data and the
   picks so far, so near duplicates of a pick are never chosen while anything else is left.
4. Labels: `HiddenLabelPool` gives only queries and items; a label is read (and validated) only
   when `reveal` is called for a selected index, and every revealed index is recorded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from darl_infer.jsonl import DataError, iter_rows

from .data import Pair

DETECTORS = ("mahalanobis", "energy", "knn", "msp")


# ---- OOD detectors -------------------------------------------------------------------------


@dataclass
class OODDetector:
    class_means: np.ndarray      # (K, H)
    precision: np.ndarray        # (H, H) inverse of the shrunk shared covariance
    bank: np.ndarray             # (N, H) L2-normalised ID features, for kNN
    knn_k: int = 10

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, num_labels: int, knn_k: int = 10, shrinkage: float = 0.1) -> "OODDetector":
        features = np.asarray(features, dtype=np.float64)
        labels = np.asarray(labels)
        if len(features) == 0:
            raise ValueError("OOD detector needs at least one in-distribution feature")
        H = features.shape[1]
        means = np.zeros((num_labels, H))
        centred = np.empty_like(features)
        present = []
        for k in range(num_labels):
            rows = labels == k
            if rows.any():
                means[k] = features[rows].mean(0)
                centred[rows] = features[rows] - means[k]
                present.append(k)
        covariance = centred.T @ centred / len(features)
        shrunk = (1 - shrinkage) * covariance + shrinkage * (np.trace(covariance) / H + 1e-8) * np.eye(H)
        return cls(means[present], np.linalg.inv(shrunk), _l2_normalise(features), knn_k)

    def mahalanobis(self, features: np.ndarray) -> np.ndarray:
        diff = np.asarray(features, dtype=np.float64)[:, None, :] - self.class_means[None]  # (N, K, H)
        dist = np.einsum("nkh,hg,nkg->nk", diff, self.precision, diff)
        return dist.min(1)

    def knn(self, features: np.ndarray) -> np.ndarray:
        sims = _l2_normalise(np.asarray(features, dtype=np.float64)) @ self.bank.T
        k = min(self.knn_k, self.bank.shape[0])
        kth_sim = np.sort(sims, axis=1)[:, -k]
        return np.sqrt(np.maximum(2 - 2 * kth_sim, 0))  # Euclidean distance on the unit sphere

    @staticmethod
    def energy(logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float64)
        m = logits.max(1, keepdims=True)
        return -(m[:, 0] + np.log(np.exp(logits - m).sum(1)))

    @staticmethod
    def msp(logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float64)
        z = np.exp(logits - logits.max(1, keepdims=True))
        return -(z / z.sum(1, keepdims=True)).max(1)

    def scores(self, features: np.ndarray, logits: np.ndarray, detectors=DETECTORS) -> dict[str, np.ndarray]:
        fns = {
            "mahalanobis": lambda: self.mahalanobis(features),
            "knn": lambda: self.knn(features),
            "energy": lambda: self.energy(logits),
            "msp": lambda: self.msp(logits),
        }
        unknown = set(detectors) - set(fns)
        if unknown:
            raise ValueError(f"unknown OOD detector(s) {sorted(unknown)}; choose from {list(DETECTORS)}")
        return {name: fns[name]() for name in detectors}


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def rank_average(scores: dict[str, np.ndarray]) -> np.ndarray:
    """Mean over detectors of each sample's rank percentile in (0, 1]; higher = more OOD."""
    ranks = [(np.argsort(np.argsort(s, kind="stable"), kind="stable") + 1) / len(s) for s in scores.values()]
    return np.mean(ranks, axis=0)


# ---- selection ----------------------------------------------------------------------------


def k_center_greedy(features: np.ndarray, budget: int, initial_centres: np.ndarray | None = None) -> list[int]:
    """Indices of `budget` rows of `features`, each the farthest from all centres so far."""
    x = _l2_normalise(np.asarray(features, dtype=np.float64))
    budget = min(budget, len(x))
    if initial_centres is not None and len(initial_centres):
        c = _l2_normalise(np.asarray(initial_centres, dtype=np.float64))
        nearest = np.sqrt(np.maximum(2 - 2 * (x @ c.T).max(1), 0))
    else:
        nearest = np.full(len(x), np.inf)
    picked: list[int] = []
    for _ in range(budget):
        i = int(np.argmax(nearest))
        if np.isinf(nearest[i]):  # no centre yet: start from the first candidate (the most OOD)
            i = 0
        picked.append(i)
        nearest = np.minimum(nearest, np.sqrt(np.maximum(2 - 2 * x @ x[i], 0)))
        nearest[picked] = -1.0  # never pick twice
    return picked


def select(
    ood_score: np.ndarray,
    pool_features: np.ndarray,
    budget: int,
    id_features: np.ndarray | None = None,
    candidate_factor: float = 3.0,
) -> list[int]:
    """DASA selection: top `candidate_factor * budget` by OOD score, then k-center greedy among them."""
    if budget < 0:
        raise ValueError("budget must be >= 0")
    order = np.argsort(-np.asarray(ood_score), kind="stable")
    candidates = order[: max(budget, int(round(candidate_factor * budget)))]
    picked = k_center_greedy(pool_features[candidates], budget, id_features)
    return [int(candidates[i]) for i in picked]


def select_random(pool_size: int, budget: int, seed: int) -> list[int]:
    """The control: the same budget drawn uniformly at random."""
    return sorted(random.Random(seed).sample(range(pool_size), min(budget, pool_size)))


# ---- a pool whose labels stay hidden until selected ---------------------------------------


class HiddenLabelPool:
    """Pool pairs whose labels are read only for selected indices (the annotation DASA pays for)."""

    def __init__(self, path: str | Path, queries: list[str], items: list[str], raw_labels: list, line_numbers: list[int], num_labels: int):
        self.path = Path(path)
        self.queries = queries
        self.items = items
        self._raw_labels = raw_labels  # unvalidated, unread until revealed
        self._lines = line_numbers
        self.num_labels = num_labels
        self.revealed: set[int] = set()

    def __len__(self) -> int:
        return len(self.queries)

    def reveal(self, indices: list[int]) -> list[Pair]:
        pairs = []
        for i in indices:
            label = self._raw_labels[i]
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < self.num_labels:
                raise DataError(f"{self.path}:{self._lines[i]}: label {label!r} is not an integer in 0..{self.num_labels - 1}")
            self.revealed.add(int(i))
            pairs.append(Pair(self.queries[i], self.items[i], label))
        return pairs


def read_pool(path: str | Path, num_labels: int = 3, limit: int | None = None, seed: int = 0) -> HiddenLabelPool:
    """Queries and items of a JSONL pool (bad lines name file and line); labels stay hidden."""
    rows = [(row["query"], row["item"], row.get("label"), n) for n, row in iter_rows(path)]
    if not rows:
        raise DataError(f"{path}: no pairs")
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    q, i, labels, lines = map(list, zip(*rows))
    return HiddenLabelPool(path, q, i, labels, lines, num_labels)
