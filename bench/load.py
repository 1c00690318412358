"""Load test: `darl-infer serve` against the peer a team would write by hand, same checkpoint and
dtype, one run, loopback only, bounded in requests and time.

    python bench/load.py --out bench/LOAD.md                       # the embedded default model
    python bench/load.py --checkpoint /tmp/tiny --duration 2 --factors 0.5 1 --single 3   # a smoke run

Workload: real Home Depot queries (../shared/data/homedepot/dev.jsonl; without it the script says
so and exits), each request one query with 20-100 items drawn from the file's titles (seeded).

Servers, each a process of its own on a free 127.0.0.1 port, started and stopped here:
- darl: `python -m darl_infer.serve` (the backend darl_infer picks unless --backend);
- peer: bench/peer_server.py, one FastAPI endpoint calling sentence-transformers'
  `CrossEncoder.predict` per request. CrossEncoder cannot load a PEFT adapter, so the checkpoint is
  merged into a plain AutoModelForSequenceClassification folder with the project's own loader
  (the same weights), and CrossEncoder is fed darl_infer's template ids (the inputs the model was
  trained on): same checkpoint, same dtype, same inputs; the scores of one request are compared.

Method, for each server:
1. warm-up, then `--single` requests one at a time: each request's latency alone, fitted as
   a + b x items (least squares; the alone-latency of any request of this workload), and L1, their
   median;
2. capacity: `--burst` requests sent at once; the completed requests/s (and items/s) of that
   saturated server;
3. open loop: Poisson arrivals at factor / L1 requests/s for each of `--factors`, ascending; each
   step sends `--max-requests` requests or for `--duration` s, what ends first (the table's `sent`
   says which: a slow server's low rates send few), never holding a request back for one still
   outstanding (a closed loop would hide queueing), then waits at most `--timeout` s for the last
   answers. Three readings of the goal's "p95 <= 2 x the single-request latency", each giving a
   sustainable throughput (the completed requests/s of the last step within it, before the first
   step over it; the sweep stops when a step is over all three):
   - per request: the p95 over a step's requests of latency / that request's alone-latency (the
     fit); a request of 100 items is compared with what 100 items take alone;
   - same percentile: the step's p95 latency / the p95 of the `--single` alone latencies;
   - median: the step's p95 latency / L1. With requests of 20-100 items, a server's p95 with no
     queueing at all is already 1.7-2.0 x its median alone-latency, so this reading leaves almost
     no room for queueing;
4. darl only: overload at twice its capacity (step 2): every request must be answered 200 or 429
   (no 5xx, none lost; a timeout or a connection error is lost).
Reported: p50 / p95 / p99 latency of the 200s, completed requests/s and items/s, status counts,
each server's peak RSS (VmHWM of its process, read before it is stopped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "homedepot" / "dev.jsonl"


def workload(path: Path, n: int, seed: int) -> list[dict]:
    """`n` request bodies: a real query and 20-100 titles of the file each."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in path.open()]
    queries, titles = sorted({r["query"] for r in rows}), sorted({r["item"] for r in rows})
    return [{"query": rng.choice(queries), "texts": rng.sample(titles, rng.randint(20, 100)), "raw_scores": True} for _ in range(n)]


def token_bound(requests: list[dict], checkpoint: str | None) -> str:
    """Tokens per item that the peer (every pair whole) and darl (each request's prefix once) run.
    On a CPU, where batching requests adds no FLOPs, their ratio bounds darl's capacity over the
    peer's (attention aside)."""
    from transformers import AutoTokenizer

    from darl_infer.base_models import base_model_dir
    from darl_infer.checkpoint import CheckpointSpec, resolve_checkpoint

    directory = resolve_checkpoint(checkpoint)
    spec = CheckpointSpec.load(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory if spec.base_model is None else base_model_dir(spec.base_model)))
    encoded = [spec.template.encoder(tokenizer).encode(r["query"], r["texts"]) for r in requests]
    prefix = sum(len(e.prefix) for e in encoded) / len(encoded)
    items = sum(len(e.suffixes) for e in encoded) / len(encoded)
    suffix = sum(len(s) for e in encoded for s in e.suffixes) / (items * len(encoded))
    peer, darl = prefix + suffix, suffix + prefix / items
    return (f"{len(encoded)} requests, {items:.1f} items each; prefix {prefix:.1f} tokens, item suffix {suffix:.1f}: "
            f"the peer runs {peer:.1f} tokens per item, darl {darl:.1f}; bound {peer / darl:.2f}x")


def cpu_model() -> str:
    return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.machine())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


