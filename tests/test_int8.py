"""dtype="int8" (darl_infer/backends/int8_linear.py): int8 weights, float activations. Its Linear
against the dequantized weight times the input, each token's result as independent of the other
rows as the float matmul's, the tiny models within int8's lossy bound of the fp32 oracle and equal
to the fp32 model with int8-rounded weights; the refusals. Then the per-token W8A8 kept for the
benches (measured, not shipped): refused where its integer products would saturate, its matmul
against the exact integer product, each token independent of the others, smoothing, calibration."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from darl_infer import Scorer
from darl_infer.backends import int8_linear
from darl_infer.backends.int8_linear import (
    INT8_FLAGS, PerTokenInt8Linear, WeightOnlyInt8Linear, decoder_linears, int8_matmul, quantize_decoder_linears,
    quantize_rows, record_input_absmax,
)
from darl_infer.loading import cpu_flags
from darl_infer.scorer import check_int8_request

from conftest import ARCHS, ragged_items

has_int8_dot_products = pytest.mark.skipif(
    not set(INT8_FLAGS) & cpu_flags(), reason="this CPU has neither AMX-INT8 nor AVX-512-VNNI"
)
# int8 weights are lossy: on the tiny gemma3 up to 0.025 from the fp32 oracle (mean 6e-3; llama
# 6e-3, qwen2 7e-4); the real model's cost is measured on the dev sets (bench/int8_quality.py).
# A wrong scale moves them far more.
INT8_MAX_GAP, INT8_MEAN_GAP = 0.05, 0.01
FP32_GAP = 1e-5  # fp32 reduction order: what the batch may change (measured <= 7e-7)


def int8_rounded(weight: torch.Tensor) -> torch.Tensor:
    """Each row rounded to 255 levels of max |w_row| / 127, in float64: the reference, written
    without int8_linear's code."""
    w = weight.detach().double()
    step = w.abs().amax(1, keepdim=True) / 127
    return torch.round(w / step) * step


def test_int8_refused_outside_the_torch_backend_and_the_cpu(tiny_checkpoints):
    with pytest.raises(ValueError, match="torch backend"):
        Scorer.from_pretrained(tiny_checkpoints["llama"], dtype="int8", backend="reference")
    with pytest.raises(ValueError, match="runs on the CPU"):
        check_int8_request("torch", torch.device("cuda"))


def test_int8_runs_without_int8_dot_products(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(int8_linear, "cpu_flags", lambda: {"avx2", "fma"})  # weight-only needs none
    scorer = Scorer.from_pretrained(tiny_checkpoints["llama"], dtype="int8")
    assert scorer.dtype == "int8" and np.isfinite(scorer.score("cordless drill", ["garden hose"]).probs).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_linear_is_the_dequantized_weight_times_the_input(dtype):
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 80)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(80, 96, generator=gen))
        linear.weight[3] *= 50  # one row of a far larger range: its own scale, the others unaffected
    linear = linear.to(dtype)  # as the model's Linear layers are loaded
    int8 = WeightOnlyInt8Linear(linear)
    assert int8.qweight.dtype == torch.int8 and int8.qweight.abs().max(1).values.eq(127).all()
    x = torch.randn(37, 96, generator=gen).to(dtype)
    got = int8(x)
    exact = x.double() @ int8_rounded(linear.weight).T + linear.bias.detach().double()
    # fp32: the fp32 matmul's rounding only; bf16: the weight, input product and output each rounded to bf16
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype
    assert (got.double() - exact).abs().max() <= rtol * exact.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_rows_depend_on_each_other_only_as_the_float_matmul(dtype):
    # oneDNN's float matmul itself may round a row differently with other rows beside it; weight-only
    # adds nothing: the same weight whatever the call, each row's result bitwise the float matmul's
    linear = torch.nn.Linear(64, 80, bias=False)
    int8 = WeightOnlyInt8Linear(linear)
    weight = int8.dequantized(dtype)
    x = (torch.randn(33, 64) * torch.linspace(0.01, 10, 33)[:, None]).to(dtype)  # rows of very different ranges
    assert torch.equal(int8(x), F.linear(x, weight))
    for i in range(len(x)):
        assert torch.equal(int8(x[i : i + 1]), F.linear(x[i : i + 1], weight))
    assert torch.equal(int8.dequantized(dtype), weight)


