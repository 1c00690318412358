"""The optimizer every training loop here uses: AdamW, linear warm-up then linear decay to zero,
gradients clipped to norm 1 (darl-train's stages and darl-distill share it)."""

from __future__ import annotations

import torch


class Optimizer:
    def __init__(self, params: list[torch.nn.Parameter], lr: float, weight_decay: float, warmup: int, total: int):
        self.params = params
        self.adamw = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        warmup, total = max(1, warmup), max(1, total)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.adamw, lambda i: min(1.0, (i + 1) / warmup) * max(0.0, 1 - i / total)
        )

    def step(self, loss: torch.Tensor) -> None:
        self.adamw.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.adamw.step()
        self.schedule.step()
