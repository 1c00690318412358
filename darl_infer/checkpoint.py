"""The DaRL checkpoint: a directory with `darl.json` beside an HF model folder or a PEFT adapter.

darl.json holds the format version, the grade labels and values, the template, the base model
(for adapters), and the training summary and evaluation table; a bi-encoder's also its
"bi_encoder" section (bi_encoder.py). Weights are safetensors only.
Loading validates everything and names the file and field at fault.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_file
from .config import check_fields
from .template import Template

FORMAT_VERSION = 1
SPEC_FILE = "darl.json"
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
DEFAULT_STUDENT_DIR = Path(__file__).parent / "default_student"  # the default model distilled (darl-distill)
DEFAULT_BI_ENCODER_DIR = Path(__file__).parent / "default_bi_encoder"  # the same, into a bi-encoder (bi_encoder.py)
# darl.json's top-level keys; "onnx" is the section an ONNX export adds (backends/onnx_format.py)
SPEC_KEYS = ("format_version", "labels", "grade_values", "template", "base_model", "training", "evaluation", "onnx", "bi_encoder")
PICKLE_OF = {"model.safetensors": "pytorch_model.bin", "adapter_model.safetensors": "adapter_model.bin"}


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
    bi_encoder: dict | None = None  # set for a bi-encoder (query and item embedded apart; bi_encoder.py)

    def __post_init__(self):
        if self.grade_values is None:
            self.grade_values = [float(k) for k in range(len(self.labels))]

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        d = {
            "format_version": FORMAT_VERSION,
            "labels": self.labels,
            "grade_values": self.grade_values,
            "template": self.template.to_dict(),
            "base_model": self.base_model,
            "training": self.training,
            "evaluation": self.evaluation,
        }
        if self.bi_encoder is not None:
            d["bi_encoder"] = self.bi_encoder
        return d

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

        try:  # a misspelt key must not silently fall back to a default (e.g. grade values 0..K-1)
            check_fields(d, SPEC_KEYS, "top-level")
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
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
        bi_encoder = d.get("bi_encoder")
        if bi_encoder is not None and not isinstance(bi_encoder, dict):
            raise bad("bi_encoder", "must be an object or absent")
        return cls(
            labels=labels,
            grade_values=[float(v) for v in values] if values is not None else None,
            template=template,
            base_model=base,
            training=d.get("training", {}),
            evaluation=d.get("evaluation", {}),
            bi_encoder=bi_encoder,
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
    """The checkpoint directory: `None` or "default" is the embedded default model, "default-student"
    its embedded distilled student, "default-bi-encoder" its embedded distilled bi-encoder."""
    if name_or_path is None or name_or_path == "default":
        return DEFAULT_MODEL_DIR
    if name_or_path == "default-student":
        return DEFAULT_STUDENT_DIR
    if name_or_path == "default-bi-encoder":
        return DEFAULT_BI_ENCODER_DIR
    path = Path(name_or_path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    return path


def safetensors_weights(folder: Path, name: str = "model.safetensors") -> Path:
    """`folder/name`; a folder that holds only pickle weights is refused (never read by torch.load)."""
    path = folder / name
    if path.is_file() or (folder / f"{name}.index.json").is_file():  # one file, or shards
        return path
    pickled = folder / PICKLE_OF[name]
    if pickled.is_file():
        raise CheckpointError(
            f"{folder}: holds {pickled.name} (pickle), not {name}; darl_infer loads safetensors only "
            "(convert it once: from_pretrained, then save_pretrained, which writes safetensors)"
        )
    raise CheckpointError(f"{path}: missing")


def check_weights(directory: Path, spec: CheckpointSpec) -> None:
    """Name a missing, pickled or unreadable weights file, and a score head that disagrees with
    darl.json's labels, before any weight is loaded (transformers would fail deep inside, or
    silently start from a random head)."""
    if spec.base_model is None:
        config, weights_name = "config.json", "model.safetensors"
    else:
        config, weights_name = "adapter_config.json", "adapter_model.safetensors"
    if not (directory / config).is_file():
        raise CheckpointError(f"{directory / config}: missing")
    weights = safetensors_weights(directory, weights_name)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (a checkpoint holds one weights file, not shards)")
    for pickle_file in PICKLE_OF.values():
        if (directory / pickle_file).exists():
            raise CheckpointError(f"{directory / pickle_file}: pickle weights are refused; use safetensors")
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            heads = [f.get_slice(k).get_shape() for k in f.keys() if k.endswith("score.weight")]
    except Exception as e:  # safetensors raises several types for a corrupt header
        raise CheckpointError(f"{weights}: unreadable safetensors file ({e})") from None
    if not heads:
        raise CheckpointError(f"{weights}: no score head (score.weight); a DaRL checkpoint holds its classification head")
    if heads[0][0] != spec.num_labels:
        raise CheckpointError(
            f"{directory / SPEC_FILE}: field 'labels' has {spec.num_labels} labels, "
            f"but {weights.name}' score head gives {heads[0][0]} grades"
        )


def check_tokenizer(folder: Path) -> None:
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(f"{folder / 'tokenizer.json'}: missing (the tokenizer; a sentencepiece tokenizer.model would do)")
