"""The torch backend on a CPU with and without one of session 21's changes, on the bench workload
(the default model, 100-item queries, 64-token instruction).

    python bench/cpu_variants.py --variant amx|add-norm|gated|padding --dtype bf16 --rounds 4

amx: the C++ attention's AMX path against its MKL path (DARL_INFER_AMX=0), one scorer, bf16;
add-norm: decoder layers with each residual add and its norms in one C++ pass, against the norm op
and PyTorch's add (a second copy of the model); gated: in fp32 one gate/up matmul and the C++ gated
kernel against HF's MLPs (fp32 only: bf16 keeps oneDNN's post-ops); these three in alternating rounds over
3 queries (bench/alternating_rounds.py), each variant's ms per query.
padding: bf16 passes padded to few sizes (chunking.pass_size) or not, as a service meets queries:
--queries new queries, each scored once, in a fresh process per variant (oneDNN builds its matmuls
for each new size, once a process), both variants twice in turn; mean and median ms per query.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time

import numpy as np
import torch

from darl_infer import Scorer
from darl_infer.backends import torch_backend
from darl_infer.backends.torch_backend import TorchBackend
from darl_infer.checkpoint import CheckpointSpec, resolve_checkpoint
from darl_infer.loading import load_checkpoint_model
from darl_infer.template import Template

from alternating_rounds import time_rounds
from mlp_post_ops import DTYPES
from workload import build_cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", required=True, choices=["amx", "add-norm", "gated", "padding"])
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--queries", type=int, default=16, help="new queries per process (--variant padding)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--padded", choices=["yes", "no"], help=argparse.SUPPRESS)  # one process of --variant padding
    args = ap.parse_args()
    if args.variant == "padding" and args.padded is None:
        for _ in range(2):
            for padded in ("yes", "no"):
                subprocess.run([sys.executable, __file__, *sys.argv[1:], "--padded", padded], check=True)
        return
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    checkpoint = resolve_checkpoint(None)
    spec = CheckpointSpec.load(checkpoint)

    def load():
        return load_checkpoint_model(checkpoint, spec, dtype, torch.device("cpu"))

    model, tokenizer = load()
    [case], _ = build_cases(checkpoint, tokenizer, [64], args.queries if args.padded else 3, 100)
    spec = dataclasses.replace(spec, template=Template.from_dict(case.template))
    if args.padded:
        if args.padded == "no":
            torch_backend.pass_size = lambda tokens, budget: tokens
        scorer = Scorer(model, tokenizer, spec, backend="torch")
        scorer.score(case.queries[0]["query"], case.queries[0]["items"][:4])  # warm-up: a pass of another size
        ms = []
        for q in case.queries:
            start = time.perf_counter()
            scorer.score(q["query"], q["items"])
            ms.append(1000 * (time.perf_counter() - start))
        print(f"{args.queries} new queries, {args.dtype}, padded {args.padded}: mean {np.mean(ms):.0f} median "
              f"{np.median(ms):.0f} ms/query ({' '.join(f'{t:.0f}' for t in ms)})")
        return
    if args.variant == "amx":
        scorer = Scorer(model, tokenizer, spec, backend="torch")
        if not torch.ops.darl_infer_cpu.attention_uses_amx() or dtype != torch.bfloat16:
            raise SystemExit("the AMX path runs bf16 on a CPU with AMX only")
        variants = {"amx": "1", "mkl": "0"}

        def use(name: str) -> Scorer:
            os.environ["DARL_INFER_AMX"] = variants[name]
            return scorer
    else:
        if args.variant == "gated" and dtype == torch.bfloat16:
            raise SystemExit("in bf16 the backend keeps oneDNN's post-ops (TorchBackend.fused_module_ops): --dtype fp32")
        ops = TorchBackend.cpu_elementwise_ops
        without = (dataclasses.replace(ops, add_rms_norm=None) if args.variant == "add-norm"
                   else dataclasses.replace(ops, gated=None))
        variants = {}
        for name, variant_ops in ((args.variant, ops), ("without", without)):
            TorchBackend.cpu_elementwise_ops = variant_ops
            variants[name] = Scorer(model, tokenizer, spec, backend="torch")
            model, _ = load()  # the next variant's own copy: the backends swap the modules' forwards
        TorchBackend.cpu_elementwise_ops = ops

        def use(name: str) -> Scorer:
            return variants[name]

    time_rounds(use, list(variants), case.queries, args.rounds, args.dtype)


if __name__ == "__main__":
    main()
