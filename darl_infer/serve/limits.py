"""The service's limits, one command-line flag each. The request limits' defaults are
text-embeddings-inference's; the step budget is a quarter of TEI's 16384 so that one step stays
short on a CPU, where a step's time grows with its tokens and steps past ~2,600 tokens buy no
speed (bench/matmul_shapes.py: from there every projection runs on both cores). On CUDA the step
budget is TEI's own 16384 (`GPU_MAX_BATCH_TOKENS`): there a step costs ~20 ms of kernel launches
whatever its size up to tens of thousands of tokens (bench/RESULTS.md, "On a GPU")."""

from __future__ import annotations

from dataclasses import asdict, dataclass


GPU_MAX_BATCH_TOKENS = 16384


@dataclass(frozen=True)
class Limits:
    max_client_batch_size: int = 1000     # documents per request; more is 413
    payload_limit: int = 2_000_000        # request body bytes; more is 413
    max_concurrent_requests: int = 512    # requests admitted and not yet answered; more is 429
    max_batch_tokens: int = 4096          # tokens (each prefix once + items) per scoring step; requests queue in pieces of half
    concurrent_steps: int = 3             # steps in flight; the torch backend hands the model between them by layers
    prefix_cache_mb: int = 0              # MiB of recent prefixes' K/V the Scorer keeps (its LRU); 0: none

    def __post_init__(self):
        for name, value in asdict(self).items():
            minimum = 0 if name == "prefix_cache_mb" else 1
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)
