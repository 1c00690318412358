"""darl-distill on tiny random models: the student is a darl_infer checkpoint on the teacher's
bottom layers, it learns the teacher's distribution, and the teacher runs once per data set."""

import json

import numpy as np
import pytest
import torch

from darl_infer import BiEncoderScorer, Scorer
from darl_infer.base_models import BaseModelMissing, split_layers
from darl_infer.loading import load_base_classifier
from darl_infer.training import cli as train_cli
from darl_infer.training import teacher_cache
from darl_infer.training.data import read_pairs
from darl_infer.training.distill import DistillConfig, distill
from darl_infer.training.evaluate import evaluate_pairs
from darl_infer.training.teacher_cache import teacher_probs
from test_training import write_rule_data
from tiny_models import make_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("base") / "llama", "llama")  # 3 layers


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("teacher") / "qwen2", "qwen2", seed=5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {"train": write_rule_data(d / "train.jsonl", 96, 1), "pool": write_rule_data(d / "pool.jsonl", 96, 3),
            "dev": write_rule_data(d / "dev.jsonl", 32, 2)}


def config(base, teacher, data, out, tmp_path, **overrides):
    cfg = dict(
        base_model=f"{base}@2", teacher=str(teacher), train=[{"path": str(data["train"])}],
        unlabeled=[{"path": str(data["pool"])}], dev=[{"path": str(data["dev"])}], output_dir=str(out),
        batch_size=8, lora_layers=2, lora_rank=8, lr=3e-3, warmup_steps=2, steps=60, log_every=1000,
        seed=0, teacher_cache=str(tmp_path / "teacher_cache"),
    )
    cfg.update(overrides)
    return DistillConfig(**cfg)


def kl_to_teacher(student_dir, teacher, pairs, backend="reference") -> float:
    p = teacher_cache.score_pairs(Scorer.from_pretrained(teacher, backend="reference"), pairs)
    q = teacher_cache.score_pairs(Scorer.from_pretrained(student_dir, backend=backend), pairs)
    return float((p * (np.log(p) - np.log(q))).sum(-1).mean())


def test_student_learns_the_teacher_and_loads_as_a_checkpoint(base, teacher, data, tmp_path):
    distilled = distill(config(base, teacher, data, tmp_path / "kd", tmp_path, ce_weight=0.0))
    control = distill(config(base, teacher, data, tmp_path / "labels", tmp_path, kl_weight=0.0, unlabeled=[]))
    spec = json.loads((distilled / "darl.json").read_text())
    assert spec["base_model"] == f"{base}@2"
    assert spec["training"]["distill"]["unlabeled_pairs"] == 96 and spec["training"]["steps"] == 60
    # a 2-layer student, exact like any checkpoint: torch backend == each pair alone through HF
    scorer = Scorer.from_pretrained(distilled)
    assert scorer.backend.model.config.num_hidden_layers == 2
    dev = [(p.query, p.item) for p in read_pairs(data["dev"])]
    np.testing.assert_allclose(teacher_cache.score_pairs(scorer, dev),
                               teacher_cache.score_pairs(Scorer.from_pretrained(distilled, backend="reference"), dev), atol=1e-5)
    # the distilled student is closer to the teacher than the same student trained on labels
    assert kl_to_teacher(distilled, teacher, dev) < 0.5 * kl_to_teacher(control, teacher, dev)
    assert spec["evaluation"][str(data["dev"])]["n"] == 32


def test_bi_encoder_student_learns_the_teacher_and_loads_as_a_checkpoint(base, teacher, data, tmp_path):
    distilled = distill(config(base, teacher, data, tmp_path / "kd", tmp_path, ce_weight=0.0, student="bi-encoder", head_hidden=32))
    control = distill(config(base, teacher, data, tmp_path / "labels", tmp_path, kl_weight=0.0, unlabeled=[],
                             student="bi-encoder", head_hidden=32))
    spec = json.loads((distilled / "darl.json").read_text())
    assert spec["bi_encoder"]["head_hidden"] == 32 and spec["training"]["distill"]["student"] == "bi-encoder"
    scorer = Scorer.from_pretrained(distilled)
    assert isinstance(scorer, BiEncoderScorer) and len(scorer.vectors.runner.decoder.layers) == 2
    dev = [(p.query, p.item) for p in read_pairs(data["dev"])]
    assert kl_to_teacher(distilled, teacher, dev, "torch") < 0.5 * kl_to_teacher(control, teacher, dev, "torch")
    # the evaluation saved in darl.json is what darl-eval's path gives for the saved checkpoint
    assert spec["evaluation"][str(data["dev"])] == evaluate_pairs(scorer, read_pairs(data["dev"]))


