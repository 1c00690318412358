"""Hugging Face's decoder modules with fused projections, their elementwise work by the backend's
ops (the Triton kernels, or their PyTorch references), with the modules' math and rounding:
- the attention of Llama (SmolLM2), Qwen2, Qwen3 and Gemma-3: q, k and v from one matmul, q's and
  k's per-head norm (Qwen3, Gemma-3) and rotary embedding by the rotary op (kernels/rotary.py),
  then the attention hook as HF calls it;
- their gated MLPs (where the backend has a gated op): gate and up from one matmul, act(gate) * up
  by the gated op (kernels/gated_activation.py);
- with a norm op, every known RMSNorm (kernels/rms_norm.py; without, HF's modules run);
- with an add-and-norm op, the decoder layers of those models: each residual add and the norms on
  either side of it in one pass (on a CPU, where these passes are bound by memory).
On a GPU a pass is bound by kernel launches up to thousands of items: with the kernels a 10-item
query on Gemma-3 makes 384 launches instead of 636 (H200). On a CPU the torch backend uses the
attention modules, eager with its C++ kernels and compiled; eager also the decoder layers, and in
fp32 the MLPs (bf16 keeps HF's with oneDNN's post-ops; TorchBackend.fused_module_ops).
A module of another class runs HF's forward. Swapped once when the backend is built, on the model
it was given (as the attention hook is); outside darl_infer's forward passes the modules run HF's
forward, so other users of the model (training it, say) are unaffected.

The swapped forwards are methods of their modules reading only module attributes (tensors, ints,
strings, the backend's op functions), as HF's are: under torch.compile (the torch backend's
compile=True) every layer then shares one graph instead of being compiled once each.
"""

from __future__ import annotations

import functools
import importlib
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from darl_infer.kernels.gated_activation import ACTIVATIONS, gated_activation_reference

from .attention_hook import attention_hook, current

# RMSNorm classes whose math kernels/rms_norm.py reproduces: class -> (norm variant, eps attribute)
KNOWN_NORMS = {
    ("llama", "LlamaRMSNorm"): ("llama", "variance_epsilon"),
    ("qwen2", "Qwen2RMSNorm"): ("llama", "variance_epsilon"),
    ("qwen3", "Qwen3RMSNorm"): ("llama", "variance_epsilon"),
    ("mistral", "MistralRMSNorm"): ("llama", "variance_epsilon"),
    ("gemma", "GemmaRMSNorm"): ("gemma", "eps"),
    ("gemma2", "Gemma2RMSNorm"): ("gemma", "eps"),
    ("gemma3", "Gemma3RMSNorm"): ("gemma", "eps"),
}
# attention and MLP classes whose forward `_fused_attention` / `_fused_mlp` reproduce
KNOWN_ATTENTION = [("llama", "LlamaAttention"), ("qwen2", "Qwen2Attention"), ("qwen3", "Qwen3Attention"), ("gemma3", "Gemma3Attention")]
KNOWN_MLP = [("llama", "LlamaMLP"), ("qwen2", "Qwen2MLP"), ("qwen3", "Qwen3MLP"), ("gemma3", "Gemma3MLP")]
# decoder layers whose forward `_fused_layer` reproduces: class -> its norms, in order
KNOWN_LAYERS = {
    ("llama", "LlamaDecoderLayer"): ("input_layernorm", "post_attention_layernorm"),
    ("qwen2", "Qwen2DecoderLayer"): ("input_layernorm", "post_attention_layernorm"),
    ("qwen3", "Qwen3DecoderLayer"): ("input_layernorm", "post_attention_layernorm"),
    ("gemma3", "Gemma3DecoderLayer"): (
        "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
    ),
}


@functools.cache
def hf_class(arch: str, name: str) -> type:
    return getattr(importlib.import_module(f"transformers.models.{arch}.modeling_{arch}"), name)


def is_one_of(module: torch.nn.Module | None, classes) -> bool:
    return any(type(module) is hf_class(arch, name) for arch, name in classes)  # exact: a subclass may differ


def known_norm(module: torch.nn.Module | None) -> tuple[str, float] | None:
    """(norm variant, eps) if `module` is one of the known RMSNorm classes, else None."""
    for (arch, name), (variant, eps_attr) in KNOWN_NORMS.items():
        if type(module) is hf_class(arch, name):  # exact: a subclass may compute something else
            return variant, float(getattr(module, eps_attr))
    return None


