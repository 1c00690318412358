"""`compile=True`: the torch backend with its decoder layers under torch.compile gives the oracle's
scores (each pair alone through HF, uncompiled) to the dtype's tolerance, in any chunking, under
threads, and refuses to be asked wrongly."""

import argparse
import random
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import ARCHS, ragged_items
from darl_infer import Scorer
from darl_infer.backends.compiled_layers import TanhGeluViaExp
from tiny_models import random_text


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_compiled_layers_match_the_reference(tiny_checkpoints, arch, dtype, tolerance):
    rng = random.Random(f"compiled-{arch}-{dtype}")
    query, items = random_text(rng, rng.randint(1, 12)), ragged_items(rng, 40)
    reference = Scorer.from_pretrained(tiny_checkpoints[arch], backend="reference", dtype=dtype).score(query, items)
    compiled = Scorer.from_pretrained(tiny_checkpoints[arch], backend="torch", dtype=dtype, compile=True)
    for token_budget in (37, 10**9):  # many chunks (several compiled shapes), then one
        compiled.backend.token_budget = token_budget
        got = compiled.score(query, items)
        assert np.abs(got.probs - reference.probs).max() <= tolerance, f"token budget {token_budget}"
    alone = compiled.score(query, [items[3]]).probs[0]  # one item: a shape of its own
    assert np.abs(alone - reference.probs[3]).max() <= tolerance
    layers = getattr(compiled.backend.model, compiled.backend.model.base_model_prefix).layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    if arch == "gemma3":  # its tanh GELU runs in the exp form under compile
        assert all(isinstance(layer.mlp.act_fn, TanhGeluViaExp) for layer in layers)


def test_tanh_gelu_via_exp_is_the_tanh_gelu():
    """The exp form against the tanh GELU computed in fp64 (as x * sigmoid(2z), the same function:
    the tanh form cancels in the negative tail, to 0 in fp64 where the value is ~1e-37, by ~1 % in
    fp32 where it is ~1e-6): as close as fp32 allows over the range hidden states take and past
    where exp over- or underflows; in bf16 within half a bf16 step. Against eager's bf16 tanh GELU
    on hidden-state-like values: off by at most 2e-5 (that tail's cancellation), the same bf16
    value almost everywhere else."""
    typical = 3 * torch.randn(20000, generator=torch.Generator().manual_seed(0))
    x = torch.cat([torch.linspace(-60, 60, 48001), typical])
    x64 = x.double()
    want = x64 * torch.sigmoid((8 / torch.pi) ** 0.5 * (x64 + 0.044715 * x64**3))
    got = TanhGeluViaExp()(x)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-37)  # exp(z), z up to ~90: |z| fp32 steps
    got16, x16 = TanhGeluViaExp()(x.bfloat16()), x.bfloat16().double()
    want16 = x16 * torch.sigmoid((8 / torch.pi) ** 0.5 * (x16 + 0.044715 * x16**3))
    assert got16.dtype == torch.bfloat16
    assert ((got16.double() - want16).abs() <= 1.01 * 2**-8 * want16.abs() + 1e-37).all()  # ~1e-37: 0 once exp overflows
    ours, eager = TanhGeluViaExp()(typical.bfloat16()).float(), torch.nn.functional.gelu(typical.bfloat16(), approximate="tanh").float()
    assert (ours - eager).abs().max() <= 2e-5
    visible = eager.abs() > 1e-3
    assert (ours[visible] != eager[visible]).float().mean() < 3e-3


def test_compiled_scorer_shared_by_threads_gives_the_sequential_results(tiny_checkpoints):
    scorer = Scorer.from_pretrained(tiny_checkpoints["gemma3"], backend="torch", compile=True, token_budget=48)
    rng = random.Random("compiled-threads")
    jobs = [(random_text(rng, rng.randint(1, 8)), ragged_items(rng, rng.randint(1, 10), max_tokens=24)) for _ in range(16)]
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads switch often: a compilation and another call would overlap
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            threaded = list(pool.map(lambda job: scorer.score(*job).probs, jobs))
    finally:
        sys.setswitchinterval(before)
    sequential = [scorer.score(query, items).probs for query, items in jobs]
    for n, (got, want) in enumerate(zip(threaded, sequential)):
        assert np.abs(got - want).max() <= 1e-6, f"job {n}: max |Δprob| {np.abs(got - want).max():.3g} under threads"
    reference = Scorer.from_pretrained(tiny_checkpoints["gemma3"], backend="reference")
    for (query, items), got in zip(jobs, sequential):
        assert np.abs(got - reference.score(query, items).probs).max() <= 1e-5


def test_compile_option_is_checked(tiny_checkpoints):
    with pytest.raises(TypeError, match="compile must be True or False"):
        Scorer.from_pretrained(tiny_checkpoints["llama"], backend="torch", compile="yes")
    with pytest.raises(TypeError, match="backend 'reference' has no option 'compile'"):
        Scorer.from_pretrained(tiny_checkpoints["llama"], backend="reference", compile=True)


def test_cli_compile_flag(tiny_checkpoints, tmp_path, capsys):
    from tiny_models import make_bi_encoder_checkpoint

    from darl_infer.cli import main as cli_main
    from darl_infer.serve.cli import add_arguments, load_models, serve_main
    from darl_infer.serve.limits import Limits

    items = tmp_path / "items.txt"
    items.write_text("\n".join(random_text(random.Random(5), n) for n in (3, 9, 1, 14, 6)) + "\n")
    rank = ["rank", "--query", "w1 w2", "--items", str(items), "--checkpoint", str(tiny_checkpoints["qwen2"])]
    cli_main(rank)
    plain = capsys.readouterr().out
    cli_main([*rank, "--compile"])
    assert capsys.readouterr().out == plain  # the same grades, scores (3 decimals) and order

    bi = make_bi_encoder_checkpoint(tmp_path / "bi", tiny_checkpoints["llama"])
    assert cli_main(["rank", "--query", "w1", "--items", str(items), "--checkpoint", str(bi), "--compile"]) == 2
    assert "--compile compiles a cross-encoder's decoder layers" in capsys.readouterr().err
    assert cli_main(["score", "--input", str(items), "--output", str(tmp_path / "out.jsonl"), "--engine", "ray", "--compile"]) == 2
    assert "--compile is for the local engine" in capsys.readouterr().err

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tiny_checkpoints["qwen2"]), "--cascade", str(bi), "--compile"])
    fine, coarse, _ = load_models(args, Limits())
    fine_layers = fine.backend.model.model.layers
    assert all(layer._compiled_call_impl is not None for layer in fine_layers)  # the cross-encoder compiled, the bi-encoder not
    with pytest.raises(SystemExit, match="--compile compiles a cross-encoder's decoder layers; neither"):
        serve_main(["--checkpoint", str(bi), "--compile"])


def test_each_compiled_layer_is_one_graph_around_the_attention_op(tiny_checkpoints):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs compiled by earlier tests would be reused and not counted
    counters.clear()
    compiled = Scorer.from_pretrained(tiny_checkpoints["gemma3"], backend="torch", dtype="fp32", compile=True)
    compiled.score("cordless drill", ["DEWALT 20V drill kit", "garden hose", "socket set"])
    assert not counters["graph_break"], dict(counters["graph_break"])  # the attention runs inside the graph
    # the layers share the compiled code: one graph per attention kind (the tiny gemma3's 3 layers:
    # sliding, global, sliding), not one per layer index
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
