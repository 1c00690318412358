"""`Scorer`: score and rank items for a query with a DaRL checkpoint.

The API follows sentence-transformers' CrossEncoder (`predict`, `rank`) so users know it already.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch

from .backends import BACKEND_CHOICES, backend_class, check_backend_options
from .backends.onnx_format import ONNX_SECTION, is_onnx_export
from .backends.prefix_cache import PrefixLRU
from .checkpoint import SPEC_FILE, CheckpointSpec, read_spec, resolve_checkpoint
from .bi_encoder import BiEncoderScorer
from .cascade import CascadeScorer
from .backends.int8_linear import quantize_decoder_linears, quantize_decoder_weights, record_input_absmax
from .jsonl import iter_rows
from .loading import auto_dtype, dtype_name, load_checkpoint_model, resolve_device, resolve_dtype
from .ranking import Ranker, ScoreResult
from .validate import check_int


def check_prefix_cache_mb(value, backend: str) -> None:
    """The LRU of recent prefixes lives in the backends that reuse prefixes (`probs_many`)."""
    check_int(value, "prefix_cache_mb", 0)
    if value and not hasattr(backend_class(backend), "probs_many"):
        raise ValueError(
            f"prefix_cache_mb needs a backend that reuses prefixes (torch or triton); backend {backend!r} keeps none"
        )


# per-token int8 (W8A8, measured and not shipped: backends/int8_linear.py) smooths each Linear's inputs
# by their ranges over these pairs: 32 hand-written pairs, English and Chinese, products, questions and web queries
INT8_CALIBRATION = Path(__file__).parent / "examples" / "int8_calibration.jsonl"


def check_int8_request(backend: str, device: torch.device) -> None:
    """dtype="int8" (backends/int8_linear.py): the torch backend on the CPU."""
    if device.type != "cpu":
        raise ValueError(f"dtype='int8' runs on the CPU; on {device} use dtype='bf16' or 'fp16'")
    if backend not in ("auto", "torch"):
        raise ValueError(f"dtype='int8' runs in the torch backend, not {backend!r}")


class Scorer(Ranker):
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
        # what "auto" chose (an ONNX export's is set from its darl.json by _from_onnx_export)
        self.dtype = dtype_name(model) if isinstance(model, torch.nn.Module) else None
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
        A bi-encoder checkpoint gives a `BiEncoderScorer` (bi_encoder.py; options `token_budget`,
        `item_cache_mb`).

        `dtype`: "auto" (bf16 on CUDA and on CPUs with AMX or AVX-512-BF16, else fp32), "fp32",
        "bf16", "fp16", or "int8" (opt-in, CPU, lossy: the decoder's Linear layers with int8 weights,
        dequantized at each call; activations and the rest as "auto"; backends/int8_linear.py).

        Every argument and the checkpoint's darl.json are checked before the model is loaded.
        """
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKEND_CHOICES)}")
        resolved_device = resolve_device(device)
        int8 = isinstance(dtype, str) and dtype == "int8"
        if int8:
            check_int8_request(backend, resolved_device)
        resolved_dtype = auto_dtype(resolved_device) if int8 else resolve_dtype(dtype, resolved_device)
        directory = resolve_checkpoint(name_or_path)
        raw = read_spec(directory)
        if int8 and raw.get("bi_encoder") is not None:
            raise ValueError(f"{directory} is a bi-encoder checkpoint: dtype='int8' is for cross-encoder checkpoints")
        if raw.get("bi_encoder") is not None:
            return cls._bi_encoder(directory, raw, backend, resolved_dtype, resolved_device, prefix_cache_mb, **backend_options)
        if is_onnx_export(raw) or backend == "onnx":
            return cls._from_onnx_export(directory, raw, backend, dtype, device, prefix_cache_mb, **backend_options)
        if backend == "auto":  # the Triton kernels on CUDA when triton imports; never on CPU (interpreter only)
            triton_ok = resolved_device.type == "cuda" and importlib.import_module("darl_infer.kernels._triton").HAS_TRITON
            backend = "triton" if triton_ok else "torch"
        check_backend_options(backend, backend_options)
        check_prefix_cache_mb(prefix_cache_mb, backend)
        spec = CheckpointSpec.from_dict(raw, directory / SPEC_FILE)
        model, tokenizer = load_checkpoint_model(directory, spec, resolved_dtype, resolved_device)
        if int8:
            quantize_decoder_weights(model)
        scorer = cls(model, tokenizer, spec, backend=backend, prefix_cache_mb=prefix_cache_mb, **backend_options)
        if int8:
            scorer.dtype = "int8"
        return scorer

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
        scorer = cls(export, tokenizer, spec, backend="onnx", device=device, **backend_options)
        scorer.dtype = "int8" if raw[ONNX_SECTION].get("int8") else "fp32"
        return scorer

    @staticmethod
    def _bi_encoder(directory: Path, raw: dict, backend: str, dtype, device, prefix_cache_mb, **options) -> BiEncoderScorer:
        if backend not in ("auto", "torch"):
            raise ValueError(f"{directory} is a bi-encoder: it runs on its own torch path; backend must be 'auto' or 'torch', not {backend!r}")
        if prefix_cache_mb:
            raise ValueError(f"{directory} is a bi-encoder: it keeps item vectors, not prefixes (item_cache_mb=, not prefix_cache_mb=)")
        unknown = set(options) - {"token_budget", "item_cache_mb"}
        if unknown:
            raise TypeError(f"a bi-encoder has no option {sorted(unknown)[0]!r}; its options: ['token_budget', 'item_cache_mb']")
        spec = CheckpointSpec.from_dict(raw, directory / SPEC_FILE)
        return BiEncoderScorer.from_checkpoint(directory, spec, dtype, device, **options)

    @staticmethod
    def cascade(coarse, fine, keep: float | int = 0.2) -> CascadeScorer:
        """A scorer with this API in which `coarse` scores every item and `fine` re-scores the
        `keep` best of each query (a fraction in (0, 1], or a count); each is a Scorer or a
        checkpoint name/path. See cascade.py."""
        coarse, fine = (m if isinstance(m, Ranker) else Scorer.from_pretrained(m) for m in (coarse, fine))
        return CascadeScorer(coarse, fine, keep)

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


def quantize_int8(model: torch.nn.Module, tokenizer, spec: CheckpointSpec, names: tuple[str, ...] | None = None) -> None:
    """Per-token int8 (W8A8, measured and not shipped; bench/int8_quality.py --method per-token):
    the decoder's Linear layers (those named in `names`, if given), in place, each
    smoothed by its inputs' ranges while the float model scores the package's calibration pairs
    (INT8_CALIBRATION) with the checkpoint's template."""
    pairs = [(row["query"], row["item"]) for _, row in iter_rows(INT8_CALIBRATION)]
    with record_input_absmax(model) as absmax:  # HF's modules as they are: the torch backend's fused
        Scorer(model, tokenizer, spec, backend="reference").predict(pairs)  # projections would pass the hooks
    quantize_decoder_linears(model, absmax, names)
