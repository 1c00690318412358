"""Items/s of each darl_infer backend on one checkpoint, same inputs, one run.

    python bench/speed.py --items 100 --item-tokens 20 --instruction-tokens 64 --dtypes fp32 bf16

The instruction is padded to `--instruction-tokens` with a neutral sentence (same weights, same
template otherwise), so the prefix share of the work matches the case being measured. Items are
real homedepot titles when ../shared/data is present, else synthetic text of the same length.
Reports items/s, p50 ms per query and the max |dprob| of each backend against `reference`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from darl_infer import Scorer
from darl_infer.checkpoint import CheckpointSpec
from darl_infer.model import load_checkpoint_model, resolve_dtype
from darl_infer.scorer import resolve_checkpoint

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "homedepot" / "dev.jsonl"
FILLER = " Read the query and the item carefully, consider the intent of the user and the attributes of the item."


def queries_and_items(tokenizer, n_queries: int, n_items: int, item_tokens: int, seed: int = 0):
    rng = random.Random(seed)
    if DATA.is_file():
        rows = [json.loads(line) for line in DATA.open()]
        titles = [r["item"] for r in rows]
        queries = rng.sample(sorted({r["query"] for r in rows}), n_queries)
    else:
        words = "cordless drill steel pipe white paint brush light bulb door handle tile floor wood deck".split()
        titles = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(2000)]
        queries = [" ".join(rng.choice(words) for _ in range(3)) for _ in range(n_queries)]
    cut = []  # each item cut to ~item_tokens tokens
    for title in rng.sample(titles, min(len(titles), n_items * n_queries)):
        ids = tokenizer(title, add_special_tokens=False).input_ids[:item_tokens]
        cut.append(tokenizer.decode(ids))
    return [(q, [cut[(i * n_items + j) % len(cut)] for j in range(n_items)]) for i, q in enumerate(queries)]


def padded_instruction(spec: CheckpointSpec, tokenizer, tokens: int) -> CheckpointSpec:
    text = spec.template.instruction
    while len(tokenizer(text, add_special_tokens=False).input_ids) < tokens:
        text += FILLER
    ids = tokenizer(text, add_special_tokens=False).input_ids[:tokens]
    return dataclasses.replace(spec, template=dataclasses.replace(spec.template, instruction=tokenizer.decode(ids)))


def time_backend(scorer: Scorer, batch, repeats: int) -> tuple[list[float], list[np.ndarray]]:
    scorer.score(*batch[0])  # warm-up
    latencies, probs = [], []
    for _ in range(repeats):
        for query, items in batch:
            t = time.perf_counter()
            probs.append(scorer.score(query, items).probs)
            latencies.append(time.perf_counter() - t)
    return latencies, probs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--backends", nargs="+", default=["reference", "torch"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--item-tokens", type=int, default=20)
    ap.add_argument("--instruction-tokens", type=int, default=64)
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    directory = resolve_checkpoint(args.checkpoint)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"checkpoint {directory}, N={args.items} items of ~{args.item_tokens} tokens, instruction {args.instruction_tokens} tokens, {args.queries} queries x {args.repeats}")
    print("| backend | dtype | items/s | p50 ms/query | max abs dprob vs reference fp32 |")
    print("|---|---|---:|---:|---:|")
    oracle = None
    for dtype in args.dtypes:
        spec = CheckpointSpec.load(directory)
        device = torch.device("cpu")
        model, tokenizer = load_checkpoint_model(directory, spec, resolve_dtype(dtype, device), device)
        spec = padded_instruction(spec, tokenizer, args.instruction_tokens)
        batch = queries_and_items(tokenizer, args.queries, args.items, args.item_tokens)
        for backend in args.backends:
            scorer = Scorer(model, tokenizer, spec, backend=backend)
            latencies, probs = time_backend(scorer, batch, args.repeats)
            if oracle is None:  # first row: reference fp32
                oracle = probs
            diff = max(float(np.abs(p - o).max()) for p, o in zip(probs, oracle))
            rate = args.items * len(latencies) / sum(latencies)
            print(f"| {backend} | {dtype} | {rate:.1f} | {1000 * statistics.median(latencies):.0f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
