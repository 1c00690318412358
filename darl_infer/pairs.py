"""(query, item) pairs in any order are scored query by query, so each query's prefix runs once."""

from __future__ import annotations

from typing import Iterable


def group_by_query(queries: Iterable[str]) -> dict[str, list[int]]:
    """Positions of each distinct query in `queries`, queries in first-seen order."""
    groups: dict[str, list[int]] = {}
    for n, query in enumerate(queries):
        groups.setdefault(query, []).append(n)
    return groups
