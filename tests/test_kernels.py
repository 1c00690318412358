"""Each Triton kernel against its PyTorch reference, same inputs.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py).
"""

import itertools

import pytest
import torch

from darl_infer.kernels._triton import HAS_TRITON, INTERPRETED
from darl_infer.kernels.classification_head import classification_head, classification_head_reference
from darl_infer.kernels.gated_activation import gated_activation, gated_activation_reference
from darl_infer.kernels.rms_norm import rms_norm, rms_norm_reference
from darl_infer.kernels.rotary import rotary, rotary_reference
from darl_infer.kernels.shared_prefix_attention import shared_prefix_attention, shared_prefix_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
if DEVICE == "cpu" and HAS_TRITON and not INTERPRETED:
    raise RuntimeError("no CUDA and the kernels were not built for the interpreter: set TRITON_INTERPRET=1 first")

# (query heads, KV heads, head dim)
HEAD_LAYOUTS = {"smollm2": (9, 3, 64), "gemma3": (4, 1, 256)}
ODD_HEAD_DIM = {"head_dim_80": (4, 2, 80)}  # not a power of two (Phi-style): masked columns
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
ITEM_LENGTHS = {
    1: [64],
    3: [1, 5, 64],
    # 130 items, mostly short so the interpreter stays quick; the 64-token one lands mid-pack
    130: [64 if i == 70 else (1, 5)[i % 2] for i in range(130)],
}


def attention_inputs(prefix_len, lengths, layout, dtype, seed=0):
    H, Hkv, D = {**HEAD_LAYOUTS, **ODD_HEAD_DIM}[layout]
    T = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)  # noqa: E731
    cu = torch.tensor([0, *itertools.accumulate(lengths)], device=DEVICE)
    return rand(T, H, D), rand(T, Hkv, D), rand(T, Hkv, D), rand(prefix_len, Hkv, D), rand(prefix_len, Hkv, D), cu, D**-0.5


def assert_attention_matches(prefix_len, lengths, layout, dtype, sliding_window=None, op=shared_prefix_attention):
    """`op` (the Triton kernel unless given) equals the PyTorch reference within the dtype's tolerance."""
    args = attention_inputs(prefix_len, lengths, layout, dtype)
    out = op(*args, sliding_window)
    expected = shared_prefix_attention_reference(*args, sliding_window)
    assert out.dtype == dtype and out.shape == expected.shape
    assert (out.float() - expected.float()).abs().max().item() <= TOLERANCE[dtype]


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("prefix_len", [0, 1, 37, 512])
def test_attention_prefix_lengths_fp32(prefix_len, layout):
    assert_attention_matches(prefix_len, ITEM_LENGTHS[3], layout, torch.float32)


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("n_items", [1, 130])
def test_attention_item_counts_fp32(n_items, layout):
    assert_attention_matches(37, ITEM_LENGTHS[n_items], layout, torch.float32)


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_half_precision(dtype, layout):
    assert_attention_matches(37, ITEM_LENGTHS[3], layout, dtype)


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize(("prefix_len", "window"), [(37, 8), (512, 40)])
def test_attention_sliding_window(prefix_len, window, layout):
    # 8: items see only part of their own keys; 40: most of the prefix is out of every window
    assert_attention_matches(prefix_len, ITEM_LENGTHS[3], layout, torch.float32, sliding_window=window)


def test_attention_head_dim_not_power_of_two():
    assert_attention_matches(37, ITEM_LENGTHS[3], "head_dim_80", torch.float32)


def test_attention_takes_hf_strided_views():
    # HF hands (1, heads, T, D) tensors; the backend passes their (T, heads, D) transposes, no copy
    q, k, v, pk, pv, cu, scale = attention_inputs(37, ITEM_LENGTHS[3], "smollm2", torch.float32)
    q, k, v, pk, pv = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v, pk, pv))
    assert q.stride(1) > q.stride(0)
    expected = shared_prefix_attention_reference(q, k, v, pk, pv, cu, scale)
    assert (shared_prefix_attention(q, k, v, pk, pv, cu, scale) - expected).abs().max().item() <= 1e-5


