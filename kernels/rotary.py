"""Rotary position embedding of queries or keys, with the per-head RMSNorm that Qwen3 and Gemma-3
apply just before it, as Hugging Face's attention modules compute them, rounding included:
x = norm(x) (if the model has one), then x * cos + rotate_half(x) * sin, each product and the sum
rounded to x's dtype.

Shapes: x (B, T, H, D), the projection's output viewed per head (any strides, unit stride along
D); cos, sin (B, T, D) as the model's rotary module gives them; the result (B, T, H, D), contiguous.

`rotary_reference` is the PyTorch version (HF's `apply_rotary_pos_emb`, tested bit-equal);
`rotary` is the Triton kernel with the same signature, which the triton backend runs on the
queries and on the keys of each layer. As PyTorch ops the pair is ~14 kernel launches per layer
(two products, two slices, a negation, a concatenation and a sum for each of q and k; ~30 % of a
pass's GPU time on gemma3-270m shapes after the norm kernel, bench/RESULTS.md) plus the norms'.
"""

from __future__ import annotations

import torch

from darl_infer.kernels._triton import LAUNCH_LOCK, tl, triton

from darl_infer.kernels.rms_norm import check_variant, rms_norm_reference


def rotary_reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0, norm_variant: str = "llama",
) -> torch.Tensor:
    if norm_weight is not None:
        x = rms_norm_reference(x, norm_weight, eps, norm_variant)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # one angle per token, the same for every head
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# --- Triton kernel -------------------------------------------------------------------------------
# Grid (ceil(T * H / BLOCK_R),): each program takes BLOCK_R (token, head) rows whole, as their two
# halves, so the norm's sum of squares and the rotation need one read and one write of each row.


@triton.jit(do_not_specialize=["rows"])  # the row count changes with every pass
def _rotary_kernel(
    x, cos, sin, weight, out, rows, stride_x_token, stride_x_head, stride_cos, stride_sin, eps,
    HEADS: tl.constexpr, D: tl.constexpr, NORM: tl.constexpr, GEMMA_NORM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    token, head = r // HEADS, r % HEADS
    d = tl.arange(0, BLOCK_HALF)
    mask = (r < rows)[:, None] & (d < HALF)[None, :]
    row = x + token[:, None] * stride_x_token + head[:, None] * stride_x_head + d[None, :]
    x1 = tl.load(row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = out.dtype.element_ty
    if NORM:  # the norm's result is rounded to the dtype, as the HF module returns it
        inv_rms = tl.math.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)[:, None]
        w1 = tl.load(weight + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(weight + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
        if GEMMA_NORM:
            x1 = ((x1 * inv_rms) * (1.0 + w1)).to(dtype).to(tl.float32)
            x2 = ((x2 * inv_rms) * (1.0 + w2)).to(dtype).to(tl.float32)
        else:
            x1 = (w1 * (x1 * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            x2 = (w2 * (x2 * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    at_token = token[:, None]
    cos1 = tl.load(cos + at_token * stride_cos + d[None, :], mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos + at_token * stride_cos + HALF + d[None, :], mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin + at_token * stride_sin + d[None, :], mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin + at_token * stride_sin + HALF + d[None, :], mask=mask, other=0.0).to(tl.float32)
    # rotate_half(x) = (-x2, x1); each product rounded to the dtype before the sum, as torch does
    y1 = (x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)
    y2 = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    dest = out + r[:, None] * D + d[None, :]
    tl.store(dest, y1.to(dtype), mask=mask)
    tl.store(dest + HALF, y2.to(dtype), mask=mask)


def rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0, norm_variant: str = "llama",
) -> torch.Tensor:
    """The Triton kernel; same arguments and result as `rotary_reference`."""
    check_variant(norm_variant)
    B, T, H, D = x.shape
    if D % 2 or cos.shape != (B, T, D) or sin.shape != cos.shape:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if norm_weight is not None and (norm_weight.shape != (D,) or norm_weight.dtype != x.dtype):
        raise ValueError(f"norm_weight must be ({D},) in {x.dtype}, got {tuple(norm_weight.shape)} in {norm_weight.dtype}")
    if len({x.dtype, cos.dtype, sin.dtype}) != 1:
        raise ValueError(f"x, cos and sin must share one dtype, got {x.dtype}, {cos.dtype}, {sin.dtype}")
    tokens = x.reshape(B * T, H, D)  # a view for a projection's output, also when it is a slice of one
    if tokens.stride(-1) != 1:
        tokens = tokens.contiguous()
    cos, sin = (c.reshape(B * T, D) for c in (cos, sin))
    cos, sin = (c if c.stride(-1) == 1 else c.contiguous() for c in (cos, sin))
    out = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    rows = B * T * H
    if rows:
        block_half = triton.next_power_of_2(D // 2)
        block_r = max(1, min(16, 2048 // block_half))  # ~4K values per program, as the norm kernel
        with LAUNCH_LOCK:
            _rotary_kernel[(triton.cdiv(rows, block_r),)](
                tokens, cos, sin, norm_weight if norm_weight is not None else tokens, out, rows,
                tokens.stride(0), tokens.stride(1), cos.stride(0), sin.stride(0), eps,
                HEADS=H, D=D, NORM=norm_weight is not None, GEMMA_NORM=norm_variant == "gemma",
                BLOCK_R=block_r, BLOCK_HALF=block_half,
            )
    return out


# --- C++ kernel (CPU) ----------------------------------------------------------------------------
# kernels/rotary_cpu.cpp: each (token, head) row read once, normalised and rotated in fp32, written once

NORM_CODES = {None: 0, "llama": 1, "gemma": 2}  # rotary_cpu.cpp's `Norm`


def rotary_cpu(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0, norm_variant: str = "llama",
) -> torch.Tensor:
    """The C++ kernel (kernels/cpu_extension.py must have built it: `has("rotary")`); same arguments
    and result as `rotary_reference`. It takes fp32 or bf16 x, cos, sin and norm weight of one dtype
    (as a fp32 or bf16 model gives them); other inputs get the reference."""
    check_variant(norm_variant)
    dtypes = {x.dtype, cos.dtype, sin.dtype} | ({norm_weight.dtype} if norm_weight is not None else set())
    if dtypes not in ({torch.float32}, {torch.bfloat16}):
        return rotary_reference(x, cos, sin, norm_weight, eps, norm_variant)
    B, T, H, D = x.shape
    if cos.shape != (B, T, D) or sin.shape != cos.shape:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    weight = norm_weight if norm_weight is not None else x.new_empty(0)
    code = NORM_CODES[norm_variant if norm_weight is not None else None]
    out = torch.ops.darl_infer_cpu.rotary(x.reshape(B * T, H, D), cos.reshape(B * T, D), sin.reshape(B * T, D), weight, eps, code)
    return out.view(B, T, H, D)
