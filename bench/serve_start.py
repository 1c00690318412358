"""How long `darl-infer serve` takes to become healthy, and how long its first requests then take.

    python bench/serve_start.py --cold-cache -- --compile

Starts the server (the flags after `--`; default model unless --checkpoint is among them) on a free
127.0.0.1 port, polls /health, then sends --requests identical TEI /rerank requests of --items
Home-Depot-like titles one after another and stops the server. `--cold-cache`: an empty inductor
cache directory, as on a fresh machine (with --compile, the server's warm-up compiles from scratch).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from load import cpu_model, server

TITLES = ["DEWALT 20V MAX Cordless Drill", "Interior paint, 1 gal.", "drill bit set 21 pieces", "garden hose 50 ft"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--cold-cache", action="store_true", help="an empty TORCHINDUCTOR_CACHE_DIR for the server")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for health and for each request")
    ap.add_argument("serve_flags", nargs="*", help="flags for darl-infer serve (after --)")
    args = ap.parse_args()

    if args.cold_cache:  # the server inherits this process's environment
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="darl_inductor_cold_")
    log = Path(tempfile.mkdtemp(prefix="darl_serve_start_")) / "server.log"
    body = {"query": "cordless drill", "texts": [TITLES[i % len(TITLES)] for i in range(args.items)]}
    start = time.perf_counter()
    with server([sys.executable, "-m", "darl_infer.serve", *args.serve_flags], log, args.timeout) as (url, _):
        healthy = time.perf_counter() - start
        seconds = []
        for _ in range(args.requests):
            sent = time.perf_counter()
            httpx.post(f"{url}/rerank", json=body, timeout=args.timeout).raise_for_status()
            seconds.append(time.perf_counter() - sent)
    print(f"{cpu_model()}, {os.cpu_count()} cores; serve {' '.join(args.serve_flags)}"
          f"{' (empty inductor cache)' if args.cold_cache else ''}: healthy after {healthy:.1f} s; requests of "
          f"{args.items} items: {', '.join(f'{s:.2f}' for s in seconds)} s; the first answered "
          f"{healthy + seconds[0]:.1f} s after start; server log {log}")


if __name__ == "__main__":
    main()