def activation_of(act_fn: torch.nn.Module) -> str | None:
    """Which of the gated op's activations `act_fn` computes, told by what it computes (HF's
    activation classes are renamed across versions): bit-equal to torch's function over a range."""
    probe = torch.linspace(-10, 10, 1001)
    with torch.no_grad():
        got = act_fn(probe)
    ones = torch.ones_like(probe)
    return next((name for name in ACTIVATIONS if torch.equal(got, gated_activation_reference(probe, ones, name))), None)


@dataclass(frozen=True)
class ElementwiseOps:
    """What runs between the matmuls: `rotary` and `gated` with the signatures of kernels/rotary.py's
    and kernels/gated_activation.py's functions, `gated` None for HF's MLP modules; `rms_norm` and
    `add_rms_norm` with kernels/rms_norm.py's, or None for HF's norm modules and decoder layers."""

    rotary: Callable
    gated: Callable | None
    rms_norm: Callable | None = None
    add_rms_norm: Callable | None = None


class FusedProjection:
    """nn.Linear layers of one input (`owner`'s) as one matmul: their weights (and biases)
    concatenated into non-persistent buffers of `owner`, darl_<name>_weight / _bias (not saved with
    the model), each layer's parameter then holding a view of its rows (the same Parameter object,
    its `.data` swapped), so the weights are held once (unless the old ones were memory-mapped from
    a file, whose pages stay mapped: TorchBackend.uses_fused_modules), the layers compute what they
    did, and an optimizer or a copy into a parameter updates the fused weight too. A parameter given other
    storage (replaced, `.data` rebound, the model moved) leaves the fused weight stale: `refresh`."""

    def __init__(self, owner: torch.nn.Module, name: str, linears: list[torch.nn.Linear]):
        self.owner, self.name, self.linears = owner, name, linears
        setattr(owner, f"darl_{name}_sizes", tuple(linear.out_features for linear in linears))
        self._fuse()

    def _storage(self) -> list[tuple[int, int | None]]:
        return [(linear.weight.data_ptr(), None if linear.bias is None else linear.bias.data_ptr()) for linear in self.linears]

    def _fuse(self) -> None:
        sizes = getattr(self.owner, f"darl_{self.name}_sizes")
        with torch.no_grad():
            weight = torch.cat([linear.weight for linear in self.linears])
            has_bias = {linear.bias is not None for linear in self.linears}
            if len(has_bias) > 1:
                raise NotImplementedError(f"fusing {self.name} projections of which only some have a bias")
            bias = torch.cat([linear.bias for linear in self.linears]) if has_bias == {True} else None
        self.owner.register_buffer(f"darl_{self.name}_weight", weight, persistent=False)
        self.owner.register_buffer(f"darl_{self.name}_bias", bias, persistent=False)
        for linear, rows in zip(self.linears, weight.split(sizes)):
            linear.weight.data = rows
        if bias is not None:
            for linear, rows in zip(self.linears, bias.split(sizes)):
                linear.bias.data = rows
        self._fused_storage = self._storage()

    def refresh(self) -> None:
        """Fuse again if a parameter's storage changed since (called outside compiled code)."""
        if self._storage() != self._fused_storage:
            self._fuse()


def use_fused_modules(decoder: torch.nn.Module, ops: ElementwiseOps) -> list[FusedProjection]:
    """Swap the forward of every known module of `decoder` (see the module's docstring); returns the
    fused projections, for the backend to `refresh` before each call."""
    if ops.rms_norm is not None:
        use_norm_op(decoder, ops.rms_norm)
    fused = []
    for module in decoder.modules():
        if ops.add_rms_norm is not None and (norms := _layer_norms(module)) is not None:
            module.darl_add_rms_norm, module.darl_layer_norm = ops.add_rms_norm, norms
            module.forward = types.MethodType(_fused_layer, module)
        if is_one_of(module, KNOWN_ATTENTION) and _head_norms_known(module) and plain_linears(module.q_proj, module.k_proj, module.v_proj):
            fused.append(FusedProjection(module, "qkv", [module.q_proj, module.k_proj, module.v_proj]))
            module.darl_rotary = ops.rotary
            module.darl_head_norm = known_norm(getattr(module, "q_norm", None))  # k's is alike (_head_norms_known)
            module.forward = types.MethodType(_fused_attention, module)
        elif ops.gated is not None and is_one_of(module, KNOWN_MLP) and plain_linears(module.gate_proj, module.up_proj) and (activation := activation_of(module.act_fn)) is not None:
            fused.append(FusedProjection(module, "gate_up", [module.gate_proj, module.up_proj]))
            module.darl_gated, module.darl_activation = ops.gated, activation
            module.forward = types.MethodType(_fused_mlp, module)
    return fused