@contextmanager
def server(command: list[str], log_path: Path, start_timeout: float):
    """Start a server on a free loopback port; yield (url, process); SIGTERM it at the end."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"{command[:3]} exited during start-up; see {log_path}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"{command[:3]} not healthy after {start_timeout} s; see {log_path}")
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            yield url, proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def send(client: httpx.AsyncClient, url: str, body: bytes, timeout: float) -> tuple[float, str]:
    start = time.perf_counter()
    try:
        response = await client.post(url, content=body, headers={"content-type": "application/json"}, timeout=timeout)
        status = str(response.status_code)
    except httpx.TimeoutException:
        status = "timeout"
    except httpx.TransportError:
        status = "error"
    return time.perf_counter() - start, status


async def open_loop(url: str, bodies: list[bytes], items: list[int], rate: float, args, seed: int) -> dict:
    """Poisson arrivals at `rate` for at most args.duration s and args.max_requests requests."""
    rng, at, schedule = random.Random(seed), 0.0, []
    while len(schedule) < args.max_requests:
        at += rng.expovariate(rate)
        if at > args.duration:
            break
        schedule.append(at)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits) as client:
        loop = asyncio.get_running_loop()
        start, tasks = loop.time(), []
        for k, t in enumerate(schedule):
            await asyncio.sleep(max(0.0, start + t - loop.time()))
            tasks.append(asyncio.create_task(send(client, url, bodies[k % len(bodies)], args.timeout)))
        outcomes = await asyncio.gather(*tasks)
        wall = max(loop.time() - start, 1e-9)
    ok = [(lat, items[k % len(items)]) for k, (lat, status) in enumerate(outcomes) if status == "200"]
    latencies = np.array([lat for lat, _ in ok]) * 1000
    pct = {f"p{q}_ms": float(np.percentile(latencies, q)) if len(ok) else float("nan") for q in (50, 95, 99)}
    return {
        "offered_rps": rate, "sent": len(schedule), "wall_s": wall, "rps": len(ok) / wall,
        "items_per_s": sum(n for _, n in ok) / wall, **pct, "statuses": dict(Counter(s for _, s in outcomes)),
        "answered": [[lat, n] for lat, n in ok],
    }


async def burst(url: str, bodies: list[bytes], items: list[int], n: int, timeout: float) -> dict:
    """`n` requests at once: the completed requests/s and items/s of a saturated server."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()
        outcomes = await asyncio.gather(*(send(client, url, bodies[k % len(bodies)], timeout) for k in range(n)))
        wall = time.perf_counter() - start
    ok = [items[k % len(items)] for k, (_, status) in enumerate(outcomes) if status == "200"]
    return {"sent": n, "wall_s": wall, "rps": len(ok) / wall, "items_per_s": sum(ok) / wall,
            "statuses": dict(Counter(s for _, s in outcomes))}


def alone_latencies(url: str, bodies: list[bytes], items: list[int], n: int, timeout: float) -> list[tuple[int, float]]:
    """(items, seconds) of `n` requests sent one at a time (after two warm-up requests)."""
    with httpx.Client(timeout=timeout) as client:
        for body in bodies[:2]:
            client.post(url, content=body, headers={"content-type": "application/json"})
        out = []
        for body, n_items in zip(bodies[2 : 2 + n], items[2 : 2 + n]):
            start = time.perf_counter()
            client.post(url, content=body, headers={"content-type": "application/json"}).raise_for_status()
            out.append((n_items, time.perf_counter() - start))
    return out


def model_totals(url: str) -> tuple[float, float] | None:
    """darl's /metrics: (seconds with a scoring step running, items it scored) so far; None for a
    server without them (the peer)."""
    text = httpx.get(f"{url}/metrics").text  # the peer answers 404
    found = dict(re.findall(r"^(darl_model_busy_seconds_total|darl_batch_items_sum) ([0-9.e+-]+)$", text, re.M))
    if len(found) < 2:
        return None
    return float(found["darl_model_busy_seconds_total"]), float(found["darl_batch_items_sum"])


# the goal's "p95 <= 2 x the single-request latency", read three ways (the docstring, step 3)
READINGS = {
    "p95_slowdown": "p95 of latency / own alone-latency <= 2",
    "p95_over_alone_p95": "p95 <= 2 x p95 alone",
    "p95_over_l1": "p95 <= 2 x median L1",
}


