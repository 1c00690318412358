"""JSON Lines of (query, item) pairs: one reader for the CLI, training and evaluation."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and line)."""


def iter_rows(path: str | Path):
    """(line number, row) of each non-blank line; a row is an object with string query and item.
    `path` "-" reads stdin.

    Any bad line is an error naming file and line. Other fields (e.g. label) are left to the caller.
    """
    if str(path) == "-":
        yield from _rows(sys.stdin, "<stdin>")
        return
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open(encoding="utf-8") as f:
        yield from _rows(f, path)


def _rows(lines, name):
    for n, line in enumerate(lines, start=1):
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
        yield n, row
