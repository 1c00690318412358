"""`darl-distill`: a DaRL teacher's grade distribution distilled into a small, fast student checkpoint.

MKD's score-distribution transfer (an LLM relevance model's graded output taught to a deployable
student), with Hinton et al. 2015's temperature-softened targets:

    loss = ce_weight * DaRL loss(student, label)              over the labelled pairs in the batch
         + kl_weight * T^2 * KL(teacher_T || student_T)       over every pair in the batch

The teacher (any DaRL checkpoint, the embedded default model by default) scores the labelled pairs
and an unlabeled pool once, each query's prefix once (`Scorer.score_many`); its probabilities are
kept on disk (teacher_cache.py), so the student and its control reuse them.

The student is trained like a `darl-train` run (Trainee: LoRA on a base, the shared-instruction
packing): by default the teacher's own bottom layers, `"gemma3-270m@2"` (base_models.py), which keep
its tokenizer (Chinese text keeps its tokens; an English WordPiece student would see [UNK]s). It is
a darl_infer checkpoint: `Scorer.from_pretrained`, `darl-eval` and `darl-infer export` take it as is.
With `kl_weight` 0 and no `unlabeled` pool the same run is MKD's control, the student on labels only.

`"student": "bi-encoder"` trains MKD's representation-based student instead: the same trunk embeds
query and item apart and a new head grades their interaction (darl_infer/bi_encoder.py); item
vectors can then be computed ahead of time. Same data, loss and teacher cache.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from darl_infer.checkpoint import CheckpointSpec, resolve_checkpoint
from darl_infer.jsonl import iter_rows
from darl_infer.template import Template

from .bi_encoder_student import BiEncoderTrainee
from .data import DataError, Pair, read_pairs
from .loss import DaRLLoss, LossConfig, resolve_class_weights
from .negatives import NegativesConfig
from .optim import Optimizer
from .stages import batch_schedule
from .teacher_cache import teacher_probs
from .train import Trainee, TrainConfig, load_sets, save_checkpoint, with_random_negatives

UNLABELED = -1  # the label of a pool pair: it learns from the teacher only
STUDENTS = ("cross-encoder", "bi-encoder")


@dataclass
class DistillConfig(TrainConfig):
    teacher: str | None = None               # checkpoint directory; None = the embedded default model
    unlabeled: list[dict] = field(default_factory=list)  # [{"path", "limit"}]: pairs the teacher grades (labels unread)
    temperature: float = 2.0
    kl_weight: float = 1.0
    ce_weight: float = 1.0
    steps: int | None = None                 # optimizer steps; None = `epochs` passes over all pairs
    teacher_cache: str | None = "runs/teacher_cache"
    student: str = "cross-encoder"           # or "bi-encoder": query and item embedded apart (darl_infer/bi_encoder.py)
    head_hidden: int = 256                   # a bi-encoder's head width

    @classmethod
    def load(cls, path) -> "DistillConfig":
        config = super().load(path)
        try:
            config.check()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return config

    def check(self) -> None:
        for name in ("dasa", "stages", "frozen_cache"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name!r} is a darl-train option; a distillation run is one stage without it")
        if self.negatives and NegativesConfig.from_dict(self.negatives).kind != "random":
            raise ValueError("distillation takes random negatives only (hard ones are mined between stages)")
        if self.temperature <= 0 or self.kl_weight < 0 or self.ce_weight < 0:
            raise ValueError("temperature must be > 0, kl_weight and ce_weight >= 0")
        if self.student not in STUDENTS:
            raise ValueError(f"student must be one of {list(STUDENTS)}, got {self.student!r}")
        if self.head_hidden < 1:
            raise ValueError("head_hidden must be >= 1")
        if self.kl_weight == 0 and self.unlabeled:
            raise ValueError("'unlabeled' pairs teach only through the teacher: they need kl_weight > 0")


def read_unlabeled(spec: dict, seed: int) -> list[Pair]:
    """The (query, item) pairs of a JSONL file; a label, if the file has one, is never read."""
    rows = [Pair(row["query"], row["item"], UNLABELED) for _, row in iter_rows(spec["path"])]
    if not rows:
        raise DataError(f"{spec['path']}: no pairs")
    limit = spec.get("limit")
    return random.Random(seed).sample(rows, limit) if limit is not None and limit < len(rows) else rows


def distillation_loss(logits, labels, teacher, loss_fn: DaRLLoss, config: DistillConfig) -> torch.Tensor:
    """The student's loss on one batch; `teacher` is (B, K) probabilities or None."""
    loss = logits.new_zeros(())
    labelled = labels != UNLABELED
    if config.ce_weight and labelled.any():
        loss = loss + config.ce_weight * loss_fn(logits[labelled], labels[labelled])
    if teacher is not None and config.kl_weight:
        t = config.temperature
        target = (teacher.clamp_min(1e-12).log() / t).log_softmax(-1)
        kl = F.kl_div((logits / t).log_softmax(-1), target, log_target=True, reduction="batchmean")
        loss = loss + config.kl_weight * t * t * kl
    return loss