def sweep(name: str, url: str, bodies: list[bytes], items: list[int], args) -> dict:
    alone = alone_latencies(f"{url}/rerank", bodies, items, args.single, args.timeout)
    l1 = float(np.median([t for _, t in alone]))
    alone_p95 = float(np.percentile([t for _, t in alone], 95))
    slope, intercept = np.polyfit([n for n, _ in alone], [t for _, t in alone], 1)
    print(f"{name}: single-request latency {l1 * 1000:.0f} ms; alone {intercept * 1000:.0f} ms + {slope * 1000:.1f} ms/item",
          file=sys.stderr)
    capacity = asyncio.run(burst(f"{url}/rerank", bodies, items, args.burst, args.timeout))
    print(f"{name}: capacity {json.dumps(capacity)}", file=sys.stderr)
    steps = []
    for n, factor in enumerate(args.factors):
        before = model_totals(url)
        step = asyncio.run(open_loop(f"{url}/rerank", bodies, items, factor / l1, args, seed=n))
        if before is not None:  # the model's own speed under this load: items per second it had a step running
            busy, scored = (b - a for a, b in zip(before, model_totals(url)))
            step["model_items_per_busy_s"], step["model_busy"] = scored / max(busy, 1e-9), busy / step["wall_s"]
        step["p95_over_l1"] = step["p95_ms"] / (l1 * 1000)
        step["p95_over_alone_p95"] = step["p95_ms"] / (alone_p95 * 1000)
        slowdowns = [lat / (intercept + slope * n_items) for lat, n_items in step["answered"]]
        step["p95_slowdown"] = float(np.percentile(slowdowns, 95)) if slowdowns else float("nan")
        steps.append(step)
        print(f"{name}: {json.dumps({k: v for k, v in step.items() if k != 'answered'})}", file=sys.stderr)
        if not any(step[key] <= 2 for key in READINGS):  # nan (nothing answered 200) counts as over
            break
    return {"l1_ms": l1 * 1000, "alone_p95_ms": alone_p95 * 1000, "alone_ms": [intercept * 1000, slope * 1000],
            "capacity": capacity, "steps": steps, "sustainable": {key: sustainable(steps, key) for key in READINGS}}


def sustainable(steps: list[dict], key: str) -> dict | None:
    """The last step with steps[key] <= 2 before the first one over it."""
    last = None
    for step in steps:
        if not step[key] <= 2:
            break
        last = step
    return last


