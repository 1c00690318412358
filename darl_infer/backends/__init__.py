"""Scoring backends: each maps an encoded query (prefix + item suffixes) to grade probabilities
(`probs`), or, where prefixes are reused, several encoded queries at once (`probs_many`).

    reference       each pair alone through HF transformers: the oracle
    torch           each prefix once, the items of all queries packed against their prefix's KV copy, fused head
    triton          the torch backend's flow with the Triton kernels
    onnx            ONNX Runtime on an exported checkpoint (export: onnx_export.py)

Backend modules are imported on first use: triton and onnxruntime are optional extras.
"""

from __future__ import annotations

import importlib
import inspect

from ..validate import check_int

BACKENDS = {
    "reference": "darl_infer.backends.reference:ReferenceBackend",
    "torch": "darl_infer.backends.torch_backend:TorchBackend",
    "triton": "darl_infer.backends.triton_backend:TritonBackend",
    "onnx": "darl_infer.backends.onnx_backend:OnnxBackend",
}
BACKEND_CHOICES = ("auto", *BACKENDS)


def backend_class(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {list(BACKEND_CHOICES)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


# the minimum of each integer backend option
_INT_OPTIONS = {"token_budget": 1, "threads": 0}
_BOOL_OPTIONS = {"compile"}


def check_backend_options(name: str, options: dict) -> None:
    """Refuse an option the backend does not take, or a bad value, before any model is loaded."""
    accepted = list(inspect.signature(backend_class(name).__init__).parameters)[2:]  # after self and the model
    for key, value in options.items():
        if key not in accepted:
            raise TypeError(f"backend {name!r} has no option {key!r}; its options: {accepted}")
        if key in _INT_OPTIONS:
            check_int(value, key, _INT_OPTIONS[key])
        if key in _BOOL_OPTIONS and not isinstance(value, bool):
            raise TypeError(f"{key} must be True or False, not {value!r}")
