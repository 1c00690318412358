"""The distillation trade-off in one run: teacher, students and coarse->fine cascades, quality and speed.

    python bench/cascade.py --student runs/distill/student_kd --control runs/distill/student_labels --out bench/CASCADE.md

Quality: darl-eval's metrics (training/evaluate.py::report: macro-F1, ECE, pairwise accuracy,
easy negatives) on the same seeded 1,000-pair dev samples as the training table. Every model
scores each evaluation pair once (the teacher through the teacher cache, so a rerun is free); a
cascade's metrics are the real `CascadeScorer` run over those per-pair probabilities, which is
exact: an item's probabilities do not depend on the items scored with it (the Scorer contract;
tests/test_cascade.py checks each cascade probability against its model scoring that pair alone).

With --bi-encoder, the same for a distilled bi-encoder: its quality, its speed cold (item vectors
computed inside each `rank`) and with every workload item's vector computed beforehand (the
catalogue encoded offline, `encode_items`; what a ranking stage runs), and cascades with it (warm)
as the coarse model.

Speed: Home Depot dev queries with --items titles of the file each (seeded), each query's `rank`
timed alone after one warm-up query; items/s over all queries and p95 ms per query. Every row in
this one process, one after another, with torch's threads as set by --threads.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from compare import machine
from darl_infer import Scorer
from darl_infer.checkpoint import resolve_checkpoint
from darl_infer.ranking import Ranker, ScoreResult
from darl_infer.training.data import read_pairs
from darl_infer.training.evaluate import foreign_pairs, report, scorer_probs
from darl_infer.training.teacher_cache import score_pairs, teacher_probs

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
DEV_SETS = ["qbqtc", "homedepot", "kuake_qtr"]
BI_ENCODER = "bi-encoder (distilled)"


class Table(Ranker):
    """A model as a lookup of its probabilities per (query, item), computed beforehand."""

    def __init__(self, spec, probs: dict[tuple[str, str], np.ndarray]):
        self.spec, self.probs = spec, probs
        self.values = np.array(spec.grade_values, dtype=np.float32)

    def score_many(self, batch) -> list[ScoreResult]:
        results = []
        for query, items in batch:
            p = np.stack([self.probs[query, item] for item in items]).astype(np.float32)
            results.append(ScoreResult(p, p @ self.values, p.argmax(-1), np.zeros(len(items), bool), self.labels))
        return results


def quality(models: dict[str, Ranker], dev: dict[str, list]) -> dict[str, dict[str, dict]]:
    return {name: {set_name: report(scorer_probs(model), pairs, model.spec.grade_values) for set_name, pairs in dev.items()}
            for name, model in models.items()}


def speed(scorers: dict[str, Ranker], workload: list[tuple[str, list[str]]]) -> dict[str, dict]:
    out = {}
    for name, scorer in scorers.items():
        scorer.rank(*workload[0])  # warm-up
        times = []
        for query, items in workload:
            started = time.perf_counter()
            scorer.rank(query, items)
            times.append(time.perf_counter() - started)
        n_items = sum(len(items) for _, items in workload)
        out[name] = {"items_per_s": n_items / sum(times), "p95_ms": 1000 * float(np.percentile(times, 95)),
                     "p50_ms": 1000 * float(np.percentile(times, 50))}
        print(f"speed {name}: {out[name]['items_per_s']:.1f} items/s, p95 {out[name]['p95_ms']:.0f} ms", flush=True)
    return out


def homedepot_workload(path: Path, queries: int, items: int, seed: int) -> list[tuple[str, list[str]]]:
    rows = [json.loads(line) for line in path.open()]
    rng = random.Random(seed)
    all_queries, titles = sorted({r["query"] for r in rows}), sorted({r["item"] for r in rows})
    return [(q, rng.sample(titles, items)) for q in rng.sample(all_queries, queries)]


def render(q: dict, s: dict, args, seconds: float) -> str:
    lines = [
        "| model | dev set | macro-F1 | ECE | accuracy | pairwise acc. | easy neg. irrelevant | easy neg. AUC | NDCG@10 own+foreign |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, sets in q.items():
        for set_name, m in sets.items():
            e = m["easy_negatives"]
            lines.append(f"| {name} | {set_name} | {m['macro_f1']:.3f} | {m['ece']:.3f} | {m['accuracy']:.3f} | "
                         f"{m['pairwise_accuracy']:.3f} | {e['irrelevant_rate']:.3f} | {e['auc']:.3f} | {e['ndcg@10']:.3f} |")
    teacher = s["teacher"]["items_per_s"]
    lines += ["", f"Speed, N = {args.items} Home Depot titles per query, {args.queries} queries:", "",
              "| model | items/s | × teacher | p50 ms / query | p95 ms / query |", "|---|---:|---:|---:|---:|"]
    for name, r in s.items():
        lines.append(f"| {name} | {r['items_per_s']:.1f} | {r['items_per_s'] / teacher:.2f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} |")
    lines += ["", f"- machine: {machine()}", f"- run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} min",
              f"- command: `python bench/cascade.py {' '.join(args.argv)}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="the fine model (default: the embedded default model)")
    p.add_argument("--student", required=True, help="the distilled student: the cascades' coarse model")
    p.add_argument("--control", default=None, help="the same student trained on labels only")
    p.add_argument("--bi-encoder", default=None,
                   help="a distilled bi-encoder: its rows cold (item vectors computed per query) and with the item "
                        "vectors precomputed (encode_items before timing), and cascades with it as the coarse model")
    p.add_argument("--keeps", type=float, nargs="+", default=[0.1, 0.2, 0.5])
    p.add_argument("--limit", type=int, default=1000, help="dev pairs per set (seeded sample, as in training)")
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--teacher-cache", default="runs/teacher_cache")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.argv = sys.argv[1:]
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    dev = {name: read_pairs(DATA / name / "dev.jsonl", 3, args.limit, 0) for name in DEV_SETS}
    shown = sorted({(pr.query, pr.item) for pairs in dev.values() for pr in pairs} |
                   {pair for pairs in dev.values() for pair in foreign_pairs(pairs)})
    teacher_dir = resolve_checkpoint(args.teacher)
    scorers = {"teacher": Scorer.from_pretrained(teacher_dir), "student (distilled)": Scorer.from_pretrained(args.student)}
    if args.control:
        scorers["student (labels only)"] = Scorer.from_pretrained(args.control)
    tables = {"teacher": Table(scorers["teacher"].spec, dict(zip(shown, teacher_probs(teacher_dir, shown, args.teacher_cache))))}
    for name in list(scorers)[1:]:
        print(f"scoring {len(shown)} evaluation pairs with {name}", flush=True)
        tables[name] = Table(scorers[name].spec, dict(zip(shown, score_pairs(scorers[name], shown))))
    workload = homedepot_workload(DATA / "homedepot" / "dev.jsonl", args.queries, args.items, seed=0)
    coarse = {"cascade": ("student (distilled)", scorers["student (distilled)"])}
    if args.bi_encoder:
        name = BI_ENCODER
        print(f"scoring {len(shown)} evaluation pairs with {name}", flush=True)
        scorers[name] = Scorer.from_pretrained(args.bi_encoder)
        tables[name] = Table(scorers[name].spec, dict(zip(shown, score_pairs(scorers[name], shown))))
        # a ranking stage's catalogue: every item's vector computed offline (not timed), kept in the LRU
        warm = Scorer.from_pretrained(args.bi_encoder, item_cache_mb=1024)
        warm.encode_items(sorted({item for _, items in workload for item in items}))
        scorers[f"{name}, item vectors precomputed"] = warm
        coarse["bi-encoder cascade"] = (name, warm)
    for prefix, (coarse_name, coarse_scorer) in coarse.items():
        for keep in args.keeps:
            tables[f"{prefix} keep {keep:.0%}"] = Scorer.cascade(tables[coarse_name], tables["teacher"], keep)
            scorers[f"{prefix} keep {keep:.0%}"] = Scorer.cascade(coarse_scorer, scorers["teacher"], keep)
    q = quality(tables, dev)
    s = {} if args.skip_speed else speed(scorers, workload)
    if args.json:
        args.json.write_text(json.dumps({"quality": q, "speed": s}, indent=2))
    text = render(q, s, args, time.time() - started) if s else json.dumps(q, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
