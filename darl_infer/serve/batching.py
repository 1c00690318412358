"""One scoring step's plan: queued requests merged by query, items deduplicated, results split back.

Requests with the same query in one step become one `(query, items)` entry of `score_many`, so
that query's prefix runs once for all of them; an item that several of them send is scored once.
Each item's score does not depend on the other items of its entry (the prefix-reuse contract), so
a request's slice of the merged result equals scoring it alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from darl_infer import ScoreResult


@dataclass(eq=False)
class Request:
    """What the scheduler needs of one HTTP request: its text and its token counts."""

    query: str
    items: list[str]
    prefix_tokens: int       # instruction + query + item label, as the encoder built them
    item_tokens: list[int]   # each item's suffix (item + answer cue)

    @property
    def tokens(self) -> int:
        return self.prefix_tokens + sum(self.item_tokens)


@dataclass
class _Entry:
    query: str
    position: dict[str, int] = field(default_factory=dict)  # item text -> index in this entry


class BatchPlan:
    def __init__(self):
        self._entries: dict[str, _Entry] = {}
        self.requests: list[Request] = []
        self.tokens = 0        # what the step will score: each entry's prefix once + its unique items
        self.shared = 0        # requests that joined an entry another request of this step opened

    def cost(self, request: Request) -> int:
        """Tokens that adding `request` adds to this step: its items not yet in it, and its prefix
        unless another request of this step has the same query."""
        entry = self._entries.get(request.query)
        known = entry.position if entry is not None else {}
        new: dict[str, int] = {}
        for item, n in zip(request.items, request.item_tokens):
            if item not in known:
                new.setdefault(item, n)
        return sum(new.values()) + (0 if entry is not None else request.prefix_tokens)

    def has_query(self, query: str) -> bool:
        return query in self._entries

    def add(self, request: Request) -> None:
        self.tokens += self.cost(request)
        entry = self._entries.get(request.query)
        if entry is None:
            entry = self._entries[request.query] = _Entry(request.query)
        else:
            self.shared += 1
        for item in request.items:
            entry.position.setdefault(item, len(entry.position))
        self.requests.append(request)

    @property
    def items(self) -> int:
        return sum(len(e.position) for e in self._entries.values())

    def batch(self) -> list[tuple[str, list[str]]]:
        """The `score_many` argument: one entry per query, its items in first-seen order."""
        return [(e.query, list(e.position)) for e in self._entries.values()]

    def split(self, results: list[ScoreResult]) -> list[ScoreResult]:
        """Each request's own result, its items in its order, from `score_many(self.batch())`."""
        by_query = dict(zip(self._entries, results))
        out = []
        for request in self.requests:
            merged, position = by_query[request.query], self._entries[request.query].position
            rows = np.array([position[item] for item in request.items], dtype=np.int64)
            out.append(ScoreResult(
                probs=merged.probs[rows], scores=merged.scores[rows], grades=merged.grades[rows],
                truncated=merged.truncated[rows], labels=merged.labels,
            ))
        return out

