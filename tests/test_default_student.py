"""The embedded distilled students (the default model's bottom layers, real gemma3-270m base): the
cross-encoder and the bi-encoder, and the cascades they make with the default model. Marked slow."""

import numpy as np
import pytest

from darl_infer import Scorer
from darl_infer import BiEncoderScorer
from darl_infer.checkpoint import DEFAULT_BI_ENCODER_DIR, DEFAULT_STUDENT_DIR, CheckpointSpec
from test_bi_encoder import Oracle

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEFAULT_STUDENT_DIR / "darl.json").is_file(), reason="no embedded default student"),
]

QUERY = "cordless drill"
ITEMS = [
    "DEWALT 20V MAX Cordless Drill/Driver Kit with 2 Batteries and Charger",
    "Behr Premium Plus Interior Eggshell Enamel Paint, 1 gal.",
    "无线电钻 锂电池 充电式 家用",
    "Milwaukee M18 Brushless 1/2 in. Hammer Drill Driver (Tool-Only) " * 12,  # over 128 tokens: truncated
    "Glacier Bay Single-Handle Pull-Down Kitchen Faucet",
]


def test_default_student_is_a_small_checkpoint_on_the_teachers_bottom_layers():
    spec = CheckpointSpec.load(DEFAULT_STUDENT_DIR)
    assert spec.base_model.startswith("gemma3-270m@") and spec.training["distill"]["kl_weight"] > 0
    assert sum(f.stat().st_size for f in DEFAULT_STUDENT_DIR.iterdir()) < 10 * 2**20


def test_default_student_torch_matches_reference():
    student = Scorer.from_pretrained("default-student", backend="torch", token_budget=40)
    reference = Scorer.from_pretrained("default-student", backend="reference")
    got, ref = student.score(QUERY, ITEMS), reference.score(QUERY, ITEMS)
    assert np.abs(got.probs - ref.probs).max() <= 1e-5
    assert got.truncated.tolist() == [False, False, False, True, False]


def test_cascade_of_the_default_student_and_model_keeps_the_models_scores_for_its_best():
    teacher = Scorer.from_pretrained("default", backend="torch")
    cascade = Scorer.cascade("default-student", teacher, keep=2)
    result = cascade.score(QUERY, ITEMS)
    fine = [i for i, by in enumerate(result.graded_by) if by == "fine"]
    assert len(fine) == 2
    np.testing.assert_allclose(result.probs[fine], teacher.score(QUERY, [ITEMS[i] for i in fine]).probs, atol=1e-5)


def test_default_bi_encoder_is_small_and_equals_each_text_alone_through_hf():
    spec = CheckpointSpec.load(DEFAULT_BI_ENCODER_DIR)
    assert spec.base_model.startswith("gemma3-270m@") and spec.bi_encoder is not None
    assert sum(f.stat().st_size for f in DEFAULT_BI_ENCODER_DIR.iterdir()) < 10 * 2**20
    scorer = Scorer.from_pretrained("default-bi-encoder", token_budget=40, item_cache_mb=16)
    assert isinstance(scorer, BiEncoderScorer)
    got = scorer.score(QUERY, ITEMS)
    np.testing.assert_allclose(got.probs, Oracle(DEFAULT_BI_ENCODER_DIR).probs(QUERY, ITEMS), atol=1e-5, rtol=0)
    assert got.truncated.tolist() == [False, False, False, True, False]
    np.testing.assert_array_equal(scorer.score(QUERY, ITEMS[::-1]).probs[::-1], got.probs)  # from the item cache
    np.testing.assert_allclose(scorer.score_vectors(QUERY, scorer.encode_items(ITEMS)).probs, got.probs, atol=1e-6)
    bf16 = Scorer.from_pretrained("default-bi-encoder", dtype="bf16")  # the trunk in bf16, vectors and head in fp32
    assert bf16.dtype == "bf16" and np.abs(bf16.score(QUERY, ITEMS).probs - got.probs).max() <= 2e-2
    # a ranking model at all: the drill above the paint and the faucet
    assert got.scores[0] > max(got.scores[1], got.scores[4])


def test_cascade_of_the_default_bi_encoder_and_model():
    teacher = Scorer.from_pretrained("default", backend="torch")
    result = Scorer.cascade("default-bi-encoder", teacher, keep=2).score(QUERY, ITEMS)
    fine = [i for i, by in enumerate(result.graded_by) if by == "fine"]
    assert len(fine) == 2
    np.testing.assert_allclose(result.probs[fine], teacher.score(QUERY, [ITEMS[i] for i in fine]).probs, atol=1e-5)
