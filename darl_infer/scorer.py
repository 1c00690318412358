"""`Scorer`: score and rank items for a query with a DaRL checkpoint.

The API follows sentence-transformers' CrossEncoder (`predict`, `rank`) so users know it already.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backends import BACKEND_CHOICES, backend_class, check_backend_options
from .backends.onnx_format import is_onnx_export
from .backends.prefix_cache import PrefixLRU
from .checkpoint import SPEC_FILE, CheckpointSpec, read_spec, resolve_checkpoint
from .loading import load_checkpoint_model, resolve_device, resolve_dtype
from .pairs import group_by_query
from .validate import check_int, check_items, check_text


@dataclass
class ScoreResult:
    probs: np.ndarray      # (N, K) probability of each grade
    scores: np.ndarray     # (N,) expected grade value, sum_k p_k * v_k
    grades: np.ndarray     # (N,) argmax grade index
    truncated: np.ndarray  # (N,) the query or the item was cut to its token limit
    labels: list[str]

    def __len__(self) -> int:
        return len(self.scores)


def check_prefix_cache_mb(value, backend: str) -> None:
    """The LRU of recent prefixes lives in the backends that reuse prefixes (`probs_many`)."""
    check_int(value, "prefix_cache_mb", 0)
    if value and not hasattr(backend_class(backend), "probs_many"):
        raise ValueError(
            f"prefix_cache_mb needs a backend that reuses prefixes (torch or triton); backend {backend!r} keeps none"
        )


class Scorer:
    """Scores (query, item) pairs with a checkpoint; safe to share between threads (each call keeps
    its own state, the model is only read, the LRU of recent prefixes takes a lock)."""

    def __init__(
        self, model, tokenizer, spec: CheckpointSpec, backend: str = "torch", prefix_cache_mb: int = 0, **backend_options
    ):
        """`prefix_cache_mb`: MiB of recent prefixes' K/V kept between calls (0: none)."""
        check_backend_options(backend, backend_options)
        check_prefix_cache_mb(prefix_cache_mb, backend)
        self.spec = spec
        self.encoder = spec.template.encoder(tokenizer)
        self.backend = backend_class(backend)(model, **backend_options)
        self.grade_values = torch.tensor(spec.grade_values, dtype=torch.float32)
        self._prefix_lru = PrefixLRU(prefix_cache_mb * 2**20)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | None = None,
        *,
        backend: str = "auto",
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        prefix_cache_mb: int = 0,
        **backend_options,
    ) -> "Scorer":
        """Load a checkpoint directory; `None` (or "default") loads the embedded default model.

        Every argument and the checkpoint's darl.json are checked before the model is loaded.
        """
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKEND_CHOICES)}")
        resolved_device = resolve_device(device)
        resolved_dtype = resolve_dtype(dtype, resolved_device)
        directory = resolve_checkpoint(name_or_path)
        raw = read_spec(directory)
        if is_onnx_export(raw) or backend == "onnx":
            return cls._from_onnx_export(directory, raw, backend, dtype, device, prefix_cache_mb, **backend_options)
        if backend == "auto":  # the Triton kernels on CUDA when triton imports; never on CPU (interpreter only)
            triton_ok = resolved_device.type == "cuda" and importlib.import_module("darl_infer.kernels._triton").HAS_TRITON
            backend = "triton" if triton_ok else "torch"
        check_backend_options(backend, backend_options)
        check_prefix_cache_mb(prefix_cache_mb, backend)
        spec = CheckpointSpec.from_dict(raw, directory / SPEC_FILE)
        model, tokenizer = load_checkpoint_model(directory, spec, resolved_dtype, resolved_device)
        return cls(model, tokenizer, spec, backend=backend, prefix_cache_mb=prefix_cache_mb, **backend_options)

    @classmethod
    def _from_onnx_export(
        cls, directory: Path, raw: dict, backend: str, dtype, device, prefix_cache_mb, **backend_options
    ) -> "Scorer":
        if backend not in ("auto", "onnx"):
            raise ValueError(f"{directory} is an ONNX export: load it with backend='onnx' (or 'auto'), not {backend!r}")
        if not (dtype in ("auto", "fp32") or dtype == torch.float32):
            raise ValueError(f"an ONNX export runs in the precision it was exported in; dtype must be 'auto' or 'fp32', not {dtype!r}")
        check_backend_options("onnx", backend_options)
        check_prefix_cache_mb(prefix_cache_mb, "onnx")
        from transformers import AutoTokenizer

        from .backends.onnx_format import OnnxExport

        export = OnnxExport.from_spec(directory, raw)  # before the tokenizer: names a missing or altered file
        spec = CheckpointSpec.from_dict(raw, directory / SPEC_FILE)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        return cls(export, tokenizer, spec, backend="onnx", device=device, **backend_options)

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    def score(self, query: str, items) -> ScoreResult:
        """Scores of `items` (any ordered iterable of str, read once; see validate.check_items) for `query`."""
        return self.score_many([(query, items)])[0]

    def score_many(self, batch) -> list[ScoreResult]:
        """`score` of each `(query, items)` of `batch`, in order. The torch and triton backends pack
        them: the queries' prefixes in one forward pass and all their items together, each item
        attending only to its own query's prefix, in as few passes as the token budget allows (two
        when everything fits); each result equals that query scored alone. Other backends score
        one query at a time."""
        encoded = [self.encoder.encode(query, items) for query, items in batch]  # all checked before any scoring
        if hasattr(self.backend, "probs_many"):
            lru = self._prefix_lru if self._prefix_lru.max_bytes else None
            probs = self.backend.probs_many(encoded, lru)
        else:
            probs = [self.backend.probs(enc) for enc in encoded]
        return [
            ScoreResult(
                probs=p.numpy(),
                scores=(p @ self.grade_values).numpy(),
                grades=p.argmax(-1).numpy(),
                truncated=np.array(enc.truncated, dtype=bool),
                labels=self.labels,
            )
            for enc, p in zip(encoded, probs)
        ]

    def prefix_cache_stats(self) -> dict[str, int]:
        """The LRU of recent prefixes (`prefix_cache_mb`): hits, misses (prefixes looked up and
        computed), evictions, entries, bytes held, max_bytes; all 0 when it is off."""
        return self._prefix_lru.stats()

    def rank(self, query: str, items, top_k: int | None = None, return_documents: bool = False) -> list[dict]:
        """Items best first, as `[{"corpus_id", "score", "grade"[, "text"]}]` (CrossEncoder.rank's shape).
        `top_k`: keep the best k (None: all)."""
        if top_k is not None:
            check_int(top_k, "top_k", 0)
        items = check_items(items)
        result = self.score(query, items)
        order = np.argsort(-result.scores, kind="stable")[:top_k]
        ranked = []
        for i in order:
            row = {"corpus_id": int(i), "score": float(result.scores[i]), "grade": int(result.grades[i])}
            if return_documents:
                row["text"] = items[i]
            ranked.append(row)
        return ranked

    def predict(self, pairs) -> np.ndarray:
        """Expected-grade scores of (query, item) pairs in input order; each query's prefix runs once."""
        pairs = list(pairs)
        for n, pair in enumerate(pairs):
            if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
                raise TypeError(f"pairs[{n}] must be a (query, item) pair")
            check_text(pair[0], f"pairs[{n}][0] (query)")
            check_text(pair[1], f"pairs[{n}][1] (item)")
        scores = np.empty(len(pairs), dtype=np.float32)
        groups = group_by_query(query for query, _ in pairs)
        results = self.score_many([(query, [pairs[n][1] for n in idx]) for query, idx in groups.items()])
        for idx, result in zip(groups.values(), results):
            scores[idx] = result.scores
        return scores