@pytest.mark.parametrize("arch,compile", [(arch, False) for arch in ARCHS] + [("gemma3", True)])
def test_int8_scores_within_its_bound_of_the_fp32_oracle(tiny_checkpoints, rng, arch, compile):
    checkpoint = tiny_checkpoints[arch]  # qwen2's projections have biases
    query, items = "cordless drill with battery", ragged_items(rng, 12)
    oracle = Scorer.from_pretrained(checkpoint, backend="reference", dtype="fp32")
    int8 = Scorer.from_pretrained(checkpoint, dtype="int8", compile=compile)
    assert int8.dtype == "int8"
    model = int8.backend.model
    assert not list(decoder_linears(model)) and any(isinstance(m, WeightOnlyInt8Linear) for m in model.modules())
    together = int8.score(query, items).probs
    alone = np.stack([int8.score(query, [item]).probs[0] for item in items])
    expected = np.stack([oracle.score(query, [item]).probs[0] for item in items])
    for probs in (together, alone):
        gap = np.abs(probs - expected)
        assert gap.max() <= INT8_MAX_GAP and gap.mean() <= INT8_MEAN_GAP
    assert np.abs(together - alone).max() <= FP32_GAP  # no activation rounding: fp32's batch dependence only

    # the fp32 model with each decoder Linear's weight int8-rounded by the reference above scores the same
    rounded = Scorer.from_pretrained(checkpoint, dtype="fp32")
    with torch.no_grad():
        for _, _, linear in decoder_linears(rounded.backend.model):
            linear.weight.copy_(int8_rounded(linear.weight).float())
    assert np.abs(together - rounded.score(query, items).probs).max() <= FP32_GAP


# Per-token W8A8 (int8_linear.PerTokenInt8Linear): kept for bench/int8_quality.py --method per-token
# and bench/matmul_shapes.py, not a dtype.


def test_per_token_int8_refused_on_a_cpu_without_int8_dot_products(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(int8_linear, "cpu_flags", lambda: {"avx2", "fma"})
    model = Scorer.from_pretrained(tiny_checkpoints["llama"], dtype="fp32").backend.model
    with pytest.raises(ValueError, match="AMX-INT8 or AVX-512-VNNI"):
        quantize_decoder_linears(model)


@has_int8_dot_products
def test_int8_matmul_equals_the_integer_product():
    gen = torch.Generator().manual_seed(0)
    qx = torch.randint(-127, 128, (37, 96), dtype=torch.int8, generator=gen)
    qw = torch.randint(-127, 128, (48, 96), dtype=torch.int8, generator=gen)
    w_scale = torch.rand(48, generator=gen) / 127
    packed = torch.ops.onednn.qlinear_prepack(qw, None)
    out = int8_matmul(qx, packed, w_scale, torch.zeros(48, dtype=torch.long), 48)
    exact = (qx.double() @ qw.double().T) * w_scale.double()  # int32 sums are exact; one fp32 rounding
    torch.testing.assert_close(out.double(), exact, rtol=2e-7, atol=0)


@has_int8_dot_products
def test_per_token_int8_linear_rows_do_not_depend_on_each_other():
    linear = torch.nn.Linear(64, 80, bias=False)
    x = torch.randn(33, 64) * torch.linspace(0.01, 10, 33)[:, None]  # rows of very different ranges
    int8 = PerTokenInt8Linear(linear)
    together = int8(x)
    alone = torch.cat([int8(x[i : i + 1]) for i in range(len(x))])
    assert torch.equal(together, alone)  # one scale per token: the batch changes nothing
    q, scale = quantize_rows(x)
    assert q.abs().max() <= 127 and ((q.float() * scale - x).abs() <= 0.5001 * scale).all()
    assert (together - linear(x)).abs().max() <= 0.02 * linear(x).abs().max()


@has_int8_dot_products
def test_smoothing_keeps_the_product_and_flattens_outlier_channels():
    gen = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(64, 80, bias=False)
    x = torch.randn(200, 64, generator=gen)
    x[:, [3, 17]] *= 40  # outlier input channels, as in Gemma's activations
    plain, smoothed = PerTokenInt8Linear(linear), PerTokenInt8Linear(linear, x.abs().amax(0))
    exact = linear(x).detach()
    error = {name: ((m(x) - exact).norm() / exact.norm()).item() for name, m in (("plain", plain), ("smoothed", smoothed))}
    assert error["smoothed"] < 0.6 * error["plain"] and error["smoothed"] < 0.01
    together = smoothed(x[:33])
    assert torch.equal(together, torch.cat([smoothed(x[i : i + 1]) for i in range(33)]))  # still one scale per token


def test_record_input_absmax_sees_each_decoder_linear_input(tiny_checkpoints):
    # the reference backend runs HF's modules as they are (the torch backend's fused projections
    # would call q/k/v and gate/up as one matmul, past these layers' hooks)
    scorer = Scorer.from_pretrained(tiny_checkpoints["gemma3"], backend="reference", dtype="fp32")
    model = scorer.backend.model
    linears = [module for _, _, module in decoder_linears(model)]
    seen = {}
    probe = linears[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", []).append(args[0].reshape(-1, m.in_features)))
    with record_input_absmax(model) as absmax:
        scorer.score("cordless drill", ["DEWALT 20V drill", "garden hose"])
    probe.remove()
    assert set(absmax) == set(linears)
    assert all(a.shape == (m.in_features,) and a.dtype == torch.float32 for m, a in absmax.items())
    torch.testing.assert_close(absmax[linears[0]], torch.cat(seen["x"]).abs().amax(0), rtol=0, atol=0)
    before = {m: a.clone() for m, a in absmax.items()}
    scorer.score("cordless drill " * 8, ["garden hose " * 20])  # after the block nothing is recorded
    assert all(torch.equal(before[m], absmax[m]) for m in linears)
