"""The model's own features of (query, item) pairs: last-token hidden state (pre-head) and logits.

Through the serving code path: pairs are grouped by query, each query's prefix (instruction +
query) runs once through `PrefixRunner`, and its items run packed against that one KV copy.
"""

from __future__ import annotations

import numpy as np
import torch

from darl_infer.backends.prefix_runner import PrefixRunner
from darl_infer.pairs import group_by_query


@torch.no_grad()
def pair_features(
    runner: PrefixRunner, head, encoder, pairs: list[tuple[str, str]], max_items_per_pass: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(hidden (N, H), logits (N, K)) for `pairs` in input order; `head` maps hidden to logits."""
    hidden_rows: dict[int, torch.Tensor] = {}
    for query, idx in group_by_query(query for query, _ in pairs).items():
        enc = encoder.encode(query, [pairs[n][1] for n in idx])
        cache = runner.prefix(torch.tensor(enc.prefix, dtype=torch.long))
        for start in range(0, len(idx), max_items_per_pass):
            part = idx[start : start + max_items_per_pass]
            suffixes = [torch.tensor(s, dtype=torch.long) for s in enc.suffixes[start : start + max_items_per_pass]]
            hidden = runner.items(cache, suffixes)
            for n, h in zip(part, hidden):
                hidden_rows[n] = h.float()
    hidden = torch.stack([hidden_rows[n] for n in range(len(pairs))])
    logits = head(hidden).float()
    return hidden.numpy(), logits.numpy()
