"""The gated MLP's middle, act(gate) * up, as Hugging Face's Llama/Qwen/Gemma MLPs compute it:
the activation rounded to the inputs' dtype, then the product rounded.

Activations: "silu" (Llama, Qwen, SmolLM2) and "gelu_tanh" (Gemma's `gelu_pytorch_tanh`). Shapes:
gate, up (..., I) with unit stride along I (the two halves of one fused gate/up projection's
output are such views); the result (..., I), contiguous.

`gated_activation_reference` is the PyTorch version (torch's own activation functions);
`gated_activation` is the Triton kernel with the same signature: one launch, gate and up read once,
instead of an activation and a product, each a pass over (tokens x I) values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from darl_infer.kernels._triton import LAUNCH_LOCK, tl, triton

ACTIVATIONS = ("silu", "gelu_tanh")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {list(ACTIVATIONS)}")


def gated_activation_reference(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    check_activation(activation)
    act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    return act * up


# --- Triton kernel -------------------------------------------------------------------------------
# Grid (rows, ceil(I / BLOCK)): elementwise over each row's I values.

@triton.jit(do_not_specialize=["I"])
def _gated_activation_kernel(
    gate, up, out, I, stride_gate, stride_up, GELU_TANH: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = i < I
    g = tl.load(gate + row * stride_gate + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up + row * stride_up + i, mask=mask, other=0.0).to(tl.float32)
    if GELU_TANH:
        # 0.5 * (1 + tanh(z)) = sigmoid(2z), z = sqrt(2/pi) (g + 0.044715 g^3): torch's tanh GELU in an
        # exp form (Triton has no portable tanh), in fp32 as torch computes it
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = g / (1.0 + tl.exp(-2.0 * z))
    else:
        act = g / (1.0 + tl.exp(-g))
    dtype = out.dtype.element_ty
    y = act.to(dtype).to(tl.float32) * u  # the activation rounded as HF's module returns it
    tl.store(out + row * I + i, y.to(dtype), mask=mask)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """The Triton kernel; same arguments and result as `gated_activation_reference`."""
    check_activation(activation)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
    I = gate.shape[-1]
    gate_rows, up_rows = (x.reshape(-1, I) for x in (gate, up))  # views for halves of one projection
    gate_rows, up_rows = (x if x.stride(-1) == 1 else x.contiguous() for x in (gate_rows, up_rows))
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate_rows.shape[0] and I:
        block = min(1024, triton.next_power_of_2(I))
        with LAUNCH_LOCK:
            _gated_activation_kernel[(gate_rows.shape[0], triton.cdiv(I, block))](
                gate_rows, up_rows, out, I, gate_rows.stride(0), up_rows.stride(0),
                GELU_TANH=activation == "gelu_tanh", BLOCK=block,
            )
    return out


def gated_activation_cpu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """The C++ kernel (kernels/cpu_extension.py must have built it: `has("gated_activation")`); same
    arguments and result as the Triton kernel, fp32 or bf16 gate and up (other dtypes get the
    reference)."""
    check_activation(activation)
    if gate.dtype not in (torch.float32, torch.bfloat16) or up.dtype != gate.dtype:
        return gated_activation_reference(gate, up, activation)
    shape = gate.shape
    out = torch.ops.darl_infer_cpu.gated_activation(gate.reshape(-1, shape[-1]), up.reshape(-1, shape[-1]), activation == "gelu_tanh")
    return out.view(shape)
