"""Data loader throughput: samples per second that ``BEVMapDataset`` + ``collate_bev`` deliver.

Answers "is the loader the bottleneck?" for a given image size, modalities and worker count. The
first batch (worker start-up, file cache warm-up) is timed separately from the steady state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, RandomSampler

from bridgeta.config import MAP_CLASSES
from bridgeta.data.dataset import BEVMapDataset, DataConfig, collate_bev
from bridgeta.geometry import BEVGrid


def measure_loader_throughput(
    config: DataConfig,
    image_size: tuple[int, int],
    output_grid: BEVGrid,
    modalities: Sequence[str],
    batch_size: int,
    num_workers: int,
    batches: int,
    classes: Sequence[str] = MAP_CLASSES,
    train: bool = True,
    seed: int = 0,
) -> dict:
    """Steady-state ``samples_per_s`` over ``batches`` batches after one warm-up batch.

    Samples are drawn at random with replacement, so a small split still yields enough batches.
    """
    if batch_size < 1 or batches < 1 or num_workers < 0:
        raise ValueError(
            f"need batch_size >= 1, batches >= 1, num_workers >= 0; "
            f"got {batch_size}, {batches}, {num_workers}"
        )
    dataset = BEVMapDataset(
        config, image_size, output_grid, classes, train=train, modalities=modalities, seed=seed
    )
    if len(dataset) == 0:
        raise ValueError(f"split '{dataset.split}' of {config.dataroot} has no samples")
    sampler = RandomSampler(
        dataset,
        replacement=True,
        num_samples=(batches + 1) * batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_bev
    )
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first_batch_s = time.perf_counter() - start
    start = time.perf_counter()
    points = 0
    for inputs, _, _ in iterator:
        points += 0 if inputs.lidar is None else len(inputs.lidar.points)
    seconds = time.perf_counter() - start
    return {
        "samples_per_s": batches * batch_size / seconds,
        "batches_per_s": batches / seconds,
        "seconds": seconds,
        "first_batch_s": first_batch_s,
        "batches": batches,
        "batch_size": batch_size,
        "num_workers": num_workers,
        # With num_workers=0 the loading runs on the main process's torch threads (workers use 1).
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "modalities": list(modalities),
        "image_size": list(image_size),
        "output_grid": list(output_grid.shape),
        "train": train,
        "points_per_sample": points / (batches * batch_size),
        "split": dataset.split,
        "dataset_samples": len(dataset),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``bridgeta bench loader``: loader samples/s for a model preset's inputs on a prepared dataroot."""
    import argparse
    import json
    from pathlib import Path

    from bridgeta.config import load_config
    from bridgeta.provenance import environment, write_json

    parser = argparse.ArgumentParser(
        prog="bridgeta bench loader", description="Training-loader throughput (samples/s) for a model preset."
    )
    parser.add_argument("--dataroot", required=True)
    parser.add_argument("--version", default="v1.0-trainval")
    parser.add_argument("--config", default="tiny-lc", help="model preset deciding image size, grid, modalities")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts to measure")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None, help="results JSON to write")
    args = parser.parse_args(argv)

    model = load_config(args.config).model
    modalities = [name for name, branch in (("camera", model.camera), ("lidar", model.lidar)) if branch]
    image_size = tuple(model.camera.image_size) if model.camera else (0, 0)
    runs = [
        measure_loader_throughput(
            DataConfig(dataroot=args.dataroot, version=args.version),
            image_size,
            model.heads.map.output_grid.build(),
            modalities,
            args.batch_size,
            workers,
            args.batches,
        )
        for workers in args.workers
    ]
    result = {"environment": environment(), "config": args.config, "runs": runs}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for run in runs:
            print(f"{args.config} {'+'.join(modalities)}: {run['num_workers']} workers, batch {run['batch_size']}: "
                  f"{run['samples_per_s']:.1f} samples/s (first batch {run['first_batch_s']:.2f} s)")
    if args.out:
        write_json(Path(args.out), result)
    return 0