def use_norm_op(decoder: torch.nn.Module, rms_norm: Callable) -> None:
    """Swap the forward of every known RMSNorm of `decoder` for `rms_norm` (kernels/rms_norm.py's
    signature), within darl_infer's passes."""
    for module in decoder.modules():
        if (norm := known_norm(module)) is not None:
            module.darl_rms_norm, (module.darl_norm_variant, module.darl_norm_eps) = rms_norm, norm
            module.forward = types.MethodType(_norm_forward, module)


def plain_linears(*linears: torch.nn.Module) -> bool:
    """nn.Linear itself: not dtype="int8"'s quantized layers (int8_linear.py), nor a LoRA wrapper."""
    return all(type(linear) is torch.nn.Linear for linear in linears)


def _head_norms_known(attention: torch.nn.Module) -> bool:
    """No per-head norms, or q's and k's both known and alike (as in every known class)."""
    present = [hasattr(attention, name) for name in ("q_norm", "k_norm")]
    if not any(present):
        return True
    q_norm, k_norm = (known_norm(getattr(attention, name, None)) for name in ("q_norm", "k_norm"))
    return all(present) and q_norm is not None and q_norm == k_norm


def _layer_norms(layer: torch.nn.Module) -> tuple[str, float] | None:
    """(variant, eps) of a known decoder layer whose norms are all known and alike, else None."""
    names = next((names for (arch, name), names in KNOWN_LAYERS.items() if type(layer) is hf_class(arch, name)), None)
    norms = {known_norm(getattr(layer, name, None)) for name in names} if names else {None}
    return norms.pop() if len(norms) == 1 and None not in norms else None


def _in_a_pass() -> bool:
    """Within a darl_infer forward pass (this thread's), or tracing one of the torch backend's
    compiled layers. Elsewhere (training the model, say) a swapped module runs HF's own forward:
    the kernels have no backward, and the fused weights are buffers outside autograd."""
    return torch.compiler.is_compiling() or current() is not None


def _norm_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not _in_a_pass():
        return type(self).forward(self, x)
    return self.darl_rms_norm(x, self.weight, self.darl_norm_eps, self.darl_norm_variant)


def _fused_attention(
    self: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask=None, **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF's attention forward (Llama/Qwen2/Qwen3/Gemma-3, no KV cache) with one q/k/v matmul."""
    if not _in_a_pass():
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)
    tokens = hidden_states.shape[:-1]
    qkv = F.linear(hidden_states, self.darl_qkv_weight, self.darl_qkv_bias).split(self.darl_qkv_sizes, dim=-1)
    q, k, v = (x.view(*tokens, -1, self.head_dim) for x in qkv)
    cos, sin = position_embeddings
    if self.darl_head_norm is None:
        q, k = self.darl_rotary(q, cos, sin), self.darl_rotary(k, cos, sin)
    else:
        variant, eps = self.darl_head_norm
        q = self.darl_rotary(q, cos, sin, self.q_norm.weight, eps, variant)
        k = self.darl_rotary(k, cos, sin, self.k_norm.weight, eps, variant)
    out, _ = attention_hook(  # HF's (B, heads, T, D) layout, as the hook takes it from HF's forward
        self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
        scaling=self.scaling, sliding_window=getattr(self, "sliding_window", None),
    )
    return self.o_proj(out.reshape(*tokens, -1)), None


def _fused_layer(self: torch.nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """HF's decoder layer forward (Llama/Qwen2/Qwen3: pre-norms; Gemma-3: norms before and after
    attention and MLP) with each residual add and its neighbouring norms by `darl_add_rms_norm`. HF's
    model passes a layer its inputs by keyword, and the layer hands them all to its attention."""
    if args or not _in_a_pass():
        return type(self).forward(self, hidden_states, *args, **kwargs)
    variant, eps = self.darl_layer_norm
    attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    if not hasattr(self, "pre_feedforward_layernorm"):  # residual + attention, then its norm
        residual, x = self.darl_add_rms_norm(attended, hidden_states, None, self.post_attention_layernorm.weight, eps, variant)
        return residual + self.mlp(x)
    residual, x = self.darl_add_rms_norm(
        attended, hidden_states, self.post_attention_layernorm.weight, self.pre_feedforward_layernorm.weight, eps, variant
    )
    out, _ = self.darl_add_rms_norm(self.mlp(x), residual, self.post_feedforward_layernorm.weight, None, eps, variant)
    return out


def _fused_mlp(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not _in_a_pass():
        return type(self).forward(self, x)
    gate, up = F.linear(x, self.darl_gate_up_weight, self.darl_gate_up_bias).split(self.darl_gate_up_sizes, dim=-1)
    return self.down_proj(self.darl_gated(gate, up, self.darl_activation))
