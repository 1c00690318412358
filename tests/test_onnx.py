"""ONNX export and the onnx backend, against the reference backend (the oracle)."""

from __future__ import annotations

import json
import random
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from darl_infer import CheckpointError, Scorer  # noqa: E402
from darl_infer.cli import main as cli_main  # noqa: E402
from darl_infer.kernels.shared_prefix_attention import shared_prefix_attention_reference  # noqa: E402
from darl_infer.backends.onnx_export import export, padded_shared_prefix_attention  # noqa: E402
from darl_infer.backends.onnx_format import sha256  # noqa: E402
from darl_infer.checkpoint import DEFAULT_MODEL_DIR  # noqa: E402

from tiny_models import make_checkpoint, random_text  # noqa: E402

ONNX_TOL = 1e-4  # fp32, DESIGN.md


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared CPU extra threads oversubscribe it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def exported(request, tmp_path_factory):
    """(checkpoint dir, export dir) of a tiny random model."""
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = make_checkpoint(root / "checkpoint", request.param)
    export(checkpoint, root / "onnx")
    return checkpoint, root / "onnx"


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_cli")
    checkpoint = make_checkpoint(root / "checkpoint", "llama", seed=1)
    assert cli_main(["export", str(checkpoint), str(root / "onnx"), "--no-optimize"]) == 0
    return checkpoint, root / "onnx"


def ragged_items(rng: random.Random, n: int, longest: int = 40) -> list[str]:
    return [random_text(rng, rng.randint(1, longest)) for _ in range(n)]


def assert_matches_reference(checkpoint, export_dir, query, items, tol=ONNX_TOL, **options):
    want = Scorer.from_pretrained(checkpoint, backend="reference").score(query, items)
    got = Scorer.from_pretrained(export_dir, backend="onnx", **options).score(query, items)
    assert got.probs.shape == want.probs.shape
    diff = np.abs(got.probs - want.probs).max()
    assert diff <= tol, f"max |Δprob| {diff:.3g}"
    np.testing.assert_allclose(got.scores, want.scores, atol=tol * 2 * len(got.labels))
    return diff


@pytest.mark.parametrize("n_items", [1, 7, 257])
def test_matches_reference(exported, n_items):
    rng = random.Random(n_items)
    assert_matches_reference(*exported, random_text(rng, 6), ragged_items(rng, n_items))


def test_chunks_and_long_prefix(exported):
    """Several items-graph calls share one prefix run; the prefix is longer than Gemma3's window."""
    rng = random.Random(3)
    assert_matches_reference(*exported, random_text(rng, 30), ragged_items(rng, 20), token_budget=25)


