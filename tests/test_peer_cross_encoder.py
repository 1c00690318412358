"""The cross-encoder peer (training/peer_cross_encoder.py) on a tiny random BERT: DaRL's exact
training pairs, a checkpoint with peer.json, darl-eval's metrics equal to re-scoring the saved
model pair by pair, the time budget, and the once-only atomic unpack of the MiniLM package."""

import json
import os
import random
import sys
import zipfile

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")

from darl_infer.training import peer_cross_encoder as peer
from darl_infer.training.data import read_pairs
from darl_infer.training.evaluate import report
from darl_infer.training.negatives import NegativesConfig
from darl_infer.training.train import load_sets, with_random_negatives

WORDS = [f"w{i}" for i in range(200)]
CUE = {0: "w10", 1: "w20", 2: "w30"}  # the item's first word decides the grade


def write_rule_data(path, n, seed):
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        query = " ".join(rng.choice(WORDS) for _ in range(3))
        for _ in range(rng.randint(1, 3)):
            label = rng.randint(0, 2)
            item = CUE[label] + " " + " ".join(rng.choice(WORDS) for _ in range(4))
            rows.append({"query": query, "item": item, "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT (hidden 32) with a WordPiece vocabulary of the test's words."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("bert")
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(d)
    BertTokenizer(str(vocab), do_lower_case=True).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {
        "train": write_rule_data(d / "train.jsonl", 96, 1),
        "dev": write_rule_data(d / "dev.jsonl", 30, 2),
        "pool": write_rule_data(d / "pool.jsonl", 60, 3),
    }


def config(tiny_bert, data, out, **overrides):
    cfg = dict(
        base_model=str(tiny_bert), train=[{"path": str(data["train"]), "limit": 80}],
        negatives={"ratio": 0.25, "kind": "random"}, pool={"path": str(data["pool"]), "limit": 50},
        pool_labels=12, dev=[{"path": str(data["dev"])}], output_dir=str(out),
        batch_size=16, lr=1e-3, epochs=2, max_length=32, class_weights="balanced", log_every=2, seed=0,
    )
    cfg.update(overrides)
    return peer.PeerConfig.from_dict(cfg)


@pytest.fixture(scope="module")
def trained(tiny_bert, data, tmp_path_factory):
    cfg = config(tiny_bert, data, tmp_path_factory.mktemp("runs") / "peer")
    return cfg, peer.train_peer(cfg)


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_training_pairs_are_darls(tiny_bert, data, tmp_path):
    cfg = config(tiny_bert, data, tmp_path / "unused")
    pairs, counts = peer.training_pairs(cfg)
    darl = with_random_negatives(load_sets(cfg.train, 3, 0), NegativesConfig.from_dict(cfg.negatives), 0)
    assert pairs[: len(darl)] == darl
    assert counts["train_pairs"] == 80 and counts["negatives"] == len(darl) - 80 > 0
    assert counts["pool_pairs"] == 12 == len(pairs) - len(darl) and counts["pool_size"] == 50
    assert counts["total"] == len(pairs) and sum(counts["label_counts"]) == len(pairs)


def test_checkpoint_and_evaluation_match_fresh_pairwise_scoring(trained, data):
    from sentence_transformers import CrossEncoder

    cfg, out = trained
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not out.with_name(out.name + ".partial").exists()
    info = json.loads((out / "peer.json").read_text())
    assert info["steps"] == info["steps_planned"] > 0 and not info["stopped_by_time_budget"]
    assert info["train_cpu_seconds"] > 0 and info["train_seconds"] > 0
    assert info["config"] == json.loads(json.dumps(vars(cfg)))
    assert np.isfinite(info["final_loss"])

    dev = read_pairs(data["dev"], 3)
    stored = info["evaluation"][str(data["dev"])]
    uniform = report(lambda ps: np.full((len(ps), 3), 1 / 3, dtype=np.float32), dev, [0, 1, 2])
    assert set(stored) == set(uniform) and {"accuracy", "macro_f1", "easy_negatives"} <= set(stored)
    assert set(stored["easy_negatives"]) == set(uniform["easy_negatives"])

    # oracle: the saved model loaded fresh, each pair scored alone (no batching, no padding)
    fresh = CrossEncoder(str(out), device="cpu", local_files_only=True)
    assert fresh.num_labels == 3

    def one_by_one(pairs):
        return np.stack([fresh.predict([pair], apply_softmax=True, show_progress_bar=False)[0] for pair in pairs])

    expected, got = flat(report(one_by_one, dev, [0, 1, 2])), flat(stored)
    assert set(got) == set(expected)
    for key, value in expected.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        else:
            assert got[key] == value, key


def test_time_budget_stops_training_early(tiny_bert, data, tmp_path):
    out = peer.train_peer(config(tiny_bert, data, tmp_path / "peer", time_budget_minutes=1e-6, dev=[]))
    info = json.loads((out / "peer.json").read_text())
    assert info["stopped_by_time_budget"] is True
    assert info["steps"] == 1 < info["steps_planned"]
    assert info["evaluation"] == {}


def test_cli_rejects_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": [], "output_dir": "x", "lables": []}))
    assert peer.main(["--config", str(bad)]) == 2
    assert "lables" in capsys.readouterr().err


def test_minilm_unpacks_once_atomically(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fake_minilm_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must be located, never imported')\n")
    with zipfile.ZipFile(package / "model.zip", "w") as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("model.safetensors", "weights")
        zf.writestr("1_Pooling/config.json", "{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(peer, "MINILM_PACKAGE", "fake_minilm_pkg")
    monkeypatch.setenv("DARL_INFER_CACHE", str(tmp_path / "cache"))

    target = peer.minilm_dir()
    assert target == tmp_path / "cache" / "models" / "all-minilm-l6-v2"
    assert (target / "model.safetensors").read_text() == "weights" and (target / "1_Pooling" / "config.json").is_file()
    assert not target.with_name(target.name + ".partial").exists()
    (target / "model.safetensors").write_text("kept")  # a second call finds it and extracts nothing
    assert peer.minilm_dir() == target and (target / "model.safetensors").read_text() == "kept"
    assert "fake_minilm_pkg" not in sys.modules
