"""Checks of user input that raise a clear TypeError / ValueError naming the argument at fault."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Set


def _a(value) -> str:
    name = type(value).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def check_text(value, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    return value


def check_items(items) -> list[str]:
    """`items` as a list of str, read exactly once.

    Any ordered iterable of str is accepted (list, tuple, generator, numpy array of str, ...).
    Refused: a lone str or bytes (it iterates as characters, never meant as items), a mapping
    (iterating it gives its keys, rarely what is meant), a set (unordered, while results are
    positional), and any element that is not a str.
    """
    if isinstance(items, str):
        raise TypeError("items must be a sequence of str, not a single str; wrap it: [item]")
    if isinstance(items, (bytes, bytearray)):
        raise TypeError("items must be a sequence of str, not bytes; decode them first")
    if isinstance(items, Mapping):
        raise TypeError(f"items must be a sequence of str, not {_a(items)}; pass list(d) or list(d.values())")
    if isinstance(items, Set):
        raise TypeError(f"items must be a sequence of str, not {_a(items)} (unordered: results follow the items' order)")
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"items must be a sequence of str, not {_a(items)}") from None
    for i, item in enumerate(items):
        check_text(item, f"items[{i}]")
    return items


def check_int(value, what: str, minimum: int) -> int:
    """An integer count or size; bool is refused although Python counts it as an int."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return int(value)
