"""Tabulate the validation curves of probe runs: map mIoU, detection mAP, NDS, car AP and the mAP
of the nearest range band at every evaluated step, plus the object heatmap and depth losses logged over the 100 steps before it.

    python scripts/probe_curves.py RUN_DIR [RUN_DIR ...] > results/probes/.../curves.md

Each RUN_DIR holds the ``metrics.jsonl`` that ``bridgeta train`` wrote (what a probe folder under
results/probes/ keeps). Figures in %, the heatmap loss as logged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _loss_near(rows: list[dict], term: str, step: int, window: int = 100) -> float | None:
    """Mean of the training term ``term`` over the logged steps in ``(step - window, step]``."""
    values = [r[term] for r in rows if term in r and step - window < r["step"] <= step]
    return sum(values) / len(values) if values else None


def curve_rows(run: Path) -> list[list[str]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    training = [r for r in rows if "eval" not in r]
    table = []
    for row in rows:
        if "eval" not in row:
            continue
        evaluation = row["eval"]
        detection = evaluation.get("detection") or {}
        near = next(iter(detection.get("by_range", {}).items()), None)
        car = detection.get("per_class", {}).get("car", {}).get("AP")
        heat = _loss_near(training, "object/heatmap", row["step"])
        depth = _loss_near(training, "depth/bce", row["step"])

        def pct(value: float | None) -> str:
            return "–" if value is None else f"{100 * value:.2f}"

        table.append([f"`{run.name}`", str(row["step"]), pct(evaluation.get("miou")), pct(detection.get("mAP")),
                      pct(detection.get("NDS")), pct(car), f"{pct(near[1]['mAP'])} ({near[0]} m)" if near else "–",
                      "–" if heat is None else f"{heat:.2f}", "–" if depth is None else f"{depth:.2f}"])
    return table


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    missing = [a for a in argv if not (Path(a) / "metrics.jsonl").is_file()]
    if missing:
        print(f"no metrics.jsonl in {missing[0]}", file=sys.stderr)
        return 2
    header = ["run", "step", "val map mIoU", "mAP", "NDS", "car AP", "mAP, nearest band", "object/heatmap loss",
              "depth/bce loss"]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for run in argv:
        for row in curve_rows(Path(run)):
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
