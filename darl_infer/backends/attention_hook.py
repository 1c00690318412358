"""The one attention function darl_infer registers with transformers' `AttentionInterface`.

HF model code runs unchanged; only its attention is swapped. What the attention does in a forward
pass is decided by that pass's state object, held in a context variable while the pass runs:
`PrefixPass` / `ItemsPass` (prefix_runner.py: packed prefixes record each layer's K/V, packed
items attend to their own prefix's copy) or the ONNX export's padded graphs (onnx_export.py). A context variable rather than
an attribute of the model: each thread (and asyncio task) sees only its own pass, so one model
serves concurrent calls.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Protocol

import torch
from transformers import AttentionInterface

from .turns import between_layers

ATTN_IMPLEMENTATION = "darl_infer"


class PassState(Protocol):
    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Attention output (B, T, H, D) of one layer, from HF's query (B, H, T, D), key and value (B, Hkv, T, D)."""


_active: contextvars.ContextVar[PassState | None] = contextvars.ContextVar("darl_infer_pass", default=None)
_compiled_layer: contextvars.ContextVar[int | None] = contextvars.ContextVar("darl_infer_compiled_layer", default=None)


def _attend(query, key, value, layer: int | None, scale: float, sliding_window: int | None) -> torch.Tensor:
    state = _active.get()
    if state is None or layer is None:
        raise RuntimeError(f"attention {ATTN_IMPLEMENTATION!r} called outside a darl_infer forward pass")
    between_layers(query.shape[-2])  # a call with less work left may run first (turns.py)
    return state.attend(layer, query, key, value, scale, sliding_window)


# Under torch.compile (the torch backend's `compile=True`) the attention is an opaque custom op:
# dynamo cannot trace the pass state (a context variable) and need not, so each decoder layer is one
# graph around it instead of two graphs either side of a graph break (bf16 on a 2-core AMX Xeon:
# +9 to +17 % items/s; bench/RESULTS.md). The op is not given HF's layer index (an int attribute of the
# module, which dynamo would bake into the graph: one compilation per layer): the compiled layer's
# Python wrapper sets it (`compiled_layer`, compiled_layers.py). Its inputs are the graph's buffers,
# reused once it returns: whatever a pass keeps must be its own copy (prefix_runner.PrefixPass).
# Eager calls and the ONNX export call `_attend` directly.
@torch.library.custom_op("darl_infer::attend", mutates_args=())
def attend_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, sliding_window: int | None) -> torch.Tensor:
    return _attend(query, key, value, _compiled_layer.get(), scale, sliding_window)


@attend_op.register_fake
def _(query, key, value, scale, sliding_window):
    B, H, T, D = query.shape
    return query.new_empty((B, T, H, D))


def attention_hook(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        return attend_op(query, key, value, scale, kwargs.get("sliding_window")), None
    return _attend(query, key, value, module.layer_idx, scale, kwargs.get("sliding_window")), None


@contextlib.contextmanager
def compiled_layer(index: int):
    """Within the block, the attention op of a compiled layer is that of layer `index`."""
    token = _compiled_layer.set(index)
    try:
        yield
    finally:
        _compiled_layer.reset(token)


AttentionInterface.register(ATTN_IMPLEMENTATION, attention_hook)


def use_attention_hook(decoder: torch.nn.Module) -> torch.nn.Module:
    """Switch an HF decoder to the hook, once when a backend or graph is built (never per call)."""
    decoder.set_attn_implementation(ATTN_IMPLEMENTATION)
    return decoder


def current() -> PassState | None:
    return _active.get()


@contextlib.contextmanager
def active(state: PassState):
    """Within the block, this thread's forward passes use `state`."""
    token = _active.set(state)
    try:
        yield state
    finally:
        _active.reset(token)
