"""Shared test set-up."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    """The suite is CPU tests (CI has no GPU); some compare bits and spawn CPU processes, so keep
    every test on the CPU on a CUDA machine too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def engine_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared synthetic world with 4 training samples, built once per session.

    Shared by the training, resume, DDP, evaluation and picture tests: generating it is the slow
    part.
    """
    pytest.importorskip("trimesh")
    pytest.importorskip("nuscenes")
    from bridgeta.data.prepare import prepare_dataroot
    from bridgeta.data.synth.generate import SynthPreset, generate_dataroot
    from bridgeta.data.synth.world import TownSettings

    root = tmp_path_factory.mktemp("engine-world")
    preset = SynthPreset(
        town=replace(TownSettings.tiny(), scene_duration=2.0),  # 4 keyframes per scene
        image_size=(36, 64),
        scenes_per_town=1,
        lidar_sweeps=1,
        ground_resolution=0.2,
    )
    generate_dataroot(root, scenes=3, seed=5, preset=preset, workers=1)
    prepare_dataroot(root, "v1.0-trainval", progress=False)
    return root
