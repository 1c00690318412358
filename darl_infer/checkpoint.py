"""The DaRL checkpoint: a directory with `darl.json` beside an HF model folder or a PEFT adapter.

darl.json holds the format version, the grade labels and values, the template, the base model
(for adapters), and the training summary and evaluation table. Weights are safetensors only.
Loading validates everything and names the file and field at fault.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_file
from .template import Template

FORMAT_VERSION = 1
SPEC_FILE = "darl.json"
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


class CheckpointError(ValueError):
    pass


@dataclass
class CheckpointSpec:
    labels: list[str] = field(default_factory=lambda: ["irrelevant", "weak", "strong"])
    grade_values: list[float] | None = None  # default 0..K-1
    template: Template = field(default_factory=Template)
    base_model: str | None = None  # set when the weights are a PEFT adapter over this base
    training: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.grade_values is None:
            self.grade_values = [float(k) for k in range(len(self.labels))]

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "labels": self.labels,
            "grade_values": self.grade_values,
            "template": self.template.to_dict(),
            "base_model": self.base_model,
            "training": self.training,
            "evaluation": self.evaluation,
        }

    def save(self, directory: str | Path) -> None:
        with atomic_file(Path(directory) / SPEC_FILE) as f:
            f.write(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "CheckpointSpec":
        return cls.from_dict(read_spec(directory), Path(directory) / SPEC_FILE)

    @classmethod
    def from_dict(cls, d: dict, path: Path) -> "CheckpointSpec":
        """Validate darl.json's content `d` (read from `path`, which errors name)."""

        def bad(fld: str, why: str):
            return CheckpointError(f"{path}: field {fld!r} {why}")

        if d.get("format_version") != FORMAT_VERSION:
            raise bad("format_version", f"is {d.get('format_version')!r}; this darl_infer reads {FORMAT_VERSION}")
        labels = d.get("labels")
        if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) for x in labels)):
            raise bad("labels", "must be a list of at least two strings")
        values = d.get("grade_values")
        if values is not None and not (
            isinstance(values, list)
            and len(values) == len(labels)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        ):
            raise bad("grade_values", f"must be {len(labels)} finite numbers, one per label")
        try:
            template = Template.from_dict(d.get("template", {}))
        except (TypeError, ValueError) as e:
            raise bad("template", str(e)) from None
        base = d.get("base_model")
        if base is not None and not isinstance(base, str):
            raise bad("base_model", "must be a string or null")
        for key in ("training", "evaluation"):
            if not isinstance(d.get(key, {}), dict):
                raise bad(key, "must be an object")
        return cls(
            labels=labels,
            grade_values=[float(v) for v in values] if values is not None else None,
            template=template,
            base_model=base,
            training=d.get("training", {}),
            evaluation=d.get("evaluation", {}),
        )


def read_spec(directory: str | Path) -> dict:
    """darl.json of a checkpoint or export directory, parsed once per load; errors name the file."""
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a darl_infer checkpoint)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    return d


def resolve_checkpoint(name_or_path: str | Path | None) -> Path:
    """The checkpoint directory: `None` or "default" is the embedded default model."""
    if name_or_path is None or name_or_path == "default":
        return DEFAULT_MODEL_DIR
    path = Path(name_or_path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    return path


def check_weights(directory: Path, spec: CheckpointSpec) -> None:
    """Name the missing file instead of letting transformers fail deep inside."""
    if spec.base_model is not None:
        needed = ["adapter_config.json", "adapter_model.safetensors"]
    else:
        needed = ["config.json", "model.safetensors"]
    for name in needed:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name}: missing")
    for pickle_file in ("pytorch_model.bin", "adapter_model.bin"):
        if (directory / pickle_file).exists():
            raise CheckpointError(f"{directory / pickle_file}: pickle weights are refused; use safetensors")
    weights = directory / needed[1]
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises several types for a corrupt header
        raise CheckpointError(f"{weights}: unreadable safetensors file ({e})") from None
