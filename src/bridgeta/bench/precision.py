"""``bridgeta bench precision``: is the trainer's default precision accuracy-neutral?

``train.precision: auto`` picks bf16 autocast (and ``train.memory_format: auto`` channels-last)
on a CPU with native bf16. That default is only worth having if it does not change what a run
learns: this benchmark trains the camera-only baseline on the cpu protocol's schedule twice per
seed, in plain fp32 (contiguous) and at the defaults, and scores both on the **validation**
towns (the same protocol choice as every other tuning decision; the test towns are not read).
The per-seed difference is compared with the spread between seeds, which is the noise any method
comparison has to beat. Runs are reused when finished, like ``bench baselines``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from bridgeta.bench.baselines import _mean_std, train_and_evaluate
from bridgeta.provenance import environment, write_json

VARIANTS: dict[str, tuple[str, ...]] = {
    "fp32": ("train.precision=fp32", "train.memory_format=contiguous"),
    "default": (),
}


def run(dataroot: Path, runs_dir: Path, out: Path, seeds: int, epochs: int, preset: str = "tiny-c") -> dict:
    started = environment()
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for seed in range(seeds):
        for name, overrides in VARIANTS.items():
            print(f"-- {preset} {name}, seed {seed}", flush=True)
            result = train_and_evaluate(
                preset, dataroot, runs_dir / f"{preset}-{name}-seed{seed}", seed,
                [f"train.epochs={epochs}", *overrides], split="val",
            )
            runs[name].append(
                {"seed": seed, "val_miou": result["val"]["miou"], "step_time_s": result["train"]["step_time_s"]}
            )
    deltas = [d["val_miou"] - f["val_miou"] for d, f in zip(runs["default"], runs["fp32"])]
    seed_spread = [statistics.stdev([r["val_miou"] for r in rows]) for rows in runs.values() if len(rows) > 1]
    result = {
        "environment": started,
        "dataroot": str(dataroot),
        "preset": preset,
        "epochs": epochs,
        "variants": {name: list(overrides) for name, overrides in VARIANTS.items()},
        "runs": runs,
        "val_miou": {name: _mean_std([r["val_miou"] for r in rows]) for name, rows in runs.items()},
        "step_time_s": {name: _mean_std([r["step_time_s"] for r in rows]) for name, rows in runs.items()},
        "paired_delta_val_miou": _mean_std(deltas),
        "seed_std_val_miou": max(seed_spread) if seed_spread else None,
    }
    write_json(out, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bridgeta bench precision", description=__doc__.splitlines()[0])
    parser.add_argument("--dataroot", required=True, type=Path)
    parser.add_argument("--runs", type=Path, default=Path("runs/precision"), help="run directories")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="the cpu accuracy protocol's student schedule")
    parser.add_argument("--preset", default="tiny-c")
    parser.add_argument("--out", type=Path, default=Path("results/precision.json"))
    args = parser.parse_args(argv)
    result = run(args.dataroot, args.runs, args.out, args.seeds, args.epochs, args.preset)
    for name, row in result["val_miou"].items():
        step = result["step_time_s"][name]["mean"]
        print(f"{name:<8} val mIoU {100 * row['mean']:.2f} ± {100 * (row['std'] or 0):.2f}   step {step:.3f} s")
    delta = result["paired_delta_val_miou"]
    print(f"paired delta (default - fp32): {100 * delta['mean']:+.2f} ± {100 * (delta['std'] or 0):.2f} mIoU; "
          f"seed std {100 * (result['seed_std_val_miou'] or 0):.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
