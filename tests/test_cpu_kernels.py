"""kernels/*_cpu.cpp, the C++ CPU ops (kernels/cpu_extension.py builds them): each against its
PyTorch reference, and through the Scorer (the torch backend on a CPU runs them) against the
reference backend. A failed build fails these tests rather than skipping them: only
DARL_INFER_CPU_KERNELS=0 turns them off."""

import dataclasses
import os
import random

import numpy as np
import pytest
import torch

from conftest import ARCHS, ragged_items
from darl_infer import Scorer
from darl_infer.backends import torch_backend
from darl_infer.backends.torch_backend import TorchBackend
from darl_infer.backends.fused_modules import known_norm
from darl_infer.kernels import cpu_extension
from darl_infer.kernels.gated_activation import gated_activation_cpu, gated_activation_reference
from darl_infer.kernels.rms_norm import add_rms_norm_cpu, add_rms_norm_reference, rms_norm_cpu, rms_norm_reference
from darl_infer.kernels.rotary import rotary_cpu, rotary_reference
from darl_infer.kernels.shared_prefix_attention import shared_prefix_attention_cpu, shared_prefix_attention_reference
from test_kernels import HEAD_LAYOUTS, ITEM_LENGTHS, ODD_HEAD_DIM, assert_attention_matches, attention_inputs
from tiny_models import random_text

pytestmark = pytest.mark.skipif(not cpu_extension.enabled(), reason="DARL_INFER_CPU_KERNELS=0")


@pytest.fixture(autouse=True, scope="module")
def built():
    assert cpu_extension.cpu_ops() is not None  # once for the module: the build takes seconds


@pytest.mark.parametrize("variant", ["llama", "gemma"])
@pytest.mark.parametrize("shape", [(2, 37, 640), (1, 50, 4, 256), (3, 7), (0, 16), (5, 1)])
def test_rms_norm_matches_the_reference(variant, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x, w = 3 * torch.randn(shape, generator=g), torch.randn(shape[-1], generator=g) / 2
    got, want = rms_norm_cpu(x, w, 1e-6, variant), rms_norm_reference(x, w, 1e-6, variant)
    assert got.shape == want.shape and got.dtype == want.dtype
    # fp32: the same math up to the order of the sum of squares
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    xb, wb = x.bfloat16(), w.bfloat16()
    got, want = rms_norm_cpu(xb, wb, 1e-6, variant), rms_norm_reference(xb, wb, 1e-6, variant)
    assert got.dtype == torch.bfloat16
    # bf16: rounded where the reference rounds; a value on a rounding boundary may land one unit
    # in the last place away (the fp32 sums differ in their last bits)
    ulp = 2.0 ** (torch.floor(torch.log2(want.float().abs().clamp_min(1e-30))) - 7)
    assert ((got.float() - want.float()).abs() <= ulp).all()
    assert (got != want).sum() <= 1e-3 * want.numel()


def test_rms_norm_takes_strided_input_and_eps():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(64, 2, 96, generator=g)[:, 1, :], torch.randn(96, generator=g)  # rows 192 apart
    for eps in (1e-6, 0.5):
        torch.testing.assert_close(rms_norm_cpu(x, w, eps, "gemma"), rms_norm_reference(x, w, eps, "gemma"), rtol=2e-6, atol=1e-6)


def test_rms_norm_other_dtypes_get_the_reference():
    x, w = torch.randn(4, 8, dtype=torch.float16), torch.randn(8, dtype=torch.float16)
    assert torch.equal(rms_norm_cpu(x, w, 1e-6, "llama"), rms_norm_reference(x, w, 1e-6, "llama"))
    with pytest.raises(ValueError, match="unknown norm_variant"):
        rms_norm_cpu(x, w, 1e-6, "layer")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["llama", "gemma"])
