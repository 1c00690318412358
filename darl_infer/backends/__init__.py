"""Scoring backends: each maps an encoded query (prefix + item suffixes) to grade probabilities.

    reference       each pair alone through HF transformers: the oracle
    torch           the prefix once, the items packed against its one KV copy, fused head
    triton          the torch backend's flow with the Triton kernels
    onnx            ONNX Runtime on an exported checkpoint (export: onnx_export.py)

Backend modules are imported on first use: triton and onnxruntime are optional extras.
"""

from __future__ import annotations

import importlib

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
