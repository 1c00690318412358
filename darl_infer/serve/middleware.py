"""Plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which would hide a client's
disconnect from the endpoint): the payload limit, and per-request metrics."""

from __future__ import annotations

import json
import time

from .metrics import Metrics


class PayloadLimit:
    """413 for a body over `limit` bytes, by its Content-Length or, for a chunked body, as it
    arrives; otherwise the body is handed on unchanged, then the server's own messages."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._reject(send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, send):
        body = json.dumps({"error": f"request body over {self.limit} bytes (--payload-limit)", "error_type": "Validation"})
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body.encode()})


class RequestMetrics:
    """darl_requests_total{endpoint, outcome} and darl_request_duration_seconds{endpoint}; the
    endpoint is the path when the app serves it, else "other" (no unbounded label values)."""

    def __init__(self, app, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.paths else "other"
        status, start = "500", time.perf_counter()  # what an exception that escapes the app becomes

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, status).inc()
            self.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - start)