@pytest.mark.parametrize("weights", ["both", "x only", "sum only"])  # Gemma-3's two adds; Llama's
@pytest.mark.parametrize("shape", [(2, 37, 640), (3, 7), (0, 16)])
def test_add_rms_norm_is_the_norms_and_the_add(shape, weights, variant, dtype):
    """Bit-equal to the C++ RMSNorm and PyTorch's add it replaces (one pass instead of three), and so
    within the norm's tolerance of the reference."""
    g = torch.Generator().manual_seed(sum(shape))
    x, residual = (3 * torch.randn(shape, generator=g)).to(dtype), (3 * torch.randn(shape, generator=g)).to(dtype)
    w1, w2 = ((torch.randn(shape[-1], generator=g) / 2).to(dtype) for _ in range(2))
    x_weight, weight = (w1 if weights != "sum only" else None), (w2 if weights != "x only" else None)
    total, normed = add_rms_norm_cpu(x, residual, x_weight, weight, 1e-6, variant)
    want_total = residual + (x if x_weight is None else rms_norm_cpu(x, x_weight, 1e-6, variant))
    assert torch.equal(total, want_total) and total.dtype == dtype
    if weight is None:
        assert normed is None
    else:
        assert torch.equal(normed, rms_norm_cpu(want_total, weight, 1e-6, variant))
    if dtype == torch.float32:
        ref_total, ref_normed = add_rms_norm_reference(x, residual, x_weight, weight, 1e-6, variant)
        torch.testing.assert_close(total, ref_total, rtol=2e-6, atol=1e-5)
        if weight is not None:
            torch.testing.assert_close(normed, ref_normed, rtol=2e-5, atol=1e-5)


def test_add_rms_norm_checks_its_inputs():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="residual"):
        add_rms_norm_cpu(x, x[:, :4], w, w, 1e-6, "gemma")
    with pytest.raises(RuntimeError, match="a weight must be"):
        add_rms_norm_cpu(x, x, w[:4], w, 1e-6, "gemma")
    half = x.half()
    assert all(torch.equal(a, b) for a, b in zip(add_rms_norm_cpu(half, half, w.half(), w.half(), 1e-6, "llama"),
                                                    add_rms_norm_reference(half, half, w.half(), w.half(), 1e-6, "llama")))


