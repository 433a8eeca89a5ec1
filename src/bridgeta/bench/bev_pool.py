"""Benchmark of BEV pooling at the size of the ``bevfusion-c`` preset (``bridgeta bench bev-pool``).

Times forward + backward of :func:`bridgeta.models.bev_pool.bev_pool` against the LSS cumsum
reference on a realistic frustum: 6 cameras of a nuScenes-like rig, 32x88 feature map (256x704
input / 8), 118 depth bins, 80 channels, a 256x256 grid of 0.4 m with one 20 m vertical bin. The
per-batch costs (geometry, pool plan, and the rank sort only the reference needs) are reported
separately because they are paid once per batch, not per feature tensor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bridgeta.config import load_config
from bridgeta.geometry import BEVGrid
from bridgeta.models.bev_pool import (
    BEVPoolPlan,
    PoolSegments,
    bev_pool,
    bev_pool_cumsum_reference,
    compute_pool_plan,
)
from bridgeta.models.lss import create_frustum, frustum_to_ego
from bridgeta.provenance import environment, write_json
from bridgeta.rig import reference_camera_inputs

def bevfusion_c_setting() -> tuple[BEVGrid, tuple[int, int], int, tuple[float, float, float]]:
    """(pooling grid, image size, feature stride, depth bins) of the ``bevfusion-c`` preset."""
    camera = load_config("bevfusion-c").model
    vtransform = camera.camera.vtransform
    return camera.grid.build(), tuple(camera.camera.image_size), vtransform.feature_stride, vtransform.depth


def _timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` in milliseconds, synchronising CUDA around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_bev_pool_benchmark(
    device: str | torch.device = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    batch_size: int = 1,
    channels: int = 80,
    seed: int = 0,
) -> dict:
    """Median forward+backward milliseconds of the fast pool and the cumsum reference, and context.

    ``speedup`` is ``reference_ms / fast_ms`` for the pooling alone. ``speedup_per_batch`` also
    charges each side its per-batch preparation (the fast path needs the plan, the reference the
    plan plus the rank sort), which is what a training step actually pays.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    device = torch.device(device)
    grid, image_size, feature_stride, depth = bevfusion_c_setting()
    generator = torch.Generator().manual_seed(seed)
    feature_size = (image_size[0] // feature_stride, image_size[1] // feature_stride)
    frustum = create_frustum(image_size, feature_size, depth).to(device)
    camera = reference_camera_inputs(batch_size, image_size)
    intrinsics, ego_T_camera, image_aug = (
        tensor.to(device) for tensor in (camera.intrinsics, camera.ego_T_camera, camera.image_aug)
    )
    batch_index = torch.arange(batch_size, device=device).view(batch_size, 1, 1, 1, 1)

    def geometry() -> torch.Tensor:
        return grid.point_to_cell(frustum_to_ego(frustum, intrinsics, ego_T_camera, image_aug))

    def plan_only() -> BEVPoolPlan:
        return compute_pool_plan(cells, batch_index, grid, batch_size)

    def segments_only() -> PoolSegments:
        # A copy of the plan has an empty cache, so this times the sort alone.
        return dataclasses.replace(plan).segments

    with torch.no_grad():
        cells = geometry()
        geometry_ms = _timed(geometry, device, repeats, warmup)
        plan_ms = _timed(plan_only, device, repeats, warmup)
        plan = plan_only()
        segments_ms = _timed(segments_only, device, repeats, warmup)
        num_occupied = int(plan.segments.is_last.sum())

    features = torch.randn(plan.num_points, channels, generator=generator).to(device)
    features.requires_grad_(True)
    grad_output = torch.randn(
        batch_size, channels * grid.num_z, *grid.shape, generator=generator
    ).to(device)

    def step(pool: Callable[[torch.Tensor, BEVPoolPlan], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            features.grad = None
            pool(features, plan).backward(grad_output)

        return run

    fast_ms = _timed(step(bev_pool), device, repeats, warmup)
    reference_ms = _timed(step(bev_pool_cumsum_reference), device, repeats, warmup)
    with torch.no_grad():
        max_abs_diff = float(
            (bev_pool(features, plan) - bev_pool_cumsum_reference(features, plan)).abs().max()
        )

    return {
        "torch_version": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "cameras": intrinsics.shape[1],
        "depth_bins": frustum.shape[0],
        "feature_size": list(feature_size),
        "channels": channels,
        "grid_shape": [grid.num_z, *grid.shape],
        "num_points": plan.num_points,
        "num_kept": int(plan.kept.sum()),
        "num_occupied_cells": num_occupied,
        "repeats": repeats,
        "warmup": warmup,
        "geometry_ms": geometry_ms,
        "plan_ms": plan_ms,
        "segments_ms": segments_ms,
        "fast_ms": fast_ms,
        "reference_ms": reference_ms,
        "speedup": reference_ms / fast_ms,
        "speedup_per_batch": (reference_ms + plan_ms + segments_ms) / (fast_ms + plan_ms),
        "max_abs_diff": max_abs_diff,
    }


def format_report(result: dict) -> str:
    """Readable table of a :func:`run_bev_pool_benchmark` result."""
    lines = [
        f"BEV pool benchmark  torch {result['torch_version']}  device {result['device']} "
        f"({result['device_name']})  threads {result['threads']}",
        f"frustum: B={result['batch_size']} N={result['cameras']} D={result['depth_bins']} "
        f"feature {result['feature_size'][0]}x{result['feature_size'][1]}  C={result['channels']}  "
        f"grid Z,X,Y={tuple(result['grid_shape'])}",
        f"points: {result['num_points']:,} total, {result['num_kept']:,} kept "
        f"({100.0 * result['num_kept'] / result['num_points']:.1f}%), "
        f"{result['num_occupied_cells']:,} occupied cells",
        f"median of {result['repeats']} (after {result['warmup']} warm-up):",
        f"  {'geometry (once per batch)':<38}{result['geometry_ms']:>10.2f} ms",
        f"  {'pool plan (once per batch)':<38}{result['plan_ms']:>10.2f} ms",
        f"  {'rank sort, reference only (per batch)':<38}{result['segments_ms']:>10.2f} ms",
        f"  {'bev_pool fwd+bwd':<38}{result['fast_ms']:>10.2f} ms",
        f"  {'cumsum reference fwd+bwd':<38}{result['reference_ms']:>10.2f} ms",
        f"  {'speedup (reference / fast)':<38}{result['speedup']:>10.2f} x",
        f"  {'speedup incl. per-batch preparation':<38}{result['speedup_per_batch']:>10.2f} x",
        f"  {'max |fast - reference|':<38}{result['max_abs_diff']:>10.2e}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bridgeta bench bev-pool",
        description="Time BEV pooling (fast path vs LSS cumsum reference) at bevfusion-c size.",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--channels", type=int, default=80)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--out",
        default=None,
        help="results JSON to write; a run on another device already in the file is kept",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = run_bev_pool_benchmark(
        device=args.device,
        repeats=args.repeats,
        warmup=args.warmup,
        batch_size=args.batch_size,
        channels=args.channels,
    )
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    if args.out:
        save_result(Path(args.out), result)
    return 0


def save_result(path: Path, result: dict) -> None:
    """Add ``result`` to the results file, replacing an earlier run on the same device."""
    runs = []
    if path.is_file():
        runs = [r for r in json.loads(path.read_text())["runs"] if r["device"] != result["device"]]
    write_json(path, {"environment": environment(), "runs": runs + [result]})


if __name__ == "__main__":
    raise SystemExit(main())
