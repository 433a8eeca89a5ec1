"""Helpers shared by the engine tests (a plain module, not a test module)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from bridgeta.config import load_config

# A narrow LiDAR-only model on a coarse grid: a training step takes a few tens of milliseconds.
SMALL_TINY_L = [
    "model.lidar.pillar_channels=8",
    "model.lidar.channels=[16]",
    "model.lidar.out_channels=16",
    "model.decoder.blocks=[[1,16,2],[1,16,1]]",
    "model.decoder.out_channels=16",
    "model.grid.x=[-51.2,51.2,1.6]",
    "model.grid.y=[-51.2,51.2,1.6]",
    "model.head.output_grid.x=[-50.0,50.0,2.0]",
    "model.head.output_grid.y=[-50.0,50.0,2.0]",
    "train.num_workers=0",
    "train.log_every=1",
]


def small_config(dataroot: Path, *overrides: str):
    """The narrow ``tiny-l`` on ``dataroot`` plus ``overrides``."""
    return load_config("tiny-l", [*SMALL_TINY_L, f"data.dataroot={dataroot}", *overrides])


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@contextmanager
def torch_threads(count: int):
    """Fix the intra-op thread count (runs compared bit for bit must use the same one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tiny_config(*overrides: str):
    """``tiny-l`` with in-process loading, for evaluation and picture tests."""
    return load_config("tiny-l", ["train.num_workers=0", "train.batch_size=2", *overrides])
