"""Ray Data readers for files of (query, item) pairs that keep each row's origin.

Every row carries `darl_source` ("path:line" for JSONL, "path:row N" for Parquet, counted from 1)
and `darl_error` (why the row cannot be scored, or null), so one bad row becomes an entry of the
errors output naming its place instead of failing the read of the whole file. JSONL rows also keep
their line as `darl_row`: the output row is that object with the scores added, exactly as the
local `darl-infer score` writes it, whatever fields the file's rows have.
"""

from __future__ import annotations

import glob
import json
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from ..jsonl import not_utf8, pair_error

# CPUs Ray reserves for a read or write task: they wait on I/O, and a whole CPU each would leave
# none for the scoring actors (on a 2-CPU Ray, 2 actors + 1 read task = deadlock, seen here)
IO_TASK_CPUS = 0.25
ROWS_PER_BLOCK = 4096  # rows a reader yields at once: streaming within a file, memory bounded
# explicit, so a block whose rows are all bad (nulls) has the same schema as any other
JSONL_SCHEMA = pa.schema([(name, pa.string()) for name in ("query", "item", "darl_row", "darl_source", "darl_error")])


def _jsonl_row(path: str, n: int, raw: bytes) -> dict:
    source = f"{path}:{n}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return dict(query=None, item=None, darl_row=None, darl_source=source, darl_error=not_utf8(raw, e))
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return dict(query=None, item=None, darl_row=text, darl_source=source, darl_error=f"malformed JSON ({e.msg})")
    error = pair_error(row)
    return dict(query=None if error else row["query"], item=None if error else row["item"],
                darl_row=text, darl_source=source, darl_error=error)


class JsonlPairs(FileBasedDatasource):
    """JSON Lines of {query, item, ...}; blank lines are skipped, as the local CLI does."""

    _FILE_EXTENSIONS = ["jsonl", "json"]

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rows = []
        for n, raw in enumerate(_lines(f), start=1):
            if raw.strip():
                rows.append(_jsonl_row(path, n, raw.rstrip(b"\r\n")))
            if len(rows) == ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema=JSONL_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=JSONL_SCHEMA)


def _lines(f: pa.NativeFile, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a pyarrow stream, read a chunk at a time (NativeFile has no line iterator)."""
    tail = b""
    while chunk := f.read(chunk_bytes):
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        yield from lines
    if tail:
        yield tail


class ParquetPairs(FileBasedDatasource):
    """Parquet with string columns query and item, read a record batch at a time."""

    _FILE_EXTENSIONS = ["parquet"]

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        return filesystem.open_input_file(path)  # Parquet's footer needs random access, not a stream

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        first = 1
        for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BLOCK):
            table = pa.Table.from_batches([batch])
            sources = [f"{path}:row {first + i}" for i in range(table.num_rows)]
            first += table.num_rows
            yield table.append_column("darl_source", pa.array(sources, pa.string())).append_column(
                "darl_error", _parquet_errors(table))


def _parquet_errors(table: pa.Table) -> pa.Array:
    """Why each row is not a pair to score (jsonl.pair_error's rule, on columns), or null; vectorised."""
    for key in ("query", "item"):
        if key not in table.column_names:
            return pa.array([f"no column {key!r}"] * table.num_rows, pa.string())
        if not pa.types.is_string(table.schema.field(key).type) and not pa.types.is_large_string(table.schema.field(key).type):
            return pa.array([f"column {key!r} must be strings, is {table.schema.field(key).type}"] * table.num_rows, pa.string())
    null_query, null_item = pc.is_null(table["query"]), pc.is_null(table["item"])
    empty_query = pc.equal(pc.utf8_trim_whitespace(pc.fill_null(table["query"], "")), "")
    return pc.case_when(
        pc.make_struct(null_query, null_item, empty_query),
        "field 'query' is null", "field 'item' is null", "field 'query' is empty", pa.scalar(None, pa.string()))


def expand_paths(path_or_glob: str | list[str]) -> list[str]:
    """Local globs expanded (sorted, so a run reads files in a stable order); URIs and plain paths
    are passed to Ray's reader as they are."""
    paths = [path_or_glob] if isinstance(path_or_glob, str) else list(path_or_glob)
    expanded = []
    for path in paths:
        if "://" not in path and glob.has_magic(path):
            matches = sorted(glob.glob(path))
            if not matches:
                raise FileNotFoundError(f"{path}: no file matches")
            expanded += matches
        else:
            expanded.append(path)
    return expanded


def read_pairs(path_or_glob: str | list[str], format: str = "jsonl", **read_options):
    """A Ray Dataset of the pairs in local paths, globs, directories or pyarrow-filesystem URIs."""
    import ray.data

    datasource = {"jsonl": JsonlPairs, "parquet": ParquetPairs}[format]
    read_options.setdefault("num_cpus", IO_TASK_CPUS)
    return ray.data.read_datasource(datasource(expand_paths(path_or_glob)), **read_options)
