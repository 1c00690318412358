"""The Triton kernels against their PyTorch references at the default model's shapes.

gemma3-270m: 18 layers (15 sliding-window, 3 global), hidden 640, 4 query / 1 KV head, head dim
256, K = 3 grades, bf16; one query: prefix 64 tokens, N = 100 items of 20 tokens.

    pytest bench/bench_kernels.py --benchmark-only      # GPU timings (skipped without CUDA)
    python bench/bench_kernels.py                       # bytes and launches per op, any machine

The byte counts of the PyTorch paths are measured, not guessed: every aten op they run is logged
with the bytes of its tensor inputs and outputs (eager GPU execution reads and writes each of them
in HBM, one kernel launch or more per op). The Triton kernels read each input once from HBM and
write their outputs once; re-reads that hit L2 are listed apart.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from darl_infer.kernels.classification_head import classification_head, classification_head_reference
from darl_infer.kernels.shared_prefix_attention import shared_prefix_attention, shared_prefix_attention_reference

LAYERS, SLIDING_LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, GRADES = 18, 15, 640, 4, 1, 256, 3
WINDOW, SCALE, EPS = 512, 256**-0.5, 1e-6
PREFIX, N_ITEMS, ITEM_TOKENS = 64, 100, 20
DTYPE = torch.bfloat16


def attention_args(device):
    T = N_ITEMS * ITEM_TOKENS
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=DTYPE)  # noqa: E731
    cu = torch.tensor([0, *itertools.accumulate([ITEM_TOKENS] * N_ITEMS)], device=device)
    return (rand(T, HEADS, HEAD_DIM), rand(T, KV_HEADS, HEAD_DIM), rand(T, KV_HEADS, HEAD_DIM),
            rand(PREFIX, KV_HEADS, HEAD_DIM), rand(PREFIX, KV_HEADS, HEAD_DIM), cu, SCALE, WINDOW)


def head_args(device):
    hidden = torch.randn(N_ITEMS * ITEM_TOKENS, HIDDEN, device=device, dtype=DTYPE)
    cu = torch.tensor([0, *itertools.accumulate([ITEM_TOKENS] * N_ITEMS)], device=device)
    norm_weight = 0.1 * torch.randn(HIDDEN, device=device, dtype=DTYPE)
    score_weight = torch.randn(GRADES, HIDDEN, device=device, dtype=DTYPE) / HIDDEN**0.5
    return hidden, cu, norm_weight, EPS, "gemma", score_weight, torch.arange(GRADES, device=device, dtype=torch.float32)


def unfused_head(hidden, cu, norm_weight, eps, variant, score_weight, grade_values):
    """The path before the fused head: the decoder's Gemma3RMSNorm over all T packed tokens, then
    gather, projection, softmax, expected grade (as HF and the earlier torch backend ran it)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = Gemma3RMSNorm(HIDDEN, eps).to(hidden)
    norm.weight.data = norm_weight
    probs = torch.nn.functional.linear(norm(hidden)[cu[1:] - 1], score_weight).float().softmax(-1)
    return probs, probs @ grade_values


# --- GPU timings ---------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU timings need CUDA")


def timed(benchmark, fn, args):
    def run():
        fn(*args)
        torch.cuda.synchronize()

    run()  # compile and autotune outside the timing
    benchmark(run)


@cuda
@pytest.mark.parametrize("op", [shared_prefix_attention, shared_prefix_attention_reference], ids=["triton", "torch"])
def test_attention_layer(benchmark, op):
    timed(benchmark, op, attention_args("cuda"))


@cuda
@pytest.mark.parametrize(
    "op", [classification_head, classification_head_reference, unfused_head], ids=["triton", "torch", "unfused"]
)
def test_classification_head(benchmark, op):
    timed(benchmark, op, head_args("cuda"))


# --- bytes and launches --------------------------------------------------------------------------

_NO_DATA_MOVED = {"view", "_unsafe_view", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
                  "squeeze", "t", "as_strided", "alias", "detach", "_reshape_alias", "lift_fresh", "unbind", "split"}


