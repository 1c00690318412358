"""The model workers: threads that score what is queued, a token budget at a time.

Continuous batching without a timer, scheduled for latency: on a CPU, batching saves little time
per token (bench/RESULTS.md, "The service under load"), so what a request waits for is mostly the
work queued or running before it. So that a small request never waits long behind a large one:
- a request is queued in pieces of at most half the step budget (`max_batch_tokens`), runs of
  consecutive items (an item is never cut): whatever came before it, a request waits for steps of
  bounded size;
- a worker that is free takes the queued pieces in order of response ratio (highest response
  ratio next: time waited per token), the first always and each next one that fits the budget,
  then keeps scanning only for pieces whose query is already in the step (they add no prefix). A
  waiting piece's ratio grows as it waits, so a large request is never starved;
- `concurrent_steps` workers (default 3) each run a step: a request that arrives while a step runs
  starts at once in another worker, and the torch backend hands the model between layers to the
  step with the least work left (backends/turns.py), so it waits one layer of the running step,
  not the whole step. The model still runs one pass at a time, every core on it.
A request is answered when its last piece is scored. An item's score does not depend on the items
scored with it (the prefix-reuse contract), so the pieces' results put back together equal
scoring the request alone. A step is one `Scorer.score_many` call (the Scorer is safe to share
between threads); when it fails, the requests with a piece in it fail and the workers go on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from darl_infer import ScoreResult

from .batching import BatchPlan, Request
from .metrics import Metrics

log = logging.getLogger("darl_infer.serve")


@dataclass(eq=False)
class Job:
    """One HTTP request; `future` gets its result once every piece is scored."""

    request: Request
    future: asyncio.Future  # of the event loop that waits for it; set from the worker thread
    pieces: int = 1
    enqueued: float = field(default_factory=time.perf_counter)
    results: dict[int, ScoreResult] = field(default_factory=dict)  # piece index -> its result (worker thread)
    started: bool = False  # a step with one of its pieces has begun (worker thread)


@dataclass(eq=False)
class Piece:
    job: Job
    index: int
    request: Request  # the job's query and a run of its consecutive items


def split_request(request: Request, max_tokens: int) -> list[Request]:
    """Runs of consecutive items whose prefix plus items fit `max_tokens`, at least one item each."""
    bounds, start, tokens = [], 0, request.prefix_tokens
    for i, n in enumerate(request.item_tokens):
        if i > start and tokens + n > max_tokens:
            bounds.append((start, i))
            start, tokens = i, request.prefix_tokens
        tokens += n
    bounds.append((start, len(request.items)))
    return [Request(request.query, request.items[a:b], request.prefix_tokens, request.item_tokens[a:b]) for a, b in bounds]


def by_response_ratio(pieces, now: float) -> list[Piece]:
    """Highest response ratio next: the response ratio is (wait + service) / service with service
    proportional to tokens, so the order is time waited per token, the earliest request first
    among equals (and a request's pieces in their order)."""
    return sorted(pieces, key=lambda p: (-(now - p.job.enqueued) / p.request.tokens, p.job.enqueued, p.index))


def joined(results: list[ScoreResult]) -> ScoreResult:
    """One request's result from its pieces' results, in item order."""
    if len(results) == 1:
        return results[0]
    return ScoreResult(
        probs=np.concatenate([r.probs for r in results]), scores=np.concatenate([r.scores for r in results]),
        grades=np.concatenate([r.grades for r in results]), truncated=np.concatenate([r.truncated for r in results]),
        labels=results[0].labels,
    )


class Scheduler:
    def __init__(self, scorer, max_batch_tokens: int, metrics: Metrics, concurrent_steps: int = 3):
        self._scorer = scorer
        self._budget = max_batch_tokens
        self._metrics = metrics
        self._queue: deque[Piece] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._lru_hits_counted = 0
        self._steps_running, self._busy_counted_to = 0, 0.0  # for the busy-seconds counter
        self._threads = [
            threading.Thread(target=self._run, name=f"darl-serve-worker-{n}", daemon=True) for n in range(concurrent_steps)
        ]

    def start(self) -> None:
        self._lru_hits_counted = self._scorer.prefix_cache_stats()["hits"]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Score what is still queued, then end the workers."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return all(thread.is_alive() for thread in self._threads) and not self._stopping

    def submit(self, request: Request) -> Job:
        pieces = split_request(request, max(1, self._budget // 2))
        job = Job(request, asyncio.get_running_loop().create_future(), pieces=len(pieces))
        with self._cond:
            self._queue.extend(Piece(job, n, piece) for n, piece in enumerate(pieces))
            self._count_queued()
            self._cond.notify()
        return job

    def withdraw(self, job: Job) -> bool:
        """Drop a job's pieces that are still queued (its client went away); False when one of
        them is already being or has been scored."""
        with self._cond:
            kept = deque(piece for piece in self._queue if piece.job is not job)
            dropped = len(self._queue) - len(kept)
            self._queue = kept
            self._count_queued()
            return dropped == job.pieces

    def _count_queued(self) -> None:
        """The queue gauge counts requests, not pieces."""
        self._metrics.queued.set(len({piece.job for piece in self._queue}))

    def _next_step(self) -> tuple[BatchPlan, list[Piece]] | None:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            plan, taken, rest, full = BatchPlan(), [], deque(), False
            for piece in by_response_ratio(self._queue, time.perf_counter()):
                cost = plan.cost(piece.request)
                fits = not taken or plan.tokens + cost <= self._budget
                if fits and (not full or plan.has_query(piece.request.query)):
                    plan.add(piece.request)
                    taken.append(piece)
                else:
                    full = True
                    rest.append(piece)
            self._queue = rest
            self._count_queued()
            return plan, taken

    def _run(self) -> None:
        while (step := self._next_step()) is not None:
            self._score(*step)

    def _score(self, plan: BatchPlan, pieces: list[Piece]) -> None:
        m, start = self._metrics, time.perf_counter()
        with self._cond:
            if not self._steps_running:
                self._busy_counted_to = start
            self._steps_running += 1
        jobs = list(dict.fromkeys(piece.job for piece in pieces))
        for job in jobs:
            if not job.started:  # a request's wait until its first piece's step starts
                job.started = True
                m.queue_duration.observe(start - job.enqueued)
        m.batch_items.observe(plan.items)
        m.batch_tokens.observe(plan.tokens)
        m.batch_requests.observe(len(jobs))
        m.prefix_hits.labels(kind="in_flight").inc(plan.shared)
        try:
            results = plan.split(self._scorer.score_many(plan.batch()))
        except Exception as exc:  # any failure of the forward pass fails this step's requests only
            log.exception("scoring step of %d requests failed", len(jobs))
            for job in jobs:
                _settle(job.future, None, exc)
            with self._cond:  # their pieces still queued are not scored
                self._queue = deque(piece for piece in self._queue if piece.job not in jobs)
                self._count_queued()
        else:
            for piece, result in zip(pieces, results):
                job = piece.job
                job.results[piece.index] = result
                if len(job.results) == job.pieces:
                    _settle(job.future, joined([job.results[n] for n in range(job.pieces)]), None)
        finally:
            end = time.perf_counter()
            m.inference_duration.observe(end - start)
            with self._cond:  # busy time up to now, counted at the end of every step
                m.busy.inc(max(0.0, end - self._busy_counted_to))
                self._busy_counted_to = max(end, self._busy_counted_to)
                self._steps_running -= 1
            self._count_lru_hits()

    def _count_lru_hits(self) -> None:
        """The Scorer's LRU hits since the last count: with steps side by side, a step cannot tell its own."""
        with self._cond:
            hits = self._scorer.prefix_cache_stats()["hits"]
            self._metrics.prefix_hits.labels(kind="lru").inc(hits - self._lru_hits_counted)
            self._lru_hits_counted = hits


def _settle(future: asyncio.Future, result, exc: BaseException | None) -> None:
    def settle():
        if future.done():  # the request was cancelled meanwhile
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    try:
        future.get_loop().call_soon_threadsafe(settle)
    except RuntimeError:  # that event loop is closed: the app is gone and nobody waits for this
        pass
