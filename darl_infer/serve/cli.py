"""`darl-infer serve` (and `python -m darl_infer.serve`): load a checkpoint, serve it with uvicorn.

SIGTERM: uvicorn stops accepting, answers what is in flight (up to --graceful-timeout), the app's
shutdown ends the model worker, and the process exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import signal
import time
from pathlib import Path

import torch

from darl_infer.cascade import keep_value

from .limits import GPU_MAX_BATCH_TOKENS, Limits

EXTRA_HINT = "darl-infer serve needs the 'serve' extra: pip install 'darl-infer[serve]' (fastapi, uvicorn, prometheus-client)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Limits()
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--backend", default="auto", help="reference, torch, triton, onnx or auto (the Scorer's choice)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"])
    p.add_argument("--compile", action="store_true",
                   help="a cross-encoder's decoder layers under torch.compile (torch backend; faster in bf16, the first request compiles)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model-id", default=None, help="the model name responses carry (default: the checkpoint's directory name)")
    p.add_argument("--max-client-batch-size", type=int, default=d.max_client_batch_size, help="documents per request; more is 413")
    p.add_argument("--payload-limit", type=int, default=d.payload_limit, help="request body bytes; more is 413")
    p.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests,
                   help="requests in flight; more is 429 with Retry-After")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help=f"tokens (each query's prefix once + items) a worker scores in one step (default: "
                        f"{d.max_batch_tokens}; {GPU_MAX_BATCH_TOKENS} where the model runs on CUDA)")
    p.add_argument("--concurrent-steps", type=int, default=d.concurrent_steps,
                   help="steps in flight at once; the torch backend hands the model between them by layers, least work left first")
    p.add_argument("--prefix-cache-mb", type=int, default=d.prefix_cache_mb,
                   help="MiB of recent prefixes' K/V kept for repeated queries (torch and triton backends; 0: none)")
    p.add_argument("--item-cache-mb", type=int, default=0,
                   help="MiB of item vectors a bi-encoder checkpoint keeps between requests (the catalogue's hot items; 0: none)")
    p.add_argument("--cascade", default=None, metavar="COARSE",
                   help="a fast checkpoint (e.g. default-student) that grades every document first, on a worker of its own")
    p.add_argument("--keep", type=keep_value, default=0.2,
                   help="with --cascade: each request's best documents the checkpoint re-grades, a fraction in (0, 1] or a count")
    p.add_argument("--graceful-timeout", type=int, default=30, help="seconds to finish in-flight requests after SIGTERM")


def load_models(args: argparse.Namespace, limits: Limits):
    """(the checkpoint's scorer, the --cascade coarse scorer or None, how many are bi-encoders).
    A bi-encoder keeps item vectors (--item-cache-mb), the others prefixes (--prefix-cache-mb); a
    cache flag that no loaded model would use is an error, not silently ignored."""
    from darl_infer import Scorer
    from darl_infer.bi_encoder import is_bi_encoder

    checkpoints = [args.checkpoint] + ([args.cascade] if args.cascade is not None else [])
    kinds = [is_bi_encoder(c) for c in checkpoints]
    if args.item_cache_mb and not any(kinds):
        raise ValueError("--item-cache-mb keeps a bi-encoder's item vectors; neither --checkpoint nor --cascade is one")
    if limits.prefix_cache_mb and all(kinds):
        raise ValueError("--prefix-cache-mb keeps prefixes' K/V, which a bi-encoder has none of (use --item-cache-mb)")
    if args.compile and all(kinds):
        raise ValueError("--compile compiles a cross-encoder's decoder layers; neither --checkpoint nor --cascade is one")
    scorers = [
        Scorer.from_pretrained(c, backend=args.backend, dtype=args.dtype,
                               **({"item_cache_mb": args.item_cache_mb} if bi else
                                  {"prefix_cache_mb": limits.prefix_cache_mb, **({"compile": True} if args.compile else {})}))
        for c, bi in zip(checkpoints, kinds)
    ]
    return scorers[0], (scorers[1] if args.cascade is not None else None), sum(kinds)


def warm_up(*scorers) -> float:
    """Score one pair with each loaded scorer (None: none) before the port opens, so that no
    client's request waits for what a first call does once: with --compile, compiling the decoder
    layers (seconds to minutes; no later request compiles again, tests/test_serve.py). Returns the
    seconds it took."""
    start = time.perf_counter()
    for scorer in scorers:
        if scorer is not None:
            scorer.score("warm-up", ["warm-up"])
    return time.perf_counter() - start


def runs_on_cuda(scorer) -> bool:
    """Whether the scorer's model runs on a CUDA device (its backend's `device`)."""
    device = getattr(getattr(scorer, "backend", None), "device", None)
    return isinstance(device, torch.device) and device.type == "cuda"


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError:
        raise SystemExit(EXTRA_HINT) from None
    from .app import create_app

    try:
        step_tokens = {} if args.max_batch_tokens is None else {"max_batch_tokens": args.max_batch_tokens}
        limits = Limits(
            max_client_batch_size=args.max_client_batch_size, payload_limit=args.payload_limit,
            max_concurrent_requests=args.max_concurrent_requests, concurrent_steps=args.concurrent_steps,
            prefix_cache_mb=args.prefix_cache_mb, **step_tokens,
        )
        scorer, coarse, bi_encoders = load_models(args, limits)
        if args.max_batch_tokens is None and runs_on_cuda(scorer):
            limits = dataclasses.replace(limits, max_batch_tokens=GPU_MAX_BATCH_TOKENS)
    # bad flag values (a prefix cache for a backend that keeps none), an unknown backend, a broken checkpoint
    except (ValueError, OSError) as e:
        raise SystemExit(f"darl-infer serve: {e}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("darl_infer.serve")
    log.info("warming up%s", " (compiling the decoder layers)" if args.compile else "")
    log.info("warmed up in %.1f s", warm_up(scorer, coarse))
    checkpoint = str(args.checkpoint or "default")
    info = {"checkpoint": checkpoint, "backend": args.backend, "dtype": scorer.dtype}  # what "auto" chose
    if bi_encoders:  # its LRU holds item vectors: the prefix-cache counters of /metrics count those hits
        info["item_cache_mb"] = args.item_cache_mb
    if coarse is not None:
        info["cascade_coarse_checkpoint"] = str(args.cascade)
    model_id = args.model_id or (Path(args.checkpoint).name if args.checkpoint else "darl-default")
    app = create_app(scorer, limits, model_id=model_id, info=info, cascade=None if coarse is None else (coarse, args.keep))
    # What is loaded by now (the models, tokenizers, libraries: ~400K objects) lives as long as the
    # process; frozen, it is out of the collector's walk: a full collection, which the garbage of
    # requests triggers every so often, took ~125 ms with it and ~0 ms after (2-core Xeon)
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.graceful_timeout)
    # uvicorn handles SIGTERM (graceful shutdown), then raises it again under the handler it found:
    # with this one that second delivery ends nothing and the process exits 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run()
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="darl-infer serve", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))

