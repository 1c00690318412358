"""Errors as text-embeddings-inference returns them: a status code and `{error, error_type}`.

Every error the service answers goes through `ServeError`, so clients of TEI (and the Cohere
client, which raises on any 4xx/5xx) see one body shape whatever went wrong.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

RETRY_AFTER_S = 1  # what a 429 asks the client to wait: one scoring step is well under a second


class ServeError(Exception):
    def __init__(self, status: int, error_type: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.error_type, self.message, self.headers = status, error_type, message, headers


def empty(message: str) -> ServeError:
    return ServeError(400, "Empty", message)


def too_large(message: str) -> ServeError:
    return ServeError(413, "Validation", message)


def invalid(message: str) -> ServeError:
    return ServeError(422, "Validation", message)


def overloaded(limit: int) -> ServeError:
    return ServeError(
        429, "Overloaded", f"{limit} requests are in flight (--max-concurrent-requests); retry later",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def backend(exc: BaseException) -> ServeError:
    return ServeError(500, "Backend", f"scoring failed: {type(exc).__name__}: {exc}")


def unavailable(message: str) -> ServeError:
    return ServeError(503, "Unhealthy", message)


def error_response(status: int, error_type: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


async def on_serve_error(request: Request, exc: ServeError) -> JSONResponse:
    return error_response(exc.status, exc.error_type, exc.message, exc.headers)


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed JSON and wrong types: 422, with each field's problem in one line."""
    problems = []
    for e in exc.errors():
        if e["type"] == "json_invalid":
            problems.append(f"malformed JSON body: {e.get('ctx', {}).get('error', e['msg'])}")
            continue
        where = ".".join(str(part) for part in e.get("loc", ())[1:])  # drop the leading "body"
        problems.append(f"{where}: {e['msg']}" if where else e["msg"])
    return error_response(422, "Validation", "; ".join(problems) or "invalid request")


async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown path, wrong method: the same body shape as every other error."""
    return error_response(exc.status_code, "Validation", str(exc.detail), getattr(exc, "headers", None))


HANDLERS = {ServeError: on_serve_error, RequestValidationError: on_validation_error, HTTPException: on_http_error}
