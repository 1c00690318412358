"""The gated MLP on a CPU as oneDNN matmuls with the activation and the gating in their epilogues.

HF's gated MLP is down(act(gate(x)) * up(x)): on a CPU three matmuls and two passes over the
(tokens x intermediate) activations, which at a few thousand tokens do not fit in cache. oneDNN
applies post-ops to each output tile while it is still in cache: the gate matmul with act (GELU-tanh
or SiLU) as a unary post-op, the up matmul with "times that" as a binary one. The same math, in
fp32 accumulators instead of rounding each step to the model's dtype: fp32 within 5e-7 of HF's
module, bf16 closer to the fp32 result than HF's own bf16 module (tests/test_onednn_mlp.py). The
weights are the module's own (no copy): `torch.ops.mkldnn._linear_pointwise` takes them dense.

Measured on a 2-core AMX Xeon (`python bench/mlp_post_ops.py --dtype bf16 --deviation [--compile]`,
bench/RESULTS.md, issue 16): one layer's MLP at 2,500 tokens 13.7 -> 9.3 ms; 100-item queries,
alternating rounds in one process, 823 -> 752 ms (median; compiled 561 -> 550); over 300 real items
against the fp32 reference, max |Δprob| 0.043 -> 0.026, items past 2e-2 14 -> 10 (384 items,
`bench/bf16_deviation.py`: 6.8 -> 4.9 %; further from HF's bf16 module, which rounds more often:
5.5 -> 10.7 %). In fp32
(`--dtype fp32`) the MLP alone 55.4 -> 53.5 ms and a query within the noise (median 2,316 -> 2,295
ms), so it is used for bf16 only, where the CPU runs bf16 natively (AVX-512-BF16 or
AMX): too little to risk CPUs it was not measured on (oneDNN's fp32 matmul instead of MKL's on an
AMD EPYC, say).

Swapped once when the torch backend is built on a CPU, as fused_modules.py swaps its modules:
within the torch backend's forward passes only (elsewhere, training the model or exporting it to
ONNX say, HF's forward runs); in a compiled layer (compile=True) as an opaque custom op.
"""

from __future__ import annotations

import platform
import types

import torch

from .attention_hook import current
from .fused_modules import KNOWN_MLP, activation_of, is_one_of, plain_linears
from .prefix_runner import ItemsPass, JointPass, PrefixPass

# the gated op's activations as oneDNN unary post-ops: (attr, algorithm)
POST_OPS = {"gelu_tanh": ("gelu", "tanh"), "silu": ("swish", "")}


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def used_for(dtype: torch.dtype) -> bool:
    """bf16 on an x86 CPU that oneDNN runs it natively on (elsewhere PyTorch's own kernels run bf16
    and oneDNN's bf16 ops refuse to; ARM's oneDNN was not measured)."""
    return (
        dtype == torch.bfloat16 and platform.machine() in ("x86_64", "AMD64") and onednn_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def use_onednn_mlps(decoder: torch.nn.Module) -> None:
    """Swap the forward of every known gated MLP of `decoder` with plain, bias-free linears and a
    known activation, if `used_for` its dtype."""
    if not used_for(next(decoder.parameters()).dtype):
        return
    for module in decoder.modules():
        if (
            is_one_of(module, KNOWN_MLP)
            and plain_linears(module.gate_proj, module.up_proj, module.down_proj)
            and module.gate_proj.bias is None and module.up_proj.bias is None
            and (activation := activation_of(module.act_fn)) is not None
        ):
            module.darl_post_op = POST_OPS[activation]
            module.forward = types.MethodType(onednn_mlp_forward, module)


def onednn_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # is_compiling first: dynamo cannot trace the context variable that current() reads (and a
    # compiled layer runs only within a pass: its attention op needs one)
    compiling = torch.compiler.is_compiling()
    if not compiling and not isinstance(current(), (PrefixPass, ItemsPass, JointPass)):
        return type(self).forward(self, x)
    rows = x.reshape(-1, x.shape[-1])  # oneDNN's linear takes 2-D input
    if compiling:
        gated = gated_product_op(rows, self.gate_proj.weight, self.up_proj.weight, *self.darl_post_op)
    else:
        gated = gated_product(rows, self.gate_proj.weight, self.up_proj.weight, self.darl_post_op)
    return self.down_proj(gated).view(*x.shape[:-1], -1)


def gated_product(rows: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, post_op: tuple[str, str]) -> torch.Tensor:
    """act(rows @ gate_weight.T) * (rows @ up_weight.T), rows 2-D, in two oneDNN matmuls."""
    attr, algorithm = post_op
    act = torch.ops.mkldnn._linear_pointwise(rows, gate_weight, None, attr, [], algorithm)
    return torch.ops.mkldnn._linear_pointwise.binary(rows, act, up_weight, None, "mul")


# Under torch.compile an opaque op: inductor cannot lower oneDNN's linear on a weight that is a graph
# input, and need not: it fuses the norms and residual adds around it.
@torch.library.custom_op("darl_infer::gated_product", mutates_args=())
def gated_product_op(rows: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, attr: str, algorithm: str) -> torch.Tensor:
    return gated_product(rows, gate_weight, up_weight, (attr, algorithm))


@gated_product_op.register_fake
def _(rows, gate_weight, up_weight, attr, algorithm):
    return rows.new_empty((rows.shape[0], gate_weight.shape[0]))