def table(rows: list[tuple[str, dict]]) -> list[str]:
    out = [
        "| server | offered req/s | sent | req/s | items/s | p50 ms | p95 ms | p99 ms | p95 slowdown | p95 / alone p95 "
        "| p95 / L1 | statuses | model items/busy-s | model busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, s in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(s["statuses"].items()))
        model = (f"{s['model_items_per_busy_s']:.1f} | {s['model_busy']:.0%}" if "model_busy" in s else "– | –")
        out.append(
            f"| {name} | {s['offered_rps']:.2f} | {s['sent']} | {s['rps']:.2f} | {s['items_per_s']:.1f} | {s['p50_ms']:.0f} "
            f"| {s['p95_ms']:.0f} | {s['p99_ms']:.0f} | {s.get('p95_slowdown', float('nan')):.2f} "
            f"| {s.get('p95_over_alone_p95', float('nan')):.2f} | {s.get('p95_over_l1', float('nan')):.2f} | {statuses} | {model} |"
        )
    return out


def score_difference(darl_url: str, peer_url: str, body: bytes) -> float:
    """Largest |expected grade difference| between the two servers on one request."""
    got = [{r["index"]: r["score"] for r in httpx.post(f"{u}/rerank", content=body, headers={"content-type": "application/json"}, timeout=600).json()}
           for u in (darl_url, peer_url)]
    return max(abs(got[0][i] - got[1][i]) for i in got[0])


def report(args, result: dict) -> str:
    darl, peer = result["darl"], result["peer"]
    lines = [
        f"Load test, {time.strftime('%Y-%m-%d')}: checkpoint {args.checkpoint or 'default'}, dtype {args.dtype}, "
        f"{cpu_model()} x{os.cpu_count()}, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}. "
        f"`{' '.join(sys.argv)}`",
        "",
        *table([("darl", s) for s in darl["steps"]] + [("peer", s) for s in peer["steps"]]
               + ([("darl 2x capacity", result["overload"])] if result.get("overload") else [])),
        "",
        *(f"- {name} alone: L1 (median) {r['l1_ms']:.0f} ms, p95 {r['alone_p95_ms']:.0f} ms; "
          f"fit {r['alone_ms'][0]:.0f} ms + {r['alone_ms'][1]:.1f} ms/item"
          for name, r in (("darl", darl), ("peer", peer))),
        f"- capacity ({args.burst} requests at once): darl {darl['capacity']['rps']:.2f} req/s "
        f"({darl['capacity']['items_per_s']:.1f} items/s), peer {peer['capacity']['rps']:.2f} req/s "
        f"({peer['capacity']['items_per_s']:.1f} items/s): {darl['capacity']['rps'] / peer['capacity']['rps']:.2f}x",
    ]
    for key, reading in READINGS.items():
        d, p = darl["sustainable"][key], peer["sustainable"][key]
        if d and p:
            lines.append(f"- sustainable throughput ({reading}): darl {d['rps']:.2f} req/s, peer {p['rps']:.2f} req/s: "
                         f"{d['rps'] / p['rps']:.2f}x (goal >= 3x)")
        else:
            lines.append(f"- sustainable throughput ({reading}): {'darl' if not d else 'peer'} met it at no rate tried (lower --factors)")
    if result.get("overload"):
        statuses = result["overload"]["statuses"]
        fivexx = sum(v for k, v in statuses.items() if k.startswith("5"))
        lost = statuses.get("timeout", 0) + statuses.get("error", 0)
        lines.append(f"- darl under 2x overload ({result['overload']['offered_rps']:.2f} req/s offered, twice its capacity): "
                     f"{fivexx} responses 5xx, {lost} lost (goal 0 and 0)")
    lines.append(f"- peak RSS: darl {result['darl_rss_mb']:.0f} MB, peer {result['peer_rss_mb']:.0f} MB")
    lines.append(f"- max |score difference| darl vs peer on one request: {result['score_diff']:.2e}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--backend", default="auto", help="darl's backend")
    p.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="darl serves with --compile (its layers under torch.compile)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--requests", type=int, default=500, help="distinct request bodies, cycled")
    p.add_argument("--single", type=int, default=20, help="requests one at a time: L1 and the alone-latency fit")
    p.add_argument("--burst", type=int, default=40, help="requests sent at once to measure capacity")
    p.add_argument("--factors", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4],
                   help="offered rates, in units of 1 / L1 of the server under test")
    p.add_argument("--max-requests", type=int, default=200, help="requests per step at most")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals per step at most")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take before it counts as lost")
    p.add_argument("--max-concurrent-requests", type=int, default=64,
                   help="darl's admission limit (429 beyond); keep it under --timeout x its req/s, or requests "
                        "admitted under overload wait past --timeout and count as lost")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="darl's step budget (default: the server's)")
    p.add_argument("--concurrent-steps", type=int, default=None, help="darl's steps in flight (default: the server's)")
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=None, help="markdown report (default: stdout)")
    p.add_argument("--json", type=Path, default=None, help="every step's raw figures")
    p.add_argument("--logs", type=Path, default=Path("/tmp/darl_load_logs"))
    p.add_argument("--token-bound", action="store_true",
                   help="only count the tokens per item each server runs on this workload (the CPU capacity bound) and exit")
    args = p.parse_args(argv)
    if args.single < 3:
        p.error("--single: at least 3 requests, to fit the alone-latency (a + b x items)")
    if not args.data.is_file():
        print(f"skipped: {args.data} not found (the load test needs the Home Depot dev file)", file=sys.stderr)
        return 0
    args.factors = sorted(args.factors)
    requests = workload(args.data, args.requests, seed=0)
    if args.token_bound:
        print(token_bound(requests, args.checkpoint))
        return 0
    bodies, items = [json.dumps(r).encode() for r in requests], [len(r["texts"]) for r in requests]
    args.logs.mkdir(parents=True, exist_ok=True)
    checkpoint = ["--checkpoint", args.checkpoint] if args.checkpoint else []
    darl_cmd = [sys.executable, "-m", "darl_infer.serve", *checkpoint, "--backend", args.backend, "--dtype", args.dtype,
                "--max-concurrent-requests", str(args.max_concurrent_requests), *(["--compile"] if args.compile else []),
                *(["--max-batch-tokens", str(args.max_batch_tokens)] if args.max_batch_tokens else []),
                *(["--concurrent-steps", str(args.concurrent_steps)] if args.concurrent_steps else [])]
    peer_cmd = [sys.executable, str(HERE / "peer_server.py"), *checkpoint, "--dtype", args.dtype]
    result = {}
    with server(darl_cmd, args.logs / "darl.log", args.start_timeout) as (darl_url, darl_proc):
        result["darl"] = sweep("darl", darl_url, bodies, items, args)
        rate = 2 * result["darl"]["capacity"]["rps"]
        result["overload"] = asyncio.run(open_loop(f"{darl_url}/rerank", bodies, items, rate, args, seed=99))
        result["darl_rss_mb"] = peak_rss_mb(darl_proc.pid)
        with server(peer_cmd, args.logs / "peer.log", args.start_timeout) as (peer_url, peer_proc):
            result["peer"] = sweep("peer", peer_url, bodies, items, args)
            result["peer_rss_mb"] = peak_rss_mb(peer_proc.pid)
            result["score_diff"] = score_difference(darl_url, peer_url, bodies[0])
    text = report(args, result)
    if args.out:
        args.out.write_text(text)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
