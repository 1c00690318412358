"""The model worker: one thread that scores what is queued, a token budget at a time.

Continuous batching without a timer: while a step runs, new requests queue; when it ends, the
worker takes the queue's head and every following request that fits `max_batch_tokens` (a
request larger than the budget goes alone), then keeps scanning only for requests whose query is
already in the step, which add no prefix. FIFO otherwise, so a large request is never starved.
The step is one `Scorer.score_many` call; when it fails, its requests fail and the worker goes on.
Only this thread touches the model, so the Scorer needs no lock, and the change of the Scorer's
prefix-LRU hit count across a step is that step's own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .batching import BatchPlan, Request
from .metrics import Metrics

log = logging.getLogger("darl_infer.serve")


@dataclass(eq=False)
class Job:
    request: Request
    future: asyncio.Future  # of the event loop that waits for it; set from the worker thread
    enqueued: float = field(default_factory=time.perf_counter)


class Scheduler:
    def __init__(self, scorer, max_batch_tokens: int, metrics: Metrics):
        self._scorer = scorer
        self._budget = max_batch_tokens
        self._metrics = metrics
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="darl-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Score what is still queued, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, request: Request) -> Job:
        job = Job(request, asyncio.get_running_loop().create_future())
        with self._cond:
            self._queue.append(job)
            self._metrics.queued.set(len(self._queue))
            self._cond.notify()
        return job

    def withdraw(self, job: Job) -> bool:
        """Drop a job that is still queued (its client went away); False once it is being scored."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            self._metrics.queued.set(len(self._queue))
            return True

    def _next_step(self) -> tuple[BatchPlan, list[Job]] | None:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            plan, taken, rest, full = BatchPlan(), [], deque(), False
            for job in self._queue:
                cost = plan.cost(job.request)
                fits = not taken or plan.tokens + cost <= self._budget
                if fits and (not full or plan.has_query(job.request.query)):
                    plan.add(job.request)
                    taken.append(job)
                else:
                    full = True
                    rest.append(job)
            self._queue = rest
            self._metrics.queued.set(len(rest))
            return plan, taken

    def _run(self) -> None:
        while (step := self._next_step()) is not None:
            self._score(*step)

    def _score(self, plan: BatchPlan, jobs: list[Job]) -> None:
        m, start = self._metrics, time.perf_counter()
        for job in jobs:
            m.queue_duration.observe(start - job.enqueued)
        m.batch_items.observe(plan.items)
        m.batch_tokens.observe(plan.tokens)
        m.batch_requests.observe(len(jobs))
        m.prefix_hits.labels(kind="in_flight").inc(plan.shared)
        lru_hits = self._scorer.prefix_cache_stats()["hits"]
        try:
            results = plan.split(self._scorer.score_many(plan.batch()))
        except Exception as exc:  # any failure of the forward pass fails this step only
            log.exception("scoring step of %d requests failed", len(jobs))
            for job in jobs:
                _settle(job.future, None, exc)
        else:
            for job, result in zip(jobs, results):
                _settle(job.future, result, None)
        finally:
            m.inference_duration.observe(time.perf_counter() - start)
            m.prefix_hits.labels(kind="lru").inc(self._scorer.prefix_cache_stats()["hits"] - lru_hits)


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
