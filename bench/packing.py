"""Multi-prefix packing: `Scorer.score_many` over several queries against `Scorer.score` called per
query, the same model in the same run, items per CPU-second each way; and `score_many` again with the
prefixes in the LRU of recent prefixes (a repeated batch: what `prefix_cache_mb` saves).

    OMP_NUM_THREADS=1 python bench/packing.py                  # the embedded default model, fp32, 8 x 10
    python bench/packing.py --checkpoint /tmp/tiny --queries 4 --items 5 --repeats 1   # a smoke run

Per query, `score` runs one prefix pass and one items pass (one query's 10 items fit the token
budget), so 8 queries take 16 decoder passes; `score_many` packs the 8 prefixes into one pass and
all 80 items into another (when they fit the budget). Both compute the same tokens; packing saves
the per-pass overhead and gives the matmuls more rows. Queries and items: real Home Depot data
when ../shared/data is there, else synthetic (bench/workload.py). The two ways alternate, each
timed `--repeats` times after a warm-up in CPU time (this process's: on a shared machine wall
time counts the other jobs too); the median is reported, with the largest difference of
their probabilities (the exactness contract: <= 1e-5 in fp32).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import numpy as np
import torch

from darl_infer import Scorer
from workload import texts


def cpu_name() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the embedded default model")
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--items", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    scorer = Scorer.from_pretrained(args.checkpoint, backend="torch", dtype="fp32")
    # the same model behind a Scorer that keeps recent prefixes
    cached = Scorer(scorer.backend.model, scorer.encoder.tokenizer, scorer.spec, backend="torch", prefix_cache_mb=1024)
    batch, source = texts(args.queries, args.items)
    n_items = sum(len(items) for _, items in batch)
    scorer.score_many(batch[:1])  # warm-up
    cached.score_many(batch)  # fills its LRU: every later call finds all its prefixes there

    def one_by_one():
        return [scorer.score(query, items) for query, items in batch]

    ways = {
        "score per query": one_by_one,
        "score_many": lambda: scorer.score_many(batch),
        "score_many, LRU": lambda: cached.score_many(batch),
    }
    seconds, results = {name: [] for name in ways}, {}
    for _ in range(args.repeats):
        for name, run in ways.items():
            start = time.process_time()
            results[name] = run()
            seconds[name].append(time.process_time() - start)
    looped = results["score per query"]
    diff = max(float(np.abs(a.probs - b.probs).max()) for r in results.values() for a, b in zip(r, looped))
    print(f"{cpu_name()}, {args.threads} thread(s), torch {torch.__version__}, fp32, token_budget "
          f"{scorer.backend.token_budget}; {args.queries} queries x {args.items} items, {source}")
    for name, times in seconds.items():
        t = statistics.median(times)
        speedup = statistics.median(seconds["score per query"]) / t
        print(f"{name:>16}: {t:7.2f} CPU-s  {n_items / t:6.2f} items/CPU-s  {speedup:5.2f}x  "
              f"(runs: {', '.join(f'{x:.2f}' for x in times)})")
    print(f"max |Δprob| against score per query: {diff:.2g}; LRU: {cached.prefix_cache_stats()}")


if __name__ == "__main__":
    main()
