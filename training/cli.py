"""`darl-train --config FILE`: train a checkpoint from a JSON config (see training/configs/).

Writes the checkpoint directory (weights, darl.json with the training summary and evaluation,
train_config.json = the full config, metrics.json) and prints its path and evaluation as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from .data import DataError
from .train import TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="darl-train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON training config (see training/configs/)")
    args = parser.parse_args(argv)
    try:
        out = train(TrainConfig.load(args.config))
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"darl-train: error: {e}", file=sys.stderr)
        return 2
    evaluation = json.loads((out / "darl.json").read_text())["evaluation"]
    json.dump({"checkpoint": str(out), "evaluation": evaluation}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
