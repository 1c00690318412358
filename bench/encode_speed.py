"""Host time to tokenize a query's items (TemplateEncoder.encode), the default model's tokenizer.

    python bench/encode_speed.py --items 1000

On a GPU host tokenizing was 13.8 of a 1,000-item query's 49 ms (bench/RESULTS.md, "On a GPU"), so
it is measured on its own: the median of --repeats calls, items drawn from the example titles' words.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

from darl_infer import Scorer

EXAMPLES = Path(__file__).resolve().parents[1] / "darl_infer" / "examples" / "items.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    encoder = Scorer.from_pretrained(dtype="fp32", backend="reference").encoder
    words = EXAMPLES.read_text().split()
    rng = random.Random(0)
    items = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) for _ in range(args.items)]
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        encoder.encode("cordless drill", items)
        times.append(time.perf_counter() - start)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    print(f"encode, {args.items} items: median {statistics.median(times) * 1e3:.1f} ms of {args.repeats} ({cpu})")


if __name__ == "__main__":
    main()
