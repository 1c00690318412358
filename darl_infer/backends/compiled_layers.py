"""`compile=True` of the torch backend: each decoder layer under torch.compile (inductor's CPU or
GPU codegen), so that a layer's norms, rotary embedding, activation, gating and residual adds run
as a few fused loops around its matrix multiplies instead of one pass over memory each, with the
dtype round trips of HF's fp32 norms folded in. The attention is an opaque custom op inside the
graph (attention_hook.py), so each layer is one graph around it.

Measured on a 2-core Xeon with AMX (bench/RESULTS.md, issue 16): bf16 scoring 1.4x faster,
fp32 1.1x; the first call pays the compilation (seconds to tens of seconds; inductor
caches it on disk for the next process). Shapes change with every call, hence dynamic=True.
"""

from __future__ import annotations

import math

import torch

from darl_infer.kernels.gated_activation import check_activation

from .attention_hook import compiled_layer


# Inductor keeps a fused chain's intermediates in fp32 unless told to round them where eager does.
# Rounding like eager keeps the compiled model on the oracle's (eager HF's) numerics: on the default
# model in bf16, 148 real items, max |Δprob| against the bf16 reference 0.024 with it, 0.063 without
# (eager torch: 0.036), at the same speed (bench/RESULTS.md, "On an AMX Xeon").
INDUCTOR_OPTIONS = {"emulate_precision_casts": True}


# HF's tanh-approximated GELU (Gemma's activation), by class name across transformers versions
TANH_GELU_CLASSES = {"GELUTanh", "PytorchGELUTanh"}


class TanhGeluViaExp(torch.nn.Module):
    """The tanh-approximated GELU written as x / (1 + exp(-2z)), z = sqrt(2/pi) (x + 0.044715 x^3):
    the same function (0.5 (1 + tanh z) = sigmoid(2z)), in fp32 like eager's, rounded to the
    input's dtype. Inductor's CPU code runs its vectorized tanh slowly: in bf16, GELU times the up
    projection over 2,600 x 2,048 took 5.3 ms with tanh (the layer's down projection: 2.6 ms) and
    2.1 ms in this form (2-core AMX Xeon). It is also the more accurate where the tanh form cancels
    (x < -3); elsewhere it matches eager's bf16 GELU to 2e-5 (bench/RESULTS.md, issue 16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tanh_gelu_via_exp(x)


def tanh_gelu_via_exp(x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return (x32 / (1 + torch.exp(-math.sqrt(8 / math.pi) * (x32 + 0.044715 * x32 * x32 * x32)))).to(x.dtype)


def gated_activation_for_inductor(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """kernels/gated_activation.py's op in compiled layers (fused_modules.py): Gemma's GELU in the
    form `TanhGeluViaExp` explains."""
    check_activation(activation)
    act = tanh_gelu_via_exp(gate) if activation == "gelu_tanh" else torch.nn.functional.silu(gate)
    return act * up


def compile_decoder_layers(decoder: torch.nn.Module) -> None:
    """Compile each of the decoder's layers in place (once: a layer already compiled is kept),
    its tanh GELU swapped for `TanhGeluViaExp`. The model is changed for every user of it; its
    results stay within the dtype's tolerance."""
    for layer in decoder.layers:
        if getattr(layer, "_compiled_call_impl", None) is None:
            mlp = getattr(layer, "mlp", None)
            if type(getattr(mlp, "act_fn", None)).__name__ in TANH_GELU_CLASSES:
                mlp.act_fn = TanhGeluViaExp()
            layer._compiled_call_impl = _telling_the_layer(
                torch.compile(layer._call_impl, dynamic=True, options=INDUCTOR_OPTIONS), layer.self_attn.layer_idx
            )


def _telling_the_layer(compiled, index: int):
    """The compiled layer, called with its index set for its attention op (attention_hook.py): in
    Python, outside the graph, so that every layer shares one graph."""

    def call(*args, **kwargs):
        with compiled_layer(index):
            return compiled(*args, **kwargs)

    return call
