"""darl_infer on a CUDA GPU at the real base models' shapes, one run, one markdown table.

    python bench/gpu.py --out bench/results/gpu_<date>.md
    bash bench/gpu_check.sh          # on a lent GPU machine: this, then the CUDA tests, one call

A GPU machine here has no model hub and the real base weights do not travel to it, so the models
are random-init at the real configs (gemma3-270m, SmolLM2-135M) with a word-level tokenizer (one
token per word: the prefix and item lengths are exact). Weights change scores, not speed.

Rows, each per (model, instruction tokens, N items per query), bf16 on the GPU:
  reference     darl_infer's oracle, every pair alone through HF (N = 10 only: it is pairwise)
  hf-pairwise   AutoModelForSequenceClassification on padded batches of 32 pairs (hand-written usage)
  torch         darl_infer, the prefix once per query, items packed against it, PyTorch's fused SDPA
  triton        the torch flow with the Triton kernels (shared-prefix attention, RMSNorm, fused head)
  torch-compiled  the torch backend with compile=True (inductor's GPU codegen; opt-in: --rows ...
                torch-compiled; its first query compiles, which the warm-up absorbs)
Columns: items/s, p50 / p95 ms per query (after a warm-up query), max |Δprob| over the first 10
items against the oracle in fp32 (within the bf16 tolerance of DESIGN.md? Random weights at full
depth put HF itself in bf16 past it: bench/RESULTS.md) and against the reference row in bf16 (each
pair alone through HF in the same dtype: the error a fast path adds to bf16's own), useful TFLOP/s (the
work of bench/workload.py's FlopModel: the prefix once for darl_infer, every pair whole for the
pairwise rows) and its fraction of the measured bf16 matmul peak.

Then the kernels alone at gemma3-270m's shapes (bench/bench_kernels.py's inputs), timed with
triton.testing.do_bench: time, the bytes each must move and that as a fraction of the measured
HBM copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the word-level tokenizer of the tests' tiny models

from tiny_models import WORDS, tiny_tokenizer  # noqa: E402

from darl_infer import Scorer  # noqa: E402
from darl_infer.checkpoint import CheckpointSpec  # noqa: E402
from darl_infer.template import Template  # noqa: E402
from workload import FlopModel  # noqa: E402

# the published configs of the real base models (the parts that set shapes and numerics)
SHAPES = {
    "gemma3-270m": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256,
        rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
    ),
    "SmolLM2-135M": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192, tie_word_embeddings=True,
    ),
}
TOLERANCE = {torch.bfloat16: 2e-2}  # DESIGN.md: bf16 probabilities against the fp32 oracle
CHECKED_ITEMS = 10  # items per query the oracle scores
QUERY_WORDS, ITEM_WORDS = 6, (12, 40)  # item lengths uniform in this range (a product title's)


def make_checkpoints(root: Path, name: str, instruction_tokens: list[int]) -> dict[int, Path]:
    """One random-init checkpoint per instruction length, sharing the weights file."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    fields = dict(SHAPES[name])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, num_labels=3, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = AutoModelForSequenceClassification.from_config(config)
    # logits of std ~2 over the unit-RMS hidden state, a trained relevance head's spread (tests/tiny_models.py)
    torch.nn.init.normal_(model.score.weight, std=2 / config.hidden_size**0.5)
    weights = root / name / "weights"
    model.save_pretrained(weights)
    tokenizer.save_pretrained(weights)
    dirs = {}
    for tokens in instruction_tokens:
        d = root / name / f"instruction{tokens}"
        d.mkdir(parents=True, exist_ok=True)
        for f in weights.iterdir():
            (d / f.name).unlink(missing_ok=True)
            (d / f.name).symlink_to(f)
        instruction = " ".join(WORDS[i % len(WORDS)] for i in range(tokens))
        CheckpointSpec(template=Template(instruction=instruction, max_item_tokens=64)).save(d)
        dirs[tokens] = d
    return dirs


