"""The triton backend's decoder: Hugging Face's modules, each known one's forward swapped for one
through the Triton kernels, with the module's math and rounding:
- every known RMSNorm: kernels/rms_norm.py, one launch instead of ~8 PyTorch ops;
- the attention of Llama (SmolLM2), Qwen2, Qwen3 and Gemma-3: q, k and v from one matmul, q's and
  k's per-head norm (Qwen3, Gemma-3) and rotary embedding by kernels/rotary.py, then the attention
  hook as HF calls it;
- their gated MLPs: gate and up from one matmul, act(gate) * up by kernels/gated_activation.py.
On a GPU a pass is bound by kernel launches up to thousands of items (bench/RESULTS.md): Gemma-3's
layer was ~35 launches as HF runs it and is 13 this way. A module of another class runs HF's
forward. Swapped once when the backend is built, on the model it was given (as the attention hook
is): other users of that model get the kernels too.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from darl_infer.kernels.gated_activation import ACTIVATIONS, gated_activation, gated_activation_reference
from darl_infer.kernels.rms_norm import rms_norm
from darl_infer.kernels.rotary import rotary

from .attention_hook import attention_hook
from .torch_backend import hf_class, known_norm

_KNOWN_ATTENTION = [("llama", "LlamaAttention"), ("qwen2", "Qwen2Attention"), ("qwen3", "Qwen3Attention"), ("gemma3", "Gemma3Attention")]
_KNOWN_MLP = [("llama", "LlamaMLP"), ("qwen2", "Qwen2MLP"), ("qwen3", "Qwen3MLP"), ("gemma3", "Gemma3MLP")]


def use_kernel_modules(decoder: torch.nn.Module) -> None:
    for module in decoder.modules():
        if (norm := known_norm(module)) is not None:
            module.forward = functools.partial(_norm_through_kernel, module, *norm)
        elif _is_one_of(module, _KNOWN_ATTENTION) and _head_norms_known(module):
            qkv = FusedLinear(module.q_proj, module.k_proj, module.v_proj)
            module.forward = functools.partial(_attention_through_kernels, module, qkv)
        elif _is_one_of(module, _KNOWN_MLP) and (activation := activation_of(module.act_fn)) is not None:
            gate_up = FusedLinear(module.gate_proj, module.up_proj)
            module.forward = functools.partial(_mlp_through_kernels, module, gate_up, activation)


def _is_one_of(module: torch.nn.Module, classes: list[tuple[str, str]]) -> bool:
    return any(type(module) is hf_class(arch, name) for arch, name in classes)  # exact: a subclass may differ


def _head_norms_known(attention: torch.nn.Module) -> bool:
    return all(known_norm(getattr(attention, name)) is not None for name in ("q_norm", "k_norm") if hasattr(attention, name))


def activation_of(act_fn: torch.nn.Module) -> str | None:
    """Which of the kernel's activations `act_fn` computes, told by what it computes (HF's activation
    classes are renamed across versions): bit-equal to torch's function over a range of inputs."""
    probe = torch.linspace(-10, 10, 1001)
    with torch.no_grad():
        got = act_fn(probe)
    ones = torch.ones_like(probe)
    return next((name for name in ACTIVATIONS if torch.equal(got, gated_activation_reference(probe, ones, name))), None)


class FusedLinear:
    """nn.Linear layers of one input as one matmul: their weights (and biases) concatenated once,
    each layer's parameter then made a view of its rows, so the memory is not doubled and the
    layers still compute what they did. Fused again if a layer's parameter is replaced."""

    def __init__(self, *linears: torch.nn.Linear):
        self.linears = linears
        self.sizes = [linear.out_features for linear in linears]
        self._fuse()

    def _fuse(self) -> None:
        with torch.no_grad():
            self.weight = torch.cat([linear.weight for linear in self.linears])
            has_bias = [linear.bias is not None for linear in self.linears]
            if any(has_bias) and not all(has_bias):
                raise NotImplementedError("fusing linear layers of which only some have a bias")
            self.bias = torch.cat([linear.bias for linear in self.linears]) if all(has_bias) else None
            for linear, weight in zip(self.linears, self.weight.split(self.sizes)):
                linear.weight = torch.nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
            if self.bias is not None:
                for linear, bias in zip(self.linears, self.bias.split(self.sizes)):
                    linear.bias = torch.nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
        self._parameters = [(linear.weight, linear.bias) for linear in self.linears]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if any(linear.weight is not w or linear.bias is not b for linear, (w, b) in zip(self.linears, self._parameters)):
            self._fuse()  # a parameter replaced (not copied into): the concatenation is stale
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def _norm_through_kernel(norm: torch.nn.Module, variant: str, eps: float, x: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, norm.weight, eps, variant)  # the weight read at each call: it may be replaced


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: torch.nn.Module | None) -> torch.Tensor:
    if norm is None:
        return rotary(x, cos, sin)
    variant, eps = known_norm(norm)
    return rotary(x, cos, sin, norm.weight, eps, variant)


def _attention_through_kernels(
    attention: torch.nn.Module, qkv: FusedLinear, hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor], attention_mask=None, **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF's attention forward (Llama/Qwen2/Qwen3/Gemma-3, no KV cache) on the kernels."""
    tokens = hidden_states.shape[:-1]
    q, k, v = (x.view(*tokens, -1, attention.head_dim) for x in qkv(hidden_states))
    cos, sin = position_embeddings
    q = _rotated(q, cos, sin, getattr(attention, "q_norm", None))
    k = _rotated(k, cos, sin, getattr(attention, "k_norm", None))
    out, _ = attention_hook(  # HF's (B, heads, T, D) layout, as the hook takes it from HF's forward
        attention, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
        scaling=attention.scaling, sliding_window=getattr(attention, "sliding_window", None),
    )
    return attention.o_proj(out.reshape(*tokens, -1)), None


def _mlp_through_kernels(mlp: torch.nn.Module, gate_up: FusedLinear, activation: str, x: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(gated_activation(*gate_up(x), activation))
