"""Fused classification head: each item's last hidden state -> final RMSNorm -> K x H projection ->
softmax -> expected grade, in one pass over N rows instead of a norm over all T packed tokens.

`hidden` (T, H) holds the decoder's packed hidden states *before* its final norm; item i ends at
row cu_seqlens[i + 1] - 1. The norm follows the model's own module, its rounding included
(rms_norm.py: "llama" or "gemma"). The projection is the model's `score` Linear (no bias) in the model's dtype, as nn.Linear rounds it.
Returns grade probabilities (N, K) and expected grades sum_k p_k * grade_values[k] (N,), fp32.

`classification_head_reference` is the PyTorch version (the torch backend's head);
`classification_head` is the Triton kernel with the same signature (the triton backend's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from darl_infer.kernels._triton import LAUNCH_LOCK, tl, triton
from darl_infer.kernels.rms_norm import check_variant, rms_norm_reference


def classification_head_reference(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_eps: float,
    norm_variant: str,
    score_weight: torch.Tensor,
    grade_values: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    normed = rms_norm_reference(hidden[cu_seqlens[1:].to(hidden.device) - 1], norm_weight, norm_eps, norm_variant)
    probs = F.linear(normed, score_weight).float().softmax(-1)
    return probs, probs @ grade_values.to(probs)


# --- Triton kernel -------------------------------------------------------------------------------
# Grid (N,): one program per item reads its last row of `hidden` (twice: sum of squares, then the
# normalized row against the K score rows, from L1/L2 the second time) and writes K + 1 floats.
# The N x H normed rows and the N x K logits never reach HBM.


@triton.jit
def _classification_head_kernel(
    hidden, cu_seqlens, norm_weight, score_weight, grade_values, probs, expected,
    stride_ht, stride_wk, stride_pn, norm_eps,
    HIDDEN: tl.constexpr, K: tl.constexpr, GEMMA_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    item = tl.program_id(0)
    row = hidden + (tl.load(cu_seqlens + item + 1) - 1) * stride_ht
    dtype = hidden.dtype.element_ty
    cols = tl.arange(0, BLOCK_H)

    squares = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(0, HIDDEN, BLOCK_H):
        x = tl.load(row + start + cols, mask=start + cols < HIDDEN, other=0.0).to(tl.float32)
        squares += x * x
    inv_rms = tl.math.rsqrt(tl.sum(squares, axis=0) / HIDDEN + norm_eps)

    grades = tl.arange(0, BLOCK_K)
    logits = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, HIDDEN, BLOCK_H):
        col = start + cols
        in_row = col < HIDDEN
        x = tl.load(row + col, mask=in_row, other=0.0).to(tl.float32) * inv_rms
        w = tl.load(norm_weight + col, mask=in_row, other=0.0).to(tl.float32)
        # the casts round where HF's modules round (products computed in fp32 as torch does)
        if GEMMA_NORM:
            x = (x * (1.0 + w)).to(dtype)
        else:
            x = (w * x.to(dtype).to(tl.float32)).to(dtype)
        score_rows = tl.load(
            score_weight + grades[:, None] * stride_wk + col[None, :],
            mask=(grades < K)[:, None] & in_row[None, :], other=0.0,
        )
        logits += tl.sum(score_rows.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)

    logits = tl.where(grades < K, logits.to(dtype).to(tl.float32), float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=0))
    p = p / tl.sum(p, axis=0)
    tl.store(probs + item * stride_pn + grades, p, mask=grades < K)
    values = tl.load(grade_values + grades, mask=grades < K, other=0.0).to(tl.float32)
    tl.store(expected + item, tl.sum(p * values, axis=0))


def classification_head(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_eps: float,
    norm_variant: str,
    score_weight: torch.Tensor,
    grade_values: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel; same arguments and result as `classification_head_reference`."""
    check_variant(norm_variant)
    T, H = hidden.shape
    K = score_weight.shape[0]
    if norm_weight.shape != (H,) or score_weight.shape != (K, H) or grade_values.shape != (K,):
        raise ValueError(
            f"shapes do not match: hidden {tuple(hidden.shape)}, norm_weight {tuple(norm_weight.shape)}, "
            f"score_weight {tuple(score_weight.shape)}, grade_values {tuple(grade_values.shape)}"
        )
    hidden, norm_weight, score_weight, grade_values = (
        x.contiguous() for x in (hidden, norm_weight, score_weight, grade_values)
    )
    N = cu_seqlens.numel() - 1
    probs = torch.empty(N, K, device=hidden.device, dtype=torch.float32)
    expected = torch.empty(N, device=hidden.device, dtype=torch.float32)
    with LAUNCH_LOCK:
        _classification_head_kernel[(N,)](
            hidden, cu_seqlens.to(hidden.device), norm_weight, score_weight, grade_values, probs, expected,
            hidden.stride(0), score_weight.stride(0), probs.stride(0), norm_eps,
            HIDDEN=H, K=K, GEMMA_NORM=norm_variant == "gemma",
            BLOCK_H=min(triton.next_power_of_2(H), 1024), BLOCK_K=triton.next_power_of_2(K),
        )
    return probs, expected
