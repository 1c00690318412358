"""backends/onednn_mlp.py: in bf16 on a CPU that runs it natively, the torch backend runs each known
gated MLP as oneDNN matmuls with the activation and the gating as post-ops. Checked against HF's own
module (same weights, same input) and, through the Scorer, against the reference backend."""

import random
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import ARCHS, ragged_items
from darl_infer import Scorer
from darl_infer.backends import onednn_mlp
from darl_infer.backends.attention_hook import active
from darl_infer.backends.prefix_runner import PrefixPass
from tiny_models import random_text

bf16_natively = pytest.mark.skipif(not onednn_mlp.used_for(torch.bfloat16), reason="this CPU has no native bf16 in oneDNN")


def _mlps(scorer):
    return [layer.mlp for layer in scorer.backend.model.model.layers]


@pytest.mark.skipif(not onednn_mlp.onednn_available(), reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_the_post_ops_compute_the_gated_activation(activation):
    """The op's math in fp32, where it must be HF's to rounding: act(x W_g^T) * (x W_u^T)."""
    g = torch.Generator().manual_seed(0)
    rows, gate_w, up_w = 3 * torch.randn(300, 64, generator=g), torch.randn(128, 64, generator=g) / 8, torch.randn(128, 64, generator=g) / 8
    act = torch.nn.functional.silu if activation == "silu" else lambda z: torch.nn.functional.gelu(z, approximate="tanh")
    want = act(rows @ gate_w.T) * (rows @ up_w.T)
    got = onednn_mlp.gated_product(rows, gate_w, up_w, onednn_mlp.POST_OPS[activation])
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_models_keep_hf_s_mlp(tiny_checkpoints, arch):
    scorer = Scorer.from_pretrained(tiny_checkpoints[arch], backend="torch", dtype="fp32")
    assert not any("darl_post_op" in vars(mlp) for mlp in _mlps(scorer))


@bf16_natively
@pytest.mark.parametrize("arch", ARCHS)  # SiLU (llama, qwen2) and GELU-tanh (gemma3)
def test_the_swapped_mlp_is_hf_s_module_in_a_pass_and_untouched_outside(tiny_checkpoints, arch):
    scorer = Scorer.from_pretrained(tiny_checkpoints[arch], backend="torch", dtype="bf16")
    mlp = _mlps(scorer)[0]
    assert "darl_post_op" in vars(mlp)  # swapped
    x = 3 * torch.randn(1, 300, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(1))
    hf = type(mlp).forward
    with torch.inference_mode():
        outside = mlp(x.bfloat16())
        assert torch.equal(outside, hf(mlp, x.bfloat16()))  # outside a pass: HF's forward
        with active(PrefixPass([300], scorer.backend.attention_op)):
            inside = mlp(x.bfloat16()).float()
        exact = hf(mlp.float(), x)
        mlp.bfloat16()
    assert inside.shape == exact.shape
    # fp32 accumulators instead of rounding each step: within bf16's rounding of HF's result, and
    # no further from the fp32 result than HF's bf16 module
    assert (inside - exact).abs().max() <= 2**-6 * exact.abs().max()
    assert (inside - exact).abs().mean() <= (outside.float() - exact).abs().mean()


@bf16_natively
@pytest.mark.parametrize("arch", ARCHS)
def test_torch_backend_with_onednn_mlps_matches_the_reference(monkeypatch, tiny_checkpoints, arch):
    rng = random.Random(f"onednn-{arch}")
    query, items = random_text(rng, rng.randint(1, 12)), ragged_items(rng, 30)
    reference = Scorer.from_pretrained(tiny_checkpoints[arch], backend="reference", dtype="bf16").score(query, items)
    scorer = Scorer.from_pretrained(tiny_checkpoints[arch], backend="torch", dtype="bf16", token_budget=60)
    calls = []
    product = onednn_mlp.gated_product
    monkeypatch.setattr(onednn_mlp, "gated_product", lambda *args: calls.append(args[0].shape[0]) or product(*args))
    got = scorer.score(query, items)
    assert len(calls) >= len(_mlps(scorer))  # every layer's MLP, in each forward pass, ran oneDNN's
    assert np.abs(got.probs - reference.probs).max() <= 2e-2


@bf16_natively
def test_compiled_layers_call_it_as_one_opaque_op_without_a_graph_break(monkeypatch, tiny_checkpoints):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    rng = random.Random("onednn-compiled")
    query, items = random_text(rng, 5), ragged_items(rng, 12)
    reference = Scorer.from_pretrained(tiny_checkpoints["gemma3"], backend="reference", dtype="bf16").score(query, items)
    scorer = Scorer.from_pretrained(tiny_checkpoints["gemma3"], backend="torch", dtype="bf16", compile=True)
    calls = []
    product = onednn_mlp.gated_product
    monkeypatch.setattr(onednn_mlp, "gated_product", lambda *args: calls.append(args[0].shape[0]) or product(*args))
    got = scorer.score(query, items)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(calls) >= len(_mlps(scorer))  # the compiled graphs call the op
    assert np.abs(got.probs - reference.probs).max() <= 2e-2


@bf16_natively
def test_threads_sharing_a_bf16_scorer_get_the_sequential_results(tiny_checkpoints):
    """The op is called from whichever thread's pass holds the model (turns.py): shared weights,
    nothing per call kept, so each call gives exactly what it gives alone."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # calls interleave inside each forward pass
    try:
        scorer = Scorer.from_pretrained(tiny_checkpoints["gemma3"], backend="torch", dtype="bf16", token_budget=48)
        rng = random.Random("onednn-threads")
        jobs = [(random_text(rng, rng.randint(1, 8)), ragged_items(rng, rng.randint(1, 10), max_tokens=24)) for _ in range(16)]
        sequential = [scorer.score(query, items).probs for query, items in jobs]
        with ThreadPoolExecutor(max_workers=4) as pool:
            threaded = list(pool.map(lambda job: scorer.score(*job).probs, jobs))
    finally:
        sys.setswitchinterval(before)
    for n, (got, want) in enumerate(zip(threaded, sequential)):
        assert np.array_equal(got, want), f"job {n}: max |Δprob| {np.abs(got - want).max():.3g} under threads"
