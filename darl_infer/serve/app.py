"""The FastAPI app: TEI's `POST /rerank`, Cohere's `POST /v2/rerank` (and the Jina-style
`POST /v1/rerank`), `GET /health`, `GET /info`, `GET /metrics`.

`create_app` takes any object with the Scorer's public API (`spec`, `encoder`, `score_many`,
`prefix_cache_stats`), so
the service scores exactly what `Scorer.score` / `Scorer.rank` would: the same encoder, the same
backend, the same order (stable on ties).
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from darl_infer.cascade import check_keep

from . import errors
from .limits import Limits
from .metrics import Metrics
from .middleware import PayloadLimit, RequestMetrics
from .scheduler import Scheduler
from .schemas import (
    CohereRerankRequest,
    CohereRerankResponse,
    CohereResult,
    Document,
    ErrorBody,
    TeiRankItem,
    TeiRerankRequest,
    Usage,
)
from .service import ClientGone, Coarse, Ranked, RerankService

RERANK_PATHS = ("/rerank", "/v2/rerank", "/v1/rerank")
ERROR_RESPONSES = {code: {"model": ErrorBody} for code in (400, 413, 422, 429, 500, 503)}


def create_app(
    scorer, limits: Limits = Limits(), model_id: str = "darl", info: dict | None = None, cascade: tuple | None = None
) -> FastAPI:
    """`info`: what /info adds about how the scorer was loaded (checkpoint, backend, dtype).
    `cascade`: (coarse scorer, keep): `scorer` then re-grades the coarse model's `keep` best."""
    metrics = Metrics()
    scheduler = Scheduler(scorer, limits.max_batch_tokens, metrics, limits.concurrent_steps)
    coarse = None if cascade is None else Coarse(
        cascade[0], Scheduler(cascade[0], limits.max_batch_tokens, metrics, limits.concurrent_steps), check_keep(cascade[1])
    )
    service = RerankService(scorer, limits, scheduler, metrics, coarse)
    workers = [scheduler] if coarse is None else [coarse.scheduler, scheduler]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for worker in workers:
            worker.start()
        try:
            yield
        finally:  # uvicorn has answered what was in flight by now; the queues are empty or drain
            for worker in workers:
                await asyncio.to_thread(worker.stop)

    app = FastAPI(title="darl_infer", lifespan=lifespan, exception_handlers=errors.HANDLERS)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    def grades(ranked: Ranked, i: int) -> dict:
        """`return_grades=true`: the argmax grade's label, every grade's probability, and in a
        cascade which model graded the item."""
        labels = scorer.spec.labels
        by = ranked.result.graded_by
        return {
            "grade": labels[int(ranked.result.grades[i])],
            "probabilities": {label: float(p) for label, p in zip(labels, ranked.result.probs[i])},
            **({} if by is None else {"graded_by": str(by[i])}),
        }

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the metric does

    @app.post("/rerank", response_model=list[TeiRankItem], response_model_exclude_none=True, responses=ERROR_RESPONSES)
    async def tei_rerank(body: TeiRerankRequest, request: Request):
        """text-embeddings-inference's rerank. `score` is the relevance in [0, 1] (as for
        /v2/rerank), or with `raw_scores=true` the expected grade itself (sum_k p_k v_k)."""
        if body.truncation_direction == "Left":
            raise errors.invalid("truncation_direction 'Left' is not supported: the checkpoint's template cuts texts at the end")
        ranked = await service.rerank(request, body.query, body.texts, truncate=bool(body.truncate))
        scores = ranked.result.scores if body.raw_scores else ranked.relevance
        return [
            TeiRankItem(
                index=int(i), score=float(scores[i]), text=body.texts[i] if body.return_text else None,
                **(grades(ranked, i) if body.return_grades else {}),
            )
            for i in ranked.order
        ]

    async def cohere_rerank(body: CohereRerankRequest, request: Request) -> CohereRerankResponse:
        """Cohere's rerank (Jina's on /v1). Documents are cut to the checkpoint's token limits, as
        Cohere cuts to `max_tokens_per_doc`; `relevance_score` is the expected grade rescaled to
        [0, 1]: expected grade / highest grade value for grades 0..K-1."""
        texts = body.texts()
        ranked = await service.rerank(request, body.query, texts, truncate=True)
        return CohereRerankResponse(
            id=str(uuid.uuid4()),
            model=model_id,
            results=[
                CohereResult(
                    index=int(i), relevance_score=float(ranked.relevance[i]),
                    document=Document(text=texts[i]) if body.return_documents else None,
                    **(grades(ranked, i) if body.return_grades else {}),
                )
                for i in ranked.order[: body.top_n]
            ],
            usage=Usage(total_tokens=ranked.tokens),
        )

    for path in ("/v2/rerank", "/v1/rerank"):
        app.post(path, response_model=CohereRerankResponse, response_model_exclude_none=True, responses=ERROR_RESPONSES)(
            cohere_rerank
        )

    @app.get("/health")
    async def health():
        if not all(worker.healthy for worker in workers):
            raise errors.unavailable("the model worker is not running")
        return {"status": "ok"}

    @app.get("/info")
    async def get_info():
        t = scorer.spec.template
        return {
            "model_id": model_id,
            **(info or {}),
            "labels": scorer.spec.labels,
            "grade_values": scorer.spec.grade_values,
            "template": {"max_query_tokens": t.max_query_tokens, "max_item_tokens": t.max_item_tokens},
            "limits": limits.to_dict(),
            **({} if coarse is None else {"cascade": {"keep": coarse.keep}}),
        }

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    paths = {*RERANK_PATHS, "/health", "/info", "/metrics"}
    app.add_middleware(PayloadLimit, limit=limits.payload_limit)
    app.add_middleware(RequestMetrics, metrics=metrics, paths=paths)  # added last: outermost, sees every 413
    return app
