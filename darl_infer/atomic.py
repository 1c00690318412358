"""Write a file or a directory so that it appears whole or not at all.

Everything is written under a temporary name beside the target (the same filesystem, so the
final rename is atomic) and renamed onto the target only when the block completes. On any
failure, an interrupt included, the temporary is removed and a previous target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path


def _temporary(target: Path) -> Path:
    # unique, so two writers of one target never share a temporary; ".partial" says what it is
    return target.with_name(f"{target.name}.{secrets.token_hex(4)}.partial")


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8"):
    """Yield an open file for writing; on success it replaces `path` ("w": text, "wb": binary)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    tmp = _temporary(target)
    try:
        # "x": never write through an existing file; permissions follow the umask like open(path, "w")
        with open(tmp, mode.replace("w", "x"), encoding=encoding if mode == "w" else None) as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path, replace: bool = False):
    """Yield a new empty directory to fill; on success it becomes `path`.

    An existing `path` is replaced only if `replace` (it is moved aside, then removed, after the new
    one is complete) or if it is an empty directory; otherwise FileExistsError, before any work.
    """
    target = Path(path)
    if target.exists() and not replace and not (target.is_dir() and not any(target.iterdir())):
        raise FileExistsError(f"{target}: exists and is not empty; remove it or choose another directory")
    tmp, previous = _temporary(target), None
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if target.exists():
            previous = _temporary(target)
            target.rename(previous)
        tmp.rename(target)
    except BaseException:
        if previous is not None and not target.exists():
            previous.rename(target)  # the new one could not take its place: put the old one back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
