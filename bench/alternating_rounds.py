"""Variants of a scorer timed in alternating rounds in one process (the machine's drift hits them
all alike), and their deviation from the fp32 reference backend: the measurement of
bench/cpu_kernels.py and bench/mlp_post_ops.py. `use(name)` switches to a variant and returns the
scorer that runs it."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from darl_infer import Scorer


def time_rounds(use: Callable[[str], Scorer], names: Sequence[str], queries: list[dict], rounds: int, label: str) -> None:
    """Print each variant's ms per query over `rounds` rounds (min, median, each), after a warm-up round."""
    times = {name: [] for name in names}
    for round_ in range(rounds + 1):  # round 0 warms up (and compiles)
        for name in names:
            scorer = use(name)
            start = time.perf_counter()
            for q in queries:
                scorer.score(q["query"], q["items"])
            if round_:
                times[name].append(1000 * (time.perf_counter() - start) / len(queries))
    for name, ms in times.items():
        print(f"model, {label}: {name} min {min(ms):.0f} median {np.median(ms):.0f} ms/query "
              f"(rounds: {' '.join(f'{t:.0f}' for t in ms)})")


def print_deviation(use: Callable[[str], Scorer], names: Sequence[str], queries: list[dict], reference: Scorer,
                    tolerance: float) -> None:
    """Print each variant's per-item max |Δprob| against `reference`: max, mean, items past `tolerance`."""
    oracle = [reference.score(q["query"], q["items"]).probs for q in queries]
    for name in names:
        scorer = use(name)
        d = np.concatenate([np.abs(scorer.score(q["query"], q["items"]).probs - o).max(1) for q, o in zip(queries, oracle)])
        print(f"vs the fp32 reference, {d.size} items: {name} max {d.max():.2e} mean {d.mean():.2e}, "
              f"past {tolerance:g}: {(d > tolerance).sum()}")
