"""A bi-encoder checkpoint: query and item embedded apart, a graded head on their interaction
(MKD's representation-based student). An item's vector does not depend on the query, so it can be
computed ahead of time (`encode_items`, `score_vectors`) or kept between calls (`item_cache_mb`):
ranking N known items then costs one short query pass and N evaluations of a small head.

A text's vector is the decoder's final hidden state at the last token of

    [BOS] + label + text (cut to the template's limit) + answer cue,

scaled to unit RMS; the label is the template's query label for a query, its item label for an
item. `[BOS] + label` is the same for every text of a kind: it runs once per call and the texts run
packed after it (prefix_runner.py), no padding, so a vector never depends on the texts beside it.
The head is an MLP over [q, i, q*i, |q-i|] (SBERT's classification features) giving K grade logits,
always in fp32.

Files: darl.json with a "bi_encoder" section (`BiEncoderSection`) and `base_model` (the trunk,
e.g. "gemma3-270m@2"), the trunk's LoRA adapter (adapter_config.json, adapter_model.safetensors)
and the head (head.safetensors). Trained by `darl-distill` with `"student": "bi-encoder"`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backends.chunking import length_sorted_chunks
from .backends.prefix_cache import PrefixLRU
from .base_models import base_model_dir
from .checkpoint import (
    SPEC_FILE, CheckpointError, CheckpointSpec, check_tokenizer, read_spec, resolve_checkpoint, safetensors_weights,
)
from .config import from_fields
from .loading import dtype_name, load_base_decoder
from .ranking import Ranker, ScoreResult
from .validate import check_int, check_items

HEAD_FILE = "head.safetensors"
FEATURES = "q,i,q*i,|q-i|"
POOLING = "last_token"


@dataclass(frozen=True)
class BiEncoderSection:
    """darl.json's "bi_encoder": what the head computes (only one kind exists; named so that a
    checkpoint of another kind is refused rather than misread)."""

    head_hidden: int
    features: str = FEATURES
    pooling: str = POOLING

    @classmethod
    def from_dict(cls, d: dict, path: Path) -> "BiEncoderSection":
        try:
            section = from_fields(cls, d, "bi_encoder")
            check_int(section.head_hidden, "head_hidden", 1)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: field 'bi_encoder': {e}") from None
        if section.features != FEATURES or section.pooling != POOLING:
            raise CheckpointError(
                f"{path}: field 'bi_encoder' asks for features {section.features!r} and pooling {section.pooling!r}; "
                f"this darl_infer computes {FEATURES!r} with {POOLING!r}"
            )
        return section

    def to_dict(self) -> dict:
        return asdict(self)


def is_bi_encoder(name_or_path) -> bool:
    """Whether a checkpoint name or directory holds a bi-encoder (its darl.json has the section)."""
    return read_spec(resolve_checkpoint(name_or_path)).get("bi_encoder") is not None


class InteractionHead(nn.Module):
    def __init__(self, hidden_size: int, head_hidden: int, num_labels: int):
        super().__init__()
        self.hidden = nn.Linear(4 * hidden_size, head_hidden)
        self.score = nn.Linear(head_hidden, num_labels)

    def forward(self, queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Grade logits (N, K) of N (query vector, item vector) rows."""
        features = torch.cat([queries, items, queries * items, (queries - items).abs()], dim=-1)
        return self.score(F.gelu(self.hidden(features)))


class TextVectors:
    """Vectors of texts that all continue one prefix, in as few packed passes as the token budget allows."""

    def __init__(self, decoder: nn.Module, token_budget: int, attention_op=None):
        """`attention_op`: the shared-prefix attention (None: PyTorch's fused SDPA, as the torch backend)."""
        # imported here: the runner pulls in the kernels package, which `import darl_infer` must not
        from .backends.prefix_runner import PrefixRunner
        from .backends.sdpa_attention import shared_prefix_attention_sdpa

        self.runner = PrefixRunner(decoder, attention_op or shared_prefix_attention_sdpa)
        self.hidden_size = decoder.config.hidden_size
        self.token_budget = token_budget

    def __call__(self, prefix_ids: list[int], texts: list[list[int]]) -> torch.Tensor:
        """(N, hidden) fp32, unit RMS, in the order of `texts` (differentiable: training uses it)."""
        device = self.runner.decoder.device
        if not texts:
            return torch.empty(0, self.hidden_size, device=device)
        prefix = self.runner.prefix(torch.tensor(prefix_ids))
        chunks = length_sorted_chunks([len(t) for t in texts], self.token_budget)
        hidden = torch.cat([self.runner.items(prefix, [torch.tensor(texts[j]) for j in c]) for c in chunks])
        hidden = hidden[torch.argsort(torch.tensor([j for c in chunks for j in c], device=device))].float()
        return F.normalize(hidden, dim=-1) * math.sqrt(self.hidden_size)


