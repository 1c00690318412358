"""The `reference` backend: every (query, item) pair as its own sequence through HF transformers.

The oracle of the exactness contract: every other backend's score for an item must equal this
one's for that pair alone.
"""

from __future__ import annotations

import torch

from ..template import Encoded


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
        return torch.stack(rows).cpu() if rows else torch.empty(0, self.model.config.num_labels)  # on the CPU, as every backend's
