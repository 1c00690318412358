"""Where a query's time goes on a CUDA GPU: host (tokenizing, Python, launches) against GPU kernels.

    python bench/gpu_profile.py --out bench/results/gpu_profile_<date>.md
    python bench/gpu_profile.py --dry-run --items 10 30          # the script on the CPU, no CUDA

The model is bench/gpu.py's: random-init at gemma3-270m's real config, word-level tokenizer, bf16.
Per backend and N: the median of 5 timed queries (after warm-ups at that N), of which encoding
(tokenizing the query and items) alone; then one query under torch.profiler: the GPU's busy time
(the sum of its kernels' times) against the wall time, and the ops by self CPU and by self GPU time.
Also each backend's max |Δprob| against the reference in bf16 (every pair alone through HF in the
same dtype): the error the fast path adds, apart from bf16's own (the fp32 column of bench/gpu.py).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu import gpu_line, make_checkpoints, make_queries, synchronize  # noqa: E402

from darl_infer import Scorer  # noqa: E402


def median_s(fn, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profiled(fn, device: str, rows: int) -> list[str]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        synchronize()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    # the kernels' own rows (an aten op's row repeats its kernels' time)
    busy = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"))
    out = [f"wall {1e3 * wall:.1f} ms under the profiler; GPU kernels busy {1e3 * busy:.1f} ms ({100 * busy / wall:.0f} %); "
           f"{launches} kernel launches", "", "```", "by self CPU time:",
           events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)]
    if device == "cuda":
        out += ["by self GPU time:", events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60)]
    return out + ["```"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--backends", nargs="+", default=["triton", "torch"])
    ap.add_argument("--items", type=int, nargs="+", default=[10, 1000])
    ap.add_argument("--instruction-tokens", type=int, default=64)
    ap.add_argument("--token-budget", type=int, default=None, help="tokens per forward pass (default: the backend's)")
    ap.add_argument("--rows", type=int, default=15, help="ops listed per table")
    ap.add_argument("--work-dir", default="/tmp/darl_gpu_profile")
    ap.add_argument("--dry-run", action="store_true", help="without CUDA: the torch backend on the CPU")
    ap.add_argument("--out", help="also write the report (markdown) here, updated as it goes")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        sys.exit("bench/gpu_profile.py needs a CUDA GPU (--dry-run: the script on the CPU)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = args.backends if device == "cuda" else [b for b in args.backends if b != "triton"]

    lines = [f"- command: `python bench/gpu_profile.py {' '.join(sys.argv[1:])}`",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- GPU: {gpu_line() if device == 'cuda' else 'none (dry run on the CPU)'}",
             f"- {args.model} random-init, bf16, instruction {args.instruction_tokens} tokens, token budget {args.token_budget or 'the default'}", ""]

    def report(line: str = "") -> None:
        lines.append(line)
        print(line, flush=True)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")

    checkpoint = make_checkpoints(Path(args.work_dir), args.model, [args.instruction_tokens])[args.instruction_tokens]
    checks = make_queries(3, 10, seed=7)
    reference = Scorer.from_pretrained(checkpoint, backend="reference", dtype="bf16", device=device)
    expected = [reference.score(q, items).probs for q, items in checks]
    del reference
    for backend in backends:
        options = {} if args.token_budget is None else {"token_budget": args.token_budget}
        scorer = Scorer.from_pretrained(checkpoint, backend=backend, dtype="bf16", device=device, **options)
        diff = max(float(np.abs(scorer.score(q, items).probs - e).max()) for (q, items), e in zip(checks, expected))
        report(f"## {backend}: max |Δprob| against the bf16 reference (3 queries x 10 items): {diff:.1e}")
        for n_items in args.items:
            (query, items), = make_queries(1, n_items, seed=n_items)
            for _ in range(2):
                scorer.score(query, items)  # warm-up: kernels compiled and tuned, allocator filled
            total = median_s(lambda: scorer.score(query, items))
            encode = median_s(lambda: scorer.encoder.encode(query, items))
            report(f"### {backend}, N = {n_items}: {1e3 * total:.1f} ms per query, of which encoding {1e3 * encode:.1f} ms")
            for line in profiled(lambda: scorer.score(query, items), device, args.rows):
                report(line)
        del scorer
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
