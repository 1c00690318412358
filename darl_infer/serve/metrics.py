"""Prometheus metrics, one registry per app (two apps in one process, as in the tests, never
share counters). Names follow Prometheus' conventions: base units, `_total` on counters."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITEMS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
TOKENS = tuple(2**k for k in range(4, 18))  # 16 .. 131072


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "darl_requests", "HTTP requests by endpoint and outcome (status code; 499: the client went away first)",
            ["endpoint", "outcome"], registry=r,
        )
        self.request_duration = Histogram(
            "darl_request_duration_seconds", "Request arrival to response", ["endpoint"], buckets=SECONDS, registry=r
        )
        self.queue_duration = Histogram(
            "darl_queue_duration_seconds", "A request's wait from queueing to the start of its scoring step",
            buckets=SECONDS, registry=r,
        )
        self.inference_duration = Histogram(
            "darl_inference_duration_seconds", "One scoring step (one score_many call)", buckets=SECONDS, registry=r
        )
        self.busy = Counter(
            "darl_model_busy_seconds", "Seconds during which at least one scoring step ran (steps side by side count once)",
            registry=r,
        )
        self.batch_items = Histogram("darl_batch_items", "Items scored in one step (after deduplication)", buckets=ITEMS, registry=r)
        self.batch_tokens = Histogram("darl_batch_tokens", "Tokens in one step: each prefix once + items", buckets=TOKENS, registry=r)
        self.batch_requests = Histogram("darl_batch_requests", "Requests served by one step", buckets=ITEMS, registry=r)
        self.prefix_hits = Counter(
            "darl_prefix_cache_hits",
            "Prefix runs saved. kind=lru: a step's query whose prefix K/V came from the Scorer's LRU of recent "
            "prefixes (--prefix-cache-mb); kind=in_flight: a request that joined another request of the same query "
            "in its step", ["kind"], registry=r,
        )
        for kind in ("lru", "in_flight"):  # both series from the start, at 0
            self.prefix_hits.labels(kind=kind)
        self.in_flight = Gauge("darl_requests_in_flight", "Requests admitted and not yet answered", registry=r)
        self.queued = Gauge("darl_queue_requests", "Requests waiting for the model worker", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