def _rotary_inputs(shape, dtype, seed):
    """x as a slice of a fused q/k/v projection's output (rows 2H + 1 heads apart), cos and sin as
    HF's rotary module gives them (the angles repeated over the two halves)."""
    B, T, H, D = shape
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(B, T, (2 * H + 1) * D, generator=g))[..., : H * D].view(B, T, H, D)
    angles = 50 * torch.rand(B, T, D // 2, generator=g)
    angles = torch.cat([angles, angles], dim=-1)
    weight = torch.randn(D, generator=g) / 2
    return x.to(dtype), angles.cos().to(dtype), angles.sin().to(dtype), weight.to(dtype)


@pytest.mark.parametrize("norm", [None, "llama", "gemma"])
@pytest.mark.parametrize("shape", [(1, 50, 4, 256), (2, 9, 3, 80), (1, 7, 1, 10), (1, 0, 4, 64)])  # Gemma-3's q; tails
def test_rotary_matches_the_reference(shape, norm):
    for dtype in (torch.float32, torch.bfloat16):
        x, cos, sin, weight = _rotary_inputs(shape, dtype, sum(shape))
        args = (weight, 1e-6, norm) if norm else ()
        got, want = rotary_cpu(x, cos, sin, *args), rotary_reference(x, cos, sin, *args)
        assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
        if norm is None or dtype == torch.float32:
            # the reference's products and sums, rounded alike; fp32's norm differs in the order of its sum
            torch.testing.assert_close(got, want, rtol=2e-6 if norm else 0, atol=1e-6 if norm else 0)
        else:  # the norm rounded to bf16 first: a value on a rounding boundary may move by its last bit
            ulp = 2.0 ** (torch.floor(torch.log2(want.float().abs().clamp_min(1e-30))) - 7)
            assert ((got.float() - want.float()).abs() <= 2 * ulp).all()
            assert (got != want).sum() <= 1e-3 * want.numel()


def test_rotary_checks_its_inputs_and_leaves_other_dtypes_to_the_reference():
    x, cos, sin, weight = _rotary_inputs((1, 6, 2, 8), torch.float16, 0)
    assert torch.equal(rotary_cpu(x, cos, sin, weight, 1e-6, "gemma"), rotary_reference(x, cos, sin, weight, 1e-6, "gemma"))
    x, cos, sin, weight = _rotary_inputs((1, 6, 2, 8), torch.float32, 0)
    with pytest.raises(ValueError, match="shapes do not match"):
        rotary_cpu(x, cos[:, :5], sin[:, :5])
    with pytest.raises(RuntimeError, match="weight must be"):
        rotary_cpu(x, cos, sin, weight[:4], 1e-6, "llama")
    with pytest.raises(ValueError, match="unknown norm_variant"):
        rotary_cpu(x, cos, sin, weight, 1e-6, "layer")
    assert torch.equal(rotary_cpu(x, cos, sin, weight.double(), 1e-6, "llama"), rotary_reference(x, cos, sin, weight.double(), 1e-6, "llama"))


@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("shape", [(37, 2048), (2, 5, 100), (3, 7), (0, 16)])  # Gemma-3's MLP; tails
def test_gated_activation_matches_the_reference(shape, activation):
    g = torch.Generator().manual_seed(shape[-1])
    fused = 4 * torch.randn(*shape[:-1], 2 * shape[-1], generator=g)  # gate and up: views of one gate/up output
    gate, up = fused.split(shape[-1], dim=-1)
    got, want = gated_activation_cpu(gate, up, activation), gated_activation_reference(gate, up, activation)
    assert got.shape == want.shape and got.is_contiguous()
    # fp32: the tanh in its exp form and torch's tanh agree to a few ulp (where torch's GELU is 0, the
    # exp form's is below 1e-30)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    gb, ub = gate.bfloat16(), up.bfloat16()
    got, want = gated_activation_cpu(gb, ub, activation), gated_activation_reference(gb, ub, activation)
    # bf16: the activation rounded, then the product, as the reference: a value on a rounding boundary
    # may land one unit in the last place away (twice: activation and product). Below gate ~ -3
    # torch's 0.5 x (1 + tanh(z)) loses digits to the cancellation (the exp form does not): there
    # the two differ by more ulp, in absolute terms below 1e-5.
    diff = (got.float() - want.float()).abs()
    ulp = 2.0 ** (torch.floor(torch.log2(want.float().abs().clamp_min(2**-20))) - 7)
    assert (diff <= 2 * ulp + 1e-5).all()
    assert (got != want)[gb > -3].sum() <= 1e-2 * max(1, want.numel())


def test_gated_activation_checks_its_inputs_and_leaves_other_dtypes_to_the_reference():
    gate, up = torch.randn(4, 8, dtype=torch.float16), torch.randn(4, 8, dtype=torch.float16)
    assert torch.equal(gated_activation_cpu(gate, up, "silu"), gated_activation_reference(gate, up, "silu"))
    with pytest.raises(RuntimeError, match="alike"):
        gated_activation_cpu(gate.float(), up.float()[:, :4], "silu")
    with pytest.raises(ValueError, match="unknown activation"):
        gated_activation_cpu(gate, up, "relu")


needs_the_attention = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the C++ attention calls MKL")
AMX = "amx_bf16" in cpu_extension.cpu_flags() and torch.backends.cpu.get_cpu_capability() == "AVX512"


@pytest.fixture(params=["amx", "mkl"])
def attention_path(request, monkeypatch):
    """The attention's two bf16 paths: AMX tiles where the CPU has them, MKL's gemm (DARL_INFER_AMX=0)."""
    if request.param == "amx" and not AMX:
        pytest.skip("no AMX on this CPU")
    monkeypatch.setenv("DARL_INFER_AMX", "1" if request.param == "amx" else "0")
    assert torch.ops.darl_infer_cpu.attention_uses_amx() == (request.param == "amx")
    return request.param


@needs_the_attention
@pytest.mark.parametrize("layout", [*HEAD_LAYOUTS, *ODD_HEAD_DIM])  # MQA, GQA, head dim 80
@pytest.mark.parametrize("prefix_len", [0, 1, 37, 512])
@pytest.mark.parametrize("n_items", [1, 3, 130])  # one 64-token item (256 rows for 4 heads: in slices), mixed
def test_attention_matches_the_reference(prefix_len, n_items, layout, attention_path):
    for dtype in (torch.float32, torch.bfloat16):
        assert_attention_matches(prefix_len, ITEM_LENGTHS[n_items], layout, dtype, op=shared_prefix_attention_cpu)


@needs_the_attention
@pytest.mark.parametrize("window", [1, 4, 40, 600])
@pytest.mark.parametrize("prefix_len", [0, 37, 512])
def test_attention_sliding_window(prefix_len, window, attention_path):
    for layout in ("gemma3", "smollm2"):
        for dtype in (torch.float32, torch.bfloat16):
            assert_attention_matches(prefix_len, ITEM_LENGTHS[130], layout, dtype, window, op=shared_prefix_attention_cpu)


@needs_the_attention
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("prefix_len", [0, 37])
def test_attention_long_items_in_slices(prefix_len, window, attention_path):
    """Items of more than a block's rows (64, in (token, query head) rows) run in slices of their own, each against the item's
    keys so far: the scores stay a block's size whatever the item's length."""
    for layout in ("gemma3", "smollm2"):
        for dtype in (torch.float32, torch.bfloat16):
            assert_attention_matches(prefix_len, [3, 300, 7, 150, 0, 64], layout, dtype, window, op=shared_prefix_attention_cpu)


@needs_the_attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_extreme_scores(dtype, attention_path):
    """Every score of a row far below zero (exp underflows unless the row's max is subtracted) or
    far above (overflows). Scores in the thousands carry fp32 rounding of ~1e-4 into the exponent,
    in the reference as here: hence 1e-3 (bf16: two units in the last place of the output's bf16)."""
    q, k, v, prefix_k, prefix_v, cu, scale = attention_inputs(37, ITEM_LENGTHS[130], "gemma3", dtype)
    q = 8 * q.abs()
    for sign in (-1, 1):
        keys = (sign * 8 * k.abs(), v, sign * 8 * prefix_k.abs(), prefix_v)
        got = shared_prefix_attention_cpu(q, keys[0], v, keys[2], prefix_v, cu, scale)
        want = shared_prefix_attention_reference(q.float(), keys[0].float(), v.float(), keys[2].float(), prefix_v.float(), cu, scale)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want, **(dict(atol=1e-3, rtol=0) if dtype == torch.float32 else dict(atol=1e-2, rtol=2**-6)))


