"""darl-infer serve: each endpoint's schema, scores equal to the Scorer's, every bad request,
batching (concurrent == sequential, one prefix run per query), overload, a failing step, a client
that leaves, and a real uvicorn server (the official Cohere client, SIGTERM)."""

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import cohere
import httpx
import numpy as np
import pytest
import torch

from conftest import ragged_items
from darl_infer import Scorer
from darl_infer.serve.app import create_app
from darl_infer.serve.batching import BatchPlan, Request
from darl_infer.serve.limits import GPU_MAX_BATCH_TOKENS, Limits
from darl_infer.serve.scheduler import Job, Piece, by_response_ratio, split_request
from tiny_models import random_text


@pytest.fixture(scope="module")
def scorer(tiny_checkpoints):
    return Scorer.from_pretrained(tiny_checkpoints["llama"], backend="torch", token_budget=64)


ONE_WORKER = Limits(concurrent_steps=1)  # the tests of the queue: a gated step holds the only worker


class Gated:
    """The Scorer's public API with a hand on the model workers: each score_many call is recorded,
    waits until `open` is set (only the first `held` calls, when given), and fails when its number
    (1-based) is in `fail`."""

    def __init__(self, scorer, held: int | None = None):
        self.spec, self.encoder, self._scorer, self.held = scorer.spec, scorer.encoder, scorer, held
        self.prefix_cache_stats = scorer.prefix_cache_stats
        self.open, self.calls, self.fail = threading.Event(), [], set()

    def score_many(self, batch):
        self.calls.append(batch)
        if self.held is None or len(self.calls) <= self.held:
            assert self.open.wait(30), "test gate never opened"
        if len(self.calls) in self.fail:
            raise RuntimeError("injected failure")
        return self._scorer.score_many(batch)


