"""`darl-infer`: rank items for a query, or score a JSONL file of pairs in bounded memory.

Bad input (an argument, a data file, the checkpoint) is one line on stderr naming the problem
(file:line for data) and exit code 2, found before the model is loaded wherever it can be.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from itertools import islice
from pathlib import Path

from .atomic import atomic_file
from .backends import BACKEND_CHOICES
from .base_models import BaseModelMissing
from .bi_encoder import is_bi_encoder
from .cascade import CascadeScorer, keep_value
from .checkpoint import CheckpointError, resolve_checkpoint
from .jsonl import DataError, iter_lines, iter_rows
from .pairs import score_pairs
from .scorer import Scorer
from .serve.cli import add_arguments as add_serve_arguments
from .serve.cli import run as run_serve

# what a user can fix: reported in one line with exit code 2, never a traceback
INPUT_ERRORS = (DataError, CheckpointError, BaseModelMissing)


def at_least(minimum: int):
    """argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"])
    p.add_argument("--compile", action="store_true",
                   help="the decoder layers under torch.compile (torch backend; faster in bf16, the first call compiles)")
    p.add_argument("--cascade", default=None, metavar="COARSE",
                   help="a fast checkpoint (e.g. default-student) that grades every item first; --checkpoint re-grades the --keep best")
    p.add_argument("--keep", type=keep_value, default=None,
                   help="with --cascade: each query's best items re-graded, a fraction in (0, 1] or a count (default 0.2)")


def _check_checkpoints(args) -> None:
    """Name a missing checkpoint directory before any model loads."""
    resolve_checkpoint(args.checkpoint)
    if args.cascade is not None:
        resolve_checkpoint(args.cascade)
    elif args.keep is not None:
        raise DataError("--keep needs --cascade (the coarse model whose best items are kept)")
    if args.compile and all(is_bi_encoder(c) for c in [args.checkpoint] + ([args.cascade] if args.cascade else [])):
        raise DataError("--compile compiles a cross-encoder's decoder layers; no checkpoint given is one (a bi-encoder runs uncompiled)")


def compile_option(args, checkpoint) -> dict:
    """--compile for a checkpoint: the option of a cross-encoder; a bi-encoder (its own path) runs uncompiled."""
    return {"compile": True} if args.compile and not is_bi_encoder(checkpoint) else {}


def _load(args) -> Scorer | CascadeScorer:
    """The scorer; its dtype (what "auto" chose on this machine) on stderr, beside the results."""
    scorer = Scorer.from_pretrained(args.checkpoint, backend=args.backend, dtype=args.dtype, **compile_option(args, args.checkpoint))
    print(f"darl-infer: {args.checkpoint or 'default model'}, dtype {scorer.dtype}", file=sys.stderr)
    if args.cascade is None:
        return scorer
    coarse = Scorer.from_pretrained(args.cascade, backend=args.backend, dtype=args.dtype, **compile_option(args, args.cascade))
    print(f"darl-infer: cascade coarse {args.cascade}, dtype {coarse.dtype}", file=sys.stderr)
    return Scorer.cascade(coarse, scorer, 0.2 if args.keep is None else args.keep)


def _read_items(source: str) -> list[str]:
    return [line.rstrip("\r\n") for _, line in iter_lines(source) if line.strip()]


def cmd_rank(args) -> int:
    if not args.query.strip():
        raise DataError("--query: query is empty")
    items = _read_items(args.items)
    _check_checkpoints(args)
    scorer = _load(args)
    result = scorer.score(args.query, items)
    ranked = scorer.rank(args.query, items, top_k=args.top_k)
    by = "" if result.graded_by is None else f"{'graded by':<10} "
    print(f"{'#':>3}  {'grade':<12} {'score':>6}  {by}item")
    for n, row in enumerate(ranked, start=1):
        i = row["corpus_id"]
        mark = " [truncated]" if result.truncated[i] else ""
        by = "" if result.graded_by is None else f"{row['graded_by']:<10} "
        print(f"{n:>3}  {scorer.labels[row['grade']]:<12} {row['score']:6.3f}  {by}{items[i]}{mark}")
    return 0


def _check_output(input_path: str, output: str) -> None:
    if output == "-":
        return
    out = Path(output)
    if out.is_dir():
        raise DataError(f"{out}: is a directory; --output names a file")
    if not out.parent.is_dir():
        raise DataError(f"{out}: directory {out.parent} does not exist")
    source = Path(input_path)
    if input_path != "-" and (out.resolve() == source.resolve() or (out.exists() and source.exists() and os.path.samefile(out, source))):
        raise DataError(f"--input and --output are the same file ({out}); write the scores to another file")


def cmd_score(args) -> int:
    if args.engine == "ray":
        if args.compile:
            raise DataError("--compile is for the local engine; Ray actors load their scorers uncompiled")
        from .distributed.job import run

        return run(args)
    return _score_local(args)


