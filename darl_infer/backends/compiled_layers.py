"""`compile=True` of the torch backend: each decoder layer under torch.compile (inductor's CPU or
GPU codegen), so that a layer's norms, rotary embedding, activation, gating and residual adds run
as a few fused loops around its matrix multiplies instead of one pass over memory each, with the
dtype round trips of HF's fp32 norms folded in. The attention hook stays eager (attention_hook.py),
so a layer compiles into the graph before its attention and the graph after it.

Measured on a 2-core Xeon with AMX (bench/RESULTS.md, issue 16): bf16 scoring 1.25x faster,
fp32 1.1x; the first call pays the compilation (seconds to tens of seconds; inductor
caches it on disk for the next process). Shapes change with every call, hence dynamic=True.
"""

from __future__ import annotations

import torch


# Inductor keeps a fused chain's intermediates in fp32 unless told to round them where eager does.
# Rounding like eager keeps the compiled model on the oracle's (eager HF's) numerics: on the default
# model in bf16, 148 real items, max |Δprob| against the bf16 reference 0.024 with it, 0.063 without
# (eager torch: 0.036), at the same speed (bench/RESULTS.md, "On an AMX Xeon").
INDUCTOR_OPTIONS = {"emulate_precision_casts": True}


def compile_decoder_layers(decoder: torch.nn.Module) -> None:
    """Compile each of the decoder's layers in place (once: a layer already compiled is kept).
    The model is changed for every user of it; its results stay within the dtype's tolerance."""
    for layer in decoder.layers:
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(dynamic=True, options=INDUCTOR_OPTIONS)
