"""Scoring backends. Each maps an encoded query (prefix + item suffixes) to grade probabilities.

`reference` scores every pair as its own sequence through HF transformers: the oracle.
`torch` computes the prefix once and runs the items packed against its one KV copy.
"""

from __future__ import annotations

import torch

from .prefix_cache import PrefixRunner
from .template import Encoded


class ReferenceBackend:
    name = "reference"

    def __init__(self, model):
        self.model = model
        self.device = model.device

    @torch.inference_mode()
    def probs(self, enc: Encoded) -> torch.Tensor:
        rows = []
        for suffix in enc.suffixes:
            ids = torch.tensor([enc.prefix + suffix], device=self.device)
            rows.append(self.model(input_ids=ids).logits[0].float().softmax(-1))
        return torch.stack(rows) if rows else torch.empty(0, self.model.config.num_labels)


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


class TorchBackend:
    name = "torch"

    def __init__(self, model, token_budget: int = 2048, runner_cls=PrefixRunner):
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        self.model = model
        self.device = model.device
        self.token_budget = token_budget
        self.runner = runner_cls(getattr(model, model.base_model_prefix))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.score(hidden).float().softmax(-1)

    @torch.inference_mode()
    def probs(self, enc: Encoded) -> torch.Tensor:
        out = torch.empty(len(enc.suffixes), self.model.config.num_labels)
        if not enc.suffixes:
            return out
        cache = self.runner.prefix(torch.tensor(enc.prefix, device=self.device))
        for chunk in length_sorted_chunks([len(s) for s in enc.suffixes], self.token_budget):
            ids = [torch.tensor(enc.suffixes[i], device=self.device) for i in chunk]
            out[chunk] = self.head(self.runner.items(cache, ids)).cpu()
        return out
