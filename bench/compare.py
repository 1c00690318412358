"""darl_infer against the peers users would pick: one run, one markdown table.

    python bench/compare.py --out bench/RESULTS.md

Same checkpoint (the embedded default model unless --checkpoint), same inputs: every row scores the
token ids of darl_infer's template (bench/workload.py). Rows, each in its own process (bench/row.py)
so its peak RSS is its own:
  hf-pairwise   AutoModelForSequenceClassification on padded batches of pairs (hand-written usage)
  crossencoder  sentence-transformers' CrossEncoder on the same HF folder
  ort-pairs     ONNX Runtime on a plain pair export of the HF folder (fp32)
  optimum       optimum's ORTModelForSequenceClassification, own venv (--optimum-python; fp32)
  reference     darl_infer, every pair alone: the oracle (fp32)
  torch, onnx   darl_infer, the prefix once per query and the items against it
  onnx-int8     opt-in (--rows): the onnx row on a dynamic-int8 export (lossy: Δprob reported, no tolerance)
  torch-compiled  opt-in (--rows): the torch row with compile=True (each decoder layer under torch.compile, inductor)
  torch-int8    opt-in (--rows): the torch-compiled row with dtype="int8"'s int8-weight Linear layers, the
                rest in the table's dtype (lossy)
Columns: items/s, p50/p95 ms per query, peak RSS, max |Δprob| against the oracle (reference fp32)
and whether that is within the backend's tolerance, useful GFLOP per item (pairwise rows run the
prefix for every pair, darl_infer once per query) and the fraction of the machine's measured
matmul peak that this reaches.

Sizes: darl_infer at --items (100) and --pair-items (10) per query; the pairwise rows, whose time
per item does not depend on N, and the oracle at --pair-items; bf16 at --bf16-items for one
instruction length: without AVX-512-BF16/AMX a CPU multiplies bf16 many times slower than fp32.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from darl_infer.checkpoint import CheckpointSpec, resolve_checkpoint
from darl_infer.loading import load_checkpoint_model

from workload import CACHE, FlopModel, build_cases, checkpoint_cache, darl_onnx_export, matmul_peak, merged_hf_folder

HERE = Path(__file__).resolve().parent
ROWS = ["hf-pairwise", "crossencoder", "ort-pairs", "optimum", "reference", "torch", "torch-compiled", "torch-int8", "onnx", "onnx-int8"]
# exported graphs run in the precision they were exported in; int8 rows quantize fp32 weights
FP32_ONLY = {"ort-pairs", "optimum", "onnx", "onnx-int8"}
SHARED_PREFIX = {"torch", "torch-compiled", "torch-int8", "onnx", "onnx-int8"}  # rows that run the prefix once per query
LOSSY = {"onnx-int8", "torch-int8"}
OPT_IN = LOSSY | {"torch-compiled"}  # rows run only when --rows names them
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}
ORT_TOLERANCE = 1e-4  # ONNX Runtime rows, fp32
DEFAULT_OPTIMUM_PYTHON = "/tmp/optimum_venv/bin/python"


def export_pairs_onnx(hf_dir: Path, out: Path) -> Path:
    """A plain ONNX export of the HF sequence classifier: (input_ids, attention_mask) -> logits."""
    if out.is_file():
        return out
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    # two rows of different lengths, so the padding mask is traced as a general input
    sample = tokenizer.pad({"input_ids": [[2, 10, 11, 12, 13, 14], [2, 20, 21]]}, return_tensors="pt")
    axes = {0: "batch", 1: "tokens"}
    partial = out.with_suffix(".partial")
    torch.onnx.export(
        Logits(), (sample["input_ids"], sample["attention_mask"]), str(partial), dynamo=False, opset_version=18,
        input_names=["input_ids", "attention_mask"], output_names=["logits"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}},
    )
    partial.rename(out)
    return out


def optimum_export(python: str, hf_dir: Path, out: Path) -> Path | str:
    """optimum's export of the HF folder, or the reason it cannot be had."""
    if out.is_dir():
        return out
    if not Path(python).is_file():
        return f"no optimum interpreter at {python} (see bench/RESULTS.md for its venv)"
    done = subprocess.run(
        [python, str(HERE / "row.py"), "export-optimum", "fp32", "--hf-dir", str(hf_dir), "--optimum-dir", str(out)],
        capture_output=True, text=True,
    )
    if done.returncode:
        return "optimum export failed: " + done.stderr.strip().splitlines()[-1]
    return out


