"""A teacher's grade probabilities for a list of pairs: computed once and kept on disk.

Two exact ways to compute them (tests/test_distill.py checks they agree with the Scorer):
- through the frozen-layer cache the teacher was trained with, when its directory is there: the
  bottom layers' states of every pair that training or evaluation already saw are read from disk
  and only the top (LoRA) layers run -- for a gemma3-270m teacher 4 of 18 layers;
- otherwise through `Scorer.score_many`, each query's prefix once, a chunk of queries per call.

The file is keyed by the teacher's files (darl.json, adapter or model config and weights) and by
the pairs in order, so a retrained teacher or other data never reads stale probabilities.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from darl_infer.atomic import atomic_file
from darl_infer.checkpoint import CheckpointSpec
from darl_infer.config import from_fields
from darl_infer.pairs import group_by_query

from .train import Trainee, TrainConfig

ITEMS_PER_CALL = 512  # a chunk of queries scored in one score_many call (bounded memory, visible progress)


def cache_key(teacher_dir: Path, pairs: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for path in sorted(teacher_dir.iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors"):
            h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    for query, item in pairs:
        h.update(query.encode() + b"\0" + item.encode() + b"\n")
    return h.hexdigest()[:32]


def score_pairs(scorer, pairs: list[tuple[str, str]]) -> np.ndarray:
    """(N, K) probabilities of `pairs` in input order."""
    probs = np.empty((len(pairs), len(scorer.labels)), dtype=np.float32)
    groups = list(group_by_query(q for q, _ in pairs).items())
    with tqdm(total=len(pairs), desc="scoring pairs", unit="pair", disable=len(pairs) < 1000) as bar:
        start = 0
        while start < len(groups):
            chunk, size = [], 0
            while start < len(groups) and (not chunk or size + len(groups[start][1]) <= ITEMS_PER_CALL):
                chunk.append(groups[start])
                size += len(groups[start][1])
                start += 1
            results = scorer.score_many([(query, [pairs[n][1] for n in idx]) for query, idx in chunk])
            for (_, idx), result in zip(chunk, results):
                probs[idx] = result.probs
            bar.update(size)
    return probs


def frozen_cache_probs(teacher_dir: Path, pairs: list[tuple[str, str]]) -> np.ndarray | None:
    """The teacher's probabilities through its training run's frozen-layer cache; None without one."""
    spec = CheckpointSpec.load(teacher_dir)
    config = spec.training.get("config") or {}
    if spec.base_model is None or not config.get("frozen_cache") or not Path(config["frozen_cache"]).is_dir():
        return None
    trainee = Trainee(from_fields(TrainConfig, config, "teacher config"), spec.template, spec.num_labels, adapter=teacher_dir)
    return trainee.probs(pairs).astype(np.float32)


def teacher_probs(teacher_dir: Path, pairs: list[tuple[str, str]], cache: str | None) -> np.ndarray:
    """Probabilities of `pairs` under the checkpoint in `teacher_dir`, from `cache` when it has them."""
    path = None if cache is None else Path(cache) / f"{cache_key(teacher_dir, pairs)}.npy"
    if path is not None and path.is_file():
        return np.load(path)
    from darl_infer import Scorer

    probs = frozen_cache_probs(teacher_dir, pairs)
    if probs is None:
        probs = score_pairs(Scorer.from_pretrained(teacher_dir), pairs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as f:
            np.save(f, probs)
    return probs
