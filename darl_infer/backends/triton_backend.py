"""`triton` backend: the torch backend's model and flow with the Triton kernels swapped in, the
shared-prefix attention (one launch per layer), every RMSNorm of the decoder (one launch each
instead of ~8 PyTorch ops) and the fused classification head (one launch per chunk of items). On
CUDA the kernels are compiled; on CPU they run only in Triton's interpreter (TRITON_INTERPRET=1,
slow, for testing).
"""

from __future__ import annotations

import functools
import os

import torch

from darl_infer.kernels._triton import HAS_TRITON, INTERPRETED
from darl_infer.kernels.classification_head import classification_head
from darl_infer.kernels.rms_norm import rms_norm
from darl_infer.kernels.shared_prefix_attention import shared_prefix_attention

from .torch_backend import TorchBackend, known_norm


def check_triton_can_run(device: torch.device) -> None:
    if not HAS_TRITON:
        raise ImportError("backend='triton' needs triton: pip install 'darl-infer[gpu]'; or use backend='torch'")
    if device.type == "cuda" or INTERPRETED:
        return
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError(
            "TRITON_INTERPRET was set after darl_infer.kernels was imported; Triton reads it when the "
            "kernels are defined. Set it before importing darl_infer, or use backend='torch'."
        )
    raise RuntimeError(
        f"backend='triton' needs a CUDA device (the model is on {device}). On CPU the Triton kernels run "
        "only in Triton's interpreter: set TRITON_INTERPRET=1 before importing darl_infer (slow, for "
        "testing). Use backend='torch' on CPU."
    )


class TritonBackend(TorchBackend):
    name = "triton"
    attention_op = staticmethod(shared_prefix_attention)
    head_op = staticmethod(classification_head)

    def __init__(self, model, token_budget: int | None = None):
        check_triton_can_run(model.device)
        super().__init__(model, token_budget)
        use_fused_norms(getattr(model, model.base_model_prefix))


def use_fused_norms(decoder: torch.nn.Module) -> None:
    """Every RMSNorm of the decoder that kernels/rms_norm.py knows runs the Triton kernel, with the
    module's math and rounding. Switched once when the backend is built (as the attention hook is),
    on the model this backend was given: other users of that model get the kernel too. On a GPU,
    Gemma-3's 6 norms per layer were ~60 % of a pass's kernel launches and its costliest GPU time
    (bench/RESULTS.md)."""
    for module in decoder.modules():
        if (known := known_norm(module)) is not None:
            variant, eps = known
            module.forward = functools.partial(_norm_through_kernel, module, variant, eps)


def _norm_through_kernel(norm: torch.nn.Module, variant: str, eps: float, x: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, norm.weight, eps, variant)  # the weight read at each call: it may be replaced
