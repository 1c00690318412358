"""`darl-eval [--checkpoint DIR] --data FILE.jsonl [--data ...]`: metrics of a checkpoint through the Scorer.

Prints one JSON object keyed by each file's path, with accuracy, macro_f1, per_grade_f1, ece
(15 bins), ndcg@10 (averaged over queries), pairwise_accuracy (over each query's item pairs with
different labels; pairwise_pairs of them), n, and easy_negatives: for --negative-queries of the
file's queries, --negatives-per-query items of other, unrelated queries of the same file (seeded,
lexical-overlap guard): irrelevant_rate (share graded irrelevant), auc (own weak/strong items
against those foreign items) and ndcg@10 over own + foreign items. See the README for the keys.
Without --checkpoint: the embedded default model.
"""

from __future__ import annotations

import argparse
import json
import sys

from darl_infer.backends import BACKEND_CHOICES
from darl_infer.cli import INPUT_ERRORS, at_least

from .data import DataError, read_pairs
from .evaluate import NEGATIVE_QUERIES, NEGATIVES_PER_QUERY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="darl-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the embedded default model)")
    parser.add_argument("--data", action="append", required=True, help="labelled JSONL file; repeat for several")
    parser.add_argument("--limit", type=at_least(1), default=None, help="evaluate a seeded random sample of this many pairs per file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="Scorer backend (default: auto)")
    parser.add_argument("--negative-queries", type=at_least(0), default=NEGATIVE_QUERIES,
                        help=f"queries per file that are shown foreign items (default {NEGATIVE_QUERIES})")
    parser.add_argument("--negatives-per-query", type=at_least(1), default=NEGATIVES_PER_QUERY,
                        help=f"foreign items per such query (default {NEGATIVES_PER_QUERY})")
    args = parser.parse_args(argv)

    from darl_infer import Scorer

    from .evaluate import evaluate_pairs

    try:
        # syntax first (fast, before loading a model); the label range once the checkpoint says K
        sets = {path: read_pairs(path, num_labels=sys.maxsize, limit=args.limit, seed=args.seed) for path in args.data}
        scorer = Scorer.from_pretrained(args.checkpoint, backend=args.backend)
        num_labels = len(scorer.labels)
        for path, pairs in sets.items():
            bad = next((p for p in pairs if p.label >= num_labels), None)
            if bad is not None:
                raise DataError(f"{path}: label {bad.label} is not an integer in 0..{num_labels - 1} (the checkpoint's grades)")
    except INPUT_ERRORS as e:
        print(f"darl-eval: error: {e}", file=sys.stderr)
        return 2
    options = {"negative_queries": args.negative_queries, "negatives_per_query": args.negatives_per_query, "seed": args.seed}
    json.dump({path: evaluate_pairs(scorer, pairs, **options) for path, pairs in sets.items()}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
