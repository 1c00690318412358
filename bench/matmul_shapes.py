"""The default model's matrix multiply shapes alone: how fast, and on how many cores, PyTorch's CPU
matmul (oneDNN) runs each decoder projection at a given number of packed tokens.

    python bench/matmul_shapes.py --dtype bf16 --tokens 700 1300 2600 --threads 2

`cores busy` is CPU time over wall time: below the thread count, the library left cores idle.
`--dtype int8`: the int8 matmul of dtype="int8" (darl_infer/backends/int8_linear.py) alone (activations already quantized),
with its error against the exact integer product.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from load import cpu_model

# (name, in, out) of Gemma3-270M's projections (hidden 640, 4 x 256 query heads, 1 KV head, MLP 2048)
SHAPES = [("q", 640, 1024), ("k, v", 640, 256), ("o", 1024, 640), ("gate, up", 640, 2048), ("down", 2048, 640)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": None}


def timed(fn, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds per call, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats


def int8_timed(tokens: int, fan_in: int, fan_out: int, repeats: int) -> tuple[float, float, str]:
    """(wall, CPU) seconds of dtype="int8"'s matmul (darl_infer/backends/int8_linear.py), and its relative error."""
    from darl_infer.backends.int8_linear import check_int8_dot_products, int8_matmul

    check_int8_dot_products()
    qx = torch.randint(-127, 128, (tokens, fan_in), dtype=torch.int8)
    qw = torch.randint(-127, 128, (fan_out, fan_in), dtype=torch.int8)
    w_scale, w_zero = torch.rand(fan_out) / 127, torch.zeros(fan_out, dtype=torch.long)
    packed = torch.ops.onednn.qlinear_prepack(qw, None)
    run = lambda: int8_matmul(qx, packed, w_scale, w_zero, fan_out)  # noqa: E731
    exact = (qx.double() @ qw.double().T) * w_scale.double()
    error = ((run().double() - exact).abs().max() / exact.abs().max()).item()
    return *timed(run, repeats), f" {error:.1e} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[700, 1300, 2600])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, {torch.get_num_threads()} of {os.cpu_count()} cores, torch {torch.__version__}, {args.dtype}")
    error = " error vs the integer product |" if args.dtype == "int8" else ""
    print(f"| tokens | projection | in → out | G(FL)OP/s (wall) | cores busy |{error}\n|---:|---|---|---:|---:|{'---|' if error else ''}")
    for tokens in args.tokens:
        for name, fan_in, fan_out in SHAPES:
            if args.dtype == "int8":
                wall, cpu, note = int8_timed(tokens, fan_in, fan_out, args.repeats)
            else:
                x = torch.randn(tokens, fan_in).to(DTYPES[args.dtype])
                w = torch.randn(fan_out, fan_in).to(DTYPES[args.dtype])
                (wall, cpu), note = timed(lambda: F.linear(x, w), args.repeats), ""
            print(f"| {tokens} | {name} | {fan_in} → {fan_out} | {2 * tokens * fan_in * fan_out / wall / 1e9:.0f} | {cpu / wall:.1f} |{note}")


if __name__ == "__main__":
    main()
