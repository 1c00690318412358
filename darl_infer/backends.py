"""Scoring backends. Each maps an encoded query (prefix + item suffixes) to grade probabilities.

`reference` scores every pair as its own sequence through HF transformers: the oracle.
`torch` computes the prefix once and runs the items packed against its one KV copy, then the
fused classification head (final norm on the N last tokens only, projection, softmax).
"""

from __future__ import annotations

import importlib

import torch

from darl_infer.kernels.classification_head import classification_head_reference
from darl_infer.kernels.shared_prefix_attention import shared_prefix_attention_reference

from .prefix_cache import PrefixRunner
from .template import Encoded


class ReferenceBackend:
    name = "reference"

    def __init__(self, model):
        self.model = model
        self.device = model.device

    @torch.inference_mode()
    def probs(self, enc: Encoded) -> torch.Tensor:
        rows = []
        for suffix in enc.suffixes:
            ids = torch.tensor([enc.prefix + suffix], device=self.device)
            rows.append(self.model(input_ids=ids).logits[0].float().softmax(-1))
        return torch.stack(rows) if rows else torch.empty(0, self.model.config.num_labels)


def length_sorted_chunks(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Item indices sorted by length, cut into chunks of at most `token_budget` tokens.

    An item longer than the budget gets a chunk of its own. Sorting keeps the items inside one
    chunk of similar length, so the per-item padding inside the attention op stays small.
    """
    chunks, current, used = [], [], 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if current and used + lengths[i] > token_budget:
            chunks.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        chunks.append(current)
    return chunks


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
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        if getattr(model.score, "bias", None) is not None:
            raise NotImplementedError("a classification head with a bias is not supported; use backend='reference'")
        self.model = model
        self.device = model.device
        self.token_budget = token_budget
        decoder = getattr(model, model.base_model_prefix)
        self.norm_weight, self.norm_eps, self.norm_variant = final_norm_of(decoder)
        # the head applies the final norm, to the last token of each item only
        self.runner = PrefixRunner(decoder, self.attention_op, final_norm=False)
        # the head's expected grade goes unused: the Scorer weighs with the checkpoint's grade values
        self.grade_values = torch.arange(model.config.num_labels, dtype=torch.float32, device=self.device)

    def head(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Grade probabilities (N, K) from the packed pre-norm hidden states of N items."""
        probs, _ = self.head_op(
            hidden, cu_seqlens, self.norm_weight, self.norm_eps, self.norm_variant, self.model.score.weight,
            self.grade_values,
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