def test_attention_rejects_mismatched_shapes():
    q, k, v, pk, pv, cu, scale = attention_inputs(5, [3], "smollm2", torch.float32)
    with pytest.raises(ValueError, match="shapes do not match"):
        shared_prefix_attention(q, k[:, :2], v[:, :2], pk, pv, cu, scale)


@pytest.mark.slow
@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_items", [1, 3, 130])
@pytest.mark.parametrize("prefix_len", [0, 1, 37, 512])
def test_attention_full_grid(prefix_len, n_items, dtype, layout):
    assert_attention_matches(prefix_len, ITEM_LENGTHS[n_items], layout, dtype)


def head_inputs(n_items, hidden_size, n_grades, variant, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = ITEM_LENGTHS.get(n_items) or [1 + i % 7 for i in range(n_items)]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], device=DEVICE)
    hidden = 3 * torch.randn(sum(lengths), hidden_size, generator=g)
    # Llama-style weights sit around 1, Gemma's around 0 (it scales by 1 + w)
    norm_weight = 0.5 * torch.randn(hidden_size, generator=g) + (1.0 if variant == "llama" else 0.0)
    score_weight = torch.randn(n_grades, hidden_size, generator=g) / hidden_size**0.5
    to = dict(device=DEVICE, dtype=dtype)
    grade_values = torch.linspace(0, 1, n_grades, device=DEVICE) ** 2
    return hidden.to(**to), cu, norm_weight.to(**to), 1e-6, variant, score_weight.to(**to), grade_values


def assert_head_matches(n_items, hidden_size, n_grades, variant, dtype):
    args = head_inputs(n_items, hidden_size, n_grades, variant, dtype)
    probs, expected = classification_head(*args)
    ref_probs, ref_expected = classification_head_reference(*args)
    assert probs.shape == (n_items, n_grades) and expected.shape == (n_items,)
    assert (probs - ref_probs).abs().max().item() <= TOLERANCE[dtype]
    assert (expected - ref_expected).abs().max().item() <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["llama", "gemma"])
@pytest.mark.parametrize(
    ("n_items", "hidden_size", "n_grades"),
    [(1, 64, 3), (3, 576, 3), (5, 1500, 5)],  # 1500: several column blocks, K not a power of 2
)
def test_classification_head(n_items, hidden_size, n_grades, variant, dtype):
    assert_head_matches(n_items, hidden_size, n_grades, variant, dtype)


@pytest.mark.parametrize("variant", ["llama", "gemma"])
def test_classification_head_many_items(variant):
    assert_head_matches(130, 640, 3, variant, torch.float32)


def test_classification_head_rejects_unknown_norm():
    args = list(head_inputs(1, 64, 3, "llama", torch.float32))
    args[4] = "layernorm"
    for head in (classification_head, classification_head_reference):
        with pytest.raises(ValueError, match="unknown norm_variant"):
            head(*args)


NORM_SHAPES = [(3, 64), (5, 640), (2, 7, 4, 256), (4, 1500)]  # 4-D: Gemma's per-head q/k norms; 1500: masked columns


