"""Cut a query's items into chunks under a token budget: memory stays bounded for any N."""

from __future__ import annotations


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
