"""Shared-prefix attention: every item of a query attends to one copy of the prefix KV.

Items are packed without padding: `q`, `k`, `v` hold the tokens of all items back to back and
`cu_seqlens` (N+1 offsets) marks where each item starts. Token t of item i sits at absolute
position P + t, P = prefix length. Attention splits into (all item queries x prefix keys), one
large matmul over a single KV copy, and (item x its own keys), causal; the two partial results
are merged by log-sum-exp (Hydragen, Juravsky et al. 2024; FlashInfer's cascade attention).
Since the model is causal this equals full attention over prefix + item, exactly.

Shapes: q (T, H, D); k, v (T, Hkv, D); prefix_k, prefix_v (P, Hkv, D); H a multiple of Hkv
(GQA/MQA). `sliding_window` W: a query at position p sees keys at positions > p - W (HF's rule).

`shared_prefix_attention_reference` is the PyTorch version (the oracle of the Triton kernel and of
the torch backend's fused SDPA op, darl_infer/backends/sdpa_attention.py);
`shared_prefix_attention` is the Triton kernel with the same signature (the triton backend's).
"""

from __future__ import annotations

import math

import torch

from darl_infer.kernels._triton import INTERPRETED, LAUNCH_LOCK, tl, triton

LOG2_E = math.log2(math.e)  # the kernel works in base 2: exp(x) = exp2(x * log2(e))


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


def padded_slots(cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed items (N + 1 offsets `cu`, long) padded to the longest, L: the (N, L) row of each
    item position (row 0 past an item's end) and the (N, L) mask of the real positions."""
    lengths = cu[1:] - cu[:-1]
    pos = torch.arange(int(lengths.max()) if lengths.numel() else 0, device=cu.device)
    real = pos[None, :] < lengths[:, None]
    return torch.where(real, cu[:-1, None] + pos[None, :], torch.zeros((), dtype=cu.dtype, device=cu.device)), real


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
    slot, real = padded_slots(cu)
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


# --- Triton kernel -------------------------------------------------------------------------------
# Grid (row tiles, KV heads). A row is one (item token, query head) pair; the G = H / Hkv query heads
# that share a KV head are folded into the rows, so a tile of BLOCK_M rows holds BLOCK_M / G packed
# tokens, usually of several items. Each tile streams (a) the prefix K/V of its KV head, one copy
# read once per tile for every item in it, and (b) the packed item keys from the first item start
# in the tile up to its last token, masked to each row's own item and causal. One online softmax
# runs over both, so the two partial attentions are merged exactly as log-sum-exp merging would.

_HALF_CONFIGS = [  # fp16/bf16: tensor-core tiles; every one fits an A100's or H100's shared memory
    triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
    for block_m, block_n, warps, stages in [
        (64, 64, 4, 2),  # first: the interpreter's only config (it cannot time kernels)
        (128, 64, 8, 2),
        (128, 64, 8, 3),
        (128, 32, 4, 3),
        (64, 32, 4, 3),
        (64, 64, 4, 3),
    ]
]
# fp32 (the exactness path, IEEE products on the FMA units): small tiles. At head dim 256 the half
# tiles above need 205-426 KB of shared memory in fp32 (over an H100's 227 KB) and 20-110 s to
# compile; this one needs 100 KB and ~6 s (ptxas for sm_90, measured offline with triton.compile).
_FP32_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)]


