"""(query, item) pairs in any order are scored query by query, so each query's prefix runs once."""

from __future__ import annotations

from typing import Iterable, Sequence


def group_by_query(queries: Iterable[str]) -> dict[str, list[int]]:
    """Positions of each distinct query in `queries`, queries in first-seen order."""
    groups: dict[str, list[int]] = {}
    for n, query in enumerate(queries):
        groups.setdefault(query, []).append(n)
    return groups


def score_pairs(scorer, queries: Sequence[str], items: Sequence[str]) -> list[dict]:
    """The output fields of each pair (score, grade, probs, truncated; graded_by for a cascade), in
    input order, from one `score_many` call: each distinct query's prefix runs once."""
    groups = group_by_query(queries)
    results = scorer.score_many([(query, [items[i] for i in idx]) for query, idx in groups.items()])
    fields: list[dict] = [{} for _ in queries]
    for idx, result in zip(groups.values(), results):
        for j, i in enumerate(idx):
            fields[i] = dict(
                score=float(result.scores[j]),
                grade=int(result.grades[j]),
                probs=[float(p) for p in result.probs[j]],
                truncated=bool(result.truncated[j]),
            )
            if result.graded_by is not None:
                fields[i]["graded_by"] = str(result.graded_by[j])
    return fields
