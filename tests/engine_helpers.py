"""Helpers shared by the engine tests (a plain module, not a test module)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from bridgeta.config import load_config

# A coarse grid, a narrow decoder and in-process loading: what every small test model shares.
_SMALL_COMMON = [
    "model.decoder.blocks=[[1,16,2],[1,16,1]]",
    "model.decoder.out_channels=16",
    "model.grid.x=[-51.2,51.2,1.6]",
    "model.grid.y=[-51.2,51.2,1.6]",
    "model.heads.map.output_grid.x=[-50.0,50.0,2.0]",
    "model.heads.map.output_grid.y=[-50.0,50.0,2.0]",
    "train.num_workers=0",
    "train.log_every=1",
]

# A narrow LiDAR-only model: a training step takes a few tens of milliseconds.
SMALL_TINY_L = [
    "model.lidar.pillar_channels=8",
    "model.lidar.channels=[16]",
    "model.lidar.out_channels=16",
    *_SMALL_COMMON,
]


# A narrow camera-only student (``tiny-c``) on the same coarse grid, and a matching fusion teacher
# (``tiny-lc``): 6 x 32x88 images, a 16-channel camera BEV. Distillation tests pair the two.
# (bev_pool returns contiguous NCHW since torch 2.13's oneDNN was found to crash in the weight
# gradient of a stride-2 1x1 conv over channels-last inputs with fewer than 16 channels;
# test_bev_pool.py keeps that fixed.)
SMALL_TINY_C = [
    "model.camera.image_size=[32,88]",
    "model.camera.neck.out_channels=16",
    "model.camera.vtransform.out_channels=16",
    *_SMALL_COMMON,
    "train.batch_size=2",
]

# The teacher's fuser must give the student's camera BEV channel count (BridgeTA has no adapters).
SMALL_TINY_LC = [
    *SMALL_TINY_C,
    "model.lidar.pillar_channels=8",
    "model.lidar.channels=[16]",
    "model.lidar.out_channels=16",
    "model.fuser.out_channels=16",
]


def small_config(dataroot: Path, *overrides: str):
    """The narrow ``tiny-l`` on ``dataroot`` plus ``overrides``."""
    return load_config("tiny-l", [*SMALL_TINY_L, f"data.dataroot={dataroot}", *overrides])


def small_student_config(dataroot: Path, *overrides: str):
    """The narrow ``tiny-c`` (camera-only student) on ``dataroot`` plus ``overrides``."""
    return load_config("tiny-c", [*SMALL_TINY_C, f"data.dataroot={dataroot}", *overrides])


def small_teacher_config(dataroot: Path, *overrides: str):
    """The narrow ``tiny-lc`` (fusion teacher of :func:`small_student_config`) on ``dataroot``."""
    return load_config("tiny-lc", [*SMALL_TINY_LC, f"data.dataroot={dataroot}", *overrides])


def write_teacher(path: Path, dataroot: Path, seed: int = 0, *overrides: str) -> Path:
    """An untrained, seeded narrow ``tiny-lc`` teacher saved as a model file at ``path``."""
    from bridgeta.engine.model_file import save_model_file
    from bridgeta.models.bev_model import build_model

    config = small_teacher_config(dataroot, *overrides)
    torch.manual_seed(seed)
    return save_model_file(path, build_model(config), config)


def distill_config(dataroot: Path, teacher: Path, *overrides: str, recipe: str = "distill/tiny-c-bridgeta"):
    """A distillation recipe on the narrow student/teacher pair, with small level weights."""
    return load_config(
        recipe,
        [
            *SMALL_TINY_C,
            f"data.dataroot={dataroot}",
            f"distill.teacher={teacher}",
            "distill.weights={fld: 0.01, dld: 0.01, lld: 0.01, lld_aux: 0.01}",
            *overrides,
        ],
    )


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


def export_onnx_and_run(run_dir: Path, out: Path):
    """``bridgeta export --format onnx`` of a run's student, then one validation batch through it:
    ``(session, inputs, PyTorch outputs)`` for the parity checks of the ONNX tests."""
    from bridgeta import cli
    from bridgeta.engine.deploy import OnnxStudent
    from bridgeta.engine.evaluate import build_eval_loader
    from bridgeta.engine.model_file import load_model_file

    with torch_threads(1):
        assert cli.main(["export", "--format", "onnx", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    session = OnnxStudent(out, threads=1)
    student, config = load_model_file(run_dir)
    loader = build_eval_loader(config, student, "val", batch_size=1, num_workers=0, distributed=False)
    inputs, _, _ = next(iter(loader))
    with torch.no_grad():
        expected = student.eval()(inputs)
    return session, inputs, expected
