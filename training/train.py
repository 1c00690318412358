"""Fine-tune a decoder LLM into a DaRL relevance checkpoint: DaRL loss, DASA, multi-stage schedule.

Efficient on a CPU by construction:
- LoRA (Hu et al. 2021) on the top `lora_layers` decoder layers only, plus the score head. The
  layers below have no trainable parameter, so autograd neither keeps their activations nor
  back-propagates through them.
- The instruction is the same for every pair: a batch runs it once and packs its pairs (query +
  item, no padding) against that one KV copy, the same shared-prefix attention used for serving.
  The token sequence of a pair is exactly the one `Template.encode` gives the Scorer.

The whole schedule lives in one config (see training/configs/): the loss (loss.py), the DASA
selection (dasa.py) and the stages (stages.py). Without `stages`, a run is one stage over the
`train` sets (plus the DASA samples when `dasa` is set).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from darl_infer.atomic import atomic_dir
from darl_infer.base_models import base_model_dir
from darl_infer.checkpoint import CheckpointSpec
from darl_infer.config import from_fields
from darl_infer.backends.prefix_runner import PrefixRunner
from darl_infer.loading import load_base_classifier
from darl_infer.template import Template

from . import dasa as dasa_lib
from .data import DataError, Pair, read_pairs
from .features import pair_features
from .frozen_cache import FrozenSplit, StateStore
from .evaluate import report
from .loss import DaRLLoss, LossConfig, resolve_class_weights
from .negatives import ForeignItems, NegativesConfig, random_negatives
from .optim import Optimizer
from .stages import StageConfig, batch_schedule, stage_pairs

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DasaConfig:
    pool: dict                        # {"path": ..., "limit": optional int}: the unlabeled pool
    budget: int                       # pool labels to reveal
    method: str = "dasa"              # "dasa" (OOD scores + k-center) or "random" (the control)
    detectors: list[str] = field(default_factory=lambda: list(dasa_lib.DETECTORS))
    id_bank: int = 600                # ID training pairs whose features define "in-distribution"
    knn_k: int = 10
    shrinkage: float = 0.1
    candidate_factor: float = 3.0

    @classmethod
    def from_dict(cls, d: dict) -> "DasaConfig":
        c = from_fields(cls, d, "dasa")
        if c.method not in ("dasa", "random"):
            raise ValueError(f"dasa method must be 'dasa' or 'random', got {c.method!r}")
        if c.budget < 0:
            raise ValueError("dasa budget must be >= 0")
        unknown_detectors = set(c.detectors) - set(dasa_lib.DETECTORS)
        if unknown_detectors or not c.detectors:
            raise ValueError(f"dasa detectors must be a non-empty subset of {list(dasa_lib.DETECTORS)}")
        return c


@dataclass
class TrainConfig:
    base_model: str                   # registered base name or a local HF decoder folder
    train: list[dict]                 # [{"path": ..., "limit": optional int}]: in-distribution data
    output_dir: str
    dev: list[dict] = field(default_factory=list)
    labels: list[str] = field(default_factory=lambda: ["irrelevant", "weak", "strong"])
    template: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)         # LossConfig fields; {} = plain cross-entropy
    dasa: dict | None = None                         # DasaConfig fields; None = no pool samples
    negatives: dict | None = None                    # NegativesConfig fields; None = no negatives
    stages: list[dict] | None = None                 # StageConfig fields; None = one stage
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_layers: int = 6              # top layers that get LoRA; the rest stay frozen
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.0
    epochs: float = 1
    warmup_steps: int = 20
    time_budget_minutes: float | None = None  # whole run (all stages); stops cleanly and saves
    frozen_cache: str | None = None   # directory: run the frozen layers once per pair (frozen_cache.py)
    seed: int = 0
    data_seed: int | None = None      # subsets of train/dev/pool; None = `seed` (set it to vary only the run)
    log_every: int = 20

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return from_fields(cls, d, "config")
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def stage_configs(self) -> list[StageConfig]:
        if self.stages is None:
            data = "id+dasa" if self.dasa else "id"
            return [StageConfig(name="train", data=data, epochs=self.epochs)]
        stages = [StageConfig.from_dict(s) for s in self.stages]
        if any(s.needs_dasa for s in stages) and not self.dasa:
            raise ValueError("a stage trains on 'dasa' data but the config has no 'dasa' section")
        return stages


def load_sets(specs: list[dict], num_labels: int, seed: int) -> list[list[Pair]]:
    return [read_pairs(spec["path"], num_labels, limit=spec.get("limit"), seed=seed) for spec in specs]


def with_random_negatives(sets: list[list[Pair]], cfg: NegativesConfig | None, seed: int) -> list[Pair]:
    """The ID pairs plus, per training file, ratio x its size negatives drawn from that same file
    (a query only ever meets items of its own data set)."""
    pairs = [p for s in sets for p in s]
    if cfg is not None:
        for n, s in enumerate(sets):
            pairs += random_negatives(s, round(cfg.ratio * len(s)), seed + 7919 * n)
    return pairs


class Trainee:
    """The model being trained: PEFT LoRA model, its shared-prefix runner, head and encoder."""

    def __init__(self, config: TrainConfig, template: Template, num_labels: int, adapter: Path | None = None):
        """`adapter`: a checkpoint directory whose trained adapter to load (a run's model, as it ended)."""
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoTokenizer

        model = load_base_classifier(config.base_model, num_labels, torch.float32)
        self.encoder = template.encoder(AutoTokenizer.from_pretrained(str(base_model_dir(config.base_model))))
        n_layers = model.config.num_hidden_layers
        top = list(range(max(0, n_layers - config.lora_layers), n_layers))
        lora = LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=LORA_TARGETS, layers_to_transform=top, layers_pattern="layers",
            modules_to_save=["score"], task_type="SEQ_CLS",
        )
        self.peft_model = get_peft_model(model, lora) if adapter is None else PeftModel.from_pretrained(model, str(adapter))
        self.inner = self.peft_model.base_model.model
        self.runner = PrefixRunner(getattr(self.inner, self.inner.base_model_prefix))
        self.instruction = torch.tensor(self.encoder.instruction, dtype=torch.long)
        self.frozen = self.store = None
        if config.frozen_cache:
            self.frozen = FrozenSplit(self.runner.decoder, top[0])
            self.store = StateStore(config.frozen_cache, config.base_model, top[0], self.instruction)

    def train(self) -> None:
        self.peft_model.train()

    def save_weights(self, directory: Path) -> None:
        self.peft_model.save_pretrained(str(directory))

    def pair_ids(self, p: Pair) -> list[int]:
        """A pair's tokens after the shared instruction, exactly as the Scorer encodes them."""
        enc = self.encoder.encode(p.query, [p.item])
        return enc.prefix[enc.instruction_len :] + enc.suffixes[0]

    def frozen_states(self, pairs: list[Pair]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Bottom-layer states of the shared instruction and of each pair (computed once, on disk)."""
        return self.store.get(self.frozen, [self.pair_ids(p) for p in pairs])

    def top_hidden(self, instruction_states: torch.Tensor, pair_states: list[torch.Tensor]) -> torch.Tensor:
        return self.frozen.top_items(self.frozen.top_prefix(instruction_states), pair_states)

    def features(self, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        """(last-token hidden state, logits) of each pair, with the model as it is now."""
        self.peft_model.eval()
        try:
            if self.frozen is None:
                return pair_features(self.runner, self.inner.score, self.encoder, pairs)
            with torch.no_grad():
                instruction_states, states = self.frozen_states([Pair(q, i, 0) for q, i in pairs])
                cache = self.frozen.top_prefix(instruction_states)
                passes = tqdm(range(0, len(states), 32), desc="top layers", unit="pass", disable=len(states) < 2000)
                hidden = torch.cat([self.frozen.top_items(cache, states[b : b + 32]) for b in passes])
                return hidden.numpy(), self.inner.score(hidden).float().numpy()
        finally:
            self.peft_model.train()

    def probs(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        _, logits = self.features(pairs)
        return torch.tensor(logits).softmax(-1).numpy()

    def evaluate(self, pairs: list[Pair], grade_values: list[float]) -> dict:
        """Dev metrics from the in-memory model (the frozen-cache path; the Scorer gives the same)."""
        return report(self.probs, pairs, grade_values)


def mine_hard_negatives(trainee: Trainee, cfg: NegativesConfig, sets: list[list[Pair]], seed: int) -> tuple[list[Pair], dict]:
    """RocketQA-style: per negative, `candidates` guarded foreign items scored by the model as it is
    now; keep the one it finds most relevant, unless P(not irrelevant) > denoise_threshold (a likely
    false negative, dropped)."""
    started = time.time()
    mined: list[Pair] = []
    dropped = 0
    for n, s in enumerate(sets):
        rng, foreign = random.Random(seed + 7919 * n), ForeignItems(s, seed + 7919 * n + 1)
        queries = [rng.choice(s).query for _ in range(round(cfg.ratio * len(s)))]
        candidates = [foreign.draw(q, cfg.candidates) for q in queries]
        shown = [(q, item) for q, items in zip(queries, candidates) for item in items]
        not_irrelevant = 1 - trainee.probs(shown)[:, 0] if shown else np.empty(0)
        start = 0
        for q, items in zip(queries, candidates):
            if items:
                c = int(not_irrelevant[start : start + len(items)].argmax())
                if not_irrelevant[start + c] > cfg.denoise_threshold:
                    dropped += 1
                else:
                    mined.append(Pair(q, items[c], 0))
            start += len(items)
    summary = {"kind": "hard", "mined": len(mined), "dropped_as_likely_relevant": dropped,
               "candidates": cfg.candidates, "seconds": round(time.time() - started, 1)}
    return mined, summary


def run_dasa(trainee: Trainee, cfg: DasaConfig, id_pairs: list[Pair], num_labels: int, seed: int, data_seed: int) -> tuple[list[Pair], dict]:
    """Select `cfg.budget` pool samples and reveal only their labels."""
    started = time.time()
    pool = dasa_lib.read_pool(cfg.pool["path"], num_labels, limit=cfg.pool.get("limit"), seed=data_seed)
    summary: dict = {"method": cfg.method, "budget": cfg.budget, "pool_size": len(pool)}
    if cfg.method == "random":
        chosen = dasa_lib.select_random(len(pool), cfg.budget, seed)
    else:
        bank = random.Random(seed).sample(id_pairs, min(cfg.id_bank, len(id_pairs)))
        id_hidden, _ = trainee.features([(p.query, p.item) for p in bank])
        pool_hidden, pool_logits = trainee.features(list(zip(pool.queries, pool.items)))
        detector = dasa_lib.OODDetector.fit(id_hidden, np.array([p.label for p in bank]), num_labels, cfg.knn_k, cfg.shrinkage)
        scores = detector.scores(pool_hidden, pool_logits, cfg.detectors)
        combined = dasa_lib.rank_average(scores)
        chosen = dasa_lib.select(combined, pool_hidden, cfg.budget, id_hidden, cfg.candidate_factor)
        summary["mean_rank_score"] = {"selected": float(combined[chosen].mean()), "pool": float(combined.mean())}
        summary["id_bank"] = len(bank)
    selected = pool.reveal(chosen)
    summary["selected"] = len(selected)
    summary["revealed_labels"] = len(pool.revealed)
    summary["selected_label_counts"] = np.bincount([p.label for p in selected], minlength=num_labels).tolist()
    summary["seconds"] = round(time.time() - started, 1)
    return selected, summary


def train(config: TrainConfig) -> Path:
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    num_labels = len(config.labels)
    loss_cfg = LossConfig.from_dict(config.loss)
    dasa_cfg = DasaConfig.from_dict(config.dasa) if config.dasa else None
    stages = config.stage_configs()
    data_seed = config.seed if config.data_seed is None else config.data_seed
    neg_cfg = NegativesConfig.from_dict(config.negatives) if config.negatives else None
    if neg_cfg is not None and neg_cfg.kind == "hard" and len(stages) < 2:
        raise ValueError("hard negatives are mined with the stage-1 model: they need at least two stages")
    id_sets = load_sets(config.train, num_labels, data_seed)
    rated_pairs = [p for s in id_sets for p in s]
    if not rated_pairs:
        raise DataError("empty training set")
    id_pairs = with_random_negatives(id_sets, neg_cfg, data_seed)
    negatives_summary = None if neg_cfg is None else {**asdict(neg_cfg), "random": len(id_pairs) - len(rated_pairs)}
    dev_sets = {spec["path"]: read_pairs(spec["path"], num_labels, spec.get("limit"), data_seed) for spec in config.dev}

    template = Template.from_dict(config.template)
    trainee = Trainee(config, template, num_labels)
    peft_model, inner, runner, instruction = trainee.peft_model, trainee.inner, trainee.runner, trainee.instruction
    params = [p for p in peft_model.parameters() if p.requires_grad]
    deadline = None if config.time_budget_minutes is None else time.time() + 60 * config.time_budget_minutes

    if trainee.frozen is not None:  # the ID set's states, shared by every stage (and every run on this data)
        cache_started = time.time()
        for pairs in [id_pairs, *dev_sets.values()]:
            trainee.frozen_states(pairs)
        print(f"frozen-layer states of the ID and dev pairs ready in {time.time() - cache_started:.0f} s", flush=True)

    started, step, tokens, pairs_seen, losses = time.time(), 0, 0, 0, []
    dasa_pairs, dasa_summary, stage_log = None, None, []
    stopped_early = False
    peft_model.train()
    for s, stage in enumerate(stages):
        if s == 1 and neg_cfg is not None and neg_cfg.kind == "hard":  # replace stage 1's random negatives
            mined, negatives_summary["hard"] = mine_hard_negatives(trainee, neg_cfg, id_sets, data_seed + 1)
            id_pairs = rated_pairs + mined
            print(f"hard negatives: {json.dumps(negatives_summary['hard'])}", flush=True)
        if stage.needs_dasa and dasa_pairs is None:
            dasa_pairs, dasa_summary = run_dasa(trainee, dasa_cfg, rated_pairs, num_labels, config.seed, data_seed)
            print(f"dasa: {json.dumps(dasa_summary)}", flush=True)
        pairs = stage_pairs(stage, id_pairs, dasa_pairs or [], config.seed + 1000 * s)
        if not pairs:
            raise DataError(f"stage {stage.name!r}: no training pairs")
        sequences = [trainee.pair_ids(p) for p in pairs]
        if trainee.frozen is not None:
            instruction_states, pair_states = trainee.frozen_states(pairs)
        labels = torch.tensor([p.label for p in pairs])
        loss_fn = DaRLLoss(loss_cfg, resolve_class_weights(loss_cfg, labels.tolist(), num_labels))
        batches = batch_schedule(len(pairs), config.batch_size, stage.steps, stage.epochs, config.seed + 1000 * s)
        total = len(batches)
        warmup = config.warmup_steps if stage.warmup_steps is None else stage.warmup_steps
        optimizer = Optimizer(params, stage.lr or config.lr, config.weight_decay, warmup, total)
        stage_started, stage_steps = time.time(), 0
        for batch in batches:
            if trainee.frozen is None:
                cache = runner.prefix(instruction)
                hidden = runner.items(cache, [torch.tensor(sequences[i]) for i in batch])
            else:
                hidden = trainee.top_hidden(instruction_states, [pair_states[i] for i in batch])
            loss = loss_fn(inner.score(hidden).float(), labels[batch])
            optimizer.step(loss)
            step += 1
            stage_steps += 1
            pairs_seen += len(batch)
            tokens += sum(len(sequences[i]) for i in batch)
            losses.append(loss.item())
            if step % config.log_every == 0:
                elapsed = time.time() - stage_started
                recent = sum(losses[-config.log_every :]) / len(losses[-config.log_every :])
                eta = elapsed / stage_steps * (total - stage_steps) / 60
                print(f"[{stage.name}] step {stage_steps}/{total} loss {recent:.4f} "
                      f"{tokens / (time.time() - started):.0f} tok/s stage eta {eta:.1f} min", flush=True)
            if deadline is not None and time.time() > deadline:
                stopped_early = True
                break
        stage_log.append({**stage.to_dict(), "pairs": len(pairs), "steps_run": stage_steps, "steps_planned": total,
                          "seconds": round(time.time() - stage_started, 1)})
        if stopped_early:
            break
    train_seconds = time.time() - started

    training = {
        "config": asdict(config),
        "loss": loss_cfg.to_dict(),
        "stages": stage_log,
        "dasa": dasa_summary,
        "negatives": negatives_summary,
        "steps": step,
        "stopped_by_time_budget": stopped_early,
        "pairs_seen": pairs_seen,
        "train_pairs": len(rated_pairs),
        "train_seconds": round(train_seconds, 1),
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
    }
    return save_checkpoint(config, trainee, template, training, dev_sets)


def save_checkpoint(config: TrainConfig, trainee, template: Template, training: dict, dev_sets: dict) -> Path:
    """Write beside the output directory, then rename: a checkpoint appears whole or not at all."""
    output = Path(config.output_dir)
    with atomic_dir(output, replace=True) as partial:
        trainee.save_weights(partial)
        spec = CheckpointSpec(labels=config.labels, template=template, base_model=config.base_model, training=training,
                              bi_encoder=getattr(trainee, "section", None) and trainee.section.to_dict())
        spec.save(partial)
        if dev_sets and trainee.frozen is not None:
            spec.evaluation = {path: trainee.evaluate(pairs, spec.grade_values) for path, pairs in dev_sets.items()}
            spec.training["evaluated_with"] = "in-memory model, frozen-layer cache (exact; darl-eval gives the same)"
            spec.save(partial)
        elif dev_sets:
            from darl_infer import Scorer

            from .evaluate import evaluate_pairs

            scorer = Scorer.from_pretrained(partial, backend="torch")
            spec.evaluation = {path: evaluate_pairs(scorer, pairs) for path, pairs in dev_sets.items()}
            spec.training["evaluated_with"] = "Scorer (torch backend)"
            spec.save(partial)
        (partial / "train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        (partial / "metrics.json").write_text(json.dumps(spec.evaluation, indent=2) + "\n")
    return output
