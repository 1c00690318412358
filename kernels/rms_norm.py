"""RMSNorm over the last dimension, as Hugging Face's decoders compute it, rounding included:
- "llama" (Llama, Qwen2, Qwen3, Mistral): w * (x * rsqrt(mean(x^2) + eps)).to(dtype)
- "gemma" (Gemma 1/2/3): ((x * rsqrt(mean(x^2) + eps)) * (1 + w)).to(dtype), in fp32

`rms_norm_reference` is the PyTorch version (the HF modules' math, which the torch backend runs
through the modules themselves, and the fused head's norm); `rms_norm` is the Triton kernel with
the same signature, which the triton backend runs in place of every such norm of the decoder:
Gemma-3 has six per layer (four around attention and MLP, two on queries and keys per head). Run as
PyTorch ops each norm is ~8 kernel launches (upcast, square, mean, add, rsqrt, two products,
downcast), each a pass over the tensor; the kernel is one launch and one read and write.
"""

from __future__ import annotations

import torch

from darl_infer.kernels._triton import LAUNCH_LOCK, tl, triton

NORM_VARIANTS = ("llama", "gemma")


def check_variant(norm_variant: str) -> None:
    if norm_variant not in NORM_VARIANTS:
        raise ValueError(f"unknown norm_variant {norm_variant!r}; choose one of {list(NORM_VARIANTS)}")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, norm_variant: str) -> torch.Tensor:
    check_variant(norm_variant)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if norm_variant == "gemma":
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


# --- Triton kernel -------------------------------------------------------------------------------
# Grid (ceil(rows / BLOCK_R),): each program normalises BLOCK_R whole rows held in registers (a
# row is at most a few thousand values), so x is read once and the output written once.


@triton.jit(do_not_specialize=["rows"])  # the row count changes with every pass
def _rms_norm_kernel(
    x, weight, out, rows, stride_x, stride_out, eps,
    D: tl.constexpr, GEMMA_NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    mask = (r < rows)[:, None] & (d < D)[None, :]
    x32 = tl.load(x + r[:, None] * stride_x + d[None, :], mask=mask, other=0.0).to(tl.float32)
    normed = x32 * tl.math.rsqrt(tl.sum(x32 * x32, axis=1) / D + eps)[:, None]
    w = tl.load(weight + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
    # the casts round where HF's modules round (products in fp32, as torch computes them)
    if GEMMA_NORM:
        y = normed * (1.0 + w)
    else:
        y = w * normed.to(x.dtype.element_ty).to(tl.float32)
    tl.store(out + r[:, None] * stride_out + d[None, :], y.to(out.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, norm_variant: str) -> torch.Tensor:
    """The Triton kernel; same arguments and result as `rms_norm_reference`."""
    check_variant(norm_variant)
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match the last dimension of x {tuple(x.shape)}")
    rows = x.reshape(-1, D)  # a view for HF's activations
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_dtype = x.dtype if norm_variant == "gemma" else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    if rows.shape[0]:
        block_d = triton.next_power_of_2(D)
        block_r = max(1, min(16, 4096 // block_d))  # ~4K values per program: 4 rows of Gemma's 640, 16 of a head's 256
        with LAUNCH_LOCK:
            _rms_norm_kernel[(triton.cdiv(rows.shape[0], block_r),)](
                rows, weight.contiguous(), out, rows.shape[0], rows.stride(0), out.stride(0), eps,
                D=D, GEMMA_NORM=norm_variant == "gemma", BLOCK_R=block_r, BLOCK_D=block_d,
            )
    return out.view(x.shape)


# --- C++ kernel (CPU) ----------------------------------------------------------------------------
# kernels/rms_norm_cpu.cpp: each row read once, normalised in fp32 while in cache, written once


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float, norm_variant: str) -> torch.Tensor:
    """The C++ kernel (kernels/cpu_extension.py must have built it: `cpu_ops()` not None); same
    arguments and result as `rms_norm_reference`. It takes fp32 or bf16 x and a weight of x's dtype
    (as every norm of an fp32 or bf16 model has); other inputs get the reference."""
    check_variant(norm_variant)
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        return rms_norm_reference(x, weight, eps, norm_variant)
    return torch.ops.darl_infer_cpu.rms_norm(x, weight, eps, norm_variant == "gemma")


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, x_weight: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
    norm_variant: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A decoder layer's residual add between its norms: sum = residual + norm(x; x_weight) (x itself
    for no x_weight: Llama's), then normed = norm(sum; weight) (None for no weight); (sum, normed)."""
    total = residual + (x if x_weight is None else rms_norm_reference(x, x_weight, eps, norm_variant))
    return total, None if weight is None else rms_norm_reference(total, weight, eps, norm_variant)


def add_rms_norm_cpu(
    x: torch.Tensor, residual: torch.Tensor, x_weight: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
    norm_variant: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The C++ kernel (one pass over the rows instead of three; `cpu_ops()` not None); same arguments
    and result as `add_rms_norm_reference`, with `rms_norm_cpu`'s math for each norm: bit-equal to
    rms_norm_cpu and PyTorch's add. fp32 or bf16 inputs of one dtype; others get the reference."""
    check_variant(norm_variant)
    weights = [w for w in (x_weight, weight) if w is not None]
    if x.dtype not in (torch.float32, torch.bfloat16) or any(t.dtype != x.dtype for t in (residual, *weights)):
        return add_rms_norm_reference(x, residual, x_weight, weight, eps, norm_variant)
    empty = x.new_empty(0)
    total, normed = torch.ops.darl_infer_cpu.add_rms_norm(
        x, residual, empty if x_weight is None else x_weight, empty if weight is None else weight, eps, norm_variant == "gemma"
    )
    return total, None if weight is None else normed
