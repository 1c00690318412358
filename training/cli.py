"""`darl-train --config FILE`: train a checkpoint from a JSON config."""

from __future__ import annotations

import argparse
import json
import sys

from .train import TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="darl-train", description=__doc__)
    parser.add_argument("--config", required=True, help="JSON training config (see training/configs/)")
    args = parser.parse_args(argv)
    out = train(TrainConfig.load(args.config))
    evaluation = json.loads((out / "darl.json").read_text())["evaluation"]
    json.dump({"checkpoint": str(out), "evaluation": evaluation}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
