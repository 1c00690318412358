"""Negatives: a query paired with items that other, unrelated queries of the same data set
retrieved, graded 0 ("irrelevant").

A ranking stage is mostly shown candidates that recall fetched for other intents, yet graded
relevance data only holds items that were retrieved for the query itself. Training on
"random / in-batch negatives" is the standard fix (DPR: Karpukhin et al. 2020, "Dense Passage
Retrieval for Open-Domain Question Answering"; Sentence-BERT's MultipleNegativesRanking; the
cross-encoders of RocketQA). Two kinds:

- random: an item of another query, drawn uniformly;
- hard: model-mined (RocketQA: Qu et al. 2021): several random candidates per query are scored by
  the model trained so far and the highest-scored one is kept -- unless the model grades it
  relevant with confidence, which marks a likely false negative (RocketQA's denoising).

Both are guarded against false negatives: an item that shares a word (Latin script, lower-cased,
stop words aside) or, for Chinese, a character bigram with the query is never used. The same
draw (`ForeignItems`) gives the `easy_negatives` evaluation its foreign items.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from darl_infer.config import from_fields

from .data import Pair, group_by_query

KINDS = ("random", "hard")
_WORD = re.compile(r"[a-z0-9]+")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]+")
# words too common in queries and titles to mark an item as related (Home Depot titles: "in", "with")
_STOP_WORDS = frozenset("a an and at by for from in of on or the to with x ft in. 1 2 3 4 5 6 7 8 9 0".split())


@dataclass
class NegativesConfig:
    ratio: float                      # negatives per ID training pair, e.g. 0.25
    kind: str = "random"              # "random", or "hard" (mined by the stage-1 model, see train.py)
    candidates: int = 4               # hard: random candidates scored per negative
    denoise_threshold: float = 0.5    # hard: drop a candidate the model gives P(not irrelevant) above this

    @classmethod
    def from_dict(cls, d: dict) -> "NegativesConfig":
        c = from_fields(cls, d, "negatives")
        if c.kind not in KINDS:
            raise ValueError(f"negatives kind must be one of {list(KINDS)}, got {c.kind!r}")
        if not 0 < c.ratio <= 4:
            raise ValueError(f"negatives ratio must be in (0, 4], got {c.ratio}")
        if c.candidates < 1 or not 0 < c.denoise_threshold <= 1:
            raise ValueError("negatives candidates must be >= 1 and denoise_threshold in (0, 1]")
        return c


def lexical_units(text: str) -> set[str]:
    """Words (Latin script, lower-cased, no stop words) and CJK character bigrams of a text."""
    text = text.lower()
    units = {w for w in _WORD.findall(text) if w not in _STOP_WORDS}
    for run in _CJK.findall(text):
        units.update(run[i : i + 2] for i in range(len(run) - 1))
        if len(run) == 1:
            units.add(run)
    return units


def related(query_units: set[str], item: str) -> bool:
    """The false-negative guard: the item shares a lexical unit with the query."""
    return not query_units.isdisjoint(lexical_units(item))


class ForeignItems:
    """Draws, for a query, items that other queries of `pairs` retrieved and that pass the guard."""

    def __init__(self, pairs: list[Pair], seed: int):
        self.items_of = {q: {pairs[i].item for i in idx} for q, idx in group_by_query(pairs).items()}
        self.all_items = [p.item for p in pairs]
        self.rng = random.Random(seed)

    def draw(self, query: str, k: int, max_tries: int = 50) -> list[str]:
        """`k` items (fewer when the guard rejects `max_tries` draws in a row)."""
        units, own, chosen, tries = lexical_units(query), self.items_of.get(query, set()), [], 0
        while len(chosen) < k and tries < max_tries:
            item = self.rng.choice(self.all_items)
            if item in own or item in chosen or related(units, item):
                tries += 1
                continue
            chosen.append(item)
            tries = 0
        return chosen


def random_negatives(pairs: list[Pair], count: int, seed: int, per_query: int = 1) -> list[Pair]:
    """`count` (query, foreign item, 0) pairs, `per_query` items for each drawn query; queries are
    drawn from `pairs` (a query as often as it has items, so the set's query mix is kept)."""
    rng, foreign = random.Random(seed), ForeignItems(pairs, seed + 1)
    negatives: list[Pair] = []
    for _ in range(20 * count):  # bounded: a set whose every item is related to every query has none
        if len(negatives) >= count:
            break
        query = rng.choice(pairs).query
        negatives += [Pair(query, item, 0) for item in foreign.draw(query, per_query)]
    return negatives[:count]
