"""The gated MLP with oneDNN post-ops (darl_infer/backends/onednn_mlp.py) against HF's module.

    python bench/mlp_post_ops.py --dtype bf16 --rounds 5 [--compile] [--deviation]

1. One layer's MLP of the default model alone at --tokens rows, eager (also with --compile): HF's
   forward, then the oneDNN one.
2. The torch backend on the bench workload (3 queries x --items items, 64-token instruction), the
   two MLPs swapped in and out in alternating rounds in one process (the machine's drift hits both):
   ms per query, min and median.
In fp32, which the backend leaves to HF's MLP, the script swaps the oneDNN one in itself.
3. --deviation: each item's max |Δprob| against the fp32 reference backend (every pair alone), for
   both MLPs: max, mean, and how many items are past bf16's 2e-2.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import types

import torch

from darl_infer import Scorer
from darl_infer.backends.attention_hook import active
from darl_infer.backends.fused_modules import activation_of
from darl_infer.backends.onednn_mlp import POST_OPS, onednn_mlp_forward
from darl_infer.backends.prefix_runner import PrefixPass
from darl_infer.checkpoint import CheckpointSpec, resolve_checkpoint
from darl_infer.loading import load_checkpoint_model
from darl_infer.template import Template

from alternating_rounds import print_deviation, time_rounds
from workload import build_cases

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def best_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--tokens", type=int, default=2500, help="rows of the MLP alone")
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--deviation", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    checkpoint = resolve_checkpoint(None)
    spec = CheckpointSpec.load(checkpoint)
    model, tokenizer = load_checkpoint_model(checkpoint, spec, DTYPES[args.dtype], torch.device("cpu"))
    [case], _ = build_cases(checkpoint, tokenizer, [64], 3, args.items)
    spec = dataclasses.replace(spec, template=Template.from_dict(case.template))
    scorer = Scorer(model, tokenizer, spec, backend="torch", **({"compile": True} if args.compile else {}))
    mlps = [layer.mlp for layer in model.model.layers]
    for mlp in mlps:  # where the backend does not use it (fp32; onednn_mlp.used_for), swapped in here
        if "darl_post_op" not in vars(mlp):
            mlp.darl_post_op = POST_OPS[activation_of(mlp.act_fn)]
            mlp.forward = types.MethodType(onednn_mlp_forward, mlp)
    variants = {"hf": [types.MethodType(type(m).forward, m) for m in mlps], "onednn": [m.forward for m in mlps]}

    def use(name: str) -> Scorer:
        for mlp, forward in zip(mlps, variants[name]):
            mlp.forward = forward
        return scorer

    x = torch.randn(1, args.tokens, mlps[0].gate_proj.in_features).to(DTYPES[args.dtype])
    with torch.inference_mode(), active(PrefixPass([args.tokens], scorer.backend.attention_op)):
        for name in variants:
            use(name)
            print(f"one layer's MLP alone, {args.tokens} rows, {args.dtype}: {name} {best_ms(lambda: mlps[0](x)):.2f} ms")

    label = f"{args.dtype}{' compiled' if args.compile else ''}"
    time_rounds(use, list(variants), case.queries, args.rounds, label)
    if args.deviation:
        fp32_model, _ = load_checkpoint_model(checkpoint, CheckpointSpec.load(checkpoint), torch.float32, torch.device("cpu"))
        print_deviation(use, list(variants), case.queries, Scorer(fp32_model, tokenizer, spec, backend="reference"), 2e-2)

if __name__ == "__main__":
    main()
