"""Print the ablation table (markdown) from finished runs: `python -m darl_infer.training.ablation_table runs/ablation/*`.

Columns: for ID (first dev set) and OOD (second dev set): accuracy / macro-F1 / ECE / pairwise
accuracy within queries / easy negatives graded irrelevant / AUC own vs easy negatives; then the
negatives used, DASA selection summary, steps, pairs seen and minutes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


COLUMNS = ("accuracy", "macro_f1", "ece", "pairwise_accuracy", "easy_negatives.irrelevant_rate", "easy_negatives.auc")


def metric(metrics: dict | None, key: str) -> str:
    """A metric's cell; "-" where the run (or an older run) did not report it."""
    value = metrics
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "-" if value is None else f"{value:.3f}"


def row(directory: Path) -> str:
    spec = json.loads((directory / "darl.json").read_text())
    evaluation, training = spec["evaluation"], spec["training"]
    id_m, ood_m = (list(evaluation.values()) + [None, None])[:2]
    dasa = training.get("dasa") or {}
    selected = f"{dasa.get('method')} {dasa.get('selected')} {dasa.get('selected_label_counts')}" if dasa else "-"
    negatives = training.get("negatives") or {}
    used = f"{negatives['kind']} {negatives['random']}" + (f", mined {negatives['hard']['mined']}" if "hard" in negatives else "") if negatives else "-"
    minutes = training["train_seconds"] / 60
    cells = [
        directory.name,
        *(metric(m, k) for m in (id_m, ood_m) for k in COLUMNS),
        used,
        selected,
        f"{training['steps']} ({training['pairs_seen']})" + (" (time budget hit)" if training["stopped_by_time_budget"] else ""),
        f"{minutes:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    dirs = [Path(d) for d in (argv if argv is not None else sys.argv[1:]) if (Path(d) / "darl.json").is_file()]
    names = ("acc", "macro-F1", "ECE", "pairwise", "neg irrel.", "neg AUC")
    print("| row | " + " | ".join(f"{side} {n}" for side in ("ID", "OOD") for n in names)
          + " | negatives | DASA (method, n, label counts) | steps (pairs) | train min |")
    print("|---" * (2 * len(names) + 5) + "|")
    for d in dirs:
        print(row(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
