"""Print the ablation table (markdown) from finished runs: `python -m darl_infer.training.ablation_table runs/ablation/*`.

Columns: ID (first dev set) and OOD (second dev set) accuracy / macro-F1 / ECE, then NDCG@10,
DASA selection summary, steps, pairs seen and minutes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(directory: Path) -> str:
    spec = json.loads((directory / "darl.json").read_text())
    evaluation, training = spec["evaluation"], spec["training"]
    id_m, ood_m = (list(evaluation.values()) + [None, None])[:2]
    blank = {"accuracy": float("nan"), "macro_f1": float("nan"), "ece": float("nan"), "ndcg@10": float("nan")}
    id_m, ood_m = id_m or blank, ood_m or blank
    dasa = training.get("dasa") or {}
    selected = f"{dasa.get('method')} {dasa.get('selected')} {dasa.get('selected_label_counts')}" if dasa else "-"
    minutes = training["train_seconds"] / 60
    cells = [
        directory.name,
        *(f"{m[k]:.3f}" for m in (id_m, ood_m) for k in ("accuracy", "macro_f1", "ece")),
        f"{id_m['ndcg@10']:.3f} / {ood_m['ndcg@10']:.3f}",
        selected,
        f"{training['steps']} ({training['pairs_seen']})" + (" (time budget hit)" if training["stopped_by_time_budget"] else ""),
        f"{minutes:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    dirs = [Path(d) for d in (argv if argv is not None else sys.argv[1:]) if (Path(d) / "darl.json").is_file()]
    print("| row | ID acc | ID macro-F1 | ID ECE | OOD acc | OOD macro-F1 | OOD ECE | NDCG@10 ID / OOD | DASA (method, n, label counts) | steps (pairs) | train min |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for d in dirs:
        print(row(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
