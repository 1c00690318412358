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


def not_utf8(raw: bytes, error: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte {raw[error.start:error.start + 1]!r} at column {error.start + 1})"


def pair_error(row) -> str | None:
    """Why a parsed JSON value is not a pair to score (an object with string query and item, the
    query not empty), or None."""
    if not isinstance(row, dict):
        return "expected a JSON object"
    for key in ("query", "item"):
        if not isinstance(row.get(key), str):
            return f"field {key!r} must be a string"
    if not row["query"].strip():
        return "field 'query' is empty"
    return None


def _decoded(lines, name):
    for n, raw in enumerate(lines, start=1):
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{name}:{n}: {not_utf8(raw, e)}") from None


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
        error = pair_error(row)
        if error is not None:
            raise DataError(f"{name}:{n}: {error}")
        yield n, row
