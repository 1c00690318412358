"""dtype="int8": the decoder's Linear layers in per-token int8 (W8A8) on oneDNN's int8 matmul; the
rest of the model (embeddings, norms, attention, the head) in the CPU's float dtype.

Weights: int8 per output channel, packed once (`onednn.qlinear_prepack`). Activations: int8 per
token, each row scaled by its own max |x| / 127, so a token's result never depends on the other
tokens of the call (torch.ao's dynamic int8 takes one scale per call, which moved an item's
probabilities by up to 0.57 with its batch: bench/RESULTS.md, "int8"). oneDNN is called with an
activation scale of 1 and each row's scale is applied to the int32-exact product afterwards.

Lossy by design: the quality cost on the dev sets is measured by bench/int8_quality.py
(bench/RESULTS.md). Needs int8 dot products that do not saturate, AMX-INT8 or AVX-512-VNNI: with
AVX2 only, oneDNN's u8 x s8 path (`vpmaddubsw`) saturates its int16 pair sums and the products
are off by ~0.09 relative (measured on an AMD EPYC), so other CPUs are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..loading import cpu_flags

INT8_FLAGS = ("amx_int8", "avx512_vnni")


def check_int8_dot_products() -> None:
    if not set(INT8_FLAGS) & cpu_flags():
        raise ValueError(
            "dtype='int8' needs a CPU with AMX-INT8 or AVX-512-VNNI (this one has neither, so its int8 "
            "products would saturate); use dtype='bf16' or 'fp32'"
        )


@torch.library.custom_op("darl_infer::int8_matmul", mutates_args=())
def int8_matmul(qx: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor, out_features: int) -> torch.Tensor:
    """(M, K) int8 @ packed (K -> N) int8 weights, times each output channel's scale: (M, N) fp32.
    A custom op so that torch.compile calls it as it is (inductor's own lowering of this oneDNN op
    wants the packed weight as a frozen constant)."""
    return torch.ops.onednn.qlinear_pointwise(qx, 1.0, 0, packed, w_scale, w_zero, None, 1.0, 0, torch.float32, "none", [], "")


@int8_matmul.register_fake
def _(qx, packed, w_scale, w_zero, out_features):
    return qx.new_empty((qx.shape[0], out_features), dtype=torch.float32)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (M, K) int8 and each row's scale (M, 1): x ≈ q * scale, |q| <= 127."""
    scale = (x.abs().amax(1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


class PerTokenInt8Linear(nn.Module):
    """A bias-free nn.Linear with int8 weights (per output channel) and int8 activations (per token)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise NotImplementedError(f"int8: a Linear with a bias ({linear})")
        qweight, w_scale = quantize_rows(linear.weight.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.w_scale = w_scale.squeeze(1)
        self.packed = torch.ops.onednn.qlinear_prepack(qweight, None)
        self.w_zero = torch.zeros(self.out_features, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qx, scale = quantize_rows(x.reshape(-1, x.shape[-1]).float())
        out = int8_matmul(qx, self.packed, self.w_scale, self.w_zero, self.out_features) * scale
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per token"


def replace_decoder_linears(model: nn.Module, wrap, names: tuple[str, ...] | None = None) -> None:
    """Every nn.Linear of the decoder layers (those whose attribute name is in `names`, if given)
    replaced by `wrap(linear)`, in place (the head stays)."""
    for layer in getattr(model, model.base_model_prefix).layers:
        for name, module in list(layer.named_modules()):
            parent, _, attr = name.rpartition(".")
            if isinstance(module, nn.Linear) and (names is None or attr in names):
                setattr(layer.get_submodule(parent) if parent else layer, attr, wrap(module))


def quantize_decoder_linears(model: nn.Module, names: tuple[str, ...] | None = None) -> None:
    """The decoder layers' nn.Linear (those named in `names`, if given) in per-token int8, in place
    (the head stays as it is: the fused head reads its weight)."""
    check_int8_dot_products()
    replace_decoder_linears(model, PerTokenInt8Linear, names)
