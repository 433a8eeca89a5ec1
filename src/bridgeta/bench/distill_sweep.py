"""``bridgeta bench distill-sweep``: every method's loss weights chosen on the validation towns.

METHOD.md leaves the loss weights open ("choose them on validation data only"), and a fair
comparison tunes every method with the same budget. Each tuned method (``bridgeta``, ``direct``,
``feature_kd``, ``logit_kd``, ``monotakd``) scales its recipe weights by the same lambdas, lambda = 0
included, with the same seeds, schedule and teacher (the benchmark's own); each point is the
mean validation mIoU over its seeds (towns disjoint from train and test; the test towns are
never read), and the best lambda per method wins. BridgeTA's per-level ratios are the recipe's
(set from the logged loss shares, docs/distill.md); lambda scales them together. The command
runs the cpu protocol of ``bench accuracy`` up to its sweep (pretraining, teacher, baselines),
so ``bench accuracy`` with the same ``--work`` reuses every run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from bridgeta.provenance import environment, write_json

def run(
    dataroot: Path,
    runs_dir: Path,
    out: Path,
    protocol,
    methods: Sequence[str],
    lambdas: Sequence[float],
    seeds: int,
    jobs: int = 1,
    execute=None,
    ledger: Path | None = None,
) -> dict:
    """Every method in ``methods`` at every lambda in ``lambdas`` (a scale of its recipe weights,
    ``bench.distill.scaled_weights``) for ``seeds`` seeds, on the validation towns; the lambda with
    the highest mean validation mIoU is chosen per method. The same budget for every method:
    points, seeds, schedule and teacher. lambda = 0 of a method without a TA is the baseline
    (its runs are reused); BridgeTA's lambda = 0 still trains its TA. Runs are resumable, and
    recorded in ``ledger`` when one is given (bench/ledger.py)."""
    from bridgeta.bench.baselines import _mean_std
    from bridgeta.bench.distill import method_job, run_name
    from bridgeta.bench.jobs import run_jobs

    started = environment()
    grid = [(m, float(lam), s) for m in methods for lam in lambdas for s in range(seeds)]
    jobs_list = [method_job(m, s, dataroot, runs_dir, protocol, lam, ("val",), ledger=ledger) for m, lam, s in grid]
    results = execute(jobs_list) if execute is not None else run_jobs(jobs_list, jobs)
    points = []
    for method in methods:
        for lam in lambdas:
            mine = [(s, r) for (m, l, s), r in zip(grid, results) if m == method and l == float(lam) and r is not None]
            val = [r["val"]["miou"] for _, r in mine]
            stats = _mean_std(val)
            points.append({
                "method": method,
                "lambda": float(lam),
                "seeds": [s for s, _ in mine],
                "runs": [run_name(method, s, protocol, float(lam)) for s, _ in mine],
                "val_miou": stats["mean"],
                "val_miou_std": stats["std"],
                "val_miou_per_seed": val,
                "val_miou_night": _mean_std([r["val"]["by_condition"]["night"]["miou"] for _, r in mine])["mean"],
                # BridgeTA's TA on the same towns (teacher > TA > student is the expected order).
                "assistant_val_miou": _mean_std([r.get("assistant_val", {}).get("miou") for _, r in mine])["mean"],
            })
    chosen = {}
    for method in methods:
        mine = [p for p in points if p["method"] == method]
        if all(len(p["seeds"]) == seeds for p in mine):  # a partial sweep (--summary) chooses nothing
            chosen[method] = max(mine, key=lambda p: p["val_miou"])["lambda"]
    result = {
        "environment": started,
        "kind": "fair",
        "dataroot": str(dataroot),
        "protocol": {k: v for k, v in vars(protocol).items()},
        "seeds": seeds,
        "lambdas": [float(lam) for lam in lambdas],
        "selection": "per method, the lambda with the highest mean validation mIoU over the seeds",
        "points": points,
        "chosen": chosen,
    }
    write_json(out, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from bridgeta.bench.accuracy import PRESETS, ensure_world, run_staged

    parser = argparse.ArgumentParser(prog="bridgeta bench distill-sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=[n for n, p in PRESETS.items() if p.lambdas], default="cpu")
    parser.add_argument("--work", type=Path, required=True, help="world and runs, shared with bench accuracy")
    parser.add_argument("--dataroot", type=Path, default=None, help="use this prepared world instead of WORK/world")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained side by side")
    parser.add_argument("--seeds", type=int, default=None, help="at most this many seeds per point")
    parser.add_argument("--out", type=Path, default=Path("results/distill_sweep.json"))
    parser.add_argument("--ledger", type=Path, default=None,
                        help="the finished runs' records, shared with bench accuracy (default: "
                             "results/accuracy-PRESET/runs, bench accuracy's with --out results/accuracy-PRESET)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    ledger = args.ledger or Path("results") / f"accuracy-{args.preset}" / "runs"
    dataroot = args.dataroot or ensure_world(args.work, preset, ledger=ledger)
    result = run_staged(args.preset, args.out.parent, args.work, dataroot, args.jobs, args.seeds,
                        sweep_out=args.out, until="sweep", ledger=ledger)
    for method, lam in result["chosen"].items():
        print(f"{method}: lambda {lam:g}")
    print(f"wrote {args.out}")
    return 0
