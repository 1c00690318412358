"""Multi-stage fine-tuning schedule: which data each stage trains on, for how long, at what LR.

Stage data:
- "id": the in-distribution training sets (`train` in the config);
- "dasa": the DASA-selected pool samples, plus `replay` (a fraction of the stage's data) drawn
  from the ID sets, so stage 2 adapts to the new domain without forgetting stage 1 (experience
  replay against catastrophic forgetting: Rolnick et al. 2019, "Experience Replay for Continual
  Learning"; the staged schedule follows the domain-adaptive continued fine-tuning of
  Gururangan et al. 2020, "Don't Stop Pretraining");
- "id+dasa": both, mixed uniformly (single-stage augmentation).
DASA runs, with the model as it is at that point, right before the first stage that needs it.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from darl_infer.config import from_fields

from .data import Pair

STAGE_DATA = ("id", "dasa", "id+dasa")


@dataclass
class StageConfig:
    name: str = "train"
    data: str = "id"
    steps: int | None = None       # optimizer steps; None = `epochs` passes over the stage data
    epochs: float = 1.0
    lr: float | None = None        # None = the run's lr
    replay: float = 0.0            # for data="dasa": fraction of the stage's pairs replayed from ID
    warmup_steps: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "StageConfig":
        s = from_fields(cls, d, "stage")
        if s.data not in STAGE_DATA:
            raise ValueError(f"stage {s.name!r}: data must be one of {list(STAGE_DATA)}, got {s.data!r}")
        if not 0 <= s.replay < 1:
            raise ValueError(f"stage {s.name!r}: replay must be in [0, 1)")
        if s.steps is not None and s.steps < 0:
            raise ValueError(f"stage {s.name!r}: steps must be >= 0")
        return s

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def needs_dasa(self) -> bool:
        return self.data != "id"


def stage_pairs(stage: StageConfig, id_pairs: list[Pair], dasa_pairs: list[Pair], seed: int) -> list[Pair]:
    if stage.data == "id":
        return list(id_pairs)
    if stage.data == "id+dasa":
        return list(id_pairs) + list(dasa_pairs)
    n_replay = round(len(dasa_pairs) * stage.replay / (1 - stage.replay))
    replay = random.Random(seed).sample(id_pairs, min(n_replay, len(id_pairs)))
    return list(dasa_pairs) + replay


def batch_schedule(n: int, batch_size: int, steps: int | None, epochs: float, seed: int) -> list[list[int]]:
    """`steps` batches of indices (default ceil(epochs * n / batch_size)): reshuffled passes over 0..n-1."""
    if steps is None:
        steps = math.ceil(epochs * n / batch_size)
    order: list[int] = []
    rng = random.Random(seed)
    while len(order) < steps * batch_size and n:
        epoch = list(range(n))
        rng.shuffle(epoch)
        order += epoch
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]
