"""Dataclass configs read from JSON: a field the dataclass does not have is an error, never ignored
(a misspelt "lables" must not silently fall back to the default)."""

from __future__ import annotations


def check_fields(d: dict, known, what: str) -> None:
    """ValueError naming every key of `d` that is not in `known`."""
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; known: {sorted(known)}")


def from_fields(cls, d, what: str):
    """`cls(**d)` after checking that `d` is an object whose keys are all fields of `cls`."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(d).__name__}")
    check_fields(d, cls.__dataclass_fields__, what)
    return cls(**d)
