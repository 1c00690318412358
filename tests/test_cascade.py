"""Scorer.cascade: the coarse model grades every item, the fine one re-grades the kept best, and
each probability is its model's own for that pair alone (oracle: the reference backend)."""

import json
import math
import random

import numpy as np
import pytest

from conftest import ragged_items
from darl_infer import CascadeScorer, Scorer
from darl_infer.checkpoint import CheckpointSpec
from tiny_models import make_checkpoint, random_text


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    load = lambda arch, backend: Scorer.from_pretrained(tiny_checkpoints[arch], backend=backend)
    return {"coarse": load("llama", "torch"), "fine": load("qwen2", "torch"),
            "coarse_ref": load("llama", "reference"), "fine_ref": load("qwen2", "reference")}


@pytest.mark.parametrize("keep", [0.2, 0.5, 1.0, 1, 3, 100])
def test_each_item_is_graded_by_the_model_that_kept_it(models, keep):
    rng = random.Random(f"cascade-{keep}")
    batch = [(random_text(rng, rng.randint(1, 8)), ragged_items(rng, n)) for n in (1, 7, 20)]
    cascade = Scorer.cascade(models["coarse"], models["fine"], keep=keep)
    for (query, items), result in zip(batch, cascade.score_many(batch)):
        coarse = models["coarse_ref"].score(query, items)
        n_kept = min(len(items), keep if isinstance(keep, int) else math.ceil(keep * len(items)))
        kept = set(np.argsort(-coarse.scores, kind="stable")[:n_kept].tolist())
        assert {i for i, by in enumerate(result.graded_by) if by == "fine"} == kept
        for i, item in enumerate(items):
            oracle = models["fine_ref"].score(query, [item]) if i in kept else models["coarse_ref"].score(query, [item])
            np.testing.assert_allclose(result.probs[i], oracle.probs[0], atol=1e-5)
            assert result.scores[i] == pytest.approx(float(oracle.scores[0]), abs=1e-5)
            assert result.grades[i] == oracle.grades[0]


def test_rank_predict_and_score_follow_the_scorer_api(models):
    rng = random.Random(7)
    query, items = random_text(rng, 5), ragged_items(rng, 10)
    cascade = Scorer.cascade(models["coarse"], models["fine"], keep=4)
    result = cascade.score(query, items)
    ranked = cascade.rank(query, items, top_k=6, return_documents=True)
    assert [r["corpus_id"] for r in ranked] == np.argsort(-result.scores, kind="stable")[:6].tolist()
    assert all(r["text"] == items[r["corpus_id"]] and r["graded_by"] == result.graded_by[r["corpus_id"]] for r in ranked)
    np.testing.assert_allclose(cascade.predict([(query, item) for item in items]), result.scores, atol=1e-6)
    assert sum(result.graded_by == "fine") == 4 and cascade.labels == models["fine"].labels
    assert "graded_by" not in models["fine"].rank(query, items)[0]  # one model: no such field


def test_keep_of_everything_is_the_fine_model(models):
    rng = random.Random(8)
    query, items = random_text(rng, 4), ragged_items(rng, 9)
    np.testing.assert_allclose(Scorer.cascade(models["coarse"], models["fine"], 1.0).score(query, items).probs,
                               models["fine"].score(query, items).probs, atol=1e-6)


@pytest.mark.parametrize("keep, error", [(0, ValueError), (-1, ValueError), (0.0, ValueError), (1.5, ValueError),
                                         (True, TypeError), ("0.2", TypeError), (None, TypeError)])
def test_a_bad_keep_is_refused_by_name(models, keep, error):
    with pytest.raises(error, match="keep"):
        Scorer.cascade(models["coarse"], models["fine"], keep=keep)


def test_models_with_different_grades_do_not_cascade(models, tmp_path):
    other = make_checkpoint(tmp_path / "two", "llama")
    CheckpointSpec(labels=["no", "yes", "maybe"], template=CheckpointSpec.load(other).template).save(other)
    with pytest.raises(ValueError, match="same grades"):
        CascadeScorer(Scorer.from_pretrained(other), models["fine"])


def test_cascade_loads_checkpoints_by_path(tiny_checkpoints):
    cascade = Scorer.cascade(tiny_checkpoints["llama"], tiny_checkpoints["gemma3"], keep=2)
    assert isinstance(cascade.coarse, Scorer) and isinstance(cascade.fine, Scorer)
    assert len(cascade.score("w1 w2", ["w3", "w4 w5", "w6"])) == 3


def test_cli_rank_and_score_with_a_cascade(tiny_checkpoints, models, tmp_path, capsys):
    from darl_infer.cli import main

    rng = random.Random(9)
    query, items = random_text(rng, 3), ragged_items(rng, 6, max_tokens=8)
    (tmp_path / "items.txt").write_text("\n".join(items) + "\n")
    common = ["--checkpoint", str(tiny_checkpoints["qwen2"]), "--cascade", str(tiny_checkpoints["llama"]), "--keep", "2"]
    assert main(["rank", "--query", query, "--items", str(tmp_path / "items.txt"), *common]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "graded by" in lines[0] and sum(" fine " in line for line in lines[1:]) == 2
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"query": query, "item": i}) + "\n" for i in items))
    assert main(["score", "--input", str(tmp_path / "pairs.jsonl"), "--output", str(tmp_path / "out.jsonl"), *common]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = Scorer.cascade(models["coarse"], models["fine"], keep=2).score(query, items)
    assert [r["graded_by"] for r in rows] == list(expected.graded_by)
    np.testing.assert_allclose([r["score"] for r in rows], expected.scores, atol=1e-5)
    assert main(["rank", "--query", query, "--items", str(tmp_path / "items.txt"), "--keep", "2"]) == 2
    assert "--keep needs --cascade" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["rank", "--query", query, "--items", str(tmp_path / "items.txt"), *common[:4], "--keep", "1.5"])
    assert "fraction in (0, 1]" in capsys.readouterr().err