def distill(config: DistillConfig):
    config.check()
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    teacher_dir = resolve_checkpoint(config.teacher)
    teacher_spec = CheckpointSpec.load(teacher_dir)
    if config.labels != teacher_spec.labels:
        raise ValueError(f"the student's labels {config.labels} differ from the teacher's {teacher_spec.labels}")
    num_labels = len(config.labels)
    data_seed = config.seed if config.data_seed is None else config.data_seed
    neg_cfg = NegativesConfig.from_dict(config.negatives) if config.negatives else None
    labelled = with_random_negatives(load_sets(config.train, num_labels, data_seed), neg_cfg, data_seed)
    unlabeled = [p for spec in config.unlabeled for p in read_unlabeled(spec, data_seed)]
    pairs = labelled + unlabeled
    if not pairs:
        raise DataError("no training pairs")
    dev_sets = {spec["path"]: read_pairs(spec["path"], num_labels, spec.get("limit"), data_seed) for spec in config.dev}

    started = time.time()
    teacher = None
    if config.kl_weight:
        teacher = torch.from_numpy(teacher_probs(teacher_dir, [(p.query, p.item) for p in pairs], config.teacher_cache))
    teacher_seconds = time.time() - started

    # the student speaks the teacher's template unless the config gives one
    template = Template.from_dict(config.template) if config.template else teacher_spec.template
    if config.student == "bi-encoder":
        trainee = BiEncoderTrainee(config, template, num_labels)
        params = trainee.parameters()
        sequences = trainee.sequences(pairs)

        def logits_of(batch: list[int]) -> torch.Tensor:
            return trainee.logits([sequences[i] for i in batch])
    else:
        trainee = Trainee(config, template, num_labels)
        params = [p for p in trainee.peft_model.parameters() if p.requires_grad]
        sequences = [trainee.pair_ids(p) for p in pairs]

        def logits_of(batch: list[int]) -> torch.Tensor:
            cache = trainee.runner.prefix(trainee.instruction)
            hidden = trainee.runner.items(cache, [torch.tensor(sequences[i]) for i in batch])
            return trainee.inner.score(hidden).float()
    labels = torch.tensor([p.label for p in pairs])
    loss_cfg = LossConfig.from_dict(config.loss)
    loss_fn = DaRLLoss(loss_cfg, resolve_class_weights(loss_cfg, [p.label for p in labelled], num_labels))
    batches = batch_schedule(len(pairs), config.batch_size, config.steps, config.epochs, config.seed)
    total = len(batches)
    optimizer = Optimizer(params, config.lr, config.weight_decay, config.warmup_steps, total)
    deadline = None if config.time_budget_minutes is None else time.time() + 60 * config.time_budget_minutes

    train_started, losses, step, stopped_early = time.time(), [], 0, False
    trainee.train()
    for batch in batches:
        loss = distillation_loss(logits_of(batch), labels[batch], None if teacher is None else teacher[batch], loss_fn, config)
        optimizer.step(loss)
        step += 1
        losses.append(loss.item())
        if step % config.log_every == 0:
            elapsed = time.time() - train_started
            recent = sum(losses[-config.log_every :]) / len(losses[-config.log_every :])
            print(f"[distill] step {step}/{total} loss {recent:.4f} eta {elapsed / step * (total - step) / 60:.1f} min", flush=True)
        if deadline is not None and time.time() > deadline:
            stopped_early = True
            break

    training = {
        "config": asdict(config),
        "loss": loss_cfg.to_dict(),
        "distill": {
            "teacher": config.teacher or "default", "teacher_base_model": teacher_spec.base_model, "student": config.student,
            "temperature": config.temperature, "kl_weight": config.kl_weight, "ce_weight": config.ce_weight,
            "labelled_pairs": len(labelled), "unlabeled_pairs": len(unlabeled),
            "teacher_seconds": round(teacher_seconds, 1),
        },
        "steps": step,
        "stopped_by_time_budget": stopped_early,
        "pairs_seen": sum(len(b) for b in batches[:step]),
        "train_pairs": len(pairs),
        "train_seconds": round(time.time() - train_started, 1),
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
    }
    return save_checkpoint(config, trainee, template, training, dev_sets)

