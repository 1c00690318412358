"""A Ray Data datasink for scored pairs: every block becomes one output file written atomically,
its bad rows one file in `errors/`.

A block's files are named after the write task and block index, so a retried task writes the same
names again (os.replace): each input row is in the output exactly once. Output rows are the input
row with score, grade, probs and truncated added, the same JSON the local `darl-infer score` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from ..atomic import atomic_file
from ..jsonl import DataError

INTERNAL = ("darl_row", "darl_source", "darl_error")
SCORES = ("score", "grade", "probs", "truncated")


def output_row(row: dict) -> dict:
    """The input row (the original JSON object, or the Parquet columns) with the scores added."""
    out = json.loads(row["darl_row"]) if row.get("darl_row") is not None else {
        k: v for k, v in row.items() if k not in INTERNAL and k not in SCORES}
    out.update({k: row[k] for k in SCORES})
    return out


def error_row(row: dict) -> dict:
    line = row.get("darl_row")
    return {"source": row.get("darl_source"), "error": row["darl_error"],
            "row": line if line is not None else {k: row.get(k) for k in ("query", "item")}}


class ScoredPairsSink(Datasink):
    """Writes into `directory` (local): part-*.jsonl|parquet, and errors/part-*.jsonl.

    on_error "skip": bad rows go to errors/ and the job goes on; "fail": the first bad row stops
    the job with a DataError naming its file and line.
    """

    def __init__(self, directory: str | Path, format: str = "jsonl", on_error: str = "skip"):
        if format not in ("jsonl", "parquet") or on_error not in ("skip", "fail"):
            raise ValueError(f"format must be jsonl or parquet and on_error skip or fail, got {format!r}, {on_error!r}")
        self.directory, self.format, self.on_error = Path(directory), format, on_error
        self.counts = {"rows": 0, "errors": 0}  # what on_write_complete totals (an empty input writes nothing)

    def on_write_start(self, schema=None) -> None:
        (self.directory / "errors").mkdir(parents=True, exist_ok=True)

    def write(self, blocks, ctx) -> dict:
        counts = {"rows": 0, "errors": 0}
        for index, block in enumerate(blocks):
            rows = BlockAccessor.for_block(block).to_arrow().to_pylist()
            good = [output_row(r) for r in rows if r.get("darl_error") is None]
            bad = [error_row(r) for r in rows if r.get("darl_error") is not None]
            if bad and self.on_error == "fail":
                raise DataError(f"{bad[0]['source']}: {bad[0]['error']}")
            name = f"part-{ctx.task_idx:06d}-{index:06d}"
            if good:
                self._write(good, self.directory / f"{name}.{self.format}")
            if bad:
                _write_jsonl(bad, self.directory / "errors" / f"{name}.jsonl")
            counts["rows"] += len(good)
            counts["errors"] += len(bad)
        return counts

    def _write(self, rows: list[dict], path: Path) -> None:
        if self.format == "jsonl":
            _write_jsonl(rows, path)
        else:
            with atomic_file(path, "wb") as f:
                pq.write_table(pa.Table.from_pylist(rows), f)

    def on_write_complete(self, write_result) -> None:
        self.counts = {k: sum(r[k] for r in write_result.write_returns) for k in ("rows", "errors")}


def _write_jsonl(rows: list[dict], path: Path) -> None:
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
