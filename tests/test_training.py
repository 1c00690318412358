"""Training on tiny random models: train -> checkpoint -> Scorer, determinism, DASA stages,
darl-train / darl-eval CLIs, bad input and interrupted runs."""

import json
import random
import re

import numpy as np
import pytest
import torch

from darl_infer import Scorer
from darl_infer.training import cli as train_cli, eval_cli, train as train_module
from darl_infer.training.data import DataError, read_pairs
from darl_infer.training.evaluate import evaluate_pairs
from darl_infer.training.train import TrainConfig, train
from tiny_models import make_checkpoint, random_text

# a learnable rule: the item's first word decides the grade
CUE = {0: "w10", 1: "w20", 2: "w30"}


def write_rule_data(path, n, seed):
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        query = random_text(rng, 3)
        for _ in range(rng.randint(1, 3)):  # several items per query, as in real search data
            label = rng.randint(0, 2)
            rows.append({"query": query, "item": CUE[label] + " " + random_text(rng, 4), "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("base") / "llama", "llama")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {
        "train": write_rule_data(d / "train.jsonl", 160, 1),
        "dev": write_rule_data(d / "dev.jsonl", 48, 2),
        "pool": write_rule_data(d / "pool.jsonl", 120, 3),
    }


def config(base, data, out, **overrides):
    cfg = dict(
        base_model=str(base), train=[{"path": str(data["train"])}], dev=[{"path": str(data["dev"])}],
        output_dir=str(out), batch_size=8, lora_layers=3, lora_rank=8, lr=3e-3, warmup_steps=2,
        epochs=2, log_every=1000, seed=0,
    )
    cfg.update(overrides)
    return TrainConfig(**cfg)


DARL = dict(
    loss={"ordinal": 0.5, "label_smoothing": 0.05, "confidence_penalty": 0.05, "class_weights": "balanced"},
    dasa={"budget": 12, "id_bank": 40, "knn_k": 5},
    stages=[{"name": "id", "data": "id", "steps": 50}, {"name": "ood", "data": "dasa", "replay": 0.5, "steps": 6, "lr": 1e-3}],
)


def darl_config(base, data, out, **overrides):
    cfg = {**DARL, "dasa": {**DARL["dasa"], "pool": {"path": str(data["pool"])}}}
    cfg.update(overrides)
    return config(base, data, out, **cfg)


@pytest.fixture(scope="module")
def trained(base, data, tmp_path_factory):
    return train(darl_config(base, data, tmp_path_factory.mktemp("run") / "ckpt"))


def test_train_checkpoint_scorer_round_trip(trained, data):
    spec = json.loads((trained / "darl.json").read_text())
    stored = spec["evaluation"][str(data["dev"])]
    dev = read_pairs(data["dev"])
    # the stored metrics are what a freshly loaded Scorer gives, through either backend
    for backend in ("torch", "reference"):
        fresh = evaluate_pairs(Scorer.from_pretrained(trained, backend=backend), dev)
        for key in ("accuracy", "macro_f1", "ndcg@10", "pairwise_accuracy", "n"):
            assert fresh[key] == pytest.approx(stored[key], abs=1e-6)
        assert fresh["ece"] == pytest.approx(stored["ece"], abs=1e-4)
        for key in ("irrelevant_rate", "auc", "ndcg@10", "n"):
            assert fresh["easy_negatives"][key] == pytest.approx(stored["easy_negatives"][key], abs=1e-6)
        assert stored["easy_negatives"]["n"] > 0
    # and the model learned the rule (chance is ~1/3)
    assert stored["accuracy"] > 0.8
    assert spec["training"]["dasa"]["selected"] == 12 == spec["training"]["dasa"]["revealed_labels"]
    assert [s["steps_run"] for s in spec["training"]["stages"]] == [50, 6]
    assert json.loads((trained / "train_config.json").read_text())["stages"] == DARL["stages"]
    assert json.loads((trained / "metrics.json").read_text()) == spec["evaluation"]


def test_fixed_seed_gives_identical_checkpoint_metrics(base, data, tmp_path):
    short = [{"name": "id", "data": "id", "steps": 6}, {"name": "ood", "data": "dasa", "replay": 0.5, "steps": 3}]
    a = json.loads((train(darl_config(base, data, tmp_path / "a", stages=short)) / "darl.json").read_text())
    b = json.loads((train(darl_config(base, data, tmp_path / "b", stages=short)) / "darl.json").read_text())
    assert a["evaluation"] == b["evaluation"]
    assert a["training"]["final_loss"] == b["training"]["final_loss"]
    assert a["training"]["dasa"]["selected_label_counts"] == b["training"]["dasa"]["selected_label_counts"]
    other_seed = train(darl_config(base, data, tmp_path / "seed1", stages=short, seed=1))
    assert json.loads((other_seed / "darl.json").read_text())["training"]["final_loss"] != a["training"]["final_loss"]


def test_dasa_reads_only_selected_pool_labels(base, data, tmp_path, monkeypatch):
    pools = []
    real_read_pool = train_module.dasa_lib.read_pool

    def spy(*args, **kwargs):
        pool = real_read_pool(*args, **kwargs)
        reads = set()

        class Recording(list):
            def __getitem__(self, i):
                reads.add(i)
                return list.__getitem__(self, i)

            def __iter__(self):
                raise AssertionError("pool labels iterated")

        pool._raw_labels = Recording(pool._raw_labels)
        pools.append((pool, reads))
        return pool

    monkeypatch.setattr(train_module.dasa_lib, "read_pool", spy)
    for method in ("dasa", "random"):
        cfg = darl_config(base, data, tmp_path / method, dev=[], stages=[{"data": "dasa", "steps": 2}])
        cfg.dasa["method"] = method
        train(cfg)
        pool, reads = pools[-1]
        assert len(reads) == 12 and reads == pool.revealed


def test_darl_eval_cli_prints_metrics_keyed_by_path(trained, data, capsys):
    assert eval_cli.main(["--checkpoint", str(trained), "--data", str(data["dev"]), "--data", str(data["train"])]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {str(data["dev"]), str(data["train"])}
    for metrics in out.values():
        assert set(metrics) == {"accuracy", "macro_f1", "per_grade_f1", "ece", "ndcg@10", "pairwise_accuracy",
                                "pairwise_pairs", "n", "easy_negatives"}
        assert set(metrics["easy_negatives"]) == {"irrelevant_rate", "auc", "ndcg@10", "queries", "n", "per_query", "seed"}
        assert len(metrics["per_grade_f1"]) == 3 and np.isclose(np.mean(metrics["per_grade_f1"]), metrics["macro_f1"])
    stored = json.loads((trained / "darl.json").read_text())["evaluation"][str(data["dev"])]
    assert out[str(data["dev"])]["accuracy"] == pytest.approx(stored["accuracy"])
    assert out[str(data["train"])]["n"] == 160


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"query": "w1", "item": "w2", "label": 1}\n{"query": "w1", "item": \n', r"bad.jsonl:2: malformed JSON"),
        ('{"query": "w1", "item": "w2", "label": 3}\n', r"bad.jsonl:1: label 3 is not an integer in 0..2"),
        ("\n", r"bad.jsonl: no pairs"),
    ],
)
def test_bad_input_is_an_error_naming_file_and_line(trained, base, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(DataError, match=message):
        train(config(base, {"train": bad, "dev": bad}, tmp_path / "out", dev=[]))
    assert not (tmp_path / "out").exists()
    if "label 3" in message:  # darl-eval reads any integer, then checks it against the checkpoint's grades
        message = r"bad.jsonl: label 3 is not an integer in 0..2"
    assert eval_cli.main(["--checkpoint", str(trained), "--data", str(bad)]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_darl_train_cli_writes_checkpoint_config_and_metrics(base, data, tmp_path, capsys):
    cfg_file = tmp_path / "run.json"
    cfg = {"base_model": str(base), "train": [{"path": str(data["train"]), "limit": 40}], "dev": [{"path": str(data["dev"])}],
           "output_dir": str(tmp_path / "ckpt"), "batch_size": 8, "lora_layers": 1, "loss": {"ordinal": 1.0}}
    cfg_file.write_text(json.dumps(cfg))
    assert train_cli.main(["--config", str(cfg_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    ckpt = tmp_path / "ckpt"
    assert printed["checkpoint"] == str(ckpt)
    assert json.loads((ckpt / "train_config.json").read_text())["loss"] == {"ordinal": 1.0}
    assert json.loads((ckpt / "metrics.json").read_text()) == printed["evaluation"]
    assert set(printed["evaluation"]) == {str(data["dev"])}
    cfg["stages"] = [{"data": "dasa"}]  # no dasa section: refused before any work
    cfg_file.write_text(json.dumps(cfg))
    assert train_cli.main(["--config", str(cfg_file)]) == 2
    assert "no 'dasa' section" in capsys.readouterr().err


@pytest.mark.parametrize(
    "section, typo",
    [(None, "output_dri"), ("loss", "ordnal"), ("template", "instrucion"), ("dasa", "budjet"), ("stages", "stpes")],
)
def test_misspelt_config_field_is_refused_by_name(base, data, tmp_path, capsys, section, typo):
    cfg = {"base_model": str(base), "train": [{"path": str(data["train"]), "limit": 40}], "output_dir": str(tmp_path / "ckpt"),
           "lora_layers": 1, "dasa": {"pool": {"path": str(data["pool"])}, "budget": 4}, "stages": [{"data": "id", "steps": 1}]}
    if section is None:
        cfg[typo] = 1
    elif section == "stages":
        cfg["stages"][0][typo] = 1
    else:
        cfg.setdefault(section, {})[typo] = 1
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps(cfg))
    assert train_cli.main(["--config", str(cfg_file)]) == 2
    assert f"field(s) ['{typo}']" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("where", ["training", "saving"])
def test_interrupted_run_leaves_no_half_written_checkpoint(base, data, tmp_path, monkeypatch, where):
    out = tmp_path / "ckpt"
    small = {"train": [{"path": str(data["train"]), "limit": 40}], "dev": [], "epochs": 1}
    first = train(config(base, data, out, **small))
    before = sorted(p.name for p in first.iterdir())
    weights = (first / "adapter_model.safetensors").read_bytes()
    if where == "training":
        calls = {"n": 0}
        real = train_module.DaRLLoss.__call__

        def interrupt_at_step_3(self, *a):
            calls["n"] += 1
            if calls["n"] == 3:
                raise Interrupt()
            return real(self, *a)

        monkeypatch.setattr(train_module.DaRLLoss, "__call__", interrupt_at_step_3)
    else:
        def interrupt_evaluation(*a, **k):
            raise Interrupt()

        monkeypatch.setattr(Scorer, "from_pretrained", interrupt_evaluation)
    with pytest.raises(Interrupt):
        train(config(base, data, out, **{**small, "dev": [{"path": str(data["dev"])}]}, seed=5))
    # the previous checkpoint is untouched, and no partial one is left behind
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "adapter_model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_frozen_layer_cache_gives_the_same_features_as_the_full_model(arch, data, tmp_path):
    from darl_infer.template import Template
    from darl_infer.training.train import Trainee

    base = make_checkpoint(tmp_path / arch, arch)  # gemma3: sliding-window and full layers on both sides of the split
    template = Template(instruction="w1 w2 w3 w4 w5 : w6 w7", max_item_tokens=64)
    pairs = [(p.query, p.item) for p in read_pairs(data["dev"])]
    full = Trainee(config(base, data, tmp_path / "o", lora_layers=2), template, 3)
    cached = Trainee(config(base, data, tmp_path / "o", lora_layers=2, frozen_cache=str(tmp_path / "cache")), template, 3)
    for p in full.peft_model.parameters():  # LoRA B starts at zero: make the adapters matter
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    cached.peft_model.load_state_dict(full.peft_model.state_dict())
    h_full, logits_full = full.features(pairs)   # Scorer layout: instruction + query as prefix
    h_cached, logits_cached = cached.features(pairs)  # training layout, top layers on cached states
    assert np.abs(h_full - h_cached).max() < 1e-4
    assert np.abs(logits_full - logits_cached).max() < 1e-5 * max(1.0, np.abs(logits_full).max())
    assert np.abs(logits_full).max() > 0.1


def test_frozen_cache_computes_only_sequences_no_stored_list_has(base, data, tmp_path, monkeypatch):
    from darl_infer.template import Template
    from darl_infer.training.frozen_cache import FrozenSplit
    from darl_infer.training.train import Trainee

    computed = []
    real_bottom = FrozenSplit.bottom
    monkeypatch.setattr(FrozenSplit, "bottom", lambda self, ins, seqs: computed.append(len(seqs)) or real_bottom(self, ins, seqs))
    cfg = config(base, data, tmp_path / "o", lora_layers=2, frozen_cache=str(tmp_path / "cache"))
    template = Template(instruction="w1 w2 w3")
    pairs = read_pairs(data["dev"])
    first = Trainee(cfg, template, 3)  # a run over pairs 0..29
    _, want = first.frozen_states(pairs[:30])
    later = Trainee(cfg, template, 3)  # another run (empty memory) over pairs 20..39: 10 are new
    _, got = later.frozen_states(pairs[20:40])
    unique_new = {tuple(later.pair_ids(p)) for p in pairs[30:40]} - {tuple(later.pair_ids(p)) for p in pairs[:30]}
    assert computed == [30, len(unique_new)] and len(unique_new) > 0
    for a, b in zip(want[20:30], got[:10]):
        assert torch.equal(a, b)
    files = sorted((tmp_path / "cache").rglob("*.pt"))
    Trainee(cfg, template, 3).frozen_states(pairs[5:35])  # all stored: nothing computed, nothing written
    assert computed == [30, len(unique_new)] and sorted((tmp_path / "cache").rglob("*.pt")) == files
    other = Trainee(cfg, Template(instruction="w4 w5"), 3)  # another instruction: nothing reused
    other.frozen_states(pairs[:5])
    assert computed[-1] == len({tuple(other.pair_ids(p)) for p in pairs[:5]})


def test_training_with_the_frozen_cache_matches_the_scorer(base, data, tmp_path):
    cache = tmp_path / "cache"
    ckpt = train(darl_config(base, data, tmp_path / "ckpt", frozen_cache=str(cache), lora_layers=2,
                             stages=[{"name": "id", "steps": 8}, {"name": "ood", "data": "dasa", "replay": 0.5, "steps": 3}]))
    stored = json.loads((ckpt / "darl.json").read_text())["evaluation"][str(data["dev"])]
    fresh = evaluate_pairs(Scorer.from_pretrained(ckpt, backend="torch"), read_pairs(data["dev"]))
    for key in ("irrelevant_rate", "auc", "ndcg@10", "n"):  # the foreign items too: same draw, same scores
        assert fresh["easy_negatives"][key] == pytest.approx(stored["easy_negatives"][key], abs=1e-5)
    for key in ("accuracy", "macro_f1", "ndcg@10", "pairwise_accuracy"):
        assert fresh[key] == pytest.approx(stored[key], abs=1e-6)
    assert fresh["ece"] == pytest.approx(stored["ece"], abs=1e-4)
    assert any(cache.rglob("*.pt"))


@pytest.mark.parametrize("kind", ["random", "hard"])
def test_negatives_join_training_and_are_reported(base, data, tmp_path, kind):
    stages = [{"name": "id", "data": "id", "steps": 6}, {"name": "ood", "data": "dasa", "replay": 0.5, "steps": 4}]
    cfg = darl_config(base, data, tmp_path / kind, stages=stages, frozen_cache=str(tmp_path / "cache"),
                      negatives={"ratio": 0.25, "kind": kind, "candidates": 3})
    spec = json.loads((train(cfg) / "darl.json").read_text())
    negatives = spec["training"]["negatives"]
    assert negatives["random"] == 40 and negatives["kind"] == kind  # 0.25 x 160 training pairs
    if kind == "hard":  # one candidate kept or dropped per drawn query
        assert negatives["hard"]["mined"] + negatives["hard"]["dropped_as_likely_relevant"] == 40
    assert spec["training"]["train_pairs"] == 160


def test_hard_negatives_need_a_stage_to_mine_with(base, data, tmp_path):
    cfg = config(base, data, tmp_path / "out", negatives={"ratio": 0.5, "kind": "hard"})
    with pytest.raises(ValueError, match="two stages"):
        train(cfg)


def test_a_stage_of_zero_steps_only_prepares_and_evaluates(base, data, tmp_path):
    """steps 0 (e.g. to fill the frozen-layer cache ahead of a long run) trains nothing and still
    writes an evaluated checkpoint."""
    cfg = config(base, data, tmp_path / "out", stages=[{"name": "id", "data": "id", "steps": 0}],
                 frozen_cache=str(tmp_path / "cache"))
    spec = json.loads((train(cfg) / "darl.json").read_text())
    assert spec["training"]["steps"] == 0 and spec["evaluation"][str(data["dev"])]["n"] == 48
    assert any((tmp_path / "cache").rglob("*.pt"))
