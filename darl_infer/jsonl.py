"""Text input files: lines of a file (or stdin), and JSON Lines of (query, item) pairs. One reader
for the CLI, training and evaluation; every error names the file and line."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and line)."""


def iter_lines(path: str | Path):
    """(line number, text) of each line of a UTF-8 file; `path` "-" reads stdin.

    Each line is decoded on its own, so a byte that is not UTF-8 is an error naming its line
    (decoding the file as a stream fails somewhere in a block, with no line number).
    """
    if str(path) == "-":
        yield from _decoded(sys.stdin.buffer, "<stdin>")
        return
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as f:
        yield from _decoded(f, path)


def _decoded(lines, name):
    for n, raw in enumerate(lines, start=1):
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{name}:{n}: not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1})") from None


def iter_rows(path: str | Path):
    """(line number, row) of each non-blank line; a row is an object with string query and item,
    the query not empty. `path` "-" reads stdin.

    Any bad line is an error naming file and line. Other fields (e.g. label) are left to the caller.
    """
    name = "<stdin>" if str(path) == "-" else path
    for n, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{name}:{n}: expected a JSON object")
        for key in ("query", "item"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{name}:{n}: field {key!r} must be a string")
        if not row["query"].strip():
            raise DataError(f"{name}:{n}: field 'query' is empty")
        yield n, row
