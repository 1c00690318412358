"""Shared-prefix attention: every item of a query attends to one copy of the prefix KV.

Items are packed without padding: `q`, `k`, `v` hold the tokens of all items back to back and
`cu_seqlens` (N+1 offsets) marks where each item starts. Token t of item i sits at absolute
position P + t, P = prefix length. Attention splits into (all item queries x prefix keys), one
large matmul over a single KV copy, and (item x its own keys), causal; the two partial results
are merged by log-sum-exp (Hydragen, Juravsky et al. 2024; FlashInfer's cascade attention).
Since the model is causal this equals full attention over prefix + item, exactly.

Shapes: q (T, H, D); k, v (T, Hkv, D); prefix_k, prefix_v (P, Hkv, D); H a multiple of Hkv
(GQA/MQA). `sliding_window` W: a query at position p sees keys at positions > p - W (HF's rule).
"""

from __future__ import annotations

import torch


def _partial_attention(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scores) @ v and the log-sum-exp of each row; fully masked rows give 0 and -inf."""
    if scores.shape[-1] == 0:  # no keys at all (an empty prefix)
        return scores.new_zeros(*scores.shape[:-1], v.shape[-1]), scores.new_full(scores.shape[:-1], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    total = p.sum(dim=-1, keepdim=True)
    out = (p @ v) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return out, (row_max + torch.log(total)).squeeze(-1)


def shared_prefix_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    T, H, D = q.shape
    P, Hkv = prefix_k.shape[0], k.shape[1]
    G = H // Hkv
    out_dtype = q.dtype
    q, k, v, prefix_k, prefix_v = (x.float() for x in (q, k, v, prefix_k, prefix_v))
    cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    N, L = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    item_of_token = torch.repeat_interleave(torch.arange(N, device=q.device), lengths)
    local_pos = torch.arange(T, device=q.device) - cu[:-1][item_of_token]

    # (a) all item queries against the one prefix copy: (Hkv, T*G, D) @ (Hkv, D, P)
    qg = q.view(T, Hkv, G, D).permute(1, 0, 2, 3).reshape(Hkv, T * G, D)
    s_pre = (qg @ prefix_k.permute(1, 2, 0)) * scale
    if sliding_window is not None and P > 0:
        query_pos = (P + local_pos).repeat_interleave(G)  # (T*G,)
        visible = torch.arange(P, device=q.device)[None, :] > query_pos[:, None] - sliding_window
        s_pre = s_pre.masked_fill(~visible, float("-inf"))
    o_pre, lse_pre = _partial_attention(s_pre, prefix_v.permute(1, 0, 2))
    o_pre = o_pre.view(Hkv, T, G, D).permute(1, 0, 2, 3).reshape(T, H, D)
    lse_pre = lse_pre.view(Hkv, T, G).permute(1, 0, 2).reshape(T, H)

    # (b) each item against its own keys, causal: pad items to L inside this op only
    slot = cu[:-1, None] + torch.arange(L, device=q.device)[None, :]  # (N, L)
    real = torch.arange(L, device=q.device)[None, :] < lengths[:, None]
    slot = torch.where(real, slot, torch.zeros_like(slot))
    qi = q[slot].view(N, L, Hkv, G, D).permute(0, 2, 3, 1, 4)  # (N, Hkv, G, L, D)
    ki = k[slot].permute(0, 2, 1, 3).unsqueeze(2)  # (N, Hkv, 1, L, D)
    vi = v[slot].permute(0, 2, 1, 3).unsqueeze(2)
    s_own = (qi @ ki.transpose(-1, -2)) * scale  # (N, Hkv, G, L, L)
    pos = torch.arange(L, device=q.device)
    visible = pos[None, :] <= pos[:, None]
    if sliding_window is not None:
        visible &= pos[None, :] > pos[:, None] - sliding_window
    visible = visible[None] & real[:, None, :]
    s_own = s_own.masked_fill(~visible[:, None, None], float("-inf"))
    o_own, lse_own = _partial_attention(s_own, vi)
    o_own = o_own.permute(0, 3, 1, 2, 4).reshape(N, L, H, D)[real]  # (T, H, D)
    lse_own = lse_own.permute(0, 3, 1, 2).reshape(N, L, H)[real]

    # merge: each token's own key always takes part, so lse is finite
    lse = torch.logaddexp(lse_pre, lse_own)
    out = o_pre * torch.exp(lse_pre - lse)[..., None] + o_own * torch.exp(lse_own - lse)[..., None]
    return out.to(out_dtype)