def make_queries(n_queries: int, n_items: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    return [(text(QUERY_WORDS), [text(rng.randint(*ITEM_WORDS)) for _ in range(n_items)]) for _ in range(n_queries)]


def hf_pairwise(checkpoint: Path, dtype: torch.dtype, device: str):
    """What users write by hand: the HF sequence classifier on padded batches of 32 pairs."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    encoder = CheckpointSpec.load(checkpoint).template.encoder(tiny_tokenizer())

    @torch.inference_mode()
    def score(query, items):
        encoded = encoder.encode(query, items)
        pairs = [encoded.prefix + s for s in encoded.suffixes]
        probs = []
        for start in range(0, len(pairs), 32):
            batch = pairs[start : start + 32]
            width = max(map(len, batch))
            ids = torch.tensor([p + [0] * (width - len(p)) for p in batch], device=device)
            mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in batch], device=device)
            probs.append(model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1))
        return torch.cat(probs).cpu().numpy()

    return score, encoder


def scorer_fn(checkpoint: Path, row: str, dtype: str, device: str, token_budget: int | None):
    backend = "torch" if row == "torch-compiled" else row
    options = {} if backend == "reference" or token_budget is None else {"token_budget": token_budget}
    if row == "torch-compiled":
        options["compile"] = True
    scorer = Scorer.from_pretrained(checkpoint, backend=backend, dtype=dtype, device=device, **options)
    return (lambda query, items: scorer.score(query, items).probs), scorer.encoder


def timed(score, queries) -> tuple[list[float], list[np.ndarray]]:
    score(*queries[0])  # warm-up: compiles and autotunes the kernels, fills the allocator
    latencies, probs = [], []
    for query, items in queries[1:]:
        synchronize()
        start = time.perf_counter()
        p = score(query, items)
        synchronize()
        latencies.append(time.perf_counter() - start)
        probs.append(np.asarray(p, dtype=np.float64))
    return latencies, probs


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(n: int = 8192, reps: int = 10) -> float:
    """bf16 FLOP/s of x @ w.T, n³, median of `reps` after warm-up (random data)."""
    x, w = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / (median_ms(lambda: torch.nn.functional.linear(x, w), reps) / 1e3)


def copy_bandwidth(gib: int = 2, reps: int = 10) -> float:
    """Bytes read + written per second of a device-to-device copy."""
    a = torch.empty(gib * 2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (median_ms(lambda: b.copy_(a), reps) / 1e3)


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_rows(bandwidth: float, peak: float) -> list[str]:
    """The kernels against their PyTorch versions at gemma3-270m's shapes, N = 100 and 1000 items."""
    import bench_kernels as bk
    from triton.testing import do_bench

    from darl_infer.backends.sdpa_attention import shared_prefix_attention_sdpa
    from darl_infer.kernels.classification_head import classification_head, classification_head_reference
    from darl_infer.kernels.shared_prefix_attention import shared_prefix_attention, shared_prefix_attention_reference

    lines = ["| op | N | time µs | bytes moved (min) MB | % of copy bandwidth | attention TFLOP/s | % of bf16 peak |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for n_items in (100, 1000):
        bk.N_ITEMS = n_items
        args = bk.attention_args("cuda")
        q, k, v, pk, pv, cu, scale, window = args
        moved = bk.nbytes(q, k, v, pk, pv, cu) + bk.nbytes(q)  # inputs once, output once
        prefix_flops, own_flops = bk.flops()
        for label, op in [("attention triton", shared_prefix_attention), ("attention torch SDPA (torch backend)", shared_prefix_attention_sdpa),
                          ("attention torch reference", shared_prefix_attention_reference)]:
            for w_label, w in [("sliding", window), ("global", None)]:
                us = 1e3 * do_bench(lambda: op(q, k, v, pk, pv, cu, scale, w))
                lines.append(f"| {label}, {w_label} | {n_items} | {us:.0f} | {moved / 1e6:.2f} | {100 * moved / (us / 1e6) / bandwidth:.0f} "
                             f"| {(prefix_flops + own_flops) / (us / 1e6) / 1e12:.1f} | {100 * (prefix_flops + own_flops) / (us / 1e6) / peak:.1f} |")
        hidden, cu, norm_weight, eps, variant, score_weight, grades = bk.head_args("cuda")
        head_moved = n_items * bk.HIDDEN * hidden.element_size() + bk.nbytes(cu, norm_weight, score_weight, grades)
        for label, op in [("head triton", classification_head), ("head torch", classification_head_reference), ("head unfused", bk.unfused_head)]:
            us = 1e3 * do_bench(lambda: op(hidden, cu, norm_weight, eps, variant, score_weight, grades))
            lines.append(f"| {label} | {n_items} | {us:.0f} | {head_moved / 1e6:.2f} | {100 * head_moved / (us / 1e6) / bandwidth:.0f} | – | – |")
    return lines


def gpu_line() -> str:
    props = torch.cuda.get_device_properties(0)
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    found = []
    for name in ("torch", "triton", "transformers"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (absent)")
    return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, driver {driver}, "
            f"CUDA {torch.version.cuda}; {', '.join(found)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--instruction-tokens", type=int, nargs="+", default=[0, 64, 256])
    ap.add_argument("--items", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--queries", type=int, default=10, help="timed queries per row (after one warm-up)")
    ap.add_argument("--token-budget", type=int, default=None, help="the torch/triton backends' tokens per forward pass (default: theirs)")
    ap.add_argument("--rows", nargs="+", default=["reference", "hf-pairwise", "torch", "triton"],
                    choices=["reference", "hf-pairwise", "torch", "triton", "torch-compiled"])
    ap.add_argument("--work-dir", default="/tmp/darl_gpu_bench")
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernels-alone table")
    ap.add_argument("--dry-run", action="store_true", help="without CUDA: the torch rows on the CPU, no peaks, no kernels")
    ap.add_argument("--out", help="also write the report (markdown) here, updated after every row")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        sys.exit("bench/gpu.py needs a CUDA GPU (--dry-run: a tiny run of the rows on the CPU, to check the script)")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    started = time.time()
    peak, bandwidth = (matmul_peak(), copy_bandwidth()) if device == "cuda" else (float("nan"), float("nan"))
    header = [
        f"- command: `python bench/gpu.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- GPU: {gpu_line() if device == 'cuda' else 'none (dry run on the CPU)'}",
        f"- measured: bf16 matmul (8192³, x @ w.T) {peak / 1e12:.0f} TFLOP/s; device copy {bandwidth / 1e12:.2f} TB/s (read + write)",
        f"- models random-init at the real configs, word-level tokenizer; queries {QUERY_WORDS} tokens, items "
        f"{ITEM_WORDS[0]}-{ITEM_WORDS[1]} tokens; torch/triton token budget {args.token_budget or 'the default'}; {args.queries} timed queries per row after one warm-up",
    ]
    lines = ["| model | instr. tokens | N | row | items/s | × hf-pairwise | p50 ms/query | p95 ms/query | max abs Δprob | within tol. "
             "| Δ vs bf16 reference | useful TFLOP/s | % of bf16 peak |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|:---:|---:|---:|---:|"]
    kernel_lines: list[str] = []

    def report() -> str:
        text = "\n".join(header) + f"\n- rows took {(time.time() - started) / 60:.1f} min\n\n" + "\n".join(lines) + "\n"
        return text + ("\n" + "\n".join(kernel_lines) + "\n" if kernel_lines else "")

    for name in args.models:
        dirs = make_checkpoints(Path(args.work_dir), name, args.instruction_tokens)
        from transformers import AutoConfig, AutoModelForSequenceClassification

        with torch.device("meta"):
            flops = FlopModel.of(AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(dirs[args.instruction_tokens[0]])))
        for tokens in sorted(args.instruction_tokens, reverse=True):
            checkpoint = dirs[tokens]
            oracle_fn, encoder = scorer_fn(checkpoint, "reference", "fp32", device, 0)
            check_queries = make_queries(args.queries + 1, CHECKED_ITEMS, seed=tokens)
            _, oracle = timed(oracle_fn, check_queries)
            del oracle_fn
            base = {}  # N -> hf-pairwise items/s
            bf16_reference = None  # the reference row's probabilities of the checked items
            # the reference first (the bf16 column), then hf-pairwise (the × column)
            for row in ["reference", "hf-pairwise", "torch", "triton", "torch-compiled"]:
                if row not in args.rows or (row == "triton" and device != "cuda"):
                    continue
                try:  # one failing row must not cost the rest of a GPU run
                    if row == "hf-pairwise":
                        fn, _ = hf_pairwise(checkpoint, torch.bfloat16, device)
                    else:
                        fn, _ = scorer_fn(checkpoint, row, "bf16", device, args.token_budget)
                    _, checked = timed(fn, check_queries)
                    diff = max(float(np.abs(p - o).max()) for p, o in zip(checked, oracle))
                    if row == "reference":
                        bf16_reference = checked
                    vs_bf16 = "–" if bf16_reference is None else f"{max(float(np.abs(p - r).max()) for p, r in zip(checked, bf16_reference)):.1e}"
                    for n_items in [CHECKED_ITEMS] if row == "reference" else sorted(args.items):
                        queries = make_queries(args.queries + 1, n_items, seed=1000 + n_items)
                        latencies, _ = timed(fn, queries)
                        encoded = [encoder.encode(q, items) for q, items in queries[1:]]
                        count = FlopModel.pairwise if row in ("reference", "hf-pairwise") else FlopModel.shared_prefix
                        work = sum(count(flops, len(e.prefix), [len(s) for s in e.suffixes]) for e in encoded)
                        items_per_s = n_items * len(latencies) / sum(latencies)
                        if row == "hf-pairwise":
                            base[n_items] = items_per_s
                        tflops = work / sum(latencies) / 1e12
                        lines.append(
                            f"| {name} | {tokens} | {n_items} | {row} | {items_per_s:.0f} | {f'{items_per_s / base[n_items]:.1f}' if n_items in base else '–'} "
                            f"| {1e3 * statistics.median(latencies):.1f} | {1e3 * float(np.percentile(latencies, 95)):.1f} | {diff:.1e} "
                            f"| {'yes' if diff <= TOLERANCE[torch.bfloat16] else 'NO'} | {vs_bf16} | {tflops:.1f} | {100 * tflops * 1e12 / peak:.1f} |"
                        )
                        print(lines[-1], flush=True)
                        if args.out:
                            Path(args.out).write_text(report())
                    del fn
                except Exception as error:  # noqa: BLE001
                    lines.append(f"| {name} | {tokens} | – | {row} | failed: {type(error).__name__}: {str(error)[:200]} |")
                    print(lines[-1], flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
    if not args.no_kernels and device == "cuda":
        try:
            kernel_lines = kernel_rows(bandwidth, peak)
        except Exception as error:  # noqa: BLE001
            kernel_lines = [f"kernels table failed: {type(error).__name__}: {error}"]
        print("\n".join(kernel_lines), flush=True)
    text = report()
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
