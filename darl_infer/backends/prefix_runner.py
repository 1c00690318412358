"""Run an HF decoder with a shared prefix: the prefix once, then packed items against its KV.

A `SharedPrefixCache` is the state of the attention hook (attention_hook.py) for one query: in
the prefix pass it records each layer's K/V (keyed by `module.layer_idx`); in the items passes it
hands that one copy to every item, with `cu_seqlens` telling the items apart inside the packed
sequence.

Thread safety: everything a call changes lives in its own cache object, held in a context
variable; the shared model is only read. Even skipping the final norm is decided per pass by the
cache (see `_pre_norm_states`), never by swapping a module of the shared model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from darl_infer.kernels.shared_prefix_attention import shared_prefix_attention_reference

from .attention_hook import active, current, use_attention_hook

AttentionOp = Callable[..., torch.Tensor]


@dataclass
class SharedPrefixCache:
    cu_seqlens: torch.Tensor
    recording: bool
    length: int
    attention_op: AttentionOp = shared_prefix_attention_reference
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    final_norm: bool = True  # False: the passes return the hidden states before the decoder's final norm

    def attend(self, layer, query, key, value, scale, sliding_window):
        if query.shape[0] != 1:
            raise ValueError("shared-prefix attention expects one packed row (batch size 1)")
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, heads, D)
        if self.recording:
            prefix_k, prefix_v = k[:0], v[:0]
            self.layers[layer] = (k, v)
        elif self.length == 0:
            prefix_k, prefix_v = k[:0], v[:0]
        else:
            prefix_k, prefix_v = self.layers[layer]
        out = self.attention_op(q, k, v, prefix_k, prefix_v, self.cu_seqlens, scale, sliding_window)
        return out.unsqueeze(0)  # (1, T, H, D), as HF's attention functions return


def _pre_norm_states(norm: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on a decoder's final norm: in a pass whose cache asks for pre-norm states, the
    norm's input replaces its output. The norm still runs (an elementwise op on the packed tokens,
    small beside one layer's matmuls), but nothing shared changes: the choice comes from this
    thread's pass, so concurrent calls, and other users of the model, are unaffected."""
    state = current()
    if isinstance(state, SharedPrefixCache) and not state.final_norm:
        return args[0]
    return output


_norms_hooked: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


class PrefixRunner:
    """Hidden states of packed items that all continue one prefix.

    `decoder` is the HF base model (e.g. `LlamaModel`), switched to the attention hook.
    `final_norm=False` returns the states before the decoder's final norm: a fused head applies it
    to the N last tokens instead of all T packed tokens.
    """

    def __init__(
        self,
        decoder: torch.nn.Module,
        attention_op: AttentionOp = shared_prefix_attention_reference,
        final_norm: bool = True,
    ):
        self.decoder = use_attention_hook(decoder)
        self.attention_op = attention_op
        self.final_norm = final_norm
        if not final_norm and decoder.norm not in _norms_hooked:  # once per model, at construction
            decoder.norm.register_forward_hook(_pre_norm_states)
            _norms_hooked.add(decoder.norm)

    def prefix(self, prefix_ids: torch.Tensor) -> SharedPrefixCache:
        """Run the prefix (1-D ids) once; the returned cache holds every layer's K/V."""
        P = prefix_ids.numel()
        cu = torch.tensor([0, P], device=prefix_ids.device)
        cache = SharedPrefixCache(
            cu, recording=P > 0, length=P, attention_op=self.attention_op, final_norm=self.final_norm
        )
        if P == 0:
            return cache
        with active(cache):
            self.decoder(
                input_ids=prefix_ids[None], position_ids=torch.arange(P, device=prefix_ids.device)[None], use_cache=False
            )
        cache.recording = False
        return cache

    def packed(self, cache: SharedPrefixCache, item_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of all item tokens packed back to back, (T, hidden), and the items'
        offsets `cu_seqlens` (N+1): item i ends at row cu_seqlens[i + 1] - 1."""
        P = cache.length
        device = item_ids[0].device
        lengths = torch.tensor([t.numel() for t in item_ids], device=device)
        cu = torch.zeros(len(item_ids) + 1, dtype=torch.long, device=device)
        cu[1:] = lengths.cumsum(0)
        packed = torch.cat(item_ids)
        positions = P + torch.arange(packed.numel(), device=device) - torch.repeat_interleave(cu[:-1], lengths)
        cache.cu_seqlens = cu
        with active(cache):
            out = self.decoder(input_ids=packed[None], position_ids=positions[None], use_cache=False)
        return out.last_hidden_state[0], cu

    def items(self, cache: SharedPrefixCache, item_ids: list[torch.Tensor]) -> torch.Tensor:
        """Hidden state at the last token of each item, (N, hidden)."""
        hidden, cu = self.packed(cache, item_ids)
        return hidden[cu[1:] - 1]
