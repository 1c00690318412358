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


def attention_hook(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    state = _active.get()
    if state is None:
        raise RuntimeError(f"attention {ATTN_IMPLEMENTATION!r} called outside a darl_infer forward pass")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    between_layers(query.shape[-2])  # a call with less work left may run first (turns.py)
    return state.attend(module.layer_idx, query, key, value, scale, kwargs.get("sliding_window")), None


# Under torch.compile (the torch backend's `compile=True`) the hook stays eager: the pass state is
# read from a context variable, which dynamo cannot trace, so each layer compiles into the graphs
# before and after its attention and the attention runs between them.
AttentionInterface.register(ATTN_IMPLEMENTATION, torch.compiler.disable(attention_hook))


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
