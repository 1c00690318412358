"""Load a checkpoint's model and tokenizer (full HF folder, or PEFT adapter over a base model), and
resolve the device and dtype to load it on."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from .base_models import base_model_dir
from .checkpoint import CheckpointError, CheckpointSpec, check_tokenizer, check_weights, safetensors_weights

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
    """An HF folder as a K-grade sequence classifier; safetensors only, never a pickle."""
    safetensors_weights(Path(path))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a causal-LM base has no score head yet: that warning is expected
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels, dtype=dtype, use_safetensors=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def load_checkpoint_model(directory: Path, spec: CheckpointSpec, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer) of a checkpoint whose darl.json is `spec`; every file is checked first."""
    check_weights(directory, spec)
    if spec.base_model is None:
        weights_dir = tokenizer_dir = directory
    else:
        weights_dir = base_model_dir(spec.base_model)
        tokenizer_dir = directory if (directory / "tokenizer_config.json").is_file() else weights_dir
    check_tokenizer(tokenizer_dir)
    model = load_sequence_classifier(weights_dir, spec.num_labels, torch.float32)
    if spec.base_model is not None:
        from peft import PeftModel

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