@asynccontextmanager
async def serving(app):
    """The app with its lifespan (the model worker) running, and an HTTP client in-process."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client


def call(app, *requests):
    """POST each (path, json) in turn and return the responses."""

    async def go():
        async with serving(app) as client:
            return [await client.post(path, json=body) for path, body in requests]

    return asyncio.run(go())


async def until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def metric(app, name, **labels):
    return app.state.metrics.registry.get_sample_value(name, labels) or 0.0


# --- schemas and exactness ----------------------------------------------------------------------


def test_tei_rerank_equals_scorer_rank(scorer, rng):
    items = ragged_items(rng, 9) + ["w1 w2 w3"]
    app = create_app(scorer)
    plain, raw, full = call(
        app,
        ("/rerank", {"query": "w1 w2", "texts": items}),
        ("/rerank", {"query": "w1 w2", "texts": items, "raw_scores": True}),
        ("/rerank", {"query": "w1 w2", "texts": items, "return_text": True, "return_grades": True, "truncate": True}),
    )
    ranked, probs = scorer.rank("w1 w2", items), scorer.score("w1 w2", items).probs
    for response in (plain, raw, full):
        assert response.status_code == 200
        assert [r["index"] for r in response.json()] == [r["corpus_id"] for r in ranked]
    assert set(plain.json()[0]) == {"index", "score"}
    np.testing.assert_allclose([r["score"] for r in raw.json()], [r["score"] for r in ranked], atol=1e-5)
    np.testing.assert_allclose([r["score"] for r in plain.json()], [r["score"] / 2 for r in ranked], atol=1e-5)
    for row in full.json():
        i = row["index"]
        assert row["text"] == items[i] and row["grade"] == scorer.labels[int(probs[i].argmax())]
        assert list(row["probabilities"]) == scorer.labels
        np.testing.assert_allclose(list(row["probabilities"].values()), probs[i], atol=1e-5)


@pytest.mark.parametrize("path", ["/v2/rerank", "/v1/rerank"])
def test_cohere_rerank_schema_and_scores(scorer, rng, path):
    items = ragged_items(rng, 8) + [random_text(rng, 100)]  # over max_item_tokens: Cohere cuts, no 413
    documents = items[:4] + [{"text": t} for t in items[4:]]  # strings (Cohere) and objects (Jina)
    app = create_app(scorer, model_id="tiny")
    top, full = call(
        app,
        (path, {"model": "anything", "query": "w5 w6", "documents": documents, "top_n": 3}),
        (path, {"query": "w5 w6", "documents": documents, "return_documents": True, "return_grades": True}),
    )
    ranked, enc = scorer.rank("w5 w6", items), scorer.encoder.encode("w5 w6", items)
    assert top.status_code == full.status_code == 200
    body = top.json()
    assert set(body) == {"id", "model", "results", "usage"} and body["model"] == "tiny" and uuid.UUID(body["id"])
    assert body["usage"] == {"total_tokens": len(enc.prefix) + sum(map(len, enc.suffixes))}
    assert [r["index"] for r in body["results"]] == [r["corpus_id"] for r in ranked[:3]]
    assert set(body["results"][0]) == {"index", "relevance_score"}
    results = full.json()["results"]
    np.testing.assert_allclose([r["relevance_score"] for r in results], [r["score"] / 2 for r in ranked], atol=1e-5)
    assert all(0 <= r["relevance_score"] <= 1 for r in results)
    assert all(r["document"] == {"text": items[r["index"]]} and r["grade"] in scorer.labels for r in results)


def test_health_info_metrics(scorer):
    app = create_app(scorer, Limits(max_batch_tokens=999), model_id="tiny", info={"backend": "torch"})

    async def go():
        async with serving(app) as client:
            await client.post("/rerank", json={"query": "w1", "texts": ["w2", "w3"]})
            return [await client.get(p) for p in ("/health", "/info", "/metrics")]

    health, info, metrics = asyncio.run(go())
    assert health.json() == {"status": "ok"}
    info = info.json()
    assert info["model_id"] == "tiny" and info["backend"] == "torch" and info["labels"] == scorer.labels
    assert info["template"] == {"max_query_tokens": 64, "max_item_tokens": 64} and info["limits"]["max_batch_tokens"] == 999
    text = metrics.text
    assert 'darl_requests_total{endpoint="/rerank",outcome="200"} 1.0' in text
    for name in ("darl_request_duration_seconds_bucket", "darl_queue_duration_seconds_bucket", "darl_inference_duration_seconds_bucket",
                 "darl_batch_items_bucket", "darl_batch_tokens_bucket", "darl_prefix_cache_hits_total", "darl_requests_in_flight"):
        assert name in text
    assert metric(app, "darl_batch_items_sum") == 2
    assert 0 < metric(app, "darl_model_busy_seconds_total") <= metric(app, "darl_inference_duration_seconds_sum")


# --- bad requests --------------------------------------------------------------------------------


LONG = " ".join(["w9"] * 70)  # 70 tokens: over the tiny checkpoint's 64-token query and item limits


@pytest.mark.parametrize(
    "path, body, status, error_type, message",
    [
        ("/rerank", {"query": "w1", "texts": []}, 400, "Empty", "empty"),
        ("/v2/rerank", {"model": "m", "query": "w1", "documents": []}, 400, "Empty", "empty"),
        ("/rerank", {"query": "   ", "texts": ["w1"]}, 400, "Empty", "query is empty"),
        ("/rerank", b'{"query": "w1", "texts": ["w2"', 422, "Validation", "malformed JSON"),
        ("/rerank", {"texts": ["w2"]}, 422, "Validation", "query: Field required"),
        ("/rerank", {"query": "w1", "texts": "w2"}, 422, "Validation", "texts"),
        ("/rerank", {"query": "w1", "texts": ["w2", 3]}, 422, "Validation", "texts.1"),
        ("/rerank", {"query": "w1", "texts": ["w2"], "raw_scores": "true"}, 422, "Validation", "raw_scores"),
        ("/rerank", {"query": "w1", "texts": ["w2"], "truncation_direction": "Left"}, 422, "Validation", "Left"),
        ("/v2/rerank", {"query": "w1", "documents": ["w2"], "top_n": 0}, 422, "Validation", "top_n"),
        ("/v2/rerank", {"query": "w1", "documents": [{"title": "w2"}]}, 422, "Validation", "documents.0"),
        ("/rerank", {"query": "w1", "texts": ["w2"] * 5}, 413, "Validation", "at most 4"),
        ("/v2/rerank", {"query": "w1", "documents": ["w2"] * 5}, 413, "Validation", "at most 4"),
        ("/rerank", {"query": "w1", "texts": ["w2 " * 700]}, 413, "Validation", "payload-limit"),
        ("/rerank", {"query": "w1", "texts": ["w2", LONG]}, 413, "Validation", "texts [1]"),
        ("/rerank", {"query": "w1", "texts": ["w2", LONG], "truncate": False}, 413, "Validation", "texts [1]"),
        ("/rerank", {"query": LONG, "texts": ["w2"]}, 413, "Validation", "the query is over"),
    ],
)
def test_bad_request(scorer, path, body, status, error_type, message):
    app = create_app(scorer, Limits(max_client_batch_size=4, payload_limit=2000))

    async def go():
        async with serving(app) as client:
            if isinstance(body, bytes):
                return await client.post(path, content=body, headers={"content-type": "application/json"})
            return await client.post(path, json=body)

    response = asyncio.run(go())
    assert response.status_code == status
    assert response.json()["error_type"] == error_type and message in response.json()["error"]
    assert metric(app, "darl_requests_total", endpoint=path, outcome=str(status)) == 1


def test_chunked_body_over_payload_limit_is_413(scorer):
    app = create_app(scorer, Limits(payload_limit=100))

    async def chunks():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(10):
            yield b'{"query": "w1", "texts": ["w2 w3 w4 w5 w6"]}'

    async def go():
        async with serving(app) as client:
            return await client.post("/rerank", content=chunks(), headers={"content-type": "application/json"})

    assert asyncio.run(go()).status_code == 413


def test_truncate_true_scores_the_cut_text(scorer):
    items = ["w2", LONG]
    (response,) = call(create_app(scorer), ("/rerank", {"query": "w1", "texts": items, "truncate": True, "raw_scores": True}))
    got = {r["index"]: r["score"] for r in response.json()}
    np.testing.assert_allclose([got[0], got[1]], scorer.score("w1", items).scores, atol=1e-5)


# --- batching across requests --------------------------------------------------------------------


def test_concurrent_requests_equal_sequential_and_share_one_prefix_run(scorer, rng):
    gate = Gated(scorer)
    app = create_app(gate, ONE_WORKER)
    queries = ["w1 w2", "w3", "w4 w5 w6"]
    pool = ragged_items(rng, 12, max_tokens=20)
    bodies = [{"query": queries[n % 3], "texts": rng.sample(pool, 5), "raw_scores": True} for n in range(9)]

    async def go():
        async with serving(app) as client:
            blocker = asyncio.ensure_future(client.post("/rerank", json={"query": "w7", "texts": ["w8"]}))
            await until(lambda: len(gate.calls) == 1)  # the worker is busy: the next 9 queue up
            pending = [asyncio.ensure_future(client.post("/rerank", json=b)) for b in bodies]
            await until(lambda: metric(app, "darl_queue_requests") == 9)
            gate.open.set()
            concurrent = await asyncio.gather(*pending)
            await blocker
            sequential = [await client.post("/rerank", json=b) for b in bodies]
            return concurrent, sequential

    concurrent, sequential = asyncio.run(go())
    for body, c, s in zip(bodies, concurrent, sequential):
        assert c.status_code == s.status_code == 200
        assert [r["index"] for r in c.json()] == [r["index"] for r in s.json()]
        np.testing.assert_allclose([r["score"] for r in c.json()], [r["score"] for r in s.json()], atol=1e-5)
        ranked = scorer.rank(body["query"], body["texts"])
        assert [r["index"] for r in c.json()] == [r["corpus_id"] for r in ranked]
    step = gate.calls[1]  # all nine in one score_many call: one entry per query, items deduplicated
    assert sorted(q for q, _ in step) == sorted(queries)
    for query, items in step:
        assert len(items) == len(set(items)) == len({t for b in bodies if b["query"] == query for t in b["texts"]})
    assert metric(app, "darl_prefix_cache_hits_total", kind="in_flight") == 6  # 9 requests, 3 prefix runs
    assert metric(app, "darl_prefix_cache_hits_total", kind="lru") == 0  # this scorer keeps no prefix


def test_repeated_query_hits_the_prefix_lru(tiny_checkpoints, scorer, rng):
    """The next page of a query, in a later step, takes its prefix from the Scorer's LRU; the
    scores are those of a Scorer without one."""
    cached = Scorer.from_pretrained(tiny_checkpoints["llama"], backend="torch", token_budget=64, prefix_cache_mb=1)
    app = create_app(cached, Limits(prefix_cache_mb=1))
    items = ragged_items(rng, 8)
    pages = [{"query": "w1 w2", "texts": items[:4], "raw_scores": True}, {"query": "w1 w2", "texts": items[4:], "raw_scores": True}]
    responses = call(app, *(("/rerank", page) for page in pages), ("/rerank", {"query": "w3", "texts": items}))
    assert all(r.status_code == 200 for r in responses)
    assert metric(app, "darl_prefix_cache_hits_total", kind="lru") == 1  # the second page
    assert metric(app, "darl_prefix_cache_hits_total", kind="in_flight") == 0
    for page, response in zip(pages, responses):
        ranked = scorer.rank(page["query"], page["texts"])
        assert [r["index"] for r in response.json()] == [r["corpus_id"] for r in ranked]
        np.testing.assert_allclose([r["score"] for r in response.json()], [r["score"] for r in ranked], atol=1e-5)


def test_token_budget_cuts_steps_and_same_query_joins(scorer):
    enc = scorer.encoder.encode("w1", ["w2"])
    prefix, item = len(enc.prefix), len(enc.suffixes[0])  # a one-word query's prefix; a one-word item + cue
    gate = Gated(scorer)
    app = create_app(gate, Limits(max_batch_tokens=2 * (prefix + 2 * item) + item, concurrent_steps=1))  # the first, second and fourth
    bodies = [
        {"query": "w1", "texts": ["w2", "w3"]},
        {"query": "w4", "texts": ["w5", "w6"]},
        {"query": "w7", "texts": [" ".join(["w8"] * 30)]},  # does not fit after the first two: the next step
        {"query": "w1", "texts": ["w3", "w9"]},  # last, but the first one's query: joins the first step
    ]

    async def go():
        async with serving(app) as client:
            blocker = asyncio.ensure_future(client.post("/rerank", json={"query": "w10", "texts": ["w11"]}))
            await until(lambda: len(gate.calls) == 1)
            pending = [asyncio.ensure_future(client.post("/rerank", json=b)) for b in bodies]
            await until(lambda: metric(app, "darl_queue_requests") == 4)
            gate.open.set()
            return await asyncio.gather(blocker, *pending)

    assert all(r.status_code == 200 for r in asyncio.run(go()))
    assert gate.calls[1:] == [
        [("w1", ["w2", "w3", "w9"]), ("w4", ["w5", "w6"])],
        [("w7", [" ".join(["w8"] * 30)])],
    ]


def test_large_request_is_scored_in_pieces_and_a_small_one_goes_between(scorer, rng):
    """A request over half the step budget queues in pieces; a small request that arrives after it
    is scored before its later pieces; both answers equal the Scorer's."""
    items = ragged_items(rng, 12, max_tokens=20)
    enc = scorer.encoder.encode("w1 w2", items)
    budget = len(enc.prefix) + sum(map(len, enc.suffixes)) // 2  # the large request takes 3+ pieces
    gate = Gated(scorer)
    app = create_app(gate, Limits(max_batch_tokens=budget, concurrent_steps=1))
    large = {"query": "w1 w2", "texts": items, "raw_scores": True}
    small = {"query": "w3", "texts": items[:1], "raw_scores": True}

    async def go():
        async with serving(app) as client:
            blocker = asyncio.ensure_future(client.post("/rerank", json={"query": "w7", "texts": ["w8"]}))
            await until(lambda: len(gate.calls) == 1)
            first = asyncio.ensure_future(client.post("/rerank", json=large))
            await until(lambda: metric(app, "darl_queue_requests") == 1)
            second = asyncio.ensure_future(client.post("/rerank", json=small))
            await until(lambda: metric(app, "darl_queue_requests") == 2)
            await asyncio.sleep(0.5)  # both wait about as long; the small one has far fewer tokens
            gate.open.set()
            return await asyncio.gather(blocker, first, second)

    responses = asyncio.run(go())
    assert all(r.status_code == 200 for r in responses)
    steps = gate.calls[1:]
    assert len(steps) >= 3 and [q for step in steps for q, _ in step].count("w1 w2") >= 3
    # each of the large request's items scored once (its pieces go by response ratio: the shorter first)
    assert sorted(t for step in steps for q, texts in step if q == "w1 w2" for t in texts) == sorted(items)
    small_step = next(n for n, step in enumerate(steps) if any(q == "w3" for q, _ in step))
    last_large = max(n for n, step in enumerate(steps) if any(q == "w1 w2" for q, _ in step))
    assert small_step < last_large  # the small request did not wait for the whole large one
    assert metric(app, "darl_queue_duration_seconds_count") == 3  # one wait per request, not per piece
    for body, response in zip((large, small), responses[1:]):
        ranked = scorer.rank(body["query"], body["texts"])
        assert [r["index"] for r in response.json()] == [r["corpus_id"] for r in ranked]
        np.testing.assert_allclose([r["score"] for r in response.json()], [r["score"] for r in ranked], atol=1e-5)


