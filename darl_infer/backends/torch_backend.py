"""The `torch` backend: the prefix once, the items packed against its one KV copy, then the fused
classification head (final norm on the N last tokens only, projection, softmax)."""

from __future__ import annotations

import importlib

import torch

from darl_infer.kernels.classification_head import classification_head_reference
from darl_infer.kernels.shared_prefix_attention import shared_prefix_attention_reference

from ..template import Encoded
from .chunking import length_sorted_chunks
from .prefix_runner import PrefixRunner

# final-norm classes whose math the fused head reproduces: class -> (norm variant, eps attribute)
_KNOWN_FINAL_NORMS = {
    ("llama", "LlamaRMSNorm"): ("llama", "variance_epsilon"),
    ("qwen2", "Qwen2RMSNorm"): ("llama", "variance_epsilon"),
    ("qwen3", "Qwen3RMSNorm"): ("llama", "variance_epsilon"),
    ("mistral", "MistralRMSNorm"): ("llama", "variance_epsilon"),
    ("gemma", "GemmaRMSNorm"): ("gemma", "eps"),
    ("gemma2", "Gemma2RMSNorm"): ("gemma", "eps"),
    ("gemma3", "Gemma3RMSNorm"): ("gemma", "eps"),
}


def final_norm_of(decoder: torch.nn.Module) -> tuple[torch.Tensor, float, str]:
    """(weight, eps, variant) of the decoder's final norm, for the fused head.

    Matched by exact class: a subclass or another norm may compute something else, so it is an
    error rather than a guess.
    """
    norm = getattr(decoder, "norm", None)
    for (arch, name), (variant, eps_attr) in _KNOWN_FINAL_NORMS.items():
        if type(norm) is getattr(importlib.import_module(f"transformers.models.{arch}.modeling_{arch}"), name):
            return norm.weight, float(getattr(norm, eps_attr)), variant
    known = ", ".join(name for _, name in _KNOWN_FINAL_NORMS)
    raise NotImplementedError(
        f"{type(decoder).__name__}.norm is {type(norm).__name__}; the fused classification head knows "
        f"only {known}. Use backend='reference' for this model."
    )


class TorchBackend:
    name = "torch"
    attention_op = staticmethod(shared_prefix_attention_reference)
    head_op = staticmethod(classification_head_reference)

    def __init__(self, model, token_budget: int = 2048):
        """`token_budget`: item tokens per forward pass (options are checked by the Scorer)."""
        if getattr(model.score, "bias", None) is not None:
            raise NotImplementedError("a classification head with a bias is not supported; use backend='reference'")
        self.model = model
        self.device = model.device
        self.token_budget = token_budget
        decoder = getattr(model, model.base_model_prefix)
        self.norm_weight, self.norm_eps, self.norm_variant = final_norm_of(decoder)
        # the head applies the final norm, to the last token of each item only
        self.runner = PrefixRunner(decoder, self.attention_op, final_norm=False)
        # The head op also returns sum_k p_k * v_k; it is given the grade indices 0..K-1 and its
        # result goes unused: the Scorer weighs the probabilities with the checkpoint's grade values.
        self.grade_indices = torch.arange(model.config.num_labels, dtype=torch.float32, device=self.device)

    def head(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Grade probabilities (N, K) from the packed pre-norm hidden states of N items."""
        probs, _ = self.head_op(
            hidden, cu_seqlens, self.norm_weight, self.norm_eps, self.norm_variant, self.model.score.weight,
            self.grade_indices,
        )
        return probs

    @torch.inference_mode()
    def probs(self, enc: Encoded) -> torch.Tensor:
        out = torch.empty(len(enc.suffixes), self.model.config.num_labels)
        if not enc.suffixes:
            return out
        cache = self.runner.prefix(torch.tensor(enc.prefix, device=self.device))
        for chunk in length_sorted_chunks([len(s) for s in enc.suffixes], self.token_budget):
            ids = [torch.tensor(enc.suffixes[i], device=self.device) for i in chunk]
            out[chunk] = self.head(*self.runner.packed(cache, ids)).cpu()
        return out
