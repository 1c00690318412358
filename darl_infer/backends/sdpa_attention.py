"""Shared-prefix attention through PyTorch's fused `scaled_dot_product_attention` (the torch
backend's op on the CPU): the same math as kernels/shared_prefix_attention.py's reference, in the
input dtype, with the softmax, scaling and masking fused in one kernel instead of separate passes
and fp32 round trips.

Items are padded to the longest item of the call (the torch backend's chunks are length-sorted, so
little is wasted); each item's keys are its prefix's K/V followed by its own, under one mask:
the prefix visible (inside the sliding window), its own keys causal. A padded row of a short item
sees the prefix, so no row is empty, and it is dropped before the result is returned. With
grouped-query attention the query heads that share a KV head attend as one longer query
(bench/RESULTS.md, issue 16: the op 1.5x faster in bf16 on an AMX Xeon).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from darl_infer.kernels.shared_prefix_attention import padded_slots


def shared_prefix_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q (T, H, D), k/v (T, Hkv, D) of N packed items (`cu_seqlens`, N + 1 offsets); prefix_k/v
    (P, Hkv, D), P may be 0. Returns (T, H, D)."""
    T, H, D = q.shape
    P, Hkv = prefix_k.shape[0], k.shape[1]
    G = H // Hkv
    slot, real = padded_slots(cu_seqlens.to(device=q.device, dtype=torch.long))  # (N, L) rows of the padded items
    N, L = slot.shape
    rows = slot.reshape(-1)  # index_select on flat rows: several times faster than q[slot] on the CPU
    # the G query heads of a KV head folded into the query rows (row g * L + l): one attention
    # problem per (item, KV head) instead of G small ones over the same keys. q's rows gathered
    # straight into that order, one copy (q as the model gives it, (T, H, D), is a free (T * H, D) view)
    heads = torch.arange(H, device=q.device).view(Hkv, G, 1)
    qi = q.reshape(T * H, D).index_select(0, (slot[:, None, None, :] * H + heads).reshape(-1)).view(N, Hkv, G * L, D)
    ki = k.index_select(0, rows).view(N, L, Hkv, D).transpose(1, 2)  # (N, Hkv, L, D)
    vi = v.index_select(0, rows).view(N, L, Hkv, D).transpose(1, 2)
    if P:
        ki = torch.cat([prefix_k.transpose(0, 1).expand(N, Hkv, P, D), ki], dim=2)
        vi = torch.cat([prefix_v.transpose(0, 1).expand(N, Hkv, P, D), vi], dim=2)
    query_pos = torch.arange(L, device=q.device)[:, None] + P  # positions from the prefix's start
    key_pos = torch.arange(P + L, device=q.device)[None, :]
    visible = key_pos <= query_pos  # the prefix (key_pos < P <= query_pos) and the own causal keys
    if sliding_window is not None:
        visible &= key_pos > query_pos - sliding_window
    out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=visible.repeat(G, 1), scale=scale)  # (N, Hkv, G * L, D)
    # back to (T, H, D), the real rows only, in one gather: token (n, l), head h is row n*H*L + h*L + l
    token_rows = (torch.arange(N, device=q.device)[:, None] * (H * L) + torch.arange(L, device=q.device))[real]
    gather = (token_rows[:, None] + torch.arange(H, device=q.device) * L).reshape(-1)
    return out.reshape(N * H * L, D).index_select(0, gather).view(T, H, D)
