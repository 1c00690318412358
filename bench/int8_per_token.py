"""Per-token int8 (W8A8) for the decoder's Linear layers through oneDNN's int8 matmul: an
experiment measured by bench/int8_quality.py --method per-token (bench/RESULTS.md, "int8"), not a
darl_infer dtype.

Weights: int8 per output channel, packed once (`onednn.qlinear_prepack`). Activations: int8 per
token, each row scaled by its own max |x| / 127, so a token's result never depends on the other
tokens of the call (unlike torch.ao's dynamic int8, whose one scale per call moved an item's
probabilities by 0.57 with its batch). oneDNN is called with an activation scale of 1 and each
row's scale is applied to the int32-exact product afterwards.

Needs int8 dot products that do not saturate: AMX-INT8 or AVX-512-VNNI. With AVX2 only, oneDNN's
u8 x s8 path (`vpmaddubsw`) saturates its int16 pair sums and the products are off by ~0.09
relative (measured on an AMD EPYC, session 8), so this refuses such CPUs.
"""

from __future__ import annotations

import torch
from torch import nn

from darl_infer.loading import cpu_flags
from row import replace_decoder_linears


def check_int8_dot_products() -> None:
    if not {"amx_int8", "avx512_vnni"} & cpu_flags():
        raise RuntimeError("per-token int8 needs AMX-INT8 or AVX-512-VNNI (this CPU has neither: its int8 products would saturate)")


@torch.library.custom_op("darl_bench::int8_matmul", mutates_args=())
def int8_matmul(qx: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor, out_features: int) -> torch.Tensor:
    """(M, K) int8 @ packed (K -> N) int8 weights, times each output channel's scale: (M, N) fp32.
    A custom op so that torch.compile calls it as it is (inductor's own lowering of this oneDNN op
    wants the packed weight as a frozen constant)."""
    return torch.ops.onednn.qlinear_pointwise(qx, 1.0, 0, packed, w_scale, w_zero, None, 1.0, 0, torch.float32, "none", [], "")


@int8_matmul.register_fake
def _(qx, packed, w_scale, w_zero, out_features):
    return qx.new_empty((qx.shape[0], out_features), dtype=torch.float32)


class PerTokenInt8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise NotImplementedError("a Linear with a bias")
        weight = linear.weight.detach().float()
        self.out_features = weight.shape[0]
        self.w_scale = (weight.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        qweight = torch.round(weight / self.w_scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.packed = torch.ops.onednn.qlinear_prepack(qweight, None)
        self.w_zero = torch.zeros(self.out_features, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        scale = (rows.abs().amax(1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        qx = torch.round(rows / scale).clamp(-127, 127).to(torch.int8)
        out = int8_matmul(qx, self.packed, self.w_scale, self.w_zero, self.out_features) * scale
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def quantize_decoder_per_token_int8(model) -> None:
    """Every nn.Linear of the decoder layers in per-token int8, in place (the head stays as it is)."""
    check_int8_dot_products()
    replace_decoder_linears(model, PerTokenInt8Linear)
