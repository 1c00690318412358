"""Run an HF decoder with shared prefixes: prefixes packed in one pass, then items packed against
their own prefix's K/V.

Two pass states for the attention hook (attention_hook.py), one object per forward pass:
- `PrefixPass`: several prefixes back to back in one row, each causal within itself (positions
  restart at 0); it records every layer's K/V and cuts them into one `PrefixKV` per prefix.
- `ItemsPass`: items of one or more prefixes back to back; each segment (consecutive items that
  continue the same prefix) attends to that prefix's K/V plus its own causal keys, through one
  call of the attention op per segment, so the op itself only ever sees one prefix.
- `JointPass`: both in one row, the prefixes first: items may continue a prefix of the same row,
  whose K/V at each layer are that layer's own rows. One forward pass instead of two: each weight
  read once, each layer called once (on a CPU a pass over the default model costs ~35 ms before
  its first token; bench/RESULTS.md).

A `PrefixKV` never changes once built: one copy serves every items pass, thread and the Scorer's
LRU of recent prefixes (prefix_cache.py). Everything a pass changes lives in its own state
object, held in a context variable; the shared model is only read. Even skipping the final norm
is decided per pass (see `_pre_norm_states`), never by swapping a module of the shared model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from itertools import accumulate
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import torch

from darl_infer.kernels.shared_prefix_attention import shared_prefix_attention_reference

from .attention_hook import active, current, use_attention_hook

AttentionOp = Callable[..., torch.Tensor]


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so a pass can group items by their prefix
class PrefixKV:
    """One prefix's keys and values at every attention layer, (P, Hkv, D) each, keyed by `layer_idx`."""

    length: int
    layers: Mapping[int, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.layers.values() for t in kv)

    def at(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V at `layer`; an empty prefix has none, so it gives `k`, `v` (the pass's own) cut to 0 rows."""
        return self.layers[layer] if self.length else (k[:0], v[:0])


EMPTY_PREFIX = PrefixKV(0, MappingProxyType({}))


def _rows(query, key, value) -> tuple[torch.Tensor, ...]:
    """HF's (1, heads, T, D) tensors of one packed row as (T, heads, D) views."""
    if query.shape[0] != 1:
        raise ValueError("shared-prefix attention expects one packed row (batch size 1)")
    return tuple(x[0].transpose(0, 1) for x in (query, key, value))


def _offsets(lengths: Sequence[int], device) -> torch.Tensor:
    """cu_seqlens: where each of the sequences packed back to back starts, and the total."""
    return torch.tensor([0, *accumulate(lengths)], dtype=torch.long, device=device)


def _positions(lengths: Sequence[int], firsts: Sequence[int], device) -> torch.Tensor:
    """Position ids of sequences packed back to back; sequence i starts at position firsts[i]."""
    lengths_t = torch.tensor(lengths, dtype=torch.long, device=device)
    starts = _offsets(lengths, device)[:-1] - torch.tensor(firsts, dtype=torch.long, device=device)
    return torch.arange(sum(lengths), device=device) - torch.repeat_interleave(starts, lengths_t)


def _on(device, ids: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sequences' ids (on any device) back to back as one (1, T) row on `device`: callers build
    ids on the CPU, and a pass makes one host-to-device copy, not one per item."""
    return torch.cat(ids).to(device)[None]


class PrefixPass:
    """Prefixes of `lengths` tokens packed in one row, each causal within itself: records every
    layer's K/V. Attending with an empty prefix K/V and the prefixes as the op's "items" gives
    exactly each prefix's own causal attention."""

    def __init__(self, lengths: Sequence[int], attention_op: AttentionOp, final_norm: bool = True, device=None):
        self.attention_op, self.final_norm = attention_op, final_norm
        self.cu_seqlens = _offsets(lengths, device)
        self.position_ids = _positions(lengths, [0] * len(lengths), device)
        self._recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, layer, query, key, value, scale, sliding_window):
        q, k, v = _rows(query, key, value)
        # copies: under compile=True the inputs are a compiled graph's buffers, which it may reuse
        # once the attention returns (attention_hook.py), while the items need these K/V later
        self._recorded[layer] = (k.clone(), v.clone())
        return self.attention_op(q, k, v, k[:0], v[:0], self.cu_seqlens, scale, sliding_window).unsqueeze(0)

    def recorded(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This pass's K/V at `layer`, every prefix's rows, once that layer has run."""
        return self._recorded[layer]

    def prefixes(self) -> list[PrefixKV]:
        """One PrefixKV per prefix, after the pass. Each slice is copied so that it owns exactly its
        bytes: a view would keep the whole packed row's K/V alive (in the LRU, say) and its size
        would not be what the LRU counts. A lone prefix keeps the recorded copies as they are."""
        cu = self.cu_seqlens.tolist()
        lone = len(cu) == 2
        return [
            PrefixKV(stop - start, MappingProxyType({
                layer: (k, v) if lone else (k[start:stop].clone(), v[start:stop].clone())
                for layer, (k, v) in self._recorded.items()
            }))
            for start, stop in zip(cu[:-1], cu[1:])
        ]


class ItemsPass:
    """Items packed in one row, grouped by prefix: `groups` is [(prefix, its items' lengths)], in
    row order. Item tokens take positions from their prefix's length on; each group (segment)
    attends to its own prefix's K/V and its own causal keys."""

    def __init__(
        self, groups: Sequence[tuple[PrefixKV, Sequence[int]]], attention_op: AttentionOp, final_norm: bool = True,
        device=None,
    ):
        self.attention_op, self.final_norm = attention_op, final_norm
        lengths = [n for _, group in groups for n in group]
        self.cu_seqlens = _offsets(lengths, device)  # all items: item i ends at row cu_seqlens[i + 1] - 1
        self.position_ids = _positions(lengths, [prefix.length for prefix, group in groups for _ in group], device)
        self.segments = []  # (prefix, first row, end row, its items' offsets from its first row)
        start = 0
        for prefix, group in groups:
            self.segments.append((prefix, start, start + sum(group), _offsets(group, device)))
            start += sum(group)

    def attend(self, layer, query, key, value, scale, sliding_window):
        q, k, v = _rows(query, key, value)
        out = []
        for prefix, start, stop, cu in self.segments:
            prefix_k, prefix_v = prefix.at(layer, k, v)
            rows = slice(start, stop)
            out.append(self.attention_op(q[rows], k[rows], v[rows], prefix_k, prefix_v, cu, scale, sliding_window))
        return (out[0] if len(out) == 1 else torch.cat(out)).unsqueeze(0)  # (1, T, H, D), as HF's attention returns


@dataclass(frozen=True, eq=False)
class _RowPrefix:
    """A prefix that runs in the same pass as its items: rows start:stop of its PrefixPass."""

    prefix_pass: PrefixPass
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    def at(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prefix_k, prefix_v = self.prefix_pass.recorded(layer)
        return prefix_k[self.start : self.stop], prefix_v[self.start : self.stop]


class JointPass:
    """Prefixes of `lengths` tokens, then items, in one row. `groups` as ItemsPass's, except that a
    group's prefix may be an int: the index of one of this row's prefixes. At each layer the
    prefixes attend first (PrefixPass), so that their K/V are there for the items (ItemsPass)."""

    def __init__(
        self, lengths: Sequence[int], groups: Sequence[tuple[PrefixKV | int, Sequence[int]]], attention_op: AttentionOp,
        final_norm: bool = True, device=None,
    ):
        self.final_norm = final_norm
        self.prefix_pass = PrefixPass(lengths, attention_op, final_norm, device)
        cu = self.prefix_pass.cu_seqlens.tolist()
        own = [_RowPrefix(self.prefix_pass, start, stop) for start, stop in zip(cu[:-1], cu[1:])]
        self.items_pass = ItemsPass(
            [(own[prefix] if isinstance(prefix, int) else prefix, group) for prefix, group in groups], attention_op, final_norm,
            device,
        )
        self.prefix_rows = cu[-1]
        self.position_ids = torch.cat([self.prefix_pass.position_ids, self.items_pass.position_ids])

    def attend(self, layer, query, key, value, scale, sliding_window):
        p = self.prefix_rows  # HF's (1, heads, T, D): rows are dim 2
        prefixes = self.prefix_pass.attend(layer, query[:, :, :p], key[:, :, :p], value[:, :, :p], scale, sliding_window)
        items = self.items_pass.attend(layer, query[:, :, p:], key[:, :, p:], value[:, :, p:], scale, sliding_window)
        return torch.cat([prefixes, items], dim=1)


def _pre_norm_states(norm: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on a decoder's final norm: in a pass whose state asks for pre-norm states, the
    norm's input replaces its output. The norm still runs (an elementwise op on the packed tokens,
    small beside one layer's matmuls), but nothing shared changes: the choice comes from this
    thread's pass, so concurrent calls, and other users of the model, are unaffected."""
    state = current()
    if isinstance(state, (PrefixPass, ItemsPass, JointPass)) and not state.final_norm:
        return args[0]
    return output


_norms_hooked: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


class PrefixRunner:
    """Prefix K/V and hidden states of packed items that continue them.

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

    def prefixes(self, prefix_ids: Sequence[torch.Tensor]) -> list[PrefixKV]:
        """Run the prefixes (1-D ids each, on any device) packed in one forward pass; one PrefixKV each."""
        nonempty = [ids for ids in prefix_ids if ids.numel()]
        if not nonempty:
            return [EMPTY_PREFIX] * len(prefix_ids)
        device = self.decoder.device
        state = PrefixPass([ids.numel() for ids in nonempty], self.attention_op, self.final_norm, device)
        with active(state):
            self.decoder(input_ids=_on(device, nonempty), position_ids=state.position_ids[None], use_cache=False)
        computed = iter(state.prefixes())
        return [next(computed) if ids.numel() else EMPTY_PREFIX for ids in prefix_ids]

    def prefix(self, prefix_ids: torch.Tensor) -> PrefixKV:
        return self.prefixes([prefix_ids])[0]

    def packed(self, groups: Sequence[tuple[PrefixKV, Sequence[torch.Tensor]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of the items of every (prefix, item ids) group packed back to back, in
        order, (T, hidden), and the items' offsets `cu_seqlens` (N+1): item i ends at row
        cu_seqlens[i + 1] - 1."""
        item_ids = [ids for _, group in groups for ids in group]
        device = self.decoder.device
        state = ItemsPass(
            [(prefix, [ids.numel() for ids in group]) for prefix, group in groups], self.attention_op, self.final_norm,
            device,
        )
        with active(state):
            out = self.decoder(input_ids=_on(device, item_ids), position_ids=state.position_ids[None], use_cache=False)
        return out.last_hidden_state[0], state.cu_seqlens

    def packed_with_prefixes(
        self, prefix_ids: Sequence[torch.Tensor], groups: Sequence[tuple[PrefixKV | int, Sequence[torch.Tensor]]],
    ) -> tuple[list[PrefixKV], torch.Tensor, torch.Tensor]:
        """`prefixes(prefix_ids)` and `packed(groups)` in one forward pass, where a group's prefix
        may also be an index into `prefix_ids`. Returns the prefixes' PrefixKV, and the items'
        hidden states and offsets as `packed` does (the prefixes' rows left out)."""
        nonempty = [n for n, ids in enumerate(prefix_ids) if ids.numel()]
        position = {n: i for i, n in enumerate(nonempty)}  # an empty prefix is EMPTY_PREFIX, not a row
        groups = [(position.get(prefix, EMPTY_PREFIX) if isinstance(prefix, int) else prefix, group) for prefix, group in groups]
        if not nonempty:
            return [EMPTY_PREFIX] * len(prefix_ids), *self.packed(groups)
        item_ids = [ids for _, group in groups for ids in group]
        device = self.decoder.device
        state = JointPass(
            [prefix_ids[n].numel() for n in nonempty], [(prefix, [ids.numel() for ids in group]) for prefix, group in groups],
            self.attention_op, self.final_norm, device,
        )
        with active(state):
            out = self.decoder(
                input_ids=_on(device, [*(prefix_ids[n] for n in nonempty), *item_ids]),
                position_ids=state.position_ids[None], use_cache=False,
            )
        computed = iter(state.prefix_pass.prefixes())
        prefixes = [next(computed) if ids.numel() else EMPTY_PREFIX for ids in prefix_ids]
        return prefixes, out.last_hidden_state[0, state.prefix_rows :], state.items_pass.cu_seqlens

    def items(self, prefix: PrefixKV, item_ids: Sequence[torch.Tensor]) -> torch.Tensor:
        """Hidden state at the last token of each item of one prefix, (N, hidden)."""
        hidden, cu = self.packed([(prefix, item_ids)])
        return hidden[cu[1:] - 1]