def run_row(row, dtype, case_index, n_queries, n_items, args, paths) -> dict:
    out = paths["run"] / f"{row}-{dtype}-case{case_index}-N{n_items}.json"
    python = args.optimum_python if row == "optimum" else sys.executable
    cmd = [
        python, str(HERE / "row.py"), row, dtype, "--workload", str(paths["workload"]), "--case", str(case_index),
        "--queries", str(n_queries), "--items", str(n_items), "--repeats", str(args.repeats), "--out", str(out),
        "--checkpoint", str(paths["checkpoint"]), "--hf-dir", str(paths["hf"]), "--threads", str(args.threads),
    ]
    onnx_key = "onnx-int8" if row == "onnx-int8" else "onnx"
    for flag, key in (("--onnx-export", onnx_key), ("--pair-onnx", "pairs"), ("--optimum-dir", "optimum")):
        if isinstance(paths.get(key), Path):
            cmd += [flag, str(paths[key])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"row {row} {dtype} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "amx_int8") if f in flags]
    return f"{cpu}, {os.cpu_count()} cores, {' '.join(simd)}; every row and the peak use {torch.get_num_threads()} thread(s)"


def versions() -> str:
    names = ["darl-infer", "torch", "transformers", "sentence-transformers", "onnxruntime", "numpy"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (absent)")
    return ", ".join(found)


def optimum_versions(python: str) -> str:
    if not Path(python).is_file():  # the optimum row is optional: its venv is often absent
        return f"absent ({python})"
    code = "import importlib.metadata as m; print(', '.join(f'{n} {m.version(n)}' for n in ['optimum-onnx', 'optimum', 'transformers', 'onnxruntime', 'torch']))"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "n/a"


def plan(args) -> list[tuple[str, int, str, int]]:
    """(dtype, instruction tokens, row, N) in the order they run: darl_infer and hf-pairwise at the
    longest instruction first, so that a run cut short still holds the headline comparison.

    Pairwise rows (peers and the oracle) run every pair whole, so their time per item does not
    depend on N: they run at --pair-items to keep the run short. darl_infer runs at --pair-items
    and, with an instruction, at --items too: its time per item falls with N as the prefix is
    shared by more items (without an instruction the prefix is a few tokens and N changes little)."""
    longest_first = sorted(args.instruction_tokens, reverse=True)
    n, n_pair = args.items, args.pair_items
    jobs = []
    for t in longest_first:
        jobs += [("fp32", t, "reference", n_pair), ("fp32", t, "hf-pairwise", n_pair), ("fp32", t, "torch", n_pair)]
        jobs += [("fp32", t, row, n) for row in ("torch", "torch-compiled", "torch-int8", "onnx", "onnx-int8") if t > 0]
        jobs += [("fp32", t, row, n_pair) for row in ("onnx", "onnx-int8") if t == 0]
    bf16_first = ["torch", "torch-compiled", "hf-pairwise"]
    jobs += [("bf16", t, row, args.bf16_items) for t in args.bf16_instruction_tokens for row in bf16_first if row in args.bf16_rows]
    jobs += [("fp32", t, row, n_pair) for t in longest_first for row in ("crossencoder", "ort-pairs", "optimum")]
    jobs += [("bf16", t, row, args.bf16_items) for t in args.bf16_instruction_tokens for row in args.bf16_rows if row not in bf16_first]
    return [job for job in jobs if job[2] in args.rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the embedded default model)")
    ap.add_argument("--queries", type=int, default=1, help="queries per case")
    ap.add_argument("--items", type=int, default=100, help="N of the darl_infer rows (fp32)")
    ap.add_argument("--pair-items", type=int, default=10, help="N of the pairwise rows and the oracle, and of darl_infer again")
    ap.add_argument("--instruction-tokens", type=int, nargs="+", default=[0, 64, 256])
    ap.add_argument("--bf16-items", type=int, default=10)
    ap.add_argument("--bf16-instruction-tokens", type=int, nargs="*", default=[64])
    bf16_rows = [row for row in ROWS if row not in FP32_ONLY]
    ap.add_argument("--bf16-rows", nargs="*", default=bf16_rows, choices=bf16_rows)
    ap.add_argument("--rows", nargs="+", default=[row for row in ROWS if row not in OPT_IN], choices=ROWS,
                    help="rows to run (default: all but the opt-in onnx-int8, torch-compiled and torch-int8)")
    ap.add_argument("--repeats", type=int, default=1, help="times each query is scored")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every row and of the matmul peak")
    ap.add_argument("--optimum-python", default=DEFAULT_OPTIMUM_PYTHON)
    ap.add_argument("--out", help="also write the report (markdown) here, updated after every row")
    args = ap.parse_args()

    started = time.time()
    checkpoint = resolve_checkpoint(args.checkpoint)
    spec = CheckpointSpec.load(checkpoint)
    model, tokenizer = load_checkpoint_model(checkpoint, spec, torch.float32, torch.device("cpu"))
    flops = FlopModel.of(model)
    del model
    hf_dir = merged_hf_folder(checkpoint)
    jobs = plan(args)
    lengths = sorted({tokens for _, tokens, _, _ in jobs})
    # always --items: the items drawn depend on how many, and every run should score the same ones
    cases, source = build_cases(checkpoint, tokenizer, lengths, args.queries, max(args.items, *(n for *_, n in jobs)))
    run_dir = CACHE / "runs" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    workload = run_dir / "workload.json"
    workload.write_text(json.dumps({"cases": [c.__dict__ for c in cases]}))
    paths = {"checkpoint": checkpoint, "hf": hf_dir, "workload": workload, "run": run_dir}
    notes = []
    if "onnx" in args.rows:
        paths["onnx"] = darl_onnx_export(checkpoint)
    if "onnx-int8" in args.rows:
        paths["onnx-int8"] = darl_onnx_export(checkpoint, int8=True)
    if "ort-pairs" in args.rows:
        paths["pairs"] = export_pairs_onnx(hf_dir, checkpoint_cache(checkpoint) / "pairs.onnx")
    if "optimum" in args.rows:
        paths["optimum"] = optimum_export(args.optimum_python, hf_dir, checkpoint_cache(checkpoint) / "optimum")
        if not isinstance(paths["optimum"], Path):
            notes.append(f"optimum row skipped: {paths['optimum']}")
            jobs = [job for job in jobs if job[2] != "optimum"]
    print(f"prepared in {time.time() - started:.0f} s", file=sys.stderr, flush=True)

    started = time.time()
    torch.set_num_threads(args.threads)
    peaks = [measure_peaks()]  # again at the end: the load of a shared machine drifts during a run
    load_at_start = os.getloadavg()
    table = []
    oracle = {}  # instruction tokens -> the reference fp32 row, which every row is checked against
    for dtype, tokens, row, n_items in jobs:
        case_index = lengths.index(tokens)
        if tokens not in oracle:
            oracle[tokens] = run_row("reference", "fp32", case_index, args.queries, args.pair_items, args, paths)
        if (dtype, row, n_items) == ("fp32", "reference", args.pair_items):
            result = oracle[tokens]
        else:
            result = run_row(row, dtype, case_index, args.queries, n_items, args, paths)
        # over the items the oracle scored: the first --pair-items of each query
        diff = max(float(np.abs(np.array(p[: len(o)]) - np.array(o[: len(p)])).max()) for p, o in zip(result["probs"], oracle[tokens]["probs"]))
        tolerance = ORT_TOLERANCE if row in FP32_ONLY else TOLERANCE[dtype]
        count = FlopModel.shared_prefix if row in SHARED_PREFIX else FlopModel.pairwise
        queries = cases[case_index].subset(args.queries, n_items).queries
        work = sum(count(flops, len(q["prefix"]), [len(s) for s in q["suffixes"]]) for q in queries) * args.repeats
        lat, cpu = result["latencies"], result["cpu_seconds"]
        table.append({
            "dtype": dtype, "instruction": tokens, "items": n_items, "row": row,
            "items_per_s": n_items * len(lat) / sum(lat), "items_per_cpu_s": n_items * len(cpu) / sum(cpu),
            "p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * float(np.percentile(lat, 95)),
            "rss_mb": result["peak_rss_mb"], "dprob": diff, "ok": None if row in LOSSY else diff <= tolerance,
            "gflop_per_item": work / (n_items * len(lat)) / 1e9, "flop_per_cpu_s": work / sum(cpu),
        })
        print(json.dumps(table[-1]), file=sys.stderr, flush=True)
        report = render(table, args, source, peaks, notes, (load_at_start, os.getloadavg()), time.time() - started, len(jobs))
        if args.out:
            Path(args.out).write_text(report)
    peaks.append(measure_peaks())
    report = render(table, args, source, peaks, notes, (load_at_start, os.getloadavg()), time.time() - started, len(jobs))
    if args.out:
        Path(args.out).write_text(report)
    print(report)


def measure_peaks() -> dict:
    """dtype -> (FLOP per wall second, FLOP per CPU second) of a large matmul."""
    return {"fp32": matmul_peak(torch.float32, 2048), "bf16": matmul_peak(torch.bfloat16, 1024)}


def render(table, args, source, peaks, notes, loads, seconds, n_jobs) -> str:
    peak = {dtype: max(p[dtype][1] for p in peaks) for dtype in peaks[0]}  # per CPU second
    dtypes = {"fp32": 0, "bf16": 1}
    table = sorted(table, key=lambda r: (dtypes[r["dtype"]], r["instruction"], ROWS.index(r["row"])))
    base = {(r["dtype"], r["instruction"]): r["items_per_cpu_s"] for r in table if r["row"] == "hf-pairwise"}
    lines = [
        "| dtype | instr. tokens | N | row | items/s | items/CPU-s | × hf-pairwise (CPU) | p50 ms/query | p95 ms/query "
        "| peak RSS MB | max abs Δprob | within tol. | GFLOP/item | % of matmul peak (CPU) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for r in table:
        ref = base.get((r["dtype"], r["instruction"]))
        speedup = f"{r['items_per_cpu_s'] / ref:.2f}" if ref else "–"
        lines.append(
            f"| {r['dtype']} | {r['instruction']} | {r['items']} | {r['row']} | {r['items_per_s']:.2f} | "
            f"{r['items_per_cpu_s']:.2f} | {speedup} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['rss_mb']:.0f} | "
            f"{r['dprob']:.1e} | {'lossy' if r['ok'] is None else 'yes' if r['ok'] else 'NO'} | {r['gflop_per_item']:.2f} | "
            f"{100 * r['flop_per_cpu_s'] / peak[r['dtype']]:.0f} |"
        )
    header = [
        f"- command: `python bench/compare.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; rows took {seconds / 60:.0f} min"
        + ("" if len(table) == n_jobs else f" (in progress: {len(table)} of {n_jobs} rows)"),
        f"- checkpoint: {args.checkpoint or 'the embedded default model'} (bench cache {checkpoint_cache(resolve_checkpoint(args.checkpoint)).name})",
        f"- machine: {machine()}",
        "- load average (1/5/15 min) at start " + "/".join(f"{x:.1f}" for x in loads[0]) + ", now " + "/".join(f"{x:.1f}" for x in loads[1]),
        "- measured matmul peak (x @ w.T, fp32 2048³, bf16 1024³), GFLOP per wall / per CPU second, before"
        + (" / after" if len(peaks) > 1 else "") + " the rows: "
        + "; ".join(f"{d} " + " / ".join(f"{p[d][0] / 1e9:.2f}, {p[d][1] / 1e9:.2f}" for p in peaks) for d in peaks[0])
        + "; % of peak: the row's FLOP per CPU second over the higher peak per CPU second",
        f"- versions: {versions()}; optimum venv: {optimum_versions(args.optimum_python)}",
        f"- inputs: {source}; {args.queries} quer{'y' if args.queries == 1 else 'ies'} per case, each scored {args.repeats}×; "
        f"Δprob against the oracle (reference, fp32) over the first {args.pair_items} items of each query",
        *[f"- {note}" for note in notes],
    ]
    return "\n".join(header) + "\n\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
