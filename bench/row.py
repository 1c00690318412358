"""One row of bench/compare.py, run in a process of its own so that its peak RSS is its own.

    python bench/row.py ROW DTYPE --workload W.json --case I --queries Q --items N --out R.json [paths]

Loads the row's model, warms it up on a few items, then times `score(query)` once per query and
repeat, and writes the latencies (wall clock and this process's CPU time), the probabilities of
the first repeat and the peak RSS.

Imports only the standard library and numpy at the top: the `optimum` row runs under another
interpreter (its own venv, transformers < 4.58) where darl_infer does not import.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

PAIR_BATCH = 32  # batch size of the pairwise peers: CrossEncoder.predict's default
WARMUP_ITEMS = 4  # warm-up on a few items of the first query: the first call builds caches and pools


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def peak_rss_mb() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries it over from the parent
    across fork + exec, so every row would report the parent's peak."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def ort_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return options


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def pair_batches(query: dict):
    """The query's prefix + suffix sequences, PAIR_BATCH at a time."""
    seqs = [query["prefix"] + s for s in query["suffixes"]]
    for start in range(0, len(seqs), PAIR_BATCH):
        yield seqs[start : start + PAIR_BATCH]


# --- darl_infer backends -------------------------------------------------------------------------


def quantize_decoder_int8(model) -> None:
    """torch.ao's dynamic int8 in every nn.Linear of the decoder stack (weights per output channel,
    activations per tensor from each call's range; x86/fbgemm kernels); the classification head
    stays fp32 (the fused head reads its weight). Lossy: bench/RESULTS.md, "int8"."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        torch.ao.quantization.quantize_dynamic(getattr(model, model.base_model_prefix), {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def quantize_int8(model, tokenizer, spec) -> None:
    """dtype="int8"'s int8 weights (darl_infer/backends/int8_linear.py), in place."""
    from darl_infer.backends.int8_linear import quantize_decoder_weights

    quantize_decoder_weights(model)


def darl_row(backend: str, prepare=None, **options):
    """`prepare(model, tokenizer, spec)`: what a variant of the row does to the loaded model first (quantize);
    `options`: the backend's options (compile=True)."""

    def load(args, case):
        import dataclasses

        import torch

        from darl_infer import Scorer
        from darl_infer.checkpoint import CheckpointSpec
        from darl_infer.loading import load_checkpoint_model
        from darl_infer.template import Template

        spec = CheckpointSpec.load(args.checkpoint)
        spec = dataclasses.replace(spec, template=Template.from_dict(case["template"]))
        if backend == "onnx":
            from transformers import AutoTokenizer

            from darl_infer.backends.onnx_format import OnnxExport

            export = OnnxExport.load(args.onnx_export)
            tokenizer = AutoTokenizer.from_pretrained(args.onnx_export)
            scorer = Scorer(export, tokenizer, spec, backend="onnx", threads=args.threads)
        else:
            model, tokenizer = load_checkpoint_model(Path(args.checkpoint), spec, torch_dtype(args.dtype), torch.device("cpu"))
            if prepare is not None:
                prepare(model, tokenizer, spec)
            scorer = Scorer(model, tokenizer, spec, backend=backend, **options)
        for q in case["queries"]:  # the Scorer encodes text itself: check it gets the workload's ids
            enc = scorer.encoder.encode(q["query"], q["items"])
            if enc.prefix != q["prefix"] or enc.suffixes != q["suffixes"]:
                raise RuntimeError(f"{backend}: encoding of {q['query']!r} differs from the workload's")
        return lambda q: scorer.score(q["query"], q["items"]).probs

    return load


# --- peers -----------------------------------------------------------------------------------------


def hf_pairwise(args, case):
    """What users write by hand: AutoModelForSequenceClassification on padded batches of pairs."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(args.hf_dir, dtype=torch_dtype(args.dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)

    @torch.inference_mode()
    def score(query):
        probs = []
        for batch in pair_batches(query):
            inputs = tokenizer.pad({"input_ids": batch}, return_tensors="pt")
            probs.append(model(**inputs).logits.float().softmax(-1))
        return torch.cat(probs).numpy()

    return score


def crossencoder(args, case):
    """sentence-transformers' CrossEncoder on the same folder. Its tokenizer would build its own
    pair template ([BOS] query [BOS] item), so `preprocess` is pointed at the workload's ids
    instead; batching, length sorting, padding and the forward pass stay CrossEncoder's."""
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(args.hf_dir, device="cpu", model_kwargs={"dtype": torch_dtype(args.dtype)})
    ids_of = {}
    for q in case["queries"]:
        for item, suffix in zip(q["items"], q["suffixes"]):
            ids_of[(q["query"], item)] = q["prefix"] + suffix

    def preprocess(pairs, **kwargs):
        padded = ce.tokenizer.pad({"input_ids": [ids_of[tuple(p)] for p in pairs]}, return_tensors="pt")
        return {**padded, "modality": "text"}

    ce.preprocess = preprocess
    return lambda q: ce.predict([(q["query"], item) for item in q["items"]], batch_size=PAIR_BATCH, apply_softmax=True)


