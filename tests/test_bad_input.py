"""Bad input, one table per surface: the Python API, `darl-infer rank`, `darl-infer score`,
`darl-eval` and checkpoint loading. Each row asserts the error type and message, that it comes
before the model is loaded where the input can be checked first (CLIs: exit code 2), and that no
output file is damaged."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import ragged_items
from darl_infer import CheckpointError, Scorer
from darl_infer.cli import main as infer_main
from darl_infer.training import eval_cli
from tiny_models import make_adapter_checkpoint, make_checkpoint

NOT_UTF8 = b'{"query": "w1", "item": "caf\xe9"}\n'  # latin-1 "é"


@pytest.fixture(scope="module")
def scorer(tiny_checkpoints):
    return Scorer.from_pretrained(tiny_checkpoints["llama"], backend="torch", token_budget=64)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: the bad input must be found before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr("darl_infer.scorer.load_checkpoint_model", refuse)


def run_cli(main, argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a CLI main; any other exception (a traceback) fails the test."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def listing(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- Python API

API_CASES = {
    "items-dict": (lambda s: s.score("w1", {"w2": 1, "w3": 2}), TypeError, r"items must be a sequence of str, not a dict"),
    "items-lone-str": (lambda s: s.score("w1", "w2 w3"), TypeError, r"not a single str"),
    "items-bytes": (lambda s: s.score("w1", b"w2"), TypeError, r"not bytes"),
    "items-set": (lambda s: s.score("w1", {"w2", "w3"}), TypeError, r"not a set \(unordered"),
    "items-not-iterable": (lambda s: s.score("w1", 3), TypeError, r"items must be a sequence of str, not an int"),
    "items-non-str-element": (lambda s: s.score("w1", iter(["w2", 7])), TypeError, r"items\[1\] must be a str, got int"),
    "query-empty": (lambda s: s.score("  ", ["w1"]), ValueError, r"query is empty"),
    "query-not-str": (lambda s: s.score(3, ["w1"]), TypeError, r"query must be a str"),
    "rank-top_k-negative": (lambda s: s.rank("w1", ["w2", "w3"], top_k=-1), ValueError, r"top_k must be >= 0, got -1"),
    "rank-top_k-not-int": (lambda s: s.rank("w1", ["w2"], top_k="2"), TypeError, r"top_k must be an int, got str"),
    "predict-not-a-pair": (lambda s: s.predict([("w1",)]), TypeError, r"pairs\[0\] must be a \(query, item\) pair"),
}

LOAD_CASES = {
    "device-cuda-without-cuda": ({"device": "cuda"}, ValueError, r"device 'cuda' .*CUDA is not available"),
    "device-unknown": ({"device": "tpu"}, ValueError, r"device 'tpu'"),
    "dtype-int8": ({"dtype": torch.int8}, ValueError, r"dtype torch.int8 .*choose one of"),
    "dtype-unknown": ({"dtype": "fp8"}, ValueError, r"dtype 'fp8' .*choose one of"),
    "token_budget-str": ({"token_budget": "64"}, TypeError, r"token_budget must be an int, got str"),
    "token_budget-zero": ({"token_budget": 0}, ValueError, r"token_budget must be >= 1, got 0"),
    "token_budget-bool": ({"token_budget": True}, TypeError, r"token_budget must be an int, got bool"),
    "unknown-option": ({"budget": 64}, TypeError, r"backend 'torch' has no option 'budget'; its options: \['token_budget', 'compile'\]"),
    "option-of-another-backend": ({"backend": "reference", "token_budget": 64}, TypeError, r"backend 'reference' has no option 'token_budget'"),
    "backend-unknown": ({"backend": "cuda"}, ValueError, r"unknown backend 'cuda'"),
    "prefix_cache_mb-negative": ({"prefix_cache_mb": -1}, ValueError, r"prefix_cache_mb must be >= 0, got -1"),
    "prefix_cache_mb-float": ({"prefix_cache_mb": 0.5}, TypeError, r"prefix_cache_mb must be an int, got float"),
    "prefix_cache_mb-reference": ({"backend": "reference", "prefix_cache_mb": 8}, ValueError,
                                  r"prefix_cache_mb needs a backend that reuses prefixes \(torch or triton\); backend 'reference'"),
}


@pytest.mark.parametrize("case", list(API_CASES) + list(LOAD_CASES))
def test_api_rejects_bad_input(scorer, tiny_checkpoints, monkeypatch, case):
    if case in API_CASES:
        call, error, message = API_CASES[case]
        with pytest.raises(error, match=message):
            call(scorer)
        return
    if case == "device-cuda-without-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    options, error, message = LOAD_CASES[case]
    options = {"backend": "torch", **options}
    monkeypatch.setattr("darl_infer.scorer.load_checkpoint_model", lambda *a, **k: pytest.fail("model loaded first"))
    with pytest.raises(error, match=message):
        Scorer.from_pretrained(tiny_checkpoints["llama"], **options)


def test_iterable_items_are_read_once(scorer, rng):
    """Any ordered iterable of str is materialised once: a generator scores like the list it yields."""
    items = ragged_items(rng, 9, max_tokens=12)
    want = scorer.score("w1 w2", items)
    for given in ((x for x in items), tuple(items), map(str, items), np.array(items)):
        got = scorer.score("w1 w2", given)
        assert np.array_equal(got.probs, want.probs) and np.array_equal(got.truncated, want.truncated)
    ranked = scorer.rank("w1 w2", (x for x in items), top_k=4, return_documents=True)
    assert ranked == scorer.rank("w1 w2", items, top_k=4, return_documents=True)
    assert [r["text"] for r in ranked] == [items[r["corpus_id"]] for r in ranked]
    assert scorer.rank("w1", items, top_k=0) == [] and len(scorer.rank("w1", items, top_k=100)) == len(items)


# ---------------------------------------------------------------- darl-infer rank

RANK_CASES = {
    "empty-query": (["--query", "  "], r"query is empty"),
    "items-missing": (["--items", "{tmp}/nope.txt"], r"nope.txt: file not found"),
    "items-not-utf8": (["--items", "{tmp}/latin1.txt"], r"latin1.txt:2: not valid UTF-8"),
    "top-k-negative": (["--top-k", "-1"], r"argument --top-k: must be an integer >= 0, got '-1'"),
    "checkpoint-missing": (["--checkpoint", "{tmp}/no_ckpt"], r"no_ckpt: checkpoint directory not found"),
}


@pytest.mark.parametrize("case", RANK_CASES)
def test_rank_cli_rejects_bad_input(tiny_checkpoints, tmp_path, capsys, no_model_load, case):
    (tmp_path / "items.txt").write_text("w1 w2\nw3\n")
    (tmp_path / "latin1.txt").write_bytes(b"w1\ncaf\xe9\n")
    args = {"--query": "w1", "--items": str(tmp_path / "items.txt"), "--checkpoint": str(tiny_checkpoints["llama"])}
    change, message = RANK_CASES[case]
    args.update(zip(change[::2], (v.format(tmp=tmp_path) for v in change[1::2])))
    before = listing(tmp_path)
    code, out, err = run_cli(infer_main, ["rank", *[x for kv in args.items() for x in kv]], capsys)
    assert code == 2 and out == ""
    assert "Traceback" not in err and re.search(message, err.strip().splitlines()[-1]), err
    assert listing(tmp_path) == before


# ---------------------------------------------------------------- darl-infer score

GOOD_LINES = [json.dumps({"query": f"w{n % 2}", "item": f"w{n} w{n + 1}"}) + "\n" for n in range(6)]
GOOD_ROWS = "".join(GOOD_LINES)

SCORE_CASES = {
    "malformed-line-4": ({"pairs.jsonl": "".join(GOOD_LINES[:3]) + "{oops\n"}, [], r"pairs.jsonl:4: malformed JSON"),
    "not-utf8-line-3": ({"pairs.jsonl": "".join(GOOD_LINES[:2]).encode() + NOT_UTF8}, [],
                        r"pairs.jsonl:3: not valid UTF-8"),
    "empty-query": ({"pairs.jsonl": GOOD_ROWS + '{"query": " ", "item": "w1"}\n'}, [], r"pairs.jsonl:7: field 'query' is empty"),
    "query-not-str": ({"pairs.jsonl": '{"query": 3, "item": "w1"}\n'}, [], r"pairs.jsonl:1: field 'query' must be a string"),
    "same-input-and-output": ({}, ["--output", "{tmp}/pairs.jsonl"], r"--input and --output are the same file"),
    "buffer-zero": ({}, ["--buffer", "0"], r"argument --buffer: must be an integer >= 1, got '0'"),
    "output-dir-missing": ({}, ["--output", "{tmp}/missing/out.jsonl"], r"missing/out.jsonl: directory .*missing does not exist"),
    "output-is-a-dir": ({}, ["--output", "{tmp}"], r"is a directory"),
    "input-missing": ({}, ["--input", "{tmp}/nope.jsonl"], r"nope.jsonl: file not found"),
    "checkpoint-missing": ({}, ["--checkpoint", "{tmp}/no_ckpt"], r"no_ckpt: checkpoint directory not found"),
}


@pytest.mark.parametrize("case", SCORE_CASES)
def test_score_cli_rejects_bad_input(tiny_checkpoints, tmp_path, capsys, no_model_load, case):
    files, change, message = SCORE_CASES[case]
    files = {"pairs.jsonl": GOOD_ROWS, "out.jsonl": "previous output\n", **files}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    args = {"--input": str(tmp_path / "pairs.jsonl"), "--output": str(tmp_path / "out.jsonl"),
            "--checkpoint": str(tiny_checkpoints["llama"])}
    args.update(zip(change[::2], (v.format(tmp=tmp_path) for v in change[1::2])))
    before = listing(tmp_path)
    code, out, err = run_cli(infer_main, ["score", *[x for kv in args.items() for x in kv]], capsys)
    assert code == 2 and out == ""
    assert "Traceback" not in err and re.search(message, err.strip().splitlines()[-1]), err
    assert listing(tmp_path) == before  # the old output is intact, no partial file is left


def test_score_cli_failure_mid_stream_keeps_the_previous_output(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    """Scored rows were already written when line 4 (read from stdin, so not checked up front) fails."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(("".join(GOOD_LINES[:3]) + "{oops\n").encode())))
    (tmp_path / "out.jsonl").write_text("previous output\n")
    argv = ["score", "--input", "-", "--output", str(tmp_path / "out.jsonl"), "--buffer", "1",
            "--checkpoint", str(tiny_checkpoints["llama"])]
    code, _, err = run_cli(infer_main, argv, capsys)
    assert code == 2 and "<stdin>:4: malformed JSON" in err
    assert listing(tmp_path) == {"out.jsonl": b"previous output\n"}


# ---------------------------------------------------------------- darl-eval

EVAL_CASES = {
    "limit-zero": (["--limit", "0"], r"argument --limit: must be an integer >= 1, got '0'"),
    "limit-negative": (["--limit", "-1"], r"argument --limit: must be an integer >= 1, got '-1'"),
    "backend-bogus": (["--backend", "bogus"], r"argument --backend: invalid choice: 'bogus'"),
    "data-not-utf8": (["--data", "{tmp}/latin1.jsonl"], r"latin1.jsonl:2: not valid UTF-8"),
    "data-missing": (["--data", "{tmp}/nope.jsonl"], r"nope.jsonl: file not found"),
    "empty-query": (["--data", "{tmp}/empty_query.jsonl"], r"empty_query.jsonl:1: field 'query' is empty"),
    "checkpoint-missing": (["--checkpoint", "{tmp}/no_ckpt"], r"no_ckpt: checkpoint directory not found"),
}


@pytest.mark.parametrize("case", EVAL_CASES)
def test_eval_cli_rejects_bad_input(tiny_checkpoints, tmp_path, capsys, no_model_load, case):
    good = '{"query": "w1", "item": "w2", "label": 1}\n'
    (tmp_path / "dev.jsonl").write_text(good)
    (tmp_path / "latin1.jsonl").write_bytes(good.encode() + NOT_UTF8.replace(b"}", b', "label": 0}'))
    (tmp_path / "empty_query.jsonl").write_text('{"query": "", "item": "w2", "label": 1}\n')
    args = {"--data": str(tmp_path / "dev.jsonl"), "--checkpoint": str(tiny_checkpoints["llama"])}
    change, message = EVAL_CASES[case]
    args.update(zip(change[::2], (v.format(tmp=tmp_path) for v in change[1::2])))
    before = listing(tmp_path)
    code, out, err = run_cli(eval_cli.main, [x for kv in args.items() for x in kv], capsys)
    assert code == 2 and out == ""  # no metrics (e.g. NaN ones) printed
    assert "Traceback" not in err and re.search(message, err.strip().splitlines()[-1]), err
    assert listing(tmp_path) == before


# ---------------------------------------------------------------- checkpoint loading


def _edit_spec(directory, **fields):
    spec = json.loads((directory / "darl.json").read_text())
    spec.update(fields)
    (directory / "darl.json").write_text(json.dumps(spec))


def _pickle_weights(directory):
    """Replace model.safetensors by pytorch_model.bin (a pickle), as older HF folders hold."""
    from safetensors.torch import load_file

    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()


CHECKPOINT_CASES = {
    "misspelt-top-level-key": ("full", lambda d: _edit_spec(d, grade_value=[0, 1, 5]),
                               r"darl.json: unknown top-level field\(s\) \['grade_value'\]; known: \[.*'grade_values'"),
    "labels-disagree-with-head": ("full", lambda d: _edit_spec(d, labels=["a", "b", "c", "d"], grade_values=None),
                                  r"darl.json: field 'labels' has 4 labels, but model.safetensors' score head gives 3 grades"),
    "tokenizer-missing": ("full", lambda d: (d / "tokenizer.json").unlink(), r"tokenizer.json: missing"),
    "pickle-weights-only": ("full", _pickle_weights,
                            r"full: holds pytorch_model.bin \(pickle\), not model.safetensors; darl_infer loads safetensors only"),
    "adapter-labels-disagree-with-head": ("adapter", lambda d: _edit_spec(d, labels=["a", "b"], grade_values=None),
                                          r"darl.json: field 'labels' has 2 labels, but adapter_model.safetensors' score head gives 3"),
    "adapter-base-pickle-weights-only": ("adapter", lambda d: _pickle_weights(d.parent / "base"),
                                         r"base: holds pytorch_model.bin \(pickle\), not model.safetensors; darl_infer loads safetensors only"),
    "adapter-base-tokenizer-missing": ("adapter", lambda d: (d.parent / "base" / "tokenizer.json").unlink(),
                                       r"base/tokenizer.json: missing"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_bad_checkpoint_is_refused_by_name(tiny_checkpoints, tmp_path, case):
    kind, damage, message = CHECKPOINT_CASES[case]
    if kind == "full":
        directory = tmp_path / "full"
        shutil.copytree(tiny_checkpoints["llama"], directory)
    else:
        base = make_checkpoint(tmp_path / "base", "llama")
        directory = make_adapter_checkpoint(tmp_path / "adapter", base)
    damage(directory)
    before = listing(directory)
    with pytest.raises(CheckpointError, match=message):
        Scorer.from_pretrained(directory, backend="torch")
    assert listing(directory) == before


def test_adapter_checkpoint_matches_reference(tmp_path, rng):
    """The adapter path loads (safetensors only) and the torch backend equals the reference on it."""
    base = make_checkpoint(tmp_path / "base", "llama")
    adapter = make_adapter_checkpoint(tmp_path / "adapter", base)
    items = ragged_items(rng, 6, max_tokens=16)
    want = Scorer.from_pretrained(adapter, backend="reference").score("w1 w2", items)
    got = Scorer.from_pretrained(adapter, backend="torch").score("w1 w2", items)
    assert np.abs(got.probs - want.probs).max() <= 1e-5
    plain = Scorer.from_pretrained(base, backend="reference").score("w1 w2", items)
    assert np.abs(plain.probs - want.probs).max() > 1e-3  # the adapter changed the scores
