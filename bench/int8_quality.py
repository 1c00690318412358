"""What int8 in the decoder's Linear layers costs and gains against fp32 (bench/RESULTS.md, "int8").

    python bench/int8_quality.py --method weight-only --compile --out bench/results/int8.md  # dtype="int8"
    python bench/int8_quality.py --compile                                # per-token W8A8 (AMX-INT8 / VNNI CPUs)
    python bench/int8_quality.py --method dynamic                         # torch.ao's, for comparison

Methods (darl_infer/backends/int8_linear.py): `weight-only`, darl_infer's dtype="int8": int8
weights per output channel dequantized to the float dtype at each call; `per-token` (the default,
as in the older bench/RESULTS.md commands), W8A8 measured and not shipped: int8 activations, one
scale per token, smoothed, oneDNN int8 matmuls. Both keep the rest in the float dtype "auto"
picks (set DARL_INFER_AUTO_DTYPE=fp32 for fp32 there), optionally with the torch backend's
compile=True. `dynamic`, torch.ao's dynamic int8 (one activation scale per call) on the fp32
model (its scores move with the batch).

Quality: darl-eval's metrics (training/evaluate.py::report) on the same seeded 1,000-pair dev
samples and foreign-item draws as the training table, and max |Δprob| of int8 against fp32 over
every evaluation pair. fp32's probabilities come from the teacher cache when present (they are the
checkpoint's own fp32 scores; bench/cascade.py fills the same cache), else they are computed.
Speed: Home Depot dev queries with --items titles each, each query's `rank` timed alone after a
warm-up (bench/cascade.py's `speed`), fp32 then int8, in this one process.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch

from cascade import DATA, DEV_SETS, Table, homedepot_workload, quality, speed
from compare import machine
from row import quantize_decoder_int8
from darl_infer import Scorer
from darl_infer.backends import int8_linear
from darl_infer.checkpoint import resolve_checkpoint
from darl_infer.training.data import read_pairs
from darl_infer.training.evaluate import foreign_pairs
from darl_infer.training.teacher_cache import score_pairs, teacher_probs


def int8_scorer(directory, method: str, compile: bool, only: list[str] | None) -> Scorer:
    """The checkpoint with the decoder's Linear layers in int8 by `method` (see the docstring);
    `only`: just the projections of these names (an experiment: the others stay in float)."""
    options = {"compile": True} if compile else {}
    if method == "dynamic":
        scorer = Scorer.from_pretrained(directory, dtype="fp32", backend="torch")
        quantize_decoder_int8(scorer.backend.model)
        return scorer
    if method == "weight-only" and only is None:
        return Scorer.from_pretrained(directory, dtype="int8", **options)
    from darl_infer.checkpoint import CheckpointSpec
    from darl_infer.loading import auto_dtype, load_checkpoint_model
    from darl_infer.scorer import quantize_int8

    spec = CheckpointSpec.load(directory)
    model, tokenizer = load_checkpoint_model(directory, spec, auto_dtype(torch.device("cpu")), torch.device("cpu"))
    names = tuple(only) if only else None
    if method == "weight-only":
        int8_linear.quantize_decoder_weights(model, names)
    else:
        quantize_int8(model, tokenizer, spec, names)
    return Scorer(model, tokenizer, spec, backend="torch", **options)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the embedded default model")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--teacher-cache", default="runs/teacher_cache")
    p.add_argument("--out", default=None)
    p.add_argument("--method", default="per-token", choices=["per-token", "weight-only", "dynamic"])
    p.add_argument("--only", nargs="+", help="per-token, weight-only: int8 in these projections only (e.g. q_proj k_proj v_proj o_proj gate_proj up_proj)")
    p.add_argument("--compile", action="store_true", help="per-token, weight-only: the torch backend's compile=True")
    p.add_argument("--smoothing-alpha", type=float, default=None,
                   help="per-token: the smoothing exponent a (default: darl_infer's SMOOTHING_ALPHA)")
    args = p.parse_args()
    started = time.time()
    if args.smoothing_alpha is not None:
        int8_linear.SMOOTHING_ALPHA = args.smoothing_alpha
    dev = {name: read_pairs(DATA / name / "dev.jsonl", 3, args.limit, 0) for name in DEV_SETS}
    shown = sorted({(pr.query, pr.item) for pairs in dev.values() for pr in pairs} |
                   {pair for pairs in dev.values() for pair in foreign_pairs(pairs)})
    directory = resolve_checkpoint(args.checkpoint)
    scorers = {"fp32": Scorer.from_pretrained(directory, dtype="fp32"), "int8": int8_scorer(directory, args.method, args.compile, args.only)}
    float_dtype = scorers["int8"].backend.model.dtype  # the speed to beat is that dtype without int8
    if args.method != "dynamic" and float_dtype != torch.float32:
        scorers["bf16"] = Scorer.from_pretrained(directory, dtype="bf16", **({"compile": True} if args.compile else {}))
    probs = {"fp32": teacher_probs(directory, shown, args.teacher_cache)}
    print(f"scoring {len(shown)} evaluation pairs in int8", flush=True)
    probs["int8"] = score_pairs(scorers["int8"], shown)
    if "bf16" in scorers:  # how much of int8's cost is its float dtype's
        print(f"scoring {len(shown)} evaluation pairs in bf16", flush=True)
        probs["bf16"] = score_pairs(scorers["bf16"], shown)
    tables = {name: Table(scorers[name].spec, dict(zip(shown, p))) for name, p in probs.items()}
    q = quality(tables, dev)
    workload = homedepot_workload(DATA / "homedepot" / "dev.jsonl", args.queries, args.items, seed=0)
    s = speed(scorers, workload)
    # batch dependence: an item's probabilities scored with its query's 100 items vs alone (the
    # exactness contract's oracle setting), for the first 3 queries
    batch_gap = {name: max(float(np.abs(sc.score(q, items).probs - np.stack([sc.score(q, [it]).probs[0] for it in items])).max())
                           for q, items in workload[:3]) for name, sc in scorers.items()}
    diff = np.abs(probs["int8"] - probs["fp32"])

    lines = ["| dtype | dev set | macro-F1 | Δ macro-F1 vs fp32 | ECE | accuracy | pairwise acc. | easy neg. irrelevant | easy neg. AUC |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, sets in q.items():
        for set_name, m in sets.items():
            e = m["easy_negatives"]
            delta = m["macro_f1"] - q["fp32"][set_name]["macro_f1"]
            lines.append(f"| {name} | {set_name} | {m['macro_f1']:.3f} | {delta:+.3f} | {m['ece']:.3f} | {m['accuracy']:.3f} | "
                         f"{m['pairwise_accuracy']:.3f} | {e['irrelevant_rate']:.3f} | {e['auc']:.3f} |")
    lines += ["", f"int8 against fp32 over the {len(shown)} evaluation pairs: max |Δprob| {diff.max():.4f}, "
                  f"mean {diff.mean():.4f}, grade changed for {(probs['int8'].argmax(1) != probs['fp32'].argmax(1)).mean():.1%}",
              f"Batch dependence, max |Δprob| of an item scored among its query's {args.items} items vs alone (3 queries): "
              + ", ".join(f"{name} {gap:.2e}" for name, gap in batch_gap.items()),
              "", f"Speed, N = {args.items} Home Depot titles per query, {args.queries} queries:", "",
              "| dtype | items/s | × fp32 | p50 ms / query | p95 ms / query |", "|---|---:|---:|---:|---:|"]
    for name, r in s.items():
        lines.append(f"| {name} | {r['items_per_s']:.1f} | {r['items_per_s'] / s['fp32']['items_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} |")
    smoothing = f", smoothing a = {int8_linear.SMOOTHING_ALPHA}" if args.method == "per-token" else ""
    lines += ["", f"- checkpoint: {args.checkpoint or 'default model'}; int8's float dtype {str(float_dtype).removeprefix('torch.')}"
                  f", {args.method}{smoothing}{', compile=True' if args.compile else ''}; torch {torch.__version__}, "
                  f"quantized engine {torch.backends.quantized.engine}",
              f"- machine: {machine()}", f"- run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {(time.time() - started) / 60:.1f} min",
              f"- command: `python bench/int8_quality.py {' '.join(sys.argv[1:])}`"]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        open(args.out, "w").write(table)


if __name__ == "__main__":
    main()