def test_teacher_probabilities_are_the_teachers_and_computed_once(teacher, data, tmp_path, monkeypatch):
    pairs = [(p.query, p.item) for p in read_pairs(data["train"])]
    first = teacher_probs(teacher, pairs, str(tmp_path))
    reference = Scorer.from_pretrained(teacher, backend="reference")
    for n in (0, 17, 95):  # each pair alone through HF
        np.testing.assert_allclose(first[n], reference.score(pairs[n][0], [pairs[n][1]]).probs[0], atol=1e-5)
    calls = []
    real = teacher_cache.score_pairs
    monkeypatch.setattr(teacher_cache, "score_pairs", lambda *a: calls.append(1) or real(*a))
    np.testing.assert_array_equal(teacher_probs(teacher, pairs, str(tmp_path)), first)
    assert calls == []  # read from disk
    np.testing.assert_allclose(teacher_probs(teacher, pairs[:10], str(tmp_path)), first[:10], atol=1e-6)
    assert calls == [1]  # other pairs are another key
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_a_teacher_with_its_frozen_layer_cache_gives_the_scorers_probabilities(base, data, tmp_path, monkeypatch):
    from darl_infer.training.train import TrainConfig, train

    teacher = train(TrainConfig(
        base_model=str(base), train=[{"path": str(data["train"])}], output_dir=str(tmp_path / "t"), batch_size=8,
        lora_layers=1, lora_rank=8, lr=3e-3, epochs=1, log_every=1000, frozen_cache=str(tmp_path / "frozen"),
    ))
    pairs = [(p.query, p.item) for p in read_pairs(data["pool"])][:40]
    monkeypatch.setattr(teacher_cache, "score_pairs", lambda *a: pytest.fail("the Scorer path ran"))
    probs = teacher_probs(teacher, pairs, None)
    reference = Scorer.from_pretrained(teacher, backend="reference")
    for n, (query, item) in enumerate(pairs):
        np.testing.assert_allclose(probs[n], reference.score(query, [item]).probs[0], atol=1e-5)


def test_darl_distill_cli_writes_a_checkpoint(base, teacher, data, tmp_path, capsys):
    cfg = config(base, teacher, data, tmp_path / "cli", tmp_path, steps=4)
    path = tmp_path / "distill.json"
    path.write_text(json.dumps({k: v for k, v in vars(cfg).items() if v is not None}))
    assert train_cli.distill_main(["--config", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(tmp_path / "cli")


@pytest.mark.parametrize("override, message", [
    ({"dasa": {"pool": {}, "budget": 1}}, "darl-train option"),
    ({"kl_weight": 0.0}, "need kl_weight > 0"),
    ({"temperature": 0.0}, "temperature"),
    ({"negatives": {"ratio": 0.1, "kind": "hard"}}, "random negatives only"),
    ({"student": "poly-encoder"}, "student must be one of"),
])
def test_bad_distill_configs_are_refused_by_name(base, teacher, data, tmp_path, capsys, override, message):
    cfg = {k: v for k, v in vars(config(base, teacher, data, tmp_path / "x", tmp_path)).items() if v is not None}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**cfg, **override}))
    assert train_cli.distill_main(["--config", str(path)]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_bottom_layers_of_a_base(base):
    assert split_layers("gemma3-270m@2") == ("gemma3-270m", 2) and split_layers(str(base)) == (str(base), None)
    full, bottom = load_base_classifier(str(base), 3, torch.float32), load_base_classifier(f"{base}@2", 3, torch.float32)
    assert len(bottom.model.layers) == 2
    for a, b in zip(full.model.layers[:2].parameters(), bottom.model.layers.parameters()):
        torch.testing.assert_close(a, b)
    for bad in (f"{base}@0", f"{base}@x", f"{base}@"):
        with pytest.raises(BaseModelMissing, match="layer count"):
            load_base_classifier(bad, 3, torch.float32)
    with pytest.raises(BaseModelMissing, match="has 3 layers, 4 were asked for"):
        load_base_classifier(f"{base}@4", 3, torch.float32)
