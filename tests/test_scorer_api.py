"""Scorer API (score / rank / predict / score_many), bad input, checkpoint validation, CLI."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import ragged_items
from darl_infer import CheckpointError, Scorer
from darl_infer.cli import main as cli_main
from darl_infer.template import Template
from tiny_models import make_checkpoint, random_text


@pytest.fixture(scope="module")
def scorer(tiny_checkpoints):
    return Scorer.from_pretrained(tiny_checkpoints["llama"], backend="torch", token_budget=64)


def test_rank_is_sorted_by_score_with_crossencoder_keys(scorer, rng):
    items = ragged_items(rng, 12)
    result = scorer.score("w1 w2", items)
    ranked = scorer.rank("w1 w2", items, return_documents=True)
    assert [r["corpus_id"] for r in ranked] == list(np.argsort(-result.scores, kind="stable"))
    assert all(r["text"] == items[r["corpus_id"]] and r["grade"] == result.grades[r["corpus_id"]] for r in ranked)
    top = scorer.rank("w1 w2", items, top_k=3)
    assert [r["corpus_id"] for r in top] == [r["corpus_id"] for r in ranked[:3]] and "text" not in top[0]


def test_predict_keeps_input_order_across_interleaved_queries(scorer, rng):
    queries = ["w1 w2", "w3", "w4 w5 w6"]
    pairs = [(rng.choice(queries), random_text(rng, rng.randint(1, 20))) for _ in range(25)]
    got = scorer.predict(pairs)
    want = [scorer.score(q, [item]).scores[0] for q, item in pairs]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_score_many_equals_score(scorer, rng):
    batch = [("w7", ragged_items(rng, 3)), ("w8 w9", ragged_items(rng, 5))]
    for (query, items), result in zip(batch, scorer.score_many(batch)):
        np.testing.assert_allclose(result.probs, scorer.score(query, items).probs, atol=1e-6)


def test_no_items(scorer):  # bad input: tests/test_bad_input.py
    empty = scorer.score("w1", [])
    assert empty.probs.shape == (0, 3) and len(empty) == 0 and scorer.rank("w1", []) == []


def test_unknown_backend_lists_choices(tiny_checkpoints):
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'.*'reference'.*'torch'"):
        Scorer.from_pretrained(tiny_checkpoints["llama"], backend="cuda")


def test_truncated_item_is_flagged_and_cut(tmp_path, rng):
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", template=Template(instruction="w1", max_query_tokens=4, max_item_tokens=8))
    scorer = Scorer.from_pretrained(ckpt, backend="torch")
    long_item, short_item = random_text(rng, 20), random_text(rng, 5)
    result = scorer.score("w1 w2", [short_item, long_item])
    assert result.truncated.tolist() == [False, True]
    cut = " ".join(long_item.split()[:8])  # the tiny tokenizer has one token per word
    np.testing.assert_allclose(result.probs[1], scorer.score("w1 w2", [cut]).probs[0], atol=1e-6)
    assert scorer.score("w1 " * 10, [short_item]).truncated.tolist() == [True]  # a cut query flags every item


@pytest.mark.parametrize(
    "damage, where",
    [
        (lambda d: (d / "darl.json").unlink(), "darl.json: missing"),
        (lambda d: (d / "darl.json").write_text("{not json"), "darl.json: not valid JSON"),
        (lambda d: _edit_spec(d, format_version=99), "'format_version'"),
        (lambda d: _edit_spec(d, labels="abc"), "'labels'"),
        (lambda d: _edit_spec(d, grade_values=[0, 1]), "'grade_values'"),
        (lambda d: _edit_spec(d, template={"max_item_tokens": 0}), "'template'"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), "model.safetensors: unreadable"),
    ],
)
def test_corrupt_checkpoint_names_the_file(tiny_checkpoints, tmp_path, damage, where):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoints["llama"], broken)
    damage(broken)
    with pytest.raises(CheckpointError, match=where):
        Scorer.from_pretrained(broken)


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Scorer.from_pretrained(tmp_path / "nope")


def _edit_spec(directory, **fields):
    spec = json.loads((directory / "darl.json").read_text())
    spec.update(fields)
    (directory / "darl.json").write_text(json.dumps(spec))


def test_cli_rank_prints_items_best_first(tiny_checkpoints, tmp_path, capsys, rng):
    items = ragged_items(rng, 5, max_tokens=10)
    (tmp_path / "items.txt").write_text("\n".join(items) + "\n")
    cli_main(["rank", "--query", "w1 w2", "--items", str(tmp_path / "items.txt"), "--checkpoint", str(tiny_checkpoints["llama"])])
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    expected = Scorer.from_pretrained(tiny_checkpoints["llama"]).rank("w1 w2", items, return_documents=True)
    assert [line.split(None, 3)[3] for line in lines] == [r["text"] for r in expected]


def test_cli_score_streams_pairs_in_order(tiny_checkpoints, tmp_path, rng):
    pairs = [{"query": rng.choice(["w1", "w2 w3"]), "item": random_text(rng, rng.randint(1, 9)), "id": n} for n in range(23)]
    src, out = tmp_path / "pairs.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cli_main(["score", "--input", str(src), "--output", str(out), "--buffer", "4", "--checkpoint", str(tiny_checkpoints["llama"])])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(23))
    want = Scorer.from_pretrained(tiny_checkpoints["llama"]).predict([(p["query"], p["item"]) for p in pairs])
    np.testing.assert_allclose([r["score"] for r in rows], want, atol=1e-5)


def test_auto_dtype_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    from darl_infer import loading

    cpu = torch.device("cpu")
    monkeypatch.delenv(loading.AUTO_DTYPE_ENV, raising=False)
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    assert loading.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    assert loading.resolve_dtype("auto", cpu) == torch.float32
    monkeypatch.setenv(loading.AUTO_DTYPE_ENV, "bf16")
    assert loading.resolve_dtype("auto", cpu) == torch.bfloat16
    assert loading.resolve_dtype("fp32", cpu) == torch.float32  # an explicit dtype is never overridden
    monkeypatch.setenv(loading.AUTO_DTYPE_ENV, "int4")
    with pytest.raises(ValueError, match="DARL_INFER_AUTO_DTYPE='int4': must be fp32 or bf16"):
        loading.resolve_dtype("auto", cpu)


def test_scorer_dtype_says_what_auto_chose(tiny_checkpoints, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DARL_INFER_AUTO_DTYPE", "bf16")
    scorer = Scorer.from_pretrained(tiny_checkpoints["llama"], backend="torch")
    assert scorer.dtype == "bf16" and next(scorer.backend.model.parameters()).dtype == torch.bfloat16
    assert Scorer.from_pretrained(tiny_checkpoints["llama"], backend="torch", dtype="fp32").dtype == "fp32"
    monkeypatch.setenv("DARL_INFER_AUTO_DTYPE", "fp32")
    items = tmp_path / "items.txt"
    items.write_text("a b\nc d\n")
    assert cli_main(["rank", "--query", "q", "--items", str(items), "--checkpoint", str(tiny_checkpoints["llama"])]) == 0
    assert "dtype fp32" in capsys.readouterr().err
