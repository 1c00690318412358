"""The embedded default model (real gemma3-270m base): exactness of the fast path. Marked slow."""

import numpy as np
import pytest

from darl_infer import Scorer
from darl_infer.scorer import DEFAULT_MODEL_DIR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "darl.json").is_file(), reason="no embedded default model"),
]

QUERY = "cordless drill"
ITEMS = [
    "DEWALT 20V MAX Cordless Drill/Driver Kit with 2 Batteries and Charger",
    "Behr Premium Plus Interior Eggshell Enamel Paint, 1 gal.",
    "无线电钻 锂电池 充电式 家用",
    "drill",
    "Milwaukee M18 Brushless 1/2 in. Hammer Drill Driver (Tool-Only) " * 12,  # over 128 tokens: truncated
    "RYOBI 18V ONE+ Cordless 1/2 in. Drill/Driver Kit",
    "Glacier Bay Single-Handle Pull-Down Kitchen Faucet",
]


@pytest.fixture(scope="module")
def reference():
    return Scorer.from_pretrained(backend="reference")


@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_default_model_torch_matches_reference(reference, dtype, tol):
    ref = reference.score(QUERY, ITEMS) if dtype == "fp32" else Scorer.from_pretrained(backend="reference", dtype=dtype).score(QUERY, ITEMS)
    fast = Scorer.from_pretrained(backend="torch", dtype=dtype, token_budget=40)
    got = fast.score(QUERY, ITEMS)
    assert np.abs(got.probs - ref.probs).max() <= tol
    assert got.truncated.tolist() == [False, False, False, False, True, False, False]
    alone = fast.score(QUERY, ITEMS[2:3]).probs[0]
    assert np.abs(alone - got.probs[2]).max() <= tol


def test_default_model_ranks_relevant_items_first(reference):
    ranked = reference.rank(QUERY, ITEMS)
    paint, faucet = 1, 6
    assert {paint, faucet}.isdisjoint(r["corpus_id"] for r in ranked[:3])
