"""JSONL relevance data: one `{"query": str, "item": str, "label": int}` object a line."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from darl_infer import pairs as pairs_lib
from darl_infer.jsonl import DataError, iter_rows


@dataclass(frozen=True)
class Pair:
    query: str
    item: str
    label: int


def read_pairs(path: str | Path, num_labels: int = 3, limit: int | None = None, seed: int = 0) -> list[Pair]:
    """All pairs of a file (or `limit` of them drawn with `seed`); any bad line is an error naming it."""
    pairs = []
    for n, row in iter_rows(path):
        label = row.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_labels:
            raise DataError(f"{path}:{n}: label {label!r} is not an integer in 0..{num_labels - 1}")
        pairs.append(Pair(row["query"], row["item"], label))
    if not pairs:
        raise DataError(f"{path}: no pairs")
    if limit is not None and limit < len(pairs):
        pairs = random.Random(seed).sample(pairs, limit)
    return pairs


def group_by_query(pairs: list[Pair]) -> dict[str, list[int]]:
    return pairs_lib.group_by_query(p.query for p in pairs)
