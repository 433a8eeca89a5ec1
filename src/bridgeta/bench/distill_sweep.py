"""``bridgeta bench distill-sweep``: choose lambda_1..3 and the eps* clamp on the validation towns.

METHOD.md leaves the loss weights open ("choose them on validation data only"). The sweep trains
the BridgeTA recipe with a short schedule from one teacher and evaluates every point on the
**validation** split (towns disjoint from train and test), in two stages:

1. a common scale ``s`` for the three levels (``lambda_1 = lambda_2 = lambda_3 = s``): the
   dual-path terms are sums over channels of squared distances and start two orders of magnitude
   above the segmentation loss, so the scale matters more than the ratio between levels;
2. the clamp range of eps* at the best scale.

The point with the best validation mIoU wins; runs are resumable and finished points are skipped.
The test towns are never read.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from bridgeta.bench.baselines import train_and_evaluate
from bridgeta.provenance import environment, write_json

RECIPE = "distill/tiny-c-bridgeta"
SCALES = (0.001, 0.003, 0.01, 0.03)
CLAMPS = ((0.01, 100.0), (0.1, 10.0), (0.5, 2.0))


def _point_name(scale: float, clamp: tuple[float, float]) -> str:
    return f"lambda{scale:g}-clamp{clamp[0]:g}-{clamp[1]:g}"


def _overrides(teacher: str, scale: float, clamp: tuple[float, float], epochs: int) -> list[str]:
    return [
        f"distill.teacher={teacher}",
        # The CrossKD term had the LLD weight when this sweep was designed: keep that meaning.
        f"distill.weights={{fld: {scale}, dld: {scale}, lld: {scale}, lld_aux: {scale}}}",
        f"distill.epsilon_range=[{clamp[0]}, {clamp[1]}]",
        f"train.epochs={epochs}",
    ]


def run(
    dataroot: Path,
    teacher: str,
    runs_dir: Path,
    out: Path,
    epochs: int,
    seed: int,
    scales: Sequence[float] = SCALES,
    clamps: Sequence[tuple[float, float]] = CLAMPS,
    recipe: str = RECIPE,
) -> dict:
    started = environment()
    points: list[dict] = []

    def evaluate_point(stage: str, scale: float, clamp: tuple[float, float]) -> dict:
        name = _point_name(scale, clamp)
        for point in points:
            if point["name"] == name:
                return point
        result = train_and_evaluate(
            recipe, dataroot, runs_dir / name, seed, _overrides(teacher, scale, clamp, epochs), split="val"
        )
        val = result["val"]
        point = {
            "name": name,
            "stage": stage,
            "lambda": scale,
            "epsilon_range": list(clamp),
            "val_miou": val["miou"],
            "val_miou_night": val["by_condition"].get("night", {}).get("miou"),
            "val_iou": val["iou"],
            "step_time_s": result["train"].get("step_time_s"),
        }
        points.append(point)
        print(f"{stage}: {name}: val mIoU {val['miou']:.4f}", flush=True)
        return point

    first_clamp = tuple(clamps[0])
    stage1 = [evaluate_point("scale", scale, first_clamp) for scale in scales]
    best_scale = max(stage1, key=lambda p: p["val_miou"])["lambda"]
    stage2 = [evaluate_point("clamp", best_scale, tuple(clamp)) for clamp in clamps]
    best = max(stage2, key=lambda p: p["val_miou"])
    result = {
        "environment": started,
        "recipe": recipe,
        "dataroot": str(dataroot),
        "teacher": teacher,
        "epochs": epochs,
        "seed": seed,
        "selection": "highest validation mIoU; stage 1 scales lambda_1..3 together, stage 2 the eps* clamp",
        "points": points,
        "chosen": {"lambda": best["lambda"], "epsilon_range": best["epsilon_range"], "val_miou": best["val_miou"]},
    }
    write_json(out, result)
    return result


def run_fair(
    dataroot: Path,
    runs_dir: Path,
    out: Path,
    protocol,
    methods: Sequence[str],
    lambdas: Sequence[float],
    seeds: int,
    jobs: int = 1,
) -> dict:
    """Every method in ``methods`` at every lambda in ``lambdas`` (a scale of its recipe weights,
    ``bench.distill.scaled_weights``) for ``seeds`` seeds, on the validation towns; the lambda with
    the highest mean validation mIoU is chosen per method. The same budget for every method:
    points, seeds, schedule and teacher. lambda = 0 of a method without a TA is the baseline
    (its runs are reused); BridgeTA's lambda = 0 still trains its TA. Runs are resumable."""
    from bridgeta.bench.baselines import _mean_std
    from bridgeta.bench.distill import method_job, run_name
    from bridgeta.bench.jobs import run_jobs

    started = environment()
    grid = [(m, float(lam), s) for m in methods for lam in lambdas for s in range(seeds)]
    jobs_list = [method_job(m, s, dataroot, runs_dir, protocol, lam, ("val",)) for m, lam, s in grid]
    results = run_jobs(jobs_list, jobs)
    points = []
    for method in methods:
        for lam in lambdas:
            mine = [(s, r) for (m, l, s), r in zip(grid, results) if m == method and l == float(lam)]
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
            })
    chosen = {}
    for method in methods:
        mine = [p for p in points if p["method"] == method]
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
    parser = argparse.ArgumentParser(prog="bridgeta bench distill-sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--dataroot", required=True, type=Path, help="prepared dataroot with a val split")
    parser.add_argument("--teacher", required=True, help="teacher run directory or model file")
    parser.add_argument("--epochs", type=int, default=2, help="short schedule per point")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    parser.add_argument("--runs", type=Path, default=Path("runs/distill_sweep"), help="where runs are kept (resumable)")
    parser.add_argument("--out", type=Path, default=Path("results/distill_sweep.json"))
    args = parser.parse_args(argv)
    result = run(args.dataroot, args.teacher, args.runs, args.out, args.epochs, args.seed, args.scales)
    chosen = result["chosen"]
    print(f"chosen: lambda_1..3 = {chosen['lambda']:g}, eps* clamp {chosen['epsilon_range']} "
          f"(val mIoU {chosen['val_miou']:.4f}); wrote {args.out}")
    return 0
