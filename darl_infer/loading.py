"""Load a checkpoint's model and tokenizer (full HF folder, or PEFT adapter over a base model), and
resolve the device and dtype to load it on."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from .base_models import BaseModelMissing, base_model_dir, split_layers
from .checkpoint import CheckpointError, CheckpointSpec, check_tokenizer, check_weights, safetensors_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(model: torch.nn.Module) -> str:
    """"fp32" / "bf16" / "fp16" of a model's weights."""
    weight_dtype = next(model.parameters()).dtype
    return next((name for name, d in DTYPES.items() if d == weight_dtype), str(weight_dtype))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None`: CUDA when there is a GPU, else the CPU. A device that cannot be used here is an
    error now, not deep inside the model load."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device; use 'cpu' or 'cuda[:N]'") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: darl_infer runs on 'cpu' or 'cuda[:N]'")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available here (torch {torch.__version__}); use 'cpu'")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


AUTO_DTYPE_ENV = "DARL_INFER_AUTO_DTYPE"  # "fp32" / "bf16": what dtype="auto" means on the CPU, overriding the rule


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; elsewhere: not known, empty)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line.split(":", 1)[1].split() for line in f if line.startswith("flags")))
    except (OSError, StopIteration):
        return set()


def cpu_has_native_bf16() -> bool:
    """AMX-BF16 or AVX-512-BF16 in the CPU flags."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def auto_dtype(device: torch.device) -> torch.dtype:
    """dtype="auto": bf16 on CUDA and on CPUs with native bf16 (AMX or AVX-512-BF16: there the torch
    backend scores bf16 2.7x as many items/s as fp32 on a 2-core AMX Xeon, bench/RESULTS.md), fp32
    on every other CPU (without native bf16 it is emulated, several times slower). The environment
    variable DARL_INFER_AUTO_DTYPE=fp32|bf16 overrides the rule on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16
    override = os.environ.get(AUTO_DTYPE_ENV)
    if override is not None:
        if override not in ("fp32", "bf16"):
            raise ValueError(f"{AUTO_DTYPE_ENV}={override!r}: must be fp32 or bf16")
        return DTYPES[override]
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, str) and dtype == "auto":
        return auto_dtype(device)
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(
        f"dtype {dtype!r} is not supported; choose one of {['auto', *DTYPES]} (or torch.float32, torch.bfloat16, torch.float16)"
    )


def truncated_config(path: str | Path, num_layers: int | None = None, **overrides):
    """An HF folder's config; `num_layers`: only its bottom decoder layers (the others' weights are not loaded)."""
    config = AutoConfig.from_pretrained(str(path), **overrides)
    if num_layers is not None:
        if num_layers > config.num_hidden_layers:
            raise BaseModelMissing(f"{path}: has {config.num_hidden_layers} layers, {num_layers} were asked for")
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None) is not None:  # HF models index it by layer position
            config.layer_types = config.layer_types[:num_layers]
    return config


def _quietly(auto_class, path, config, dtype):
    """`auto_class.from_pretrained` (safetensors only) without transformers' load report: loading a
    causal LM's weights as a classifier (a new score head) or as a bare decoder (its LM head unused)
    reports missing or unused keys, which is expected here."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return auto_class.from_pretrained(str(path), config=config, dtype=dtype, use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)


def load_sequence_classifier(path: str | Path, num_labels: int, dtype: torch.dtype, num_layers: int | None = None):
    """An HF folder as a K-grade sequence classifier; safetensors only, never a pickle.
    `num_layers`: keep only the bottom decoder layers."""
    safetensors_weights(Path(path))
    config = truncated_config(path, num_layers, num_labels=num_labels)
    return _quietly(AutoModelForSequenceClassification, path, config, dtype)


def load_base_decoder(base_model: str, dtype: torch.dtype):
    """A base model ("NAME" or "NAME@L") as its bare decoder (no LM head): the trunk of a bi-encoder."""
    from transformers import AutoModel

    path = base_model_dir(base_model)
    safetensors_weights(Path(path))
    return _quietly(AutoModel, path, truncated_config(path, split_layers(base_model)[1]), dtype)


def load_base_classifier(base_model: str, num_labels: int, dtype: torch.dtype):
    """A base model ("NAME" or "NAME@L", see base_models.py) as a K-grade classifier with a new head."""
    return load_sequence_classifier(base_model_dir(base_model), num_labels, dtype, split_layers(base_model)[1])


def load_checkpoint_model(directory: Path, spec: CheckpointSpec, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer) of a checkpoint whose darl.json is `spec`; every file is checked first."""
    check_weights(directory, spec)
    if spec.base_model is None:
        tokenizer_dir = directory
    else:
        has_own_tokenizer = (directory / "tokenizer_config.json").is_file()
        tokenizer_dir = directory if has_own_tokenizer else base_model_dir(spec.base_model)
    check_tokenizer(tokenizer_dir)
    if spec.base_model is None:
        model = load_sequence_classifier(directory, spec.num_labels, torch.float32)
    else:
        from peft import PeftModel

        model = load_base_classifier(spec.base_model, spec.num_labels, torch.float32)
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            # peft reads adapter_model.safetensors when it is there, which check_weights made sure of
            model = PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{tokenizer_dir}: the tokenizer does not load ({e})") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model.to(device=device, dtype=dtype).eval(), tokenizer
