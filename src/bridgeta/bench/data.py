"""``bridgeta bench data``: how fast the synthetic world is generated and loaded, vs. training.

Generates a small world, prepares it, then measures for each tiny preset the loader's samples/s
(0 and 2 workers) against the samples/s of a training step (forward, backward, AdamW) on batches
from that loader. The loader is not the bottleneck when its rate is well above the step's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bridgeta.bench.loader import measure_loader_throughput
from bridgeta.config import load_config
from bridgeta.data.dataset import BEVMapDataset, DataConfig, collate_bev
from bridgeta.data.prepare import prepare_dataroot
from bridgeta.data.synth.generate import generate_dataroot
from bridgeta.losses import map_segmentation_loss
from bridgeta.models.bev_model import build_model
from bridgeta.provenance import environment, write_json


def training_step_rate(dataroot: Path, preset: str, batch_size: int, steps: int) -> dict:
    """Median seconds of one optimisation step of ``preset`` on real batches (after a warm-up)."""
    config = load_config(preset)
    model = build_model(config).train()
    dataset = BEVMapDataset.for_model(DataConfig(dataroot=str(dataroot)), model, "train", train=True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_bev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = iter(loader)
    times = []
    for step in range(steps + 1):
        inputs, labels, _ = next(batches)
        start = time.perf_counter()
        loss = sum(map_segmentation_loss(model(inputs).logits, labels, model.classes).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:  # the first step pays one-off allocation costs
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"step_s": step_s, "samples_per_s": batch_size / step_s, "batch_size": batch_size}


def run(out: Path, scenes: int, duration: float, seed: int, batch_size: int, batches: int) -> dict:
    started = environment()  # the code that runs is the code of the commit at the start
    with tempfile.TemporaryDirectory(prefix="bridgeta-bench-data-") as scratch:
        dataroot = Path(scratch) / "world"
        generation = generate_dataroot(dataroot, scenes, seed, "tiny", duration=duration)
        start = time.perf_counter()
        prepare_dataroot(dataroot, "v1.0-trainval", progress=False)
        prepare_s = time.perf_counter() - start
        presets = {}
        for preset in ("tiny-lc", "tiny-c", "tiny-l"):
            model = load_config(preset).model
            modalities = [n for n, branch in (("camera", model.camera), ("lidar", model.lidar)) if branch]
            image_size = tuple(model.camera.image_size) if model.camera else (0, 0)
            loader = {
                workers: measure_loader_throughput(
                    DataConfig(dataroot=str(dataroot)), image_size, model.heads.map.output_grid.build(),
                    modalities, batch_size, workers, batches,
                )["samples_per_s"]
                for workers in (0, 2)
            }
            presets[preset] = {
                "loader_samples_per_s": {str(k): v for k, v in loader.items()},
                "training": training_step_rate(dataroot, preset, batch_size, steps=5),
            }
    result = {
        "environment": started,
        "generation": {
            "preset": "tiny",
            "scenes": scenes,
            "scene_duration_s": duration,
            "samples": generation.samples,
            "lidar_sweeps": generation.sweeps,
            "seconds": generation.seconds,
            "samples_per_s": generation.samples_per_second,
            "prepare_samples_per_s": generation.samples / prepare_s,
        },
        "presets": presets,
    }
    write_json(out, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bridgeta bench data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/data_throughput.json")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0, help="scene length in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args(argv)
    result = run(Path(args.out), args.scenes, args.duration, args.seed, args.batch_size, args.batches)
    generation = result["generation"]
    print(f"generation: {generation['samples_per_s']:.2f} samples/s (6 cameras + LiDAR + sweeps), "
          f"prepare: {generation['prepare_samples_per_s']:.1f} samples/s")
    for preset, entry in result["presets"].items():
        loader = entry["loader_samples_per_s"]
        print(f"{preset}: loader {loader['0']:.1f} / {loader['2']:.1f} samples/s (0 / 2 workers), "
              f"training {entry['training']['samples_per_s']:.1f} samples/s")
    print(f"wrote {args.out}")
    return 0
