"""`darl-train --config FILE` and `darl-distill --config FILE`: a checkpoint from a JSON config
(see training/configs/).

Writes the checkpoint directory (weights, darl.json with the training summary and evaluation,
train_config.json = the full config, metrics.json) and prints its path and evaluation as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from .data import DataError
from .distill import DistillConfig, distill
from .train import TrainConfig, train


def run(prog: str, load_config, fit, argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON config (see training/configs/)")
    args = parser.parse_args(argv)
    try:
        out = fit(load_config(args.config))
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    evaluation = json.loads((out / "darl.json").read_text())["evaluation"]
    json.dump({"checkpoint": str(out), "evaluation": evaluation}, sys.stdout, indent=2)
    print()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run("darl-train", TrainConfig.load, train, argv)


def distill_main(argv: list[str] | None = None) -> int:
    return run("darl-distill", DistillConfig.load, distill, argv)


if __name__ == "__main__":
    sys.exit(main())
