"""Cut work under a token budget, so memory stays bounded for any number of queries and items:
queries into rounds of prefixes, items into chunks."""

from __future__ import annotations

from typing import Sequence


def length_sorted_chunks(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Item indices sorted by length, cut into chunks of at most `token_budget` tokens.

    An item longer than the budget gets a chunk of its own. Sorting keeps the items inside one
    chunk of similar length, so the per-item padding inside the attention op stays small.
    """
    chunks, current, used = [], [], 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if current and used + lengths[i] > token_budget:
            chunks.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        chunks.append(current)
    return chunks


def prefix_rounds(prefixes: Sequence[Sequence[int]], token_budget: int) -> list[list[int]]:
    """Query indices in order, cut into rounds whose distinct prefixes hold at most `token_budget`
    tokens (a longer prefix gets a round of its own; a repeated prefix counts once).

    A round's prefixes run in one forward pass and its items are packed together, so a round's
    prefix K/V are all that is held at once, however many queries a call brings.
    """
    rounds, current, seen, used = [], [], set(), 0
    for n, prefix in enumerate(prefixes):
        key = tuple(prefix)
        if key not in seen and current and used + len(key) > token_budget:
            rounds.append(current)
            current, seen, used = [], set(), 0
        if key not in seen:
            seen.add(key)
            used += len(key)
        current.append(n)
    if current:
        rounds.append(current)
    return rounds


def pass_size(tokens: int, token_budget: int) -> int:
    """`tokens` rounded up to one of 16 sizes an octave (16 tokens apart below 512), at most 1/16
    more and not past the budget unless `tokens` is: on a CPU oneDNN builds its bf16 matmuls anew
    for each new number of rows (~10 ms each, ~40 ms for a pass of the default model the first time
    a size is seen), so that passes of a few sizes reuse them."""
    step = 1 << max(4, tokens.bit_length() - 5)
    return max(tokens, min(-(-tokens // step) * step, token_budget))
