"""Where one query's time goes: torch.profiler over `Scorer.score` on the bench workload.

    python bench/profile_scorer.py --backend torch --dtype fp32 --items 100 --instruction-tokens 64

Prints the ops by self CPU time and the share of matrix multiplies, for the same checkpoint and
inputs as bench/compare.py (its first query).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.profiler import ProfilerActivity, profile

from darl_infer import Scorer
from darl_infer.checkpoint import CheckpointSpec, resolve_checkpoint
from darl_infer.loading import load_checkpoint_model, resolve_dtype
from darl_infer.template import Template

from workload import build_cases

# a compiled layer's matrix multiplies are these same aten ops, called from its graph
MATMUL_OPS = {
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "mkldnn::_linear_pointwise",  # the MLP's matmuls with their post-ops (onednn_mlp.py)
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--backend", default="torch", choices=["reference", "torch"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--instruction-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", type=int, default=20, help="ops listed")
    ap.add_argument("--compile", action="store_true", help="the torch backend's compile=True (compiled at the warm-up)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    checkpoint = resolve_checkpoint(args.checkpoint)
    spec = CheckpointSpec.load(checkpoint)
    model, tokenizer = load_checkpoint_model(checkpoint, spec, resolve_dtype(args.dtype, torch.device("cpu")), torch.device("cpu"))
    [case], _ = build_cases(checkpoint, tokenizer, [args.instruction_tokens], 1, args.items)
    spec = dataclasses.replace(spec, template=Template.from_dict(case.template))
    scorer = Scorer(model, tokenizer, spec, backend=args.backend, **({"compile": True} if args.compile else {}))
    query = case.queries[0]
    scorer.score(query["query"], query["items"][:4])  # warm-up
    scorer.score(query["query"], query["items"])  # compiled code: every shape of the profiled call seen once
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        scorer.score(query["query"], query["items"])
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"matrix multiplies: {100 * matmul / total:.0f}% of {total / 1e6:.2f} s self CPU time")


if __name__ == "__main__":
    main()
