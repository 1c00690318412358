"""The C++ CPU kernels (kernels/*_cpu.cpp) against what the torch backend ran before them.

    python bench/cpu_kernels.py --kernel norms|attention|layers|budget --dtype bf16 --rounds 5 [--deviation]

--kernel norms: the C++ RMSNorm against HF's modules; attention: the C++ shared-prefix attention
against PyTorch's SDPA (in bf16 on an AMX CPU also its MKL path, DARL_INFER_AMX=0); layers: the CPU path (the fused attention modules, eager with the C++ norm
and rotary, HF's MLPs) against HF's modules (eager with the C++ norms; a second copy of the model);
budget: the torch backend at each of --budgets tokens a forward pass.

1. The op alone (norms, attention): the default model's norms at --tokens rows (the layer norm on
   (tokens, 640), the per-head q and k norms on (tokens, 4, 256) and (tokens, 1, 256)), or one
   layer's attention over --items items: the old op, then the kernel.
2. The torch backend on the bench workload (3 queries x --items items, 64-token instruction), the
   two variants in alternating rounds in one process (the machine's drift hits both): ms per
   query, min and median.
3. --deviation: each item's max |Δprob| against the fp32 reference backend (every pair alone), for
   both: max, mean, and how many items are past the dtype's tolerance (fp32 1e-5, bf16 2e-2).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
from unittest import mock

import torch

from darl_infer import Scorer
from darl_infer.backends.attention_hook import active
from darl_infer.backends.fused_modules import known_norm, use_norm_op
from darl_infer.backends.torch_backend import TorchBackend
from darl_infer.backends.prefix_runner import PrefixPass
from darl_infer.backends.sdpa_attention import shared_prefix_attention_sdpa
from darl_infer.checkpoint import CheckpointSpec, resolve_checkpoint
from darl_infer.kernels.rms_norm import rms_norm_cpu
from darl_infer.kernels.shared_prefix_attention import shared_prefix_attention_cpu
from darl_infer.loading import load_checkpoint_model
from darl_infer.template import Template

from alternating_rounds import print_deviation, time_rounds
from mlp_post_ops import DTYPES, best_ms
from workload import build_cases

TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default="norms", choices=["norms", "attention", "layers", "budget"])
    ap.add_argument("--budgets", type=int, nargs="+", default=[2048, 4096, 8192], help="token budgets (--kernel budget)")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--tokens", type=int, default=2500, help="rows of the op alone")
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="compiled layers (attention, layers)")
    ap.add_argument("--deviation", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]

    checkpoint = resolve_checkpoint(None)
    spec = CheckpointSpec.load(checkpoint)
    model, tokenizer = load_checkpoint_model(checkpoint, spec, dtype, torch.device("cpu"))
    [case], _ = build_cases(checkpoint, tokenizer, [64], 3, args.items)
    spec = dataclasses.replace(spec, template=Template.from_dict(case.template))
    scorer = Scorer(model, tokenizer, spec, backend="torch", **({"compile": True} if args.compile else {}))
    if args.kernel == "norms":
        norms = [m for m in model.modules() if known_norm(m) is not None]
        if not all("darl_rms_norm" in vars(m) for m in norms):
            raise SystemExit("the torch backend did not swap the norms (compile=True, or CPU kernels disabled or not built?)")
        variants = {"hf": [types.MethodType(type(m).forward, m) for m in norms], "c++": [m.forward for m in norms]}

        def use(name: str) -> Scorer:
            for norm, forward in zip(norms, variants[name]):
                norm.forward = forward
            return scorer

        layer = model.model.layers[0]
        attention = layer.self_attn
        shapes = {
            "layer norm": (layer.input_layernorm, (1, args.tokens, model.config.hidden_size)),
            "q norm": (attention.q_norm, (1, args.tokens, model.config.num_attention_heads, attention.head_dim)),
            "k norm": (attention.k_norm, (1, args.tokens, model.config.num_key_value_heads, attention.head_dim)),
        }
        with torch.inference_mode(), active(PrefixPass([args.tokens], scorer.backend.attention_op)):
            for label, (norm, shape) in shapes.items():
                x = torch.randn(shape).to(dtype)
                for name in variants:
                    use(name)
                    print(f"{label} alone, {tuple(shape)}, {args.dtype}: {name} {best_ms(lambda: norm(x)) * 1000:.0f} us")
    elif args.kernel == "attention":
        runner = scorer.backend.runner
        if runner.attention_op is not shared_prefix_attention_cpu:
            raise SystemExit("the torch backend does not use the C++ attention (CPU kernels disabled or not built?)")
        variants = {"sdpa": shared_prefix_attention_sdpa, "c++": shared_prefix_attention_cpu}
        if dtype == torch.bfloat16 and torch.ops.darl_infer_cpu.attention_uses_amx():
            variants["c++ mkl"] = shared_prefix_attention_cpu  # read at each call: MKL's gemm instead of AMX tiles

        def use(name: str) -> Scorer:
            runner.attention_op = variants[name]
            os.environ["DARL_INFER_AMX"] = "0" if name == "c++ mkl" else "1"
            return scorer

        config, g = model.config, torch.Generator().manual_seed(0)
        lengths = torch.randint(10, 36, (args.items,), generator=g)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        T, H, Hkv, D = int(cu[-1]), config.num_attention_heads, config.num_key_value_heads, config.head_dim
        q = torch.randn(T, H, D, generator=g).to(dtype)
        k, v, prefix_k, prefix_v = (torch.randn(n, Hkv, D, generator=g).to(dtype) for n in (T, T, 80, 80))
        for name, op in variants.items():
            use(name)
            ms = best_ms(lambda: op(q, k, v, prefix_k, prefix_v, cu, D ** -0.5))
            print(f"one layer's attention alone, {args.items} items, {T} tokens, 80-token prefix, {args.dtype}: {name} {ms:.2f} ms")
    elif args.kernel == "budget":
        variants = {f"budget {budget}": budget for budget in args.budgets}

        def use(name: str) -> Scorer:
            scorer.backend.token_budget = variants[name]
            return scorer
    else:
        if not scorer.backend.fused_projections:
            raise SystemExit("the torch backend does not run the fused modules (CPU kernels disabled or not built?)")
        hf_model, _ = load_checkpoint_model(checkpoint, CheckpointSpec.load(checkpoint), dtype, torch.device("cpu"))
        with mock.patch.object(TorchBackend, "uses_fused_modules", lambda self: False):
            hf_modules = Scorer(hf_model, tokenizer, spec, backend="torch", **({"compile": True} if args.compile else {}))
        if not args.compile:
            use_norm_op(hf_model.model, rms_norm_cpu)  # as the eager backend did before the C++ rotary
        variants = {"hf modules": hf_modules, "fused": scorer}

        def use(name: str) -> Scorer:
            return variants[name]

    label = f"{args.dtype}{' compiled' if args.compile else ''}"
    time_rounds(use, list(variants), case.queries, args.rounds, label)
    if args.deviation:
        fp32_model, _ = load_checkpoint_model(checkpoint, CheckpointSpec.load(checkpoint), torch.float32, torch.device("cpu"))
        reference = Scorer(fp32_model, tokenizer, spec, backend="reference")
        print_deviation(use, list(variants), case.queries, reference, TOLERANCE[args.dtype])

if __name__ == "__main__":
    main()
