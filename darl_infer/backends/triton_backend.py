"""`triton` backend: the torch backend's model and flow with the Triton kernels swapped in: the
shared-prefix attention (one launch per layer), the decoder's norms, rotary embeddings and gated
MLP activations, between the fused q/k/v and gate/up projections (fused_modules.py), and the fused
classification head (one launch per chunk of items). On CUDA the kernels are compiled; on CPU
they run only in Triton's interpreter (TRITON_INTERPRET=1, slow, for testing).
"""

from __future__ import annotations

import os

import torch

from darl_infer.kernels._triton import HAS_TRITON, INTERPRETED
from darl_infer.kernels.classification_head import classification_head
from darl_infer.kernels.gated_activation import gated_activation
from darl_infer.kernels.rms_norm import rms_norm
from darl_infer.kernels.rotary import rotary
from darl_infer.kernels.shared_prefix_attention import shared_prefix_attention

from .fused_modules import ElementwiseOps
from .torch_backend import TorchBackend


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
    elementwise_ops = ElementwiseOps(rotary=rotary, gated=gated_activation, rms_norm=rms_norm)

    def __init__(self, model, token_budget: int | None = None):
        check_triton_can_run(model.device)
        super().__init__(model, token_budget)

    def uses_fused_modules(self) -> bool:
        return True  # the kernels run there (on a CPU only in Triton's interpreter, for the tests)

    def uses_cpu_kernels(self) -> bool:
        return False  # its own kernels, also in Triton's interpreter

    def fused_module_ops(self) -> ElementwiseOps:
        return self.elementwise_ops
