"""Offline scoring on Ray Data against the local CLI, on the same file, in one run.

    python bench/ray_score.py --queries 20 --items 50 --out bench/results/ray_score.md

Input: --queries Home Depot dev queries with --items titles each (bench/workload.py; synthetic
text without ../shared/data), one JSONL file sorted by query, as retrieval writes it. Rows, each a
fresh `darl-infer` process, timed end to end (process start, model load, Ray start, scoring,
writing): the local `darl-infer score` (torch's default threads), then `--engine ray` with 1 actor
and with 2 actors. Ray's own job time (after Ray is up, actor start and model load included) is
taken from the output's _SUCCESS.json. Every row's scores are checked against the local row's.
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from compare import machine
from workload import texts

ROWS = {  # name: extra arguments; 2 CPUs here: the actors leave Ray 0.5 CPU for reading and writing
    "local CLI": [],
    "ray, 1 actor x 1.5 CPU": ["--engine", "ray", "--actors", "1", "--num-cpus", "1.5"],
    "ray, 2 actors x 0.75 CPU": ["--engine", "ray", "--actors", "2", "--num-cpus", "0.75"],
}


def run_row(name: str, extra: list[str], pairs: Path, out: Path, checkpoint: str | None, buffer: int) -> dict:
    cmd = [sys.executable, "-m", "darl_infer.cli", "score", "--input", str(pairs), "--output", str(out), "--buffer", str(buffer), *extra]
    cmd += ["--checkpoint", checkpoint] if checkpoint else []
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    if out.is_dir():
        rows = [json.loads(line) for part in sorted(glob.glob(f"{out}/part-*.jsonl")) for line in open(part)]
        job = json.loads((out / "_SUCCESS.json").read_text())["seconds"]
    else:
        rows, job = [json.loads(line) for line in open(out)], None
    return {"name": name, "wall": wall, "job": job, "scores": {(r["query"], r["item"]): r["score"] for r in rows}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--buffer", type=int, default=256, help="pairs per local buffer and per actor batch")
    parser.add_argument("--checkpoint", default=None, help="default: the embedded default model")
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()

    groups, source = texts(args.queries, args.items)
    with tempfile.TemporaryDirectory() as tmp:
        pairs = Path(tmp) / "pairs.jsonl"
        pairs.write_text("".join(json.dumps({"query": q, "item": item}) + "\n" for q, items in groups for item in items))
        n = args.queries * args.items
        results = []
        for i, (name, extra) in enumerate(ROWS.items()):
            out = Path(tmp) / (f"out{i}" if "--engine" in extra else f"out{i}.jsonl")
            results.append(run_row(name, extra, pairs, out, args.checkpoint, args.buffer))
            print(f"{name}: {results[-1]['wall']:.1f} s", file=sys.stderr)

    local = results[0]["scores"]
    lines = [
        f"| row | wall s (end to end) | pairs/s end to end | Ray job s | pairs/s in the job | x local | max abs score diff vs local |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        assert r["scores"].keys() == local.keys(), f"{r['name']}: rows differ from the local CLI's"
        diff = max(abs(r["scores"][k] - local[k]) for k in local)
        job = "" if r["job"] is None else f"{r['job']:.1f}"
        job_rate = "" if r["job"] is None else f"{n / r['job']:.1f}"
        lines.append(f"| {r['name']} | {r['wall']:.1f} | {n / r['wall']:.1f} | {job} | {job_rate} | "
                     f"{results[0]['wall'] / r['wall']:.2f} | {diff:.1e} |")
    lines += ["", f"- pairs: {n} ({args.queries} queries x {args.items} items, sorted by query); {source}",
              f"- checkpoint: {args.checkpoint or 'default model'}; --buffer {args.buffer}",
              f"- machine: {machine()}", f"- run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
              f"- command: python bench/ray_score.py {' '.join(sys.argv[1:])}"]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