class TrafficCounter(TorchDispatchMode):
    """Bytes of tensor inputs + outputs and the number of ops that move data, over aten calls."""

    def __init__(self):
        super().__init__()
        self.bytes = self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name not in _NO_DATA_MOVED:
            if name == "index":  # a gather reads only the rows it returns, plus the indices
                self.bytes += 2 * nbytes(out) + nbytes(*torch.utils._pytree.tree_leaves(args[1]))
            else:
                self.bytes += nbytes(*torch.utils._pytree.tree_leaves((args, kwargs, out)))
            self.launches += 1
        return out


def measured(fn, args):
    with TrafficCounter() as counter:
        fn(*args)
    return counter.bytes, counter.launches


def nbytes(*tensors):
    return sum(x.numel() * x.element_size() for x in tensors if isinstance(x, torch.Tensor))


def traffic_table():
    q, k, v, pk, pv, cu, scale, window = attention_args("cpu")
    out_bytes = nbytes(q)
    MB = 1e6
    rows = []
    for label, w, layers in [("sliding layer", window, SLIDING_LAYERS), ("global layer", None, LAYERS - SLIDING_LAYERS)]:
        ref_bytes, ref_launches = measured(shared_prefix_attention_reference, (q, k, v, pk, pv, cu, scale, w))
        rows.append((f"attention, torch reference, {label} (x{layers})", ref_bytes / MB, ref_launches))
    kernel_bytes = nbytes(q, k, v, pk, pv, cu) + out_bytes
    per_item_prefix = N_ITEMS * nbytes(pk, pv)
    # a fused attention (FlashAttention) over a batch of items whose cache holds a prefix copy each:
    # the copies are written, then read
    flash_bytes = nbytes(q, k, v, cu) + out_bytes + 2 * per_item_prefix
    rows.append(("attention, fused per item, prefix K/V copied per item", flash_bytes / MB, 2))
    rows.append(("attention, Triton kernel, any layer (x18)", kernel_bytes / MB, 1))
    rows.append(("  prefix K/V if every item read its own copy", per_item_prefix / MB, None))
    rows.append(("  prefix K/V, Triton kernel: HBM once (L2 re-reads per tile below)", nbytes(pk, pv) / MB, None))
    tiles = -(-q.shape[0] * HEADS // KV_HEADS // 64) * KV_HEADS
    rows.append((f"  L2 -> SM prefix re-reads, {tiles} tiles of 64 rows", tiles * nbytes(pk, pv) / MB, None))

    args = head_args("cpu")
    for label, fn in [("head, unfused (norm over all T tokens)", unfused_head), ("head, torch reference", classification_head_reference)]:
        b, n = measured(fn, args)
        rows.append((label, b / MB, n))
    hidden, cu, norm_weight, _, _, score_weight, grades = args
    last_rows = N_ITEMS * HIDDEN * hidden.element_size()
    head_kernel = last_rows + nbytes(cu, norm_weight, score_weight, grades) + N_ITEMS * (GRADES + 1) * 4
    rows.append(("head, Triton kernel", head_kernel / MB, 1))
    return rows


def flops():
    T = N_ITEMS * ITEM_TOKENS
    prefix = 4 * T * HEADS * PREFIX * HEAD_DIM  # QK^T and PV over the prefix
    own = 4 * N_ITEMS * ITEM_TOKENS * (ITEM_TOKENS + 1) // 2 * HEADS * HEAD_DIM  # causal, visible pairs only
    return prefix, own


if __name__ == "__main__":
    print(f"gemma3-270m, bf16, prefix {PREFIX} tokens, {N_ITEMS} items x {ITEM_TOKENS} tokens")
    print(f"{'op':70s} {'MB':>9s} {'launches':>9s}")
    for label, mb, launches in traffic_table():
        print(f"{label:70s} {mb:9.3f} {'' if launches is None else launches:>9}")
    prefix, own = flops()
    print(f"attention FLOPs per layer: prefix {prefix / 1e6:.0f} M + own causal {own / 1e6:.0f} M")