def test_padded_attention_matches_packed_reference():
    torch.manual_seed(0)
    H, Hkv, D, P = 4, 2, 8, 11
    lengths = [5, 1, 9]
    N, L = len(lengths), max(lengths)
    q, k, v = torch.randn(N, H, L, D), torch.randn(N, Hkv, L, D), torch.randn(N, Hkv, L, D)
    prefix_k, prefix_v = torch.randn(P, Hkv, D), torch.randn(P, Hkv, D)
    cu = torch.tensor([0, *np.cumsum(lengths)])

    def packed(x):  # (N, heads, L, D) right-padded -> (T, heads, D)
        return torch.cat([x[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])

    for window in (None, 4, 13):
        want = shared_prefix_attention_reference(packed(q), packed(k), packed(v), prefix_k, prefix_v, cu, 0.3, window)
        got = padded_shared_prefix_attention(q, k, v, prefix_k, prefix_v, 0.3, window)
        got = torch.cat([got[i, :n] for i, n in enumerate(lengths)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_auto_detects_export_and_cli_export(llama_export):
    checkpoint, export_dir = llama_export
    scorer = Scorer.from_pretrained(export_dir)
    assert scorer.backend.name == "onnx"
    rng = random.Random(5)
    assert_matches_reference(checkpoint, export_dir, random_text(rng, 4), ragged_items(rng, 9))


def test_threads_sharing_an_onnx_scorer_get_the_sequential_results(llama_export):
    checkpoint, export_dir = llama_export
    scorer = Scorer.from_pretrained(export_dir, token_budget=30)
    rng = random.Random(8)
    jobs = [(random_text(rng, rng.randint(1, 6)), ragged_items(rng, rng.randint(1, 8), longest=12)) for _ in range(12)]
    sequential = [scorer.score(query, items).probs for query, items in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda job: scorer.score(*job).probs, jobs))
    for got, want in zip(threaded, sequential):
        assert np.array_equal(got, want)
    reference = Scorer.from_pretrained(checkpoint, backend="reference")
    for (query, items), got in zip(jobs, sequential):
        assert np.abs(got - reference.score(query, items).probs).max() <= ONNX_TOL


def test_int8_export_scores_close(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint", "llama")
    section = export(checkpoint, tmp_path / "onnx", int8=True)
    assert section["int8"]
    rng = random.Random(6)
    query, items = random_text(rng, 5), ragged_items(rng, 16)
    want = Scorer.from_pretrained(checkpoint, backend="reference").score(query, items)
    got = Scorer.from_pretrained(tmp_path / "onnx").score(query, items)
    np.testing.assert_allclose(got.probs.sum(-1), 1.0, atol=1e-5)
    assert np.abs(got.probs - want.probs).max() < 0.1  # lossy: int8 weights, not exact


def test_wrong_backend_for_folder(llama_export):
    checkpoint, export_dir = llama_export
    with pytest.raises(CheckpointError, match="darl-infer export"):
        Scorer.from_pretrained(checkpoint, backend="onnx")
    with pytest.raises(ValueError, match="ONNX export"):
        Scorer.from_pretrained(export_dir, backend="torch")
    with pytest.raises(ValueError, match="dtype"):
        Scorer.from_pretrained(export_dir, dtype="bf16")


def test_export_refuses_existing_folder(llama_export, tmp_path):
    checkpoint, export_dir = llama_export
    with pytest.raises(CheckpointError, match="already an ONNX export"):
        export(export_dir, tmp_path / "again")
    with pytest.raises(FileExistsError):
        export(checkpoint, export_dir)


@pytest.fixture
def broken(llama_export, tmp_path):
    """A fresh copy of the export to damage."""
    copy = tmp_path / "onnx"
    shutil.copytree(llama_export[1], copy)
    return copy


@pytest.mark.parametrize("name", ["items.onnx", "prefix.onnx", "tokenizer.json"])
def test_missing_file_is_named(broken, name):
    (broken / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name}: missing"):
        Scorer.from_pretrained(broken)


@pytest.mark.parametrize("name", ["items.onnx", "tokenizer.json"])
def test_checksum_mismatch_is_named(broken, name):
    with open(broken / name, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match=f"{name}: sha256 does not match"):
        Scorer.from_pretrained(broken)


def edit_spec(directory, change):
    path = directory / "darl.json"
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec))


def test_unreadable_format_version_is_named(broken):
    edit_spec(broken, lambda s: s["onnx"].update(format_version=99))
    with pytest.raises(CheckpointError, match=r"darl.json: field 'onnx.format_version' is 99"):
        Scorer.from_pretrained(broken)


def test_unlisted_graph_is_named(broken):
    edit_spec(broken, lambda s: s["onnx"]["files"].pop("prefix.onnx"))
    with pytest.raises(CheckpointError, match="does not list prefix.onnx"):
        Scorer.from_pretrained(broken)


def test_label_count_mismatch_is_named(broken):
    edit_spec(broken, lambda s: s.update(labels=["a", "b"], grade_values=[0.0, 1.0]))
    with pytest.raises(CheckpointError, match="items.onnx: gives 3 grades"):
        Scorer.from_pretrained(broken)


def test_graph_swap_is_caught(broken):
    """Valid files in the wrong places (checksums re-made to match): the graph names give it away."""
    (broken / "items.onnx").rename(broken / "tmp.onnx")
    (broken / "prefix.onnx").rename(broken / "items.onnx")
    (broken / "tmp.onnx").rename(broken / "prefix.onnx")
    files = {name: sha256(broken / name) for name in ("items.onnx", "prefix.onnx")}
    edit_spec(broken, lambda s: s["onnx"]["files"].update(files))
    with pytest.raises(CheckpointError, match="graph inputs/outputs"):
        Scorer.from_pretrained(broken)


@pytest.mark.slow
def test_default_model_matches_reference(tmp_path):
    if not (DEFAULT_MODEL_DIR / "darl.json").is_file():
        pytest.skip(f"no default model at {DEFAULT_MODEL_DIR}")
    export(None, tmp_path / "onnx")
    items = (DEFAULT_MODEL_DIR.parent / "examples" / "items.txt").read_text().splitlines()
    rng = random.Random(0)
    many = [" ".join(rng.sample(items, rng.randint(1, 3))) for _ in range(257)]
    for query, batch in [("cordless drill", items[:1]), ("cordless drill", many)]:
        assert_matches_reference(DEFAULT_MODEL_DIR, tmp_path / "onnx", query, batch)
