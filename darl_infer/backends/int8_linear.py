"""dtype="int8": the decoder's Linear layers with int8 weights (weight-only); their activations and
the rest of the model (embeddings, norms, attention, the head) in the float dtype "auto" picks.

Weights: int8 per output channel, symmetric (max |w_row| / 127, round to nearest), dequantized to
the float dtype at each call and multiplied by the float matmul (`WeightOnlyInt8Linear`): the int8
weights take half bf16's memory, a token's result depends on the other rows only as the float
matmul's does, and no int8 dot products are needed, so any CPU runs it. On the default model and
the three dev sets macro-F1 moves by +0.002 to +0.006 from fp32 (mean |Δprob| 0.008); 8-15 % fewer
items/s than bf16 on a 2-core AMX Xeon, the dequantization's cost (bench/RESULTS.md, "int8").

Also here, measured and not shipped (bench/int8_quality.py --method per-token,
bench/matmul_shapes.py --dtype int8): W8A8, int8 activations per token on oneDNN's int8 matmul
(`PerTokenInt8Linear`), each row scaled by its own max |x| / 127 and smoothed first (SmoothQuant,
Xiao et al. 2023: input channel j divided by s_j and the weight's column j multiplied by it, s_j
from each channel's largest |x| over a few calibration pairs, `record_input_absmax`). It missed
macro-F1 within 0.01 of fp32 on two of three dev sets. It needs int8 dot products that do not
saturate, AMX-INT8 or AVX-512-VNNI: with AVX2 only, oneDNN's u8 x s8 path (`vpmaddubsw`)
saturates its int16 pair sums and the products are off by ~0.09 relative (measured on an AMD
EPYC), so other CPUs are refused.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..loading import cpu_flags

INT8_FLAGS = ("amx_int8", "avx512_vnni")


def check_int8_dot_products() -> None:
    if not set(INT8_FLAGS) & cpu_flags():
        raise ValueError(
            "per-token int8 (W8A8) needs a CPU with AMX-INT8 or AVX-512-VNNI (this one has neither, so its "
            "int8 products would saturate); dtype='int8' (weight-only) runs without them"
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


# s_j = max|x_j|^a / max|W_:j|^(1 - a). On the default model, the 5,996 pairs of the three dev sets
# (bench/int8_quality.py --smoothing-alpha): mean |Δprob| against fp32 0.030 unsmoothed, 0.021 with
# a = 0.5, 0.018 with 0.65, 0.016 with 0.8 (bench/RESULTS.md, "int8").
SMOOTHING_ALPHA = 0.8


def smoothing_scales(input_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per input channel s: x / s and W * s give the same product with flatter activations."""
    tiny = 1e-5  # a channel that never fired (or a zero weight column) keeps a finite scale
    return input_absmax.float().clamp_min(tiny) ** alpha / weight.abs().amax(0).clamp_min(tiny) ** (1 - alpha)


class PerTokenInt8Linear(nn.Module):
    """A bias-free nn.Linear with int8 weights (per output channel) and int8 activations (per token),
    smoothed by the input channels' calibrated ranges when `input_absmax` is given."""

    def __init__(self, linear: nn.Linear, input_absmax: torch.Tensor | None = None):
        super().__init__()
        if linear.bias is not None:
            raise NotImplementedError(f"int8: a Linear with a bias ({linear})")
        weight = linear.weight.detach().float()
        self.inv_smooth = None
        if input_absmax is not None:
            smooth = smoothing_scales(input_absmax, weight, SMOOTHING_ALPHA)
            weight, self.inv_smooth = weight * smooth, 1 / smooth
        qweight, w_scale = quantize_rows(weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.w_scale = w_scale.squeeze(1)
        self.packed = torch.ops.onednn.qlinear_prepack(qweight, None)
        self.w_zero = torch.zeros(self.out_features, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.reshape(-1, x.shape[-1]).float()
        qx, scale = quantize_rows(x32 if self.inv_smooth is None else x32 * self.inv_smooth)
        out = int8_matmul(qx, self.packed, self.w_scale, self.w_zero, self.out_features) * scale
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        smoothed = ", smoothed" if self.inv_smooth is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per token{smoothed}"


class WeightOnlyInt8Linear(nn.Module):
    """An nn.Linear with int8 weights (per output channel, round to nearest) and float activations:
    the weight is dequantized to the input's dtype at each call and multiplied by the float matmul
    (bf16 on AMX). Dequantizing costs 20-70 % over bf16's matmul alone at 2,000 tokens, yet this is
    13-16x as fast as `aten._weight_int8pack_mm` (gpt-fast's CPU int8 kernel, written for decoding's
    few rows) at the decoder's shapes on a 2-core AMX Xeon. Not smoothed: smoothing moves range from
    the activations into the weights, the only quantized side here (it raised the weight-only error
    of 99 of the default model's 126 layers on the calibration pairs)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.qweight, self.w_scale = quantize_rows(linear.weight.detach().float())
        self.bias = None if linear.bias is None else linear.bias.detach()  # kept as it is: N values, not worth rounding
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        # the int8-rounded weight, rounded once more to `dtype` (as the float model's own weight is)
        return (self.qweight.float() * self.w_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight only"


def decoder_linears(model: nn.Module, names: tuple[str, ...] | None = None):
    """(layer, attribute path, module) of every nn.Linear of the decoder layers (those whose
    attribute name is in `names`, if given); the head is not a decoder layer's."""
    for layer in getattr(model, model.base_model_prefix).layers:
        for name, module in list(layer.named_modules()):
            if isinstance(module, nn.Linear) and (names is None or name.rpartition(".")[2] in names):
                yield layer, name, module


def replace_decoder_linears(model: nn.Module, wrap, names: tuple[str, ...] | None = None) -> None:
    """Every nn.Linear of the decoder layers (see `decoder_linears`) replaced by `wrap(linear)`, in place."""
    for layer, name, module in list(decoder_linears(model, names)):
        parent, _, attr = name.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, attr, wrap(module))


@contextlib.contextmanager
def record_input_absmax(model: nn.Module):
    """Within the block, each decoder Linear's largest |x| per input channel over every call: a dict
    from the module to an fp32 (in_features,) tensor, filled as the model runs."""
    absmax: dict[nn.Module, torch.Tensor] = {}

    def record(module, args):
        seen = args[0].detach().reshape(-1, module.in_features).abs().amax(0).float()
        absmax[module] = torch.maximum(absmax[module], seen) if module in absmax else seen

    handles = [module.register_forward_pre_hook(record) for _, _, module in decoder_linears(model)]
    try:
        yield absmax
    finally:
        for handle in handles:
            handle.remove()


def quantize_decoder_linears(
    model: nn.Module, input_absmax: dict[nn.Module, torch.Tensor] | None = None, names: tuple[str, ...] | None = None,
) -> None:
    """The decoder layers' nn.Linear (those named in `names`, if given) in per-token int8 (W8A8, not
    shipped: see the module's docstring), in place, each smoothed by its entry in `input_absmax`
    (`record_input_absmax`) if it has one (the head stays as it is: the fused head reads its weight)."""
    check_int8_dot_products()
    absmax = input_absmax or {}
    replace_decoder_linears(model, lambda linear: PerTokenInt8Linear(linear, absmax.get(linear)), names)


def quantize_decoder_weights(model: nn.Module, names: tuple[str, ...] | None = None) -> None:
    """dtype="int8": the decoder layers' nn.Linear (those named in `names`, if given) with int8
    weights, in place (the head stays as it is: the fused head reads its weight)."""
    replace_decoder_linears(model, WeightOnlyInt8Linear, names)