def norm_inputs(shape, variant, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(*shape, generator=g)
    # Llama-style weights sit around 1, Gemma's around 0 (it scales by 1 + w)
    weight = 0.5 * torch.randn(shape[-1], generator=g) + (1.0 if variant == "llama" else 0.0)
    return x.to(device=DEVICE, dtype=dtype), weight.to(device=DEVICE, dtype=dtype)


def assert_norm_matches(x, weight, variant):
    out = rms_norm(x, weight, 1e-6, variant)
    expected = rms_norm_reference(x, weight, 1e-6, variant)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    # one unit in the last place of the output dtype (a sum taken in another order may round the
    # other way); two for bf16 in the interpreter, which casts fp32 to bf16 by truncation
    ulps = 2 if INTERPRETED and x.dtype == torch.bfloat16 else 1
    torch.testing.assert_close(out, expected, rtol=ulps * torch.finfo(x.dtype).eps, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["llama", "gemma"])
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm(shape, variant, dtype):
    assert_norm_matches(*norm_inputs(shape, variant, dtype), variant)


def test_rms_norm_takes_strided_views_and_no_rows():
    x, weight = norm_inputs((6, 64), "gemma", torch.float32)
    assert_norm_matches(x.t().contiguous().t(), weight, "gemma")  # column-major: copied to rows
    assert rms_norm(x[:0], weight, 1e-6, "gemma").shape == (0, 64)


@pytest.mark.parametrize("module_name", ["llama.LlamaRMSNorm", "qwen3.Qwen3RMSNorm", "gemma3.Gemma3RMSNorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_reference_is_the_hf_modules_math(module_name, dtype):
    import importlib

    arch, name = module_name.split(".")
    module = getattr(importlib.import_module(f"transformers.models.{arch}.modeling_{arch}"), name)(640, eps=1e-6)
    variant = "gemma" if arch.startswith("gemma") else "llama"
    x, weight = norm_inputs((5, 640), variant, dtype)
    module = module.to(device=DEVICE, dtype=dtype)
    module.weight.data.copy_(weight)
    assert torch.equal(rms_norm_reference(x, module.weight, 1e-6, variant), module(x))


ROTARY_LAYOUTS = {"smollm2": (2, 5, 9, 64), "gemma3": (1, 7, 4, 256), "head_dim_80": (1, 6, 2, 80)}  # (B, T, H, D)


def rotary_inputs(layout, dtype, norm_variant=None, seed=0):
    """x as a slice of a wider projection output (the fused q/k/v matmul's), and HF's cos and sin:
    positions from 30 on (items continue a prefix), rounded to the dtype as HF's rotary module does."""
    B, T, H, D = ROTARY_LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    projection = 3 * torch.randn(B, T, 2 * H * D, generator=g)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    angles = (30 + torch.arange(T)).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1).expand(B, T, D)
    weight = None
    if norm_variant is not None:
        weight = (0.5 * torch.randn(D, generator=g) + (1.0 if norm_variant == "llama" else 0.0)).to(device=DEVICE, dtype=dtype)
    x = projection.to(device=DEVICE, dtype=dtype)[..., H * D :].view(B, T, H, D)
    return x, emb.cos().to(device=DEVICE, dtype=dtype), emb.sin().to(device=DEVICE, dtype=dtype), weight


def assert_rotary_matches(x, cos, sin, weight, variant):
    out = rotary(x, cos, sin, weight, 1e-6, variant or "llama")
    expected = rotary_reference(x, cos, sin, weight, 1e-6, variant or "llama")
    assert out.dtype == expected.dtype and out.shape == expected.shape and out.is_contiguous()
    # the products and the sum round where torch rounds them, so the kernel differs only where the
    # norm's sum of squares (or, in fp32, a fused multiply-add) rounds the other way: one unit in the
    # last place of the row's largest value (a rotation keeps each pair's length, so no term is
    # larger than ~1.4x it); four for bf16 in the interpreter, which casts by truncation, an error
    # of up to one unit at each of the norm's, the products' and the sum's roundings
    ulps = 4 if INTERPRETED and x.dtype == torch.bfloat16 else 1
    scale = expected.abs().amax(-1, keepdim=True)
    assert ((out.float() - expected.float()).abs() <= ulps * torch.finfo(x.dtype).eps * scale.float() + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", [None, "llama", "gemma"])
@pytest.mark.parametrize("layout", ROTARY_LAYOUTS)
def test_rotary(layout, variant, dtype):
    assert_rotary_matches(*rotary_inputs(layout, dtype, variant), variant)


def test_rotary_takes_no_rows_and_rejects_mismatches():
    x, cos, sin, weight = rotary_inputs("smollm2", torch.float32, "llama")
    assert rotary(x[:, :0], cos[:, :0], sin[:, :0], weight, 1e-6).shape == (2, 0, 9, 64)
    with pytest.raises(ValueError, match="shapes do not match"):
        rotary(x, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="norm_weight"):
        rotary(x, cos, sin, weight.half(), 1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_reference_is_hf_math(arch, dtype):
    """Bit-equal to HF's attention between the projections and the attention function: the
    per-head norms (Qwen3, Gemma-3) on HF's (B, H, T, D) layout, then `apply_rotary_pos_emb`."""
    import importlib

    modeling = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    variant = {"llama": None, "qwen3": "llama", "gemma3": "gemma"}[arch]
    q, cos, sin, weight = rotary_inputs("gemma3", dtype, variant, seed=1)
    k, _, _, _ = rotary_inputs("gemma3", dtype, variant, seed=2)
    q_hf, k_hf = q.transpose(1, 2), k.transpose(1, 2)
    if variant is not None:
        norm = getattr(modeling, f"{arch.capitalize()}RMSNorm")(q.shape[-1], eps=1e-6).to(device=DEVICE, dtype=dtype)
        norm.weight.data.copy_(weight)
        q_hf, k_hf = norm(q_hf), norm(k_hf)
    q_hf, k_hf = modeling.apply_rotary_pos_emb(q_hf, k_hf, cos, sin)
    assert torch.equal(rotary_reference(q, cos, sin, weight, 1e-6, variant or "llama").transpose(1, 2), q_hf)
    assert torch.equal(rotary_reference(k, cos, sin, weight, 1e-6, variant or "llama").transpose(1, 2), k_hf)


def gated_inputs(rows, size, dtype, seed=0):
    """gate and up as the two halves of one fused projection's output, as the triton backend gives them."""
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(rows, 2 * size, generator=g)).to(device=DEVICE, dtype=dtype).split(size, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize(("rows", "size"), [(5, 128), (3, 2048), (7, 1500)])  # 1500: masked columns
def test_gated_activation(rows, size, activation, dtype):
    gate, up = gated_inputs(rows, size, dtype)
    out = gated_activation(gate, up, activation)
    expected = gated_activation_reference(gate, up, activation)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    # the activation in another exp/tanh form than torch's may round the other way: one unit in the
    # last place of the activation, carried through the product; two for bf16 in the interpreter
    ulps = 2 if INTERPRETED and dtype == torch.bfloat16 else 1
    bound = 2 * ulps * torch.finfo(dtype).eps * (gate.float().abs() * up.float().abs()) + 1e-6
    assert ((out.float() - expected.float()).abs() <= bound).all()


@pytest.mark.parametrize(("arch", "activation"), [("llama", "silu"), ("gemma3", "gelu_tanh")])
def test_gated_activation_reference_is_hf_mlp_math(arch, activation):
    from transformers import Gemma3TextConfig, LlamaConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = (LlamaConfig if arch == "llama" else Gemma3TextConfig)(hidden_size=64, intermediate_size=128)
    mlp = (LlamaMLP if arch == "llama" else Gemma3MLP)(config).to(device=DEVICE, dtype=torch.bfloat16)
    gate, up = gated_inputs(9, 128, torch.bfloat16)
    assert torch.equal(gated_activation_reference(gate, up, activation), mlp.act_fn(gate) * up)


def test_gated_activation_rejects_mismatches():
    gate, up = gated_inputs(3, 64, torch.float32)
    with pytest.raises(ValueError, match="must match"):
        gated_activation(gate, up[:2], "silu")
    with pytest.raises(ValueError, match="unknown activation"):
        gated_activation(gate, up, "relu")