@needs_the_attention
@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_takes_strided_views_and_checks_its_inputs(layout, dtype, attention_path):
    q, k, v, prefix_k, prefix_v, cu, scale = attention_inputs(37, ITEM_LENGTHS[130], layout, dtype)
    expected = shared_prefix_attention_cpu(q, k, v, prefix_k, prefix_v, cu, scale)
    # HF's (heads, T, D) memory, and rows of a longer packed row (the items after a pass's prefixes)
    views = tuple(torch.cat([x, x[:5]]).transpose(0, 1).contiguous().transpose(0, 1)[: len(x)] for x in (q, k, v))
    assert not views[0].is_contiguous()
    got = shared_prefix_attention_cpu(*views, prefix_k, prefix_v, cu, scale)
    assert got.is_contiguous() and torch.equal(got, expected)
    with pytest.raises(RuntimeError, match="cu_seqlens must end at q's tokens"):
        shared_prefix_attention_cpu(q, k, v, prefix_k, prefix_v, cu[:-1], scale)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        shared_prefix_attention_cpu(q, k, v, prefix_k[..., :-1], prefix_v[..., :-1], cu, scale)
    with pytest.raises(RuntimeError, match="one dtype"):
        shared_prefix_attention_cpu(q, k.double(), v, prefix_k, prefix_v, cu, scale)


def _norms(scorer):
    return [m for m in scorer.backend.model.modules() if known_norm(m) is not None]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)  # llama and qwen2 norms, gemma3's (with q/k norms); qwen2's q/k/v biases