def test_a_request_is_scored_while_another_step_is_in_flight(scorer, rng):
    """With the default workers (3), a request that arrives while a step runs does not wait for it."""
    gate = Gated(scorer, held=1)
    app = create_app(gate)
    body = {"query": "w3", "texts": ragged_items(rng, 4, max_tokens=12), "raw_scores": True}

    async def go():
        async with serving(app) as client:
            blocker = asyncio.ensure_future(client.post("/rerank", json={"query": "w1", "texts": ["w2"]}))
            await until(lambda: len(gate.calls) == 1)
            answered = await client.post("/rerank", json=body)
            assert not blocker.done()
            gate.open.set()
            return answered, await blocker

    answered, blocker = asyncio.run(go())
    assert answered.status_code == blocker.status_code == 200
    ranked = scorer.rank(body["query"], body["texts"])
    assert [r["index"] for r in answered.json()] == [r["corpus_id"] for r in ranked]
    np.testing.assert_allclose([r["score"] for r in answered.json()], [r["score"] for r in ranked], atol=1e-5)


def test_a_failing_piece_fails_its_request_once_and_drops_its_other_pieces(scorer, rng):
    items = ragged_items(rng, 12, max_tokens=20)
    enc = scorer.encoder.encode("w1 w2", items)
    gate = Gated(scorer)
    gate.fail = {2}  # the first step with the large request's pieces (it has 3 or more)
    app = create_app(gate, Limits(max_batch_tokens=len(enc.prefix) + sum(map(len, enc.suffixes)) // 2, concurrent_steps=1))

    async def go():
        async with serving(app) as client:
            blocker = asyncio.ensure_future(client.post("/rerank", json={"query": "w7", "texts": ["w8"]}))
            await until(lambda: len(gate.calls) == 1)
            doomed = asyncio.ensure_future(client.post("/rerank", json={"query": "w1 w2", "texts": items}))
            await until(lambda: metric(app, "darl_queue_requests") == 1)
            gate.open.set()
            return await blocker, await doomed, await client.get("/health")

    blocker, doomed, health = asyncio.run(go())
    assert blocker.status_code == health.status_code == 200
    assert doomed.status_code == 500 and doomed.json()["error_type"] == "Backend"
    assert len(gate.calls) == 2  # its later pieces were dropped, not scored
    assert metric(app, "darl_queue_requests") == 0


def test_batch_plan_counts_each_prefix_and_item_once():
    plan = BatchPlan()
    a = Request("q", ["x", "y", "x"], prefix_tokens=10, item_tokens=[3, 4, 3])
    b = Request("q", ["y", "z"], prefix_tokens=10, item_tokens=[4, 5])
    assert plan.cost(a) == 17
    plan.add(a)
    assert plan.cost(b) == 5
    plan.add(b)
    assert (plan.tokens, plan.items, plan.shared, plan.batch()) == (22, 3, 1, [("q", ["x", "y", "z"])])


def test_split_request_bounds_each_piece_and_keeps_item_order():
    request = Request("q", [f"i{n}" for n in range(7)], prefix_tokens=10, item_tokens=[5, 30, 3, 3, 8, 2, 40])
    pieces = split_request(request, max_tokens=25)
    assert [p.items for p in pieces] == [["i0"], ["i1"], ["i2", "i3", "i4"], ["i5"], ["i6"]]
    assert all(p.query == "q" and p.prefix_tokens == 10 for p in pieces)
    assert [n for p in pieces for n in p.item_tokens] == request.item_tokens
    assert all(p.tokens <= 25 for p in pieces if len(p.items) > 1)  # one item over the bound is a piece alone
    assert split_request(request, max_tokens=10_000)[0].items == request.items


def test_response_ratio_puts_a_small_request_first_and_never_starves_a_large_one():
    def piece(tokens: int, enqueued: float) -> Piece:
        request = Request("q", ["x"], prefix_tokens=0, item_tokens=[tokens])
        return Piece(Job(request, future=None, enqueued=enqueued), 0, request)

    large, small = piece(2000, enqueued=0.0), piece(100, enqueued=0.5)
    assert by_response_ratio([large, small], now=1.0) == [small, large]  # 5 ms per token waited vs 0.5
    fresh = piece(100, enqueued=9.99)
    assert by_response_ratio([fresh, large], now=10.0) == [large, fresh]  # the large one has waited 5 ms per token
    twin = piece(2000, enqueued=0.0)
    assert by_response_ratio([twin, large], now=1.0)[0] is twin  # equal ratio and arrival: the order they came in


# --- overload, failures, disconnects -------------------------------------------------------------


def test_queue_full_is_429_with_retry_after(scorer):
    gate = Gated(scorer)
    app = create_app(gate, Limits(max_concurrent_requests=1))
    body = {"query": "w1", "texts": ["w2"]}

    async def go():
        async with serving(app) as client:
            first = asyncio.ensure_future(client.post("/rerank", json=body))
            await until(lambda: len(gate.calls) == 1)
            refused = await client.post("/rerank", json=body)
            gate.open.set()
            return refused, await first, await client.post("/rerank", json=body)

    refused, first, after = asyncio.run(go())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error_type"] == "Overloaded"
    assert first.status_code == after.status_code == 200


def test_failing_step_is_500_for_its_requests_only(scorer):
    gate = Gated(scorer)
    gate.fail = {1}
    app = create_app(gate, ONE_WORKER)
    body = {"query": "w1", "texts": ["w2", "w3"], "raw_scores": True}

    async def go():
        async with serving(app) as client:
            doomed = asyncio.ensure_future(client.post("/rerank", json=body))
            await until(lambda: len(gate.calls) == 1)
            queued = asyncio.ensure_future(client.post("/rerank", json={**body, "query": "w4"}))
            await until(lambda: metric(app, "darl_queue_requests") == 1)
            gate.open.set()
            return await doomed, await queued, await client.post("/rerank", json=body), await client.get("/health")

    doomed, queued, again, health = asyncio.run(go())
    assert doomed.status_code == 500 and doomed.json() == {"error": "scoring failed: RuntimeError: injected failure", "error_type": "Backend"}
    assert queued.status_code == again.status_code == health.status_code == 200
    np.testing.assert_allclose(sorted(r["score"] for r in again.json()), sorted(scorer.score("w1", ["w2", "w3"]).scores), atol=1e-5)


def asgi_post(app, path: str, body: dict, gone: asyncio.Event):
    """A raw ASGI request whose client disconnects when `gone` is set; returns what the app sent."""
    payload = json.dumps(body).encode()
    inbox = [{"type": "http.request", "body": payload, "more_body": False}]
    sent = []

    async def receive():
        if inbox:
            return inbox.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        "client": ("127.0.0.1", 1), "server": ("test", 80),
    }
    return app(scope, receive, send), sent


def test_disconnected_client_is_dropped_before_scoring(scorer):
    gate = Gated(scorer)
    app = create_app(gate, ONE_WORKER)

    async def go():
        async with serving(app) as client:
            first = asyncio.ensure_future(client.post("/rerank", json={"query": "w1", "texts": ["w2"]}))
            await until(lambda: len(gate.calls) == 1)
            gone = asyncio.Event()
            handle, _ = asgi_post(app, "/rerank", {"query": "w3", "texts": ["w4", "w5"]}, gone)
            leaver = asyncio.ensure_future(handle)
            await until(lambda: metric(app, "darl_queue_requests") == 1)
            gone.set()
            await leaver
            assert metric(app, "darl_queue_requests") == 0
            gate.open.set()
            return await first

    assert asyncio.run(go()).status_code == 200
    assert gate.calls == [[("w1", ["w2"])]]  # the leaver's query never reached the model
    assert metric(app, "darl_requests_total", endpoint="/rerank", outcome="499") == 1


# --- command line and a real server --------------------------------------------------------------


def test_serve_names_the_missing_extra(monkeypatch):
    from darl_infer.serve.cli import serve_main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # an import of it now raises ImportError
    with pytest.raises(SystemExit, match=r"pip install 'darl-infer\[serve\]'"):
        serve_main(["--port", "1"])


def test_darl_infer_has_a_serve_subcommand():
    from darl_infer.cli import build_parser
    from darl_infer.serve.cli import run

    args = build_parser().parse_args(["serve", "--port", "9000", "--max-concurrent-requests", "8"])
    assert args.func is run and args.port == 9000 and args.max_concurrent_requests == 8 and args.host == "127.0.0.1"


def test_warm_up_compiles_so_that_no_request_does(tiny_checkpoints, rng):
    """`serve` scores one pair with each model before its port opens: with --compile, the decoder
    layers compile there, and requests of every size after it compile nothing more; their scores
    are the scorer's own, and the warm-up is not counted as a prefix-cache hit."""
    from torch._dynamo.utils import counters

    from darl_infer.serve.cli import warm_up

    torch._dynamo.reset()  # graphs compiled by earlier tests would be reused and not counted
    counters.clear()
    compiled = Scorer.from_pretrained(tiny_checkpoints["gemma3"], backend="torch", dtype="fp32", compile=True, prefix_cache_mb=1)
    assert warm_up(compiled, None) > 0
    compiled_by_warm_up = counters["stats"]["unique_graphs"]
    assert compiled_by_warm_up >= 1, dict(counters["stats"])
    app = create_app(compiled, Limits(prefix_cache_mb=1))
    small = {"query": "w1", "texts": ["w2"]}
    large = {"query": "w3 w4 w5", "texts": ragged_items(rng, 40)}
    responses = call(app, ("/rerank", small), ("/rerank", large), ("/rerank", large))
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert counters["stats"]["unique_graphs"] == compiled_by_warm_up, dict(counters["stats"])
    expected = compiled.score(large["query"], large["texts"]).scores / 2  # TEI's score: grade value over the top one
    np.testing.assert_allclose([r["score"] for r in sorted(responses[1].json(), key=lambda r: r["index"])], expected, atol=1e-5)
    assert metric(app, "darl_prefix_cache_hits_total", kind="lru") == 1  # the third request's, not the warm-up's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited during start-up"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become healthy")


def test_real_server_cohere_client_then_sigterm(tiny_checkpoints, scorer, rng, tmp_path):
    """One uvicorn process (its start-up is most of this test's time): the official Cohere client
    unchanged, twice (the second call's prefix from the LRU that --prefix-cache-mb turns on); then SIGTERM with a request in flight: that request is answered, new connections are
    refused meanwhile, and the process exits 0."""
    port, log = free_port(), open(tmp_path / "server.log", "w")
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "darl_infer.serve", "--checkpoint", str(tiny_checkpoints["llama"]), "--backend", "torch",
         "--port", str(port), "--graceful-timeout", "60", "--prefix-cache-mb", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        wait_until_healthy(url, proc)
        assert "warmed up in" in (tmp_path / "server.log").read_text()  # before the port opened
        items = ragged_items(rng, 10)
        client = cohere.ClientV2(base_url=url, api_key="x")
        ranked = scorer.rank("w1 w2", items, top_k=4)
        for _ in range(2):
            response = client.rerank(model="tiny", query="w1 w2", documents=items, top_n=4)
            assert [r.index for r in response.results] == [r["corpus_id"] for r in ranked]
            np.testing.assert_allclose([r.relevance_score for r in response.results], [r["score"] / 2 for r in ranked], atol=1e-5)
        assert 'darl_prefix_cache_hits_total{kind="lru"} 1.0' in httpx.get(f"{url}/metrics", timeout=5).text
        # no --max-batch-tokens: the CPU's step budget, TEI's larger one where the model is on CUDA
        step = httpx.get(f"{url}/info", timeout=5).json()["limits"]["max_batch_tokens"]
        assert step == (GPU_MAX_BATCH_TOKENS if torch.cuda.is_available() else Limits().max_batch_tokens)

        big = {"query": "w3", "texts": [random_text(rng, 64) for _ in range(1000)]}  # seconds of work here
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(httpx.post, f"{url}/rerank", json=big, timeout=120)
            while "darl_requests_in_flight 1.0" not in httpx.get(f"{url}/metrics", timeout=5).text:
                assert not in_flight.done(), "the big request finished before it could be caught in flight"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            refused = False
            while not in_flight.done() and not refused:
                try:
                    httpx.get(f"{url}/health", timeout=1)
                except httpx.ConnectError:
                    refused = True
                time.sleep(0.02)
            answer = in_flight.result()
        assert refused, "the server kept accepting connections after SIGTERM"
        assert answer.status_code == 200 and len(answer.json()) == 1000
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_cascade_requests_batched_together_equal_the_cascade_scorer(tiny_checkpoints, scorer, rng):
    """--cascade: same-query requests with different documents share the coarse worker's step, yet
    each keeps its own best items (the keep rule is per request) and equals Scorer.cascade's rank."""
    coarse = Gated(Scorer.from_pretrained(tiny_checkpoints["qwen2"], backend="torch"))
    app = create_app(scorer, ONE_WORKER, cascade=(coarse, 0.4))
    pool = ragged_items(rng, 12, max_tokens=20)
    bodies = [{"query": "w1 w2", "texts": rng.sample(pool, 5), "raw_scores": True, "return_grades": True} for _ in range(4)]

    async def go():
        async with serving(app) as client:
            pending = [asyncio.ensure_future(client.post("/rerank", json=b)) for b in bodies]
            await until(lambda: len(coarse.calls) == 1)
            coarse.open.set()
            return await asyncio.gather(*pending), await client.get("/info")

    responses, info = asyncio.run(go())
    assert info.json()["cascade"] == {"keep": 0.4}
    expected = Scorer.cascade(coarse._scorer, scorer, keep=0.4)
    assert len(coarse.calls) <= 2 and sum(len(items) for _, items in coarse.calls[-1]) < 4 * 5  # merged, deduplicated
    for body, response in zip(bodies, responses):
        ranked = expected.rank(body["query"], body["texts"])
        rows = response.json()
        assert [r["index"] for r in rows] == [r["corpus_id"] for r in ranked]
        np.testing.assert_allclose([r["score"] for r in rows], [r["score"] for r in ranked], atol=1e-5)
        assert [r["graded_by"] for r in rows] == [r["graded_by"] for r in ranked]
        assert sum(r["graded_by"] == "fine" for r in rows) == 2  # ceil(0.4 * 5)


def test_a_bi_encoder_checkpoint_serves_both_schemas_with_its_scores(tiny_checkpoints, rng, tmp_path):
    from tiny_models import make_bi_encoder_checkpoint

    bi = Scorer.from_pretrained(make_bi_encoder_checkpoint(tmp_path / "bi", tiny_checkpoints["llama"]), item_cache_mb=1)
    items = ragged_items(rng, 7)
    tei, cohere = call(create_app(bi, model_id="bi"), ("/rerank", {"query": "w1 w2", "texts": items, "raw_scores": True}),
                       ("/v2/rerank", {"query": "w1 w2", "documents": items, "model": "bi"}))
    ranked = bi.rank("w1 w2", items)
    assert [r["index"] for r in tei.json()] == [r["corpus_id"] for r in ranked]
    np.testing.assert_allclose([r["score"] for r in tei.json()], [r["score"] for r in ranked], atol=1e-5)
    np.testing.assert_allclose([r["relevance_score"] for r in cohere.json()["results"]], [r["score"] / 2 for r in ranked], atol=1e-5)


def test_serve_cache_flags_go_to_the_model_that_keeps_that_cache(tiny_checkpoints, tmp_path):
    from tiny_models import make_bi_encoder_checkpoint

    from darl_infer.bi_encoder import BiEncoderScorer
    from darl_infer.serve.cli import add_arguments, load_models, serve_main

    bi = make_bi_encoder_checkpoint(tmp_path / "bi", tiny_checkpoints["llama"])
    cross = str(tiny_checkpoints["qwen2"])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--checkpoint", cross, "--cascade", str(bi), "--item-cache-mb", "2", "--prefix-cache-mb", "3"])
    fine, coarse, bi_encoders = load_models(args, Limits(prefix_cache_mb=3))
    assert isinstance(coarse, BiEncoderScorer) and bi_encoders == 1
    assert coarse.prefix_cache_stats()["max_bytes"] == 2 * 2**20 and fine.prefix_cache_stats()["max_bytes"] == 3 * 2**20
    with pytest.raises(SystemExit, match="--item-cache-mb keeps a bi-encoder's item vectors; neither"):
        serve_main(["--checkpoint", cross, "--item-cache-mb", "8"])
    with pytest.raises(SystemExit, match="--prefix-cache-mb keeps prefixes' K/V, which a bi-encoder has none of"):
        serve_main(["--checkpoint", str(bi), "--prefix-cache-mb", "8"])


def test_the_gpu_step_budget_goes_to_models_on_cuda(scorer):
    from types import SimpleNamespace

    from darl_infer.serve.cli import runs_on_cuda

    assert not runs_on_cuda(scorer)  # the tiny model on the CPU
    assert runs_on_cuda(SimpleNamespace(backend=SimpleNamespace(device=torch.device("cuda", 0))))
    assert not runs_on_cuda(SimpleNamespace())  # a scorer without a backend device (a bi-encoder's): the CPU budget