class BiEncoderScorer(Ranker):
    """The Scorer of a bi-encoder checkpoint (`Scorer.from_pretrained` returns one for such a
    directory): `score`/`rank`/`predict`/`score_many` like any scorer, plus `encode_items` and
    `score_vectors`. Safe to share between threads (the model is only read; the LRU takes a lock)."""

    def __init__(self, decoder, head: InteractionHead, tokenizer, spec: CheckpointSpec,
                 token_budget: int = 2048, item_cache_mb: int = 0):
        """`item_cache_mb`: MiB of item vectors kept between calls, least recently used first out (0: none)."""
        check_int(token_budget, "token_budget", 1)
        check_int(item_cache_mb, "item_cache_mb", 0)
        self.spec = spec
        self.encoder = spec.template.encoder(tokenizer)
        self.vectors = TextVectors(decoder, token_budget)
        self.head = head
        self.dtype = dtype_name(decoder)
        self.grade_values = torch.tensor(spec.grade_values, dtype=torch.float32)
        self.query_prefix = self.encoder.bos + self.encoder.query_label
        self.item_prefix = self.encoder.bos + self.encoder.item_label
        self._item_lru = PrefixLRU(item_cache_mb * 2**20)

    @classmethod
    def from_checkpoint(cls, directory: Path, spec: CheckpointSpec, dtype: torch.dtype, device: torch.device,
                        **options) -> "BiEncoderScorer":
        section = BiEncoderSection.from_dict(spec.bi_encoder, directory / SPEC_FILE)
        if spec.base_model is None:
            raise CheckpointError(f"{directory / SPEC_FILE}: field 'base_model' must name the bi-encoder's trunk")
        for name in ("adapter_config.json", HEAD_FILE):
            if not (directory / name).is_file():
                raise CheckpointError(f"{directory / name}: missing")
        safetensors_weights(directory, "adapter_model.safetensors")
        tokenizer_dir = base_model_dir(spec.base_model)
        check_tokenizer(tokenizer_dir)
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        decoder = load_base_decoder(spec.base_model, torch.float32)
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            decoder = PeftModel.from_pretrained(decoder, str(directory)).merge_and_unload()
        head = InteractionHead(decoder.config.hidden_size, section.head_hidden, spec.num_labels)
        try:
            head.load_state_dict(load_file(str(directory / HEAD_FILE)))
        except Exception as e:  # a corrupt file, or shapes that disagree with darl.json
            raise CheckpointError(f"{directory / HEAD_FILE}: not this checkpoint's head ({e})") from None
        decoder = decoder.to(device=device, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        return cls(decoder, head.to(device).eval(), tokenizer, spec, **options)

    def _item_vectors(self, suffixes: list[list[int]]) -> torch.Tensor:
        """Vectors of encoded items: from the LRU when it has them, the others computed once each."""
        keys = [tuple(s) for s in suffixes]
        lru = self._item_lru if self._item_lru.max_bytes else None
        found = {}
        for key in dict.fromkeys(keys):
            if lru is not None and (vector := lru.get(key)) is not None:
                found[key] = vector
        missing = [key for key in dict.fromkeys(keys) if key not in found]
        for key, vector in zip(missing, self.vectors(self.item_prefix, [list(key) for key in missing])):
            found[key] = vector
            if lru is not None:  # a row of its own: the LRU must not keep the whole batch alive
                lru.put(key, vector.clone())
        if not keys:
            return torch.empty(0, self.vectors.hidden_size)
        return torch.stack([found[key] for key in keys])

    def _result(self, query_vector: torch.Tensor, item_vectors: torch.Tensor, truncated) -> ScoreResult:
        probs = self.head(query_vector.expand(len(item_vectors), -1), item_vectors).float().softmax(-1).cpu()
        return ScoreResult(
            probs=probs.numpy(), scores=(probs @ self.grade_values).numpy(), grades=probs.argmax(-1).numpy(),
            truncated=np.array(truncated, dtype=bool), labels=self.labels,
        )

    @torch.inference_mode()
    def score_many(self, batch) -> list[ScoreResult]:
        """`score` of each `(query, items)`: the queries in one packed pass, the items not in the
        LRU in another; each result equals that query scored alone."""
        encoded = [self.encoder.encode(query, items) for query, items in batch]  # all checked first
        queries = self.vectors(self.query_prefix, [enc.query + self.encoder.answer_cue for enc in encoded])
        items = self._item_vectors([s for enc in encoded for s in enc.suffixes])
        results, start = [], 0
        for enc, query in zip(encoded, queries):
            results.append(self._result(query, items[start : start + len(enc.suffixes)], enc.truncated))
            start += len(enc.suffixes)
        return results

    @torch.inference_mode()
    def encode_items(self, items) -> np.ndarray:
        """(N, hidden) fp32 vectors of `items`, to keep and hand to `score_vectors` later (they are
        also put in the LRU when `item_cache_mb` is set)."""
        suffixes, _ = self.encoder.item_suffixes(check_items(items))
        return self._item_vectors(suffixes).cpu().numpy()

    @torch.inference_mode()
    def score_vectors(self, query: str, item_vectors) -> ScoreResult:
        """`score(query, items)` from the items' `encode_items` vectors: one query pass and the head.
        `truncated` says only whether the query was cut (the vectors do not record their item's cut)."""
        vectors = torch.as_tensor(np.asarray(item_vectors, dtype=np.float32), device=self.vectors.runner.decoder.device)
        if vectors.ndim != 2 or vectors.shape[1] != self.vectors.hidden_size:
            raise ValueError(f"item_vectors must be (N, {self.vectors.hidden_size}) as encode_items returns, got {tuple(vectors.shape)}")
        query_ids, query_cut = self.encoder.query_ids(query)
        query_vector = self.vectors(self.query_prefix, [query_ids + self.encoder.answer_cue])[0]
        return self._result(query_vector, vectors, [query_cut] * len(vectors))

    def prefix_cache_stats(self) -> dict[str, int]:
        """The service's cache counters; for a bi-encoder, its LRU of item vectors (`item_cache_mb`)."""
        return self._item_lru.stats()
