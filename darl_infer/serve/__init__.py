"""`darl-infer serve`: the ranking-stage service (TEI- and Cohere-compatible rerank endpoints).

One process, one model worker: the FastAPI app (`app.create_app`) validates and tokenizes each
request, the scheduler (`scheduler.Scheduler`) batches what is queued under a token budget into
one `Scorer.score_many` call. FastAPI, uvicorn and prometheus-client come with the `serve` extra;
this package imports them only where it needs them, so `darl-infer serve` can say which extra is
missing.
"""
