"""How far bf16 scores move on real items: each bf16 path against the oracles, over Home Depot
requests of the load test's workload (real queries, 20-100 titles each, first --items of each).

    python bench/bf16_deviation.py --requests 3 --items 60

Rows: the reference backend (HF, each pair alone) in bf16 against fp32; the torch backend in bf16,
eager and with compile=True, against the bf16 reference (DESIGN.md's contract, tolerance 2e-2)
and against fp32; and each item scored among its request's items against scored alone.
Per item the largest |Δprob| over the grades; reported: max, mean, 90th percentile, share > 2e-2.
`--diagnose` adds the batch-vs-alone row of the torch backend with one suspect made exact: its
Linear layers computed in fp32, or the shared-prefix attention through the fp32 reference op.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from compare import machine
from darl_infer import Scorer
from load import DATA, workload
from darl_infer.backends.int8_linear import replace_decoder_linears

BF16_TOLERANCE = 2e-2


def row(name: str, per_item: np.ndarray) -> str:
    return (f"| {name} | {per_item.max():.4f} | {per_item.mean():.5f} | {np.quantile(per_item, 0.9):.4f} | "
            f"{np.mean(per_item > BF16_TOLERANCE):.1%} |")


class Fp32Linear(nn.Module):
    """A bf16 Linear computed in fp32 and rounded once: rules the matmul out as a source."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return nn.functional.linear(x.float(), self.linear.weight.float()).to(x.dtype)


def with_fp32_linears(scorer: Scorer) -> Scorer:
    replace_decoder_linears(scorer.backend.model, Fp32Linear)
    return scorer


def with_reference_attention(scorer: Scorer) -> Scorer:
    from darl_infer.kernels.shared_prefix_attention import shared_prefix_attention_reference

    scorer.backend.runner.attention_op = shared_prefix_attention_reference
    return scorer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--items", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--diagnose", action="store_true", help="also the batch-vs-alone rows with one suspect made exact")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    requests = [(r["query"], r["texts"][: args.items]) for r in workload(DATA, args.requests, seed=0)]

    def probs(scorer, alone=False):
        if alone:
            return [np.stack([scorer.score(q, [item]).probs[0] for item in items]) for q, items in requests]
        return [scorer.score(q, items).probs for q, items in requests]

    def gap(a, b):
        return np.concatenate([np.abs(x - y).max(1) for x, y in zip(a, b)])

    fp32 = probs(Scorer.from_pretrained(args.checkpoint, dtype="fp32"))
    reference = probs(Scorer.from_pretrained(args.checkpoint, dtype="bf16", backend="reference"))
    lines = ["| bf16 path | max | mean | p90 | share > 2e-2 |", "|---|---:|---:|---:|---:|", row("reference vs fp32", gap(reference, fp32))]
    for label, options in (("torch", {}), ("torch compile=True", {"compile": True})):
        scorer = Scorer.from_pretrained(args.checkpoint, dtype="bf16", backend="torch", **options)
        batch = probs(scorer)
        lines += [row(f"{label} vs bf16 reference", gap(batch, reference)), row(f"{label} vs fp32", gap(batch, fp32)),
                  row(f"{label}: in its request vs alone", gap(batch, probs(scorer, alone=True)))]
    if args.diagnose:
        for label, exact in (("torch, Linear layers in fp32", with_fp32_linears), ("torch, fp32 reference attention op", with_reference_attention)):
            scorer = exact(Scorer.from_pretrained(args.checkpoint, dtype="bf16", backend="torch"))
            lines.append(row(f"{label}: in its request vs alone", gap(probs(scorer), probs(scorer, alone=True))))
    n = sum(len(items) for _, items in requests)
    print(f"{n} items of {len(requests)} requests; {machine()}; torch {torch.__version__}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