def _configs_for_dtype(configs, named_args, **kwargs):
    if len(configs) == 1:  # the interpreter's
        return configs
    fp32 = named_args["q"].element_size() == 4
    return [c for c in configs if (c in _FP32_CONFIGS) == fp32]


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_base, v_base, keys, key_end, stride_kt, stride_vt, visible, d, d_valid,
                  scale_log2, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """One online-softmax step of q against keys[]; returns the updated (acc, running max, running sum)."""
    load_mask = (keys < key_end)[:, None] & d_valid[None, :]
    k = tl.load(k_base + keys[:, None] * stride_kt + d[None, :], mask=load_mask, other=0.0)
    v = tl.load(v_base + keys[:, None] * stride_vt + d[None, :], mask=load_mask, other=0.0)
    if DOT_IN_FP32:  # the interpreter cannot multiply bf16 (triton#11584); fp32 gives the same products
        q, k = q.to(tl.float32), k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)  # P @ V in the inputs' dtype (tensor cores for fp16/bf16), fp32 accumulator
    if DOT_IN_FP32:
        p, v = p.to(tl.float32), v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.autotune(
    configs=_HALF_CONFIGS + _FP32_CONFIGS if not INTERPRETED else _HALF_CONFIGS[:1],
    key=["HEAD_DIM", "GROUP"],  # and the tensors' dtypes, which the autotuner adds to its key
    prune_configs_by={"early_config_prune": _configs_for_dtype},
)
# lengths and offsets change with every call: specialising on them (== 1, % 16) would recompile
@triton.jit(do_not_specialize=["T", "P", "N", "search_steps", "prefix_start", "window"])
def _shared_prefix_attention_kernel(
    q, k, v, prefix_k, prefix_v, out, cu_seqlens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_pkt, stride_pkh, stride_pvt, stride_pvh, stride_ot, stride_oh,
    T, P, N, search_steps, prefix_start, window, scale_log2,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    token = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = token < T
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM

    # start of each row's item: binary search for the last i with cu_seqlens[i] <= token
    lo = tl.zeros([BLOCK_M], dtype=tl.int32)
    hi = tl.full([BLOCK_M], N, dtype=tl.int32)
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        past = tl.load(cu_seqlens + mid) <= token
        lo = tl.where(past, mid, lo)
        hi = tl.where(past, hi, mid)
    item_start = tl.load(cu_seqlens + lo).to(tl.int32)
    query_pos = P + token - item_start

    q_tile = tl.load(
        q + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_valid[:, None] & d_valid[None, :], other=0.0,
    )
    # finite start: a row that sees no key in a block keeps exp2(m_i - m_new) well defined
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # (a) the prefix: keys 0..P-1 at their own positions; those at or before prefix_start - 1 are
    # outside every row's sliding window
    for start in range(prefix_start, P, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        visible = (keys[None, :] < P) & (keys[None, :] > query_pos[:, None] - window)
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q_tile, prefix_k + kv_head * stride_pkh, prefix_v + kv_head * stride_pvh, keys, P,
            stride_pkt, stride_pvt, visible, d, d_valid, scale_log2, DOT_PRECISION, DOT_IN_FP32,
        )

    # (b) the items' own keys, causal: from the first item start in the tile (or the earliest key
    # inside the first row's window) to the tile's last token
    first_token = tile * BLOCK_M // GROUP
    key_end = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP, T - 1) + 1
    own_start = tl.maximum(tl.min(item_start, axis=0), first_token - window + 1)
    for start in range(own_start, key_end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        visible = (
            (keys[None, :] >= item_start[:, None])
            & (keys[None, :] <= token[:, None])
            & (keys[None, :] > token[:, None] - window)
        )
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q_tile, k + kv_head * stride_kh, v + kv_head * stride_vh, keys, key_end,
            stride_kt, stride_vt, visible, d, d_valid, scale_log2, DOT_PRECISION, DOT_IN_FP32,
        )

    # every row sees at least its own key, so l_i > 0 for real rows
    tl.store(
        out + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        (acc / l_i[:, None]).to(out.dtype.element_ty),
        mask=row_valid[:, None] & d_valid[None, :],
    )


def shared_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The Triton kernel; same arguments and result as `shared_prefix_attention_reference`."""
    T, H, D = q.shape
    P, Hkv = prefix_k.shape[0], k.shape[1]
    if H % Hkv or k.shape != (T, Hkv, D) or v.shape != k.shape or prefix_k.shape != (P, Hkv, D) or prefix_v.shape != prefix_k.shape:
        raise ValueError(
            f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"prefix_k {tuple(prefix_k.shape)}, prefix_v {tuple(prefix_v.shape)}"
        )
    if len({x.dtype for x in (q, k, v, prefix_k, prefix_v)}) != 1:
        raise ValueError("q, k, v, prefix_k and prefix_v must share one dtype")
    N = cu_seqlens.numel() - 1
    if N < 1 or T == 0:
        raise ValueError("need at least one item with at least one token")
    # the kernel addresses the head dim with unit stride; HF's (1, H, T, D) tensors already have it
    q, k, v, prefix_k, prefix_v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, prefix_k, prefix_v))
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    # no window: one wider than any position, so the window masks are always true
    window = sliding_window if sliding_window is not None else P + T + 1
    G = H // Hkv
    grid = lambda meta: (triton.cdiv(T * G, meta["BLOCK_M"]), Hkv)  # noqa: E731
    with LAUNCH_LOCK:
        _shared_prefix_attention_kernel[grid](
            q, k, v, prefix_k, prefix_v, out, cu,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            prefix_k.stride(0), prefix_k.stride(1), prefix_v.stride(0), prefix_v.stride(1), out.stride(0), out.stride(1),
            T, P, N, (N - 1).bit_length(), max(P - window + 1, 0), window, scale * LOG2_E,
            HEAD_DIM=D, GROUP=G, BLOCK_D=max(16, triton.next_power_of_2(D)),
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # no TF32 rounding for fp32 models
            DOT_IN_FP32=INTERPRETED and q.dtype == torch.bfloat16,
        )
    return out


# --- C++ kernel (CPU) ----------------------------------------------------------------------------
# kernels/shared_prefix_attention_cpu.cpp: blocks of whole items, four MKL matmuls per block and KV
# head around one softmax pass; the prefix K/V read in place, no padding, no gathers


def shared_prefix_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The C++ kernel (kernels/cpu_extension.py must have built it: `has("shared_prefix_attention")`);
    same arguments and result as `shared_prefix_attention_reference`, fp32 or bf16 inputs."""
    return torch.ops.darl_infer_cpu.shared_prefix_attention(q, k, v, prefix_k, prefix_v, cu_seqlens, scale, sliding_window or 0)