def test_torch_backend_with_cpu_kernels_matches_the_reference(monkeypatch, tiny_checkpoints, arch, dtype):
    calls = {"rms_norm": 0, "rotary": 0, "add_rms_norm": 0}

    def counted(name, op):
        return lambda *args: calls.__setitem__(name, calls[name] + 1) or op(*args)

    ops = TorchBackend.cpu_elementwise_ops
    monkeypatch.setattr(TorchBackend, "cpu_elementwise_ops", dataclasses.replace(
        ops, rms_norm=counted("rms_norm", ops.rms_norm), rotary=counted("rotary", ops.rotary),
        add_rms_norm=counted("add_rms_norm", ops.add_rms_norm),
    ))
    rng = random.Random(f"cpu-norms-{arch}-{dtype}")
    query, items = random_text(rng, rng.randint(1, 12)), ragged_items(rng, 30)
    reference = Scorer.from_pretrained(tiny_checkpoints[arch], backend="reference", dtype=dtype).score(query, items)
    scorer = Scorer.from_pretrained(tiny_checkpoints[arch], backend="torch", dtype=dtype, token_budget=60)
    got = scorer.score(query, items)
    norms, layers = _norms(scorer), scorer.backend.model.config.num_hidden_layers
    assert all("darl_rms_norm" in vars(norm) for norm in norms)
    # one q/k/v matmul; in fp32 one gate/up matmul and the C++ gated kernel, in bf16 HF's MLPs with
    # oneDNN's post-ops
    fused = ["qkv"] * layers if dtype == "bf16" else [name for _ in range(layers) for name in ("qkv", "gate_up")]
    assert [p.name for p in scorer.backend.fused_projections] == fused
    mlps = [m for m in scorer.backend.model.modules() if hasattr(m, "gate_proj")]
    assert all(("darl_post_op" in vars(m)) == (dtype == "bf16") for m in mlps)
    assert all((vars(m).get("darl_gated") is gated_activation_cpu) == (dtype == "fp32") for m in mlps)
    assert scorer.backend.runner.attention_op is shared_prefix_attention_cpu
    passes = calls["rotary"] // (2 * layers)  # q and k in each layer of each pass
    assert passes >= 2 and calls["rotary"] == 2 * layers * passes
    # each layer: its input norm, then its residual adds with the norms beside them (Gemma-3: the
    # post-attention and pre-MLP norms with the first, the post-MLP norm with the second; Llama and
    # Qwen2: the post-attention norm with the first, the second a plain add); q/k norms: in the rotary
    assert all("darl_add_rms_norm" in vars(layer) for layer in scorer.backend.model.model.layers)
    assert calls["rms_norm"] >= passes * layers and calls["add_rms_norm"] == passes * layers * (2 if arch == "gemma3" else 1)
    assert np.abs(got.probs - reference.probs).max() <= (1e-5 if dtype == "fp32" else 2e-2)


def test_fp16_keeps_pytorch_s_attention(tiny_checkpoints):
    scorer = Scorer.from_pretrained(tiny_checkpoints["llama"], backend="torch", dtype="fp16")
    assert scorer.backend.runner.attention_op is torch_backend.shared_prefix_attention_sdpa  # the kernel takes fp32, bf16


def test_compiled_layers_and_the_switch_keep_hf_s_norms(monkeypatch, tiny_checkpoints):
    compiled = Scorer.from_pretrained(tiny_checkpoints["gemma3"], backend="torch", dtype="fp32", compile=True)
    assert not any("darl_rms_norm" in vars(norm) for norm in _norms(compiled))  # inductor fuses them itself
    # one q/k/v matmul, the rotary's reference for inductor to fuse; HF's MLPs
    assert {p.name for p in compiled.backend.fused_projections} == {"qkv"}
    assert all(m.darl_rotary is rotary_reference for m in compiled.backend.model.modules() if hasattr(m, "darl_rotary"))
    monkeypatch.setenv("DARL_INFER_CPU_KERNELS", "0")
    switched_off = Scorer.from_pretrained(tiny_checkpoints["gemma3"], backend="torch", dtype="fp32")
    assert not any("darl_rms_norm" in vars(norm) for norm in _norms(switched_off))
    assert not switched_off.backend.fused_projections  # HF's modules
    assert switched_off.backend.runner.attention_op is torch_backend.shared_prefix_attention_sdpa


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's map of the loaded libraries")
def test_the_ops_run_on_torch_s_threads():
    """Built with OpenMP: without it at::parallel_for compiles to a serial loop and every op runs on
    one core (as session 19's build did), so the library calls libgomp's parallel region."""
    with open("/proc/self/maps") as maps:
        libraries = {line.split()[-1] for line in maps if "darl_infer_cpu_" in line and line.rstrip().endswith(".so")}
    assert len(libraries) == 1, libraries
    with open(libraries.pop(), "rb") as library:
        assert b"GOMP_parallel" in library.read()


def test_a_failed_build_warns_and_leaves_pytorch_s_path(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("no c++ here")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    cpu_extension._build.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built.*no c\\+\\+ here"):
            assert cpu_extension.cpu_ops() is None
    finally:
        cpu_extension._build.cache_clear()
