"""Fine-tune a decoder LLM into a relevance checkpoint (plain cross-entropy; DaRL parts build on it).

Efficient on a CPU by construction:
- LoRA (Hu et al. 2021) on the top `lora_layers` decoder layers only, plus the score head. The
  layers below have no trainable parameter, so autograd neither keeps their activations nor
  back-propagates through them.
- The instruction is the same for every pair: a batch runs it once and packs its pairs (query +
  item, no padding) against that one KV copy, the same shared-prefix attention used for serving.
  The token sequence of a pair is exactly the one `Template.encode` gives the Scorer.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from darl_infer.base_models import base_model_dir
from darl_infer.checkpoint import CheckpointSpec
from darl_infer.model import load_sequence_classifier
from darl_infer.prefix_cache import PrefixRunner
from darl_infer.template import Template

from .data import DataError, Pair, read_pairs

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    base_model: str                   # registered base name or a local HF decoder folder
    train: list[dict]                 # [{"path": ..., "limit": optional int}]
    output_dir: str
    dev: list[dict] = field(default_factory=list)
    labels: list[str] = field(default_factory=lambda: ["irrelevant", "weak", "strong"])
    template: dict = field(default_factory=dict)
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_layers: int = 6              # top layers that get LoRA; the rest stay frozen
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.0
    epochs: int = 1
    warmup_steps: int = 20
    time_budget_minutes: float | None = None  # stop cleanly when training reaches this
    seed: int = 0
    log_every: int = 20

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        d = json.loads(Path(path).read_text())
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown config field(s) {sorted(unknown)}")
        return cls(**d)


def load_sets(specs: list[dict], num_labels: int, seed: int) -> list[Pair]:
    pairs = []
    for spec in specs:
        pairs += read_pairs(spec["path"], num_labels, limit=spec.get("limit"), seed=seed)
    return pairs


def train(config: TrainConfig) -> Path:
    from peft import LoraConfig, get_peft_model

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    num_labels = len(config.labels)
    train_pairs = load_sets(config.train, num_labels, config.seed)
    if not train_pairs:
        raise DataError("empty training set")
    dev_sets = {spec["path"]: read_pairs(spec["path"], num_labels, spec.get("limit"), config.seed) for spec in config.dev}

    template = Template.from_dict(config.template)
    base_dir = base_model_dir(config.base_model)
    model = load_sequence_classifier(base_dir, num_labels, torch.float32)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    encoder = template.encoder(tokenizer)
    n_layers = model.config.num_hidden_layers
    top = list(range(max(0, n_layers - config.lora_layers), n_layers))
    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=LORA_TARGETS, layers_to_transform=top, layers_pattern="layers",
        modules_to_save=["score"], task_type="SEQ_CLS",
    )
    peft_model = get_peft_model(model, lora)
    inner = peft_model.base_model.model
    runner = PrefixRunner(getattr(inner, inner.base_model_prefix))

    # each pair as instruction (shared) + the rest of its template tokens
    def pair_ids(p: Pair) -> list[int]:
        enc = encoder.encode(p.query, [p.item])
        return enc.prefix[enc.instruction_len :] + enc.suffixes[0]

    sequences = [pair_ids(p) for p in train_pairs]
    labels = torch.tensor([p.label for p in train_pairs])
    instruction = torch.tensor(encoder.instruction, dtype=torch.long)

    steps_per_epoch = math.ceil(len(train_pairs) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)) * max(0.0, 1 - s / total_steps)
    )
    peft_model.train()
    started, step, tokens, losses = time.time(), 0, 0, []
    stopped_early = False
    for epoch in range(config.epochs):
        order = list(range(len(train_pairs)))
        random.Random(config.seed + epoch).shuffle(order)
        for b in range(0, len(order), config.batch_size):
            batch = order[b : b + config.batch_size]
            cache = runner.prefix(instruction)
            hidden = runner.items(cache, [torch.tensor(sequences[i]) for i in batch])
            loss = F.cross_entropy(inner.score(hidden).float(), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            tokens += sum(len(sequences[i]) for i in batch)
            losses.append(loss.item())
            elapsed = time.time() - started
            if step % config.log_every == 0:
                recent = sum(losses[-config.log_every :]) / len(losses[-config.log_every :])
                eta = elapsed / step * (total_steps - step) / 60
                print(f"step {step}/{total_steps} loss {recent:.4f} {tokens / elapsed:.0f} tok/s eta {eta:.1f} min", flush=True)
            if config.time_budget_minutes is not None and elapsed > 60 * config.time_budget_minutes:
                stopped_early = True
                break
        if stopped_early:
            break
    train_seconds = time.time() - started

    output = Path(config.output_dir)
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    peft_model.save_pretrained(str(partial))
    spec = CheckpointSpec(
        labels=config.labels,
        template=template,
        base_model=config.base_model,
        training={
            "config": asdict(config),
            "steps": step,
            "total_steps": total_steps,
            "stopped_by_time_budget": stopped_early,
            "pairs_seen": min(step * config.batch_size, len(train_pairs) * config.epochs),
            "train_pairs": len(train_pairs),
            "train_seconds": round(train_seconds, 1),
            "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        },
    )
    spec.save(partial)
    if dev_sets:
        from darl_infer import Scorer

        from .evaluate import evaluate_pairs

        scorer = Scorer.from_pretrained(partial, backend="torch")
        spec.evaluation = {path: evaluate_pairs(scorer, pairs) for path, pairs in dev_sets.items()}
        spec.save(partial)
    (partial / "train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    shutil.rmtree(output, ignore_errors=True)
    partial.rename(output)  # a checkpoint appears whole or not at all
    return output
