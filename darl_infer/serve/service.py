"""What every rerank endpoint does between parsing its body and shaping its answer.

Admit (429 past `max_concurrent_requests`), validate (400 / 413 / 422), tokenize with the
checkpoint's own encoder (the token counts the scheduler budgets with, and the truncation flags
that make an over-long text a 413 when the client did not ask for truncation), queue, and wait
for the result or for the client to go away, whichever comes first: a request whose client left
is taken out of the queue before it is scored.

Tokenizing here, on the event loop's thread, while the worker's `score_many` tokenizes too, is
safe: the encoder asks its fast tokenizer for no truncation and no padding, so every call only
reads the Rust tokenizer (its state changes, and two threads could collide, only when those differ).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
from starlette.requests import Request as HttpRequest

from darl_infer import ScoreResult
from darl_infer.cascade import kept_best, merge

from . import errors
from .batching import Request
from .limits import Limits
from .metrics import Metrics
from .scheduler import Scheduler


class ClientGone(Exception):
    """The client disconnected before its result was ready."""


@dataclass
class Ranked:
    result: ScoreResult   # this request's items, in its order
    order: np.ndarray     # item indices best first (Scorer.rank's order: stable on ties)
    relevance: np.ndarray # expected grade rescaled to [0, 1]
    tokens: int           # prefix + items as encoded


@dataclass
class Coarse:
    """`--cascade`: the fast model, its own worker, and how many of each request's items it keeps."""

    scorer: object
    scheduler: Scheduler
    keep: float | int


class RerankService:
    """With `coarse`, a request is a cascade (darl_infer.cascade): the coarse worker grades every
    item, then the fine worker re-grades the kept best; each worker batches across requests, and
    each item's score stays its model's score for that pair alone."""

    def __init__(self, scorer, limits: Limits, scheduler: Scheduler, metrics: Metrics, coarse: Coarse | None = None):
        self.scorer, self.limits, self.scheduler, self.metrics, self.coarse = scorer, limits, scheduler, metrics, coarse
        values = scorer.spec.grade_values
        self._low, self._span = min(values), (max(values) - min(values)) or 1.0
        self._in_flight = 0  # touched only on the event loop's thread

    def relevance(self, scores: np.ndarray) -> np.ndarray:
        """Expected grade over the highest grade value when the lowest is 0 (every checkpoint's
        0, 1, 2): (score - lowest) / (highest - lowest), so it stays in [0, 1] for any grade values."""
        return (scores - self._low) / self._span

    async def rerank(self, http: HttpRequest, query: str, texts: list[str], truncate: bool) -> Ranked:
        if self._in_flight >= self.limits.max_concurrent_requests:
            raise errors.overloaded(self.limits.max_concurrent_requests)
        if not (self.scheduler.healthy and (self.coarse is None or self.coarse.scheduler.healthy)):
            raise errors.unavailable("the model worker is not running")
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        try:
            request = self._encode(self.scorer, query, texts, truncate)
            if self.coarse is None:
                result = await self._wait(http, self.scheduler, request)
            else:
                result = await self._cascade(http, query, texts)
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)
        order = np.argsort(-result.scores, kind="stable")
        return Ranked(result, order, self.relevance(result.scores), request.tokens)

    async def _cascade(self, http: HttpRequest, query: str, texts: list[str]) -> ScoreResult:
        coarse = await self._wait(http, self.coarse.scheduler, self._encode(self.coarse.scorer, query, texts, True))
        picks = kept_best(coarse, self.coarse.keep)
        kept = [texts[i] for i in picks]
        fine = await self._wait(http, self.scheduler, self._encode(self.scorer, query, kept, True))
        return merge(coarse, fine, picks)

    def _encode(self, scorer, query: str, texts: list[str], truncate: bool) -> Request:
        if not texts:
            raise errors.empty("no documents to rank: `texts` / `documents` is empty")
        if len(texts) > self.limits.max_client_batch_size:
            raise errors.too_large(
                f"{len(texts)} documents; at most {self.limits.max_client_batch_size} per request (--max-client-batch-size)"
            )
        try:
            enc = scorer.encoder.encode(query, texts)
        except ValueError as e:  # the only one the encoder raises on well-typed input: an empty query
            raise errors.empty(str(e)) from None
        if not truncate and any(enc.truncated):
            raise errors.too_large(self._over_length(query, texts, enc.truncated))
        return Request(query, texts, len(enc.prefix), [len(s) for s in enc.suffixes])

    def _over_length(self, query: str, texts: list[str], truncated: list[bool]) -> str:
        t = self.scorer.spec.template
        if self.scorer.encoder.encode(query, [""]).truncated[0]:  # an empty item is never cut: the query is
            return f"the query is over the checkpoint's limit of {t.max_query_tokens} tokens; send truncate=true to cut it"
        over = [i for i, cut in enumerate(truncated) if cut]
        shown = ", ".join(map(str, over[:10])) + (", ..." if len(over) > 10 else "")
        return (
            f"texts [{shown}] are over the checkpoint's limit of {t.max_item_tokens} tokens per text; "
            "send truncate=true to cut them"
        )

    async def _wait(self, http: HttpRequest, scheduler: Scheduler, request: Request) -> ScoreResult:
        job = scheduler.submit(request)
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not job.future.done():
            scheduler.withdraw(job)  # False when already being scored: its result is then dropped
            job.future.cancel()
            raise ClientGone
        try:
            return job.future.result()
        except Exception as exc:
            raise errors.backend(exc) from exc


async def _disconnected(http: HttpRequest) -> None:
    """Return when the client closes the connection. The body is read by now, so the server's
    next message is `http.disconnect` (or comes once the response is sent, when this is cancelled)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
