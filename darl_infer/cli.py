"""`darl-infer`: rank items for a query, or score a JSONL file of pairs in bounded memory."""

from __future__ import annotations

import argparse
import json
import sys
from itertools import groupby

from .jsonl import DataError, iter_rows
from .backends import BACKEND_CHOICES
from .scorer import Scorer


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])


def _load(args) -> Scorer:
    return Scorer.from_pretrained(args.checkpoint, backend=args.backend, dtype=args.dtype)


def _read_items(source: str) -> list[str]:
    f = sys.stdin if source == "-" else open(source, encoding="utf-8")
    with f:
        return [line.rstrip("\n") for line in f if line.strip()]


def cmd_rank(args) -> int:
    scorer = _load(args)
    items = _read_items(args.items)
    result = scorer.score(args.query, items)
    ranked = scorer.rank(args.query, items, top_k=args.top_k)
    print(f"{'#':>3}  {'grade':<12} {'score':>6}  item")
    for n, row in enumerate(ranked, start=1):
        i = row["corpus_id"]
        mark = " [truncated]" if result.truncated[i] else ""
        print(f"{n:>3}  {scorer.labels[row['grade']]:<12} {row['score']:6.3f}  {items[i]}{mark}")
    return 0


def cmd_score(args) -> int:
    """Stream: at most `--buffer` pairs in memory; consecutive pairs of one query share a prefix run."""
    scorer = _load(args)
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    rows = (row for _, row in iter_rows(args.input))
    with out:
        while True:
            buffer = [row for _, row in zip(range(args.buffer), rows)]
            if not buffer:
                break
            for query, group in groupby(buffer, key=lambda r: r["query"]):
                group = list(group)
                result = scorer.score(query, [r["item"] for r in group])
                for i, row in enumerate(group):
                    row.update(
                        score=float(result.scores[i]),
                        grade=int(result.grades[i]),
                        probs=[float(p) for p in result.probs[i]],
                        truncated=bool(result.truncated[i]),
                    )
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return 0


def cmd_export(args) -> int:
    from .backends.onnx_export import export

    section = export(args.checkpoint, args.out_dir, optimize=not args.no_optimize, int8=args.int8)
    print(f"exported to {args.out_dir}: {', '.join(section['files'])}")
    print(f"check against the reference backend: max |Δprob| {section['check_max_abs_prob_diff']:.2e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="darl-infer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rank = sub.add_parser("rank", help="rank items (one per line) for a query")
    rank.add_argument("--query", required=True)
    rank.add_argument("--items", required=True, help="file with one item per line, or - for stdin")
    rank.add_argument("--top-k", type=int, default=None)
    _add_model_args(rank)
    rank.set_defaults(func=cmd_rank)
    score = sub.add_parser("score", help="score a JSONL file of {query, item} pairs")
    score.add_argument("--input", required=True, help="JSONL pairs, or - for stdin")
    score.add_argument("--output", default="-", help="JSONL out (input fields + score, grade, probs, truncated)")
    score.add_argument("--buffer", type=int, default=4096, help="pairs held in memory at once")
    _add_model_args(score)
    score.set_defaults(func=cmd_score)
    export = sub.add_parser("export", help="export a checkpoint to ONNX graphs for the onnx backend")
    export.add_argument("checkpoint", help="checkpoint directory, or 'default' for the embedded default model")
    export.add_argument("out_dir", help="new directory for prefix.onnx, items.onnx, tokenizer and darl.json")
    export.add_argument("--int8", action="store_true", help="dynamic int8 quantization of the weights")
    export.add_argument("--no-optimize", action="store_true", help="skip ONNX Runtime's transformer optimizer")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DataError as e:
        raise SystemExit(f"darl-infer: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