RAY_ONLY = {"format": None, "input_format": None, "actors": 1, "num_cpus": 1, "num_gpus": 0, "address": None,
            "on_error": "skip", "group_by_query": False, "overwrite": False}


def _score_local(args) -> int:
    """Stream: at most `--buffer` pairs in memory, scored in one `score_many` call (the pairs of one
    query in a buffer share a prefix run; with torch/triton the buffer's queries are packed).

    The output is written to a temporary file beside --output and renamed when complete: on any
    error the previous file is untouched. A file input is checked line by line before the model
    loads (stdin can be read once only: its lines are checked as they are scored).
    """
    for name, default in RAY_ONLY.items():
        if getattr(args, name) != default:
            raise DataError(f"--{name.replace('_', '-')} needs --engine ray (the local command writes one JSONL file)")
    _check_output(args.input, args.output)
    _check_checkpoints(args)
    if args.input != "-":
        for _ in iter_rows(args.input):
            pass
    scorer = _load(args)
    rows = (row for _, row in iter_rows(args.input))
    writing = contextlib.nullcontext(sys.stdout) if args.output == "-" else atomic_file(args.output)
    with writing as out:
        while buffer := list(islice(rows, args.buffer)):
            scored = score_pairs(scorer, [row["query"] for row in buffer], [row["item"] for row in buffer])
            for row, fields in zip(buffer, scored):
                row.update(fields)
            for row in buffer:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return 0


def cmd_export(args) -> int:
    from .backends.onnx_export import export

    section = export(args.checkpoint, args.out_dir, optimize=not args.no_optimize, int8=args.int8)
    print(f"exported to {args.out_dir}: {', '.join(section['files'])}")
    print(f"check against the reference backend: max |Δprob| {section['check_max_abs_prob_diff']:.2e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="darl-infer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rank = sub.add_parser("rank", help="rank items (one per line) for a query")
    rank.add_argument("--query", required=True)
    rank.add_argument("--items", required=True, help="file with one item per line, or - for stdin")
    rank.add_argument("--top-k", type=at_least(0), default=None)
    _add_model_args(rank)
    rank.set_defaults(func=cmd_rank)
    score = sub.add_parser("score", help="score a JSONL file of {query, item} pairs (or many files, on Ray Data)")
    score.add_argument("--input", required=True, help="JSONL pairs, or - for stdin; with --engine ray: paths, a glob, a directory or a URI, JSONL or Parquet")
    score.add_argument("--output", default="-", help="JSONL out (input fields + score, grade, probs, truncated); with --engine ray: a new directory")
    score.add_argument("--buffer", type=at_least(1), default=4096, help="pairs held in memory at once (--engine ray: per actor batch)")
    _add_model_args(score)
    ray_options = score.add_argument_group("--engine ray (the 'distributed' extra)")
    ray_options.add_argument("--engine", choices=["local", "ray"], default="local")
    ray_options.add_argument("--format", choices=["jsonl", "parquet"], default=None, help="output format (default: the input's)")
    ray_options.add_argument("--input-format", choices=["jsonl", "parquet"], default=None, help="default: parquet if --input ends in .parquet, else jsonl")
    ray_options.add_argument("--actors", type=at_least(1), default=1, help="scoring actors, each holding one model")
    ray_options.add_argument("--num-cpus", type=float, default=1, help="CPUs per actor (torch threads)")
    ray_options.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor")
    ray_options.add_argument("--address", default=None, help="Ray cluster ('auto': the one RAY_ADDRESS or `ray start` gave); default: start a local Ray")
    ray_options.add_argument("--on-error", choices=["skip", "fail"], default="skip", help="bad rows: to OUTPUT/errors/ and go on, or stop at the first")
    ray_options.add_argument("--group-by-query", action="store_true", help="input not sorted by query: groupby (a full shuffle) so each prefix runs once")
    ray_options.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    score.set_defaults(func=cmd_score)
    export = sub.add_parser("export", help="export a checkpoint to ONNX graphs for the onnx backend")
    export.add_argument("checkpoint", help="checkpoint directory, or 'default' for the embedded default model")
    export.add_argument("out_dir", help="new directory for prefix.onnx, items.onnx, tokenizer and darl.json")
    export.add_argument("--int8", action="store_true", help="dynamic int8 quantization of the weights")
    export.add_argument("--no-optimize", action="store_true", help="skip ONNX Runtime's transformer optimizer")
    export.set_defaults(func=cmd_export)
    serve = sub.add_parser("serve", help="serve rerank endpoints over HTTP (TEI and Cohere schemas; the 'serve' extra)")
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (*INPUT_ERRORS, FileExistsError) as e:
        print(f"darl-infer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