def ort_pairs(args, case):
    """ONNX Runtime on a plain export of the HF model (input_ids, attention_mask -> logits)."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    session = ort.InferenceSession(args.pair_onnx, ort_options(args.threads), providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)

    def score(query):
        logits = []
        for batch in pair_batches(query):
            inputs = tokenizer.pad({"input_ids": batch}, return_tensors="np")
            logits.append(session.run(["logits"], {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]})[0])
        return softmax(np.concatenate(logits))

    return score


def register_optimum_gemma3_classification() -> None:
    """optimum-onnx 0.1 has an ONNX config for gemma3_text but registers it for generation and
    feature extraction only; register the same config for text-classification."""
    from optimum.exporters.onnx.model_configs import Gemma3TextOnnxConfig, register_tasks_manager_onnx

    register_tasks_manager_onnx("gemma3_text", "text-classification")(Gemma3TextOnnxConfig)


def optimum(args, case):
    """optimum's ORTModelForSequenceClassification on its own export of the same folder."""
    register_optimum_gemma3_classification()
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    model = ORTModelForSequenceClassification.from_pretrained(args.optimum_dir, session_options=ort_options(args.threads))
    tokenizer = AutoTokenizer.from_pretrained(args.optimum_dir)

    def score(query):
        logits = [model(**tokenizer.pad({"input_ids": batch}, return_tensors="pt")).logits.numpy() for batch in pair_batches(query)]
        return softmax(np.concatenate(logits))

    return score


def export_optimum(hf_dir: str, out_dir: str) -> None:
    register_optimum_gemma3_classification()
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    partial = Path(out_dir + ".partial")
    ORTModelForSequenceClassification.from_pretrained(hf_dir, export=True).save_pretrained(partial)
    AutoTokenizer.from_pretrained(hf_dir).save_pretrained(partial)
    partial.rename(out_dir)


ROWS = {
    "reference": darl_row("reference"),
    "torch": darl_row("torch"),
    "torch-compiled": darl_row("torch", compile=True),
    "torch-int8": darl_row("torch", quantize_int8, compile=True),
    "onnx": darl_row("onnx"),
    "onnx-int8": darl_row("onnx"),  # the same backend on the int8 export that --onnx-export names
    "hf-pairwise": hf_pairwise,
    "crossencoder": crossencoder,
    "ort-pairs": ort_pairs,
    "optimum": optimum,
}


def subset(case: dict, n_queries: int, n_items: int) -> dict:
    queries = [
        {**q, "items": q["items"][:n_items], "suffixes": q["suffixes"][:n_items]} for q in case["queries"][:n_queries]
    ]
    return {**case, "queries": queries}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("row", choices=[*ROWS, "export-optimum"])
    ap.add_argument("dtype", choices=["fp32", "bf16"])
    ap.add_argument("--workload")
    ap.add_argument("--case", type=int)
    ap.add_argument("--queries", type=int)
    ap.add_argument("--items", type=int)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out")
    ap.add_argument("--checkpoint")
    ap.add_argument("--hf-dir")
    ap.add_argument("--onnx-export")
    ap.add_argument("--pair-onnx")
    ap.add_argument("--optimum-dir")
    args = ap.parse_args()
    if args.row == "export-optimum":
        export_optimum(args.hf_dir, args.optimum_dir)
        return

    import torch  # both venvs have it: the pairwise peers and darl_infer run on its thread pool

    torch.set_num_threads(args.threads)
    case = subset(json.loads(Path(args.workload).read_text())["cases"][args.case], args.queries, args.items)
    score = ROWS[args.row](args, case)
    first = case["queries"][0]
    score(subset({"queries": [first]}, 1, WARMUP_ITEMS)["queries"][0])
    latencies, cpu_seconds, probs = [], [], []
    for repeat in range(args.repeats):
        for query in case["queries"]:
            start, start_cpu = time.perf_counter(), time.process_time()
            p = np.asarray(score(query), dtype=np.float64)
            latencies.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - start_cpu)
            if repeat == 0:
                probs.append(p.tolist())
    result = {"latencies": latencies, "cpu_seconds": cpu_seconds, "probs": probs, "peak_rss_mb": peak_rss_mb()}
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
