"""Negatives for training and evaluation: drawn from other queries of the same set, never an item
the lexical guard relates to the query, and never one of the query's own items."""

import random

import pytest

from darl_infer.training.data import Pair
from darl_infer.training.negatives import ForeignItems, NegativesConfig, lexical_units, random_negatives, related


def test_guard_relates_shared_words_and_chinese_bigrams():
    assert related(lexical_units("Cordless Drill"), "DEWALT 20V MAX cordless drill/driver")
    assert not related(lexical_units("cordless drill"), "Interior paint in white, 1 gal.")  # stop words, numbers
    assert related(lexical_units("小孩咳嗽感冒"), "感冒过后久咳该吃什么药")  # shares 感冒
    assert not related(lexical_units("小孩咳嗽感冒"), "前列腺癌转移能活多久")
    assert not related(lexical_units("感冒"), "冒险游戏感人")  # single characters shared, no bigram


def make_pairs(seed=0, queries=30):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(200)]
    pairs = []
    for q in range(queries):
        query = " ".join(rng.sample(words, 2))
        for _ in range(rng.randint(1, 4)):
            pairs.append(Pair(query, " ".join(rng.sample(words, 4)), rng.randint(0, 2)))
    return pairs


def test_random_negatives_are_guarded_foreign_items_labelled_zero():
    pairs = make_pairs()
    own = {}
    for p in pairs:
        own.setdefault(p.query, set()).add(p.item)
    negatives = random_negatives(pairs, 60, seed=3)
    assert len(negatives) == 60
    for n in negatives:
        assert n.label == 0 and n.query in own
        assert n.item not in own[n.query] and any(n.item in items for items in own.values())
        assert not related(lexical_units(n.query), n.item)
    assert random_negatives(pairs, 60, seed=3) == negatives  # seeded
    assert random_negatives(pairs, 60, seed=4) != negatives


def test_foreign_items_run_out_instead_of_breaking_the_guard():
    pairs = [Pair("w1 w2", "w1 x", 1), Pair("w1 w3", "w1 y", 2)]  # every item shares w1 with every query
    assert ForeignItems(pairs, 0).draw("w1 w2", 3) == []
    assert random_negatives(pairs, 5, seed=0) == []


@pytest.mark.parametrize("fields, message", [
    ({"ratio": 0}, "ratio"), ({"ratio": 0.5, "kind": "mined"}, "kind"),
    ({"ratio": 0.5, "candidates": 0}, "candidates"), ({"ratio": 0.5, "ratioo": 1}, "ratioo"),
])
def test_negatives_config_is_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        NegativesConfig.from_dict(fields)
