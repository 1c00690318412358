"""Load a checkpoint's model and tokenizer (full HF folder, or PEFT adapter over a base model), and
resolve the dtype to load it in."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from .base_models import base_model_dir
from .checkpoint import CheckpointError, CheckpointSpec, check_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, str) and dtype == "auto":
        # CPUs without native bf16 (no AVX-512-BF16/AMX) run bf16 several times slower than fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(
        f"dtype {dtype!r} is not supported; choose one of {['auto', *DTYPES]} (or torch.float32, torch.bfloat16, torch.float16)"
    )


def load_sequence_classifier(path: str | Path, num_labels: int, dtype: torch.dtype):
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a causal-LM base has no score head yet: that warning is expected
    try:
        return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)


def load_checkpoint_model(directory: Path, spec: CheckpointSpec, dtype: torch.dtype, device: torch.device):
    check_weights(directory, spec)
    if spec.base_model is None:
        model = load_sequence_classifier(directory, spec.num_labels, torch.float32)
        tokenizer_dir = directory
    else:
        from peft import PeftModel

        base_dir = base_model_dir(spec.base_model)
        base = load_sequence_classifier(base_dir, spec.num_labels, torch.float32)
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(base, str(directory)).merge_and_unload()
        tokenizer_dir = directory if (directory / "tokenizer_config.json").is_file() else base_dir
    if model.config.num_labels != spec.num_labels:
        raise CheckpointError(
            f"{directory / 'config.json'}: num_labels is {model.config.num_labels}, "
            f"darl.json has {spec.num_labels} labels"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model.to(device=device, dtype=dtype).eval(), tokenizer
