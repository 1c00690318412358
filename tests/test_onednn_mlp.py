"""backends/onednn_mlp.py: on a CPU the torch backend runs each known gated MLP as oneDNN matmuls
with the activation and the gating as post-ops. Checked against HF's own module (same weights,
same input) and, through the Scorer, against the reference backend."""

import random

import numpy as np
import pytest
import torch

from conftest import ARCHS, ragged_items
from darl_infer import Scorer
from darl_infer.backends import onednn_mlp
from darl_infer.backends.attention_hook import active
from darl_infer.backends.onednn_mlp import onednn_runs
from darl_infer.backends.prefix_runner import PrefixPass
from tiny_models import random_text

DTYPES = [d for d in ("fp32", "bf16") if onednn_runs({"fp32": torch.float32, "bf16": torch.bfloat16}[d])]
pytestmark = pytest.mark.skipif(not DTYPES, reason="this PyTorch build has no oneDNN")


def _mlps(scorer):
    return [layer.mlp for layer in scorer.backend.model.model.layers]


@pytest.mark.parametrize("arch", ARCHS)  # SiLU (llama, qwen2) and GELU-tanh (gemma3)
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_swapped_mlp_is_hf_s_module_in_a_pass_and_untouched_outside(tiny_checkpoints, arch, dtype):
    scorer = Scorer.from_pretrained(tiny_checkpoints[arch], backend="torch", dtype=dtype)
    mlp = _mlps(scorer)[0]
    assert "darl_post_op" in vars(mlp)  # swapped
    x = 3 * torch.randn(1, 300, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(1))
    hf = type(mlp).forward
    with torch.inference_mode():
        outside = mlp(x.to(mlp.gate_proj.weight.dtype))
        assert torch.equal(outside, hf(mlp, x.to(mlp.gate_proj.weight.dtype)))  # outside a pass: HF's forward
        with active(PrefixPass([300], scorer.backend.attention_op)):
            inside = mlp(x.to(mlp.gate_proj.weight.dtype)).float()
        exact = hf(mlp.float(), x).float() if dtype == "bf16" else hf(mlp, x)
        mlp.to(scorer.backend.model.dtype)
    assert inside.shape == exact.shape
    if dtype == "fp32":
        assert (inside - exact).abs().max() <= 1e-5 * exact.abs().max()
    else:  # fp32 accumulators instead of rounding each step: no further from fp32 than HF's bf16 module
        hf_bf16 = outside.float()
        assert (inside - exact).abs().mean() <= (hf_bf16 - exact).abs().mean()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_torch_backend_with_onednn_mlps_matches_the_reference(monkeypatch, tiny_checkpoints, arch, dtype, tolerance):
    if dtype not in DTYPES:
        pytest.skip(f"oneDNN does not run {dtype} on this CPU")
    rng = random.Random(f"onednn-{arch}-{dtype}")
    query, items = random_text(rng, rng.randint(1, 12)), ragged_items(rng, 30)
    reference = Scorer.from_pretrained(tiny_checkpoints[arch], backend="reference", dtype=dtype).score(query, items)
    scorer = Scorer.from_pretrained(tiny_checkpoints[arch], backend="torch", dtype=dtype, token_budget=60)
    calls = []
    product = onednn_mlp.gated_product
    monkeypatch.setattr(onednn_mlp, "gated_product", lambda *args: calls.append(args[0].shape[0]) or product(*args))
    got = scorer.score(query, items)
    assert len(calls) >= len(_mlps(scorer))  # every layer's MLP, in each forward pass, ran oneDNN's
    assert np.abs(got.probs - reference.probs).max() <= tolerance
