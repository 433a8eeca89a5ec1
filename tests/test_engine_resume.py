"""Checkpoints: layout, pruning, no unpickling, and a SIGKILLed run resumed to the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file
from engine_helpers import SMALL_TINY_L, read_metrics, small_config, torch_threads

from bridgeta.config import load_config
from bridgeta.engine.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from bridgeta.engine.logging import MetricsLogger
from bridgeta.engine.schedule import WarmupCosineSchedule
from bridgeta.engine.trainer import parameter_groups, train
from bridgeta.models.bev_model import build_model
from bridgeta.models.types import BEVInputs, LidarInputs


@pytest.fixture(scope="module")
def dataroot(engine_world):
    return engine_world


def _training_state(seed: int):
    """A tiny-l model, AdamW and schedule after two real optimiser steps on random points."""
    torch.manual_seed(seed)
    config = load_config("tiny-l", SMALL_TINY_L)
    model = build_model(config)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-3, betas=(0.8, 0.9))
    schedule = WarmupCosineSchedule(optimizer, 1, 10, 0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    points = torch.rand(500, 5) * torch.tensor([80.0, 80.0, 4.0, 1.0, 0.0]) - torch.tensor([40.0, 40.0, 2.0, 0, 0])
    inputs = BEVInputs(batch_size=1, lidar=LidarInputs(points, torch.zeros(500, dtype=torch.long)))
    for _ in range(2):
        model(inputs).logits.square().mean().backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return config, model, optimizer, schedule, scaler


def test_checkpoint_round_trip_layout_and_pruning(tmp_path, monkeypatch):
    config, model, optimizer, schedule, scaler = _training_state(seed=0)
    rng = [capture_rng_state(torch.device("cpu"))]
    expected_draw = torch.rand(3)
    data = {"batch": 2, "batches_per_epoch": 4, "batch_size": 1, "world_size": 1}
    for step in (1, 2, 3, 4, 5):
        path = save_checkpoint(tmp_path, step, 1, model, config, optimizer, schedule, scaler, rng, data)
    assert path == tmp_path / "checkpoints" / "step-00000005"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest", "step-00000003", "step-00000004", "step-00000005",
    ]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000005\n"
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
    ]
    state = json.loads((path / "state.json").read_text())
    assert (state["step"], state["epoch"], state["data"]["batch"]) == (5, 1, 2)
    assert [g["name"] for g in state["optimizer"]["param_groups"]] == ["decay", "no_decay"]
    optimizer_keys = set(load_file(str(path / "optimizer.safetensors")))
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= optimizer_keys

    # Restore into fresh objects, with unpickling made impossible.
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    _, fresh, fresh_optimizer, fresh_schedule, fresh_scaler = _training_state(seed=1)
    loaded = load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_optimizer, fresh_schedule, fresh_scaler)
    assert (loaded.step, loaded.epoch, loaded.data, loaded.ranks) == (5, 1, data, 1)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    ours, theirs = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert isinstance(theirs["param_groups"][0]["betas"], tuple)
    for index, values in ours["state"].items():
        for key, value in values.items():
            assert torch.equal(value, theirs["state"][index][key]), (index, key)
    assert fresh_schedule.state_dict() == schedule.state_dict()
    assert torch.equal(torch.rand(3), expected_draw)  # the torch RNG continues where it was saved


def test_metrics_of_a_resumed_run_restart_after_the_checkpoint(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    # Step 3 was logged after the checkpoint of step 2; the kill tore the line of step 4.
    metrics.write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo'
    )
    logger = MetricsLogger(tmp_path, is_main=True, resume_step=2)
    logger.log(3, {"loss": 1.25, "eval": {"miou": torch.tensor(0.5), "night": None}})
    logger.close()
    assert read_metrics(tmp_path) == [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5},
        {"step": 3, "loss": 1.25, "eval": {"miou": 0.5, "night": None}},
    ]
    MetricsLogger(tmp_path, is_main=False, resume_step=0).close()  # other ranks never touch it
    assert len(read_metrics(tmp_path)) == 3


def _kill_after(process: subprocess.Popen, out, step: int, timeout: float = 90.0) -> int:
    """SIGKILL ``process`` once its latest checkpoint is at least ``step``; returns that step."""
    pointer = out / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the training process exited early with {process.returncode}")
        if pointer.exists():
            reached = int(pointer.read_text().strip().removeprefix("step-"))
            if reached >= step:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return reached
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no checkpoint of step {step} within {timeout} s")


def test_sigkilled_run_resumes_to_identical_weights(dataroot, tmp_path):
    # Batch 1 x 3 micro-batches over 4 samples: each epoch is a full step and a partial one, so
    # the resumed run must restart inside an epoch, at the right micro-batch.
    overrides = [
        "train.epochs=5", "train.batch_size=1", "train.grad_accumulation=3", "train.checkpoint_every=1",
        "train.deterministic=true", "train.seed=7", "train.optimizer.lr=0.003", "train.optimizer.warmup_steps=2",
    ]
    config = small_config(dataroot, *overrides)
    interrupted = tmp_path / "interrupted"
    # The child slows each loss call down so that the kill lands in the middle of the run.
    script = textwrap.dedent(
        f"""
        import sys, time
        import torch
        torch.set_num_threads(1)
        from bridgeta.engine import trainer
        from engine_helpers import small_config
        loss = trainer.map_segmentation_loss
        def slow(*args, **kwargs):
            time.sleep(0.1)
            return loss(*args, **kwargs)
        trainer.map_segmentation_loss = slow
        trainer.train(small_config({str(dataroot)!r}, *{overrides!r}), {str(interrupted)!r})
        """
    )
    with (tmp_path / "child.log").open("w") as log:
        child = subprocess.Popen(
            [sys.executable, "-c", script], cwd=os.path.dirname(__file__), stdout=log, stderr=log,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )
        killed_at = _kill_after(child, interrupted, step=3)
    assert child.returncode == -signal.SIGKILL
    assert killed_at < 10 and not (interrupted / "model.safetensors").exists()

    with torch_threads(1):
        resumed = train(config, interrupted, resume=True)
        reference = train(config, tmp_path / "reference")
    assert resumed["resumed_from"] == killed_at and resumed["steps"] == reference["steps"] == 10

    ours = load_file(str(interrupted / "model.safetensors"))
    theirs = load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, f"resumed weights differ from the uninterrupted run's: {different[:5]}"
    # One metrics line per step (lines the killed run wrote past its checkpoint were dropped),
    # with the uninterrupted run's losses.
    rows, reference_rows = read_metrics(interrupted), read_metrics(tmp_path / "reference")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference_rows]


def test_resumed_fused_adamw_on_a_channels_last_model_continues_exactly(tmp_path):
    """Checkpoints store contiguous moments; a channels-last model's fused AdamW must get them back
    in its parameters' layout, or its kernel pairs the wrong elements (found as a resume bug)."""

    def state(seed):
        torch.manual_seed(seed)
        config = load_config("tiny-l", SMALL_TINY_L)
        model = build_model(config).to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-2, fused=True)
        schedule = WarmupCosineSchedule(optimizer, 1, 10, 0.01)
        return config, model, optimizer, schedule, torch.amp.GradScaler("cpu", enabled=False)

    points = torch.rand(500, 5) * torch.tensor([80.0, 80.0, 4.0, 1.0, 0.0]) - torch.tensor([40.0, 40.0, 2.0, 0, 0])
    inputs = BEVInputs(batch_size=1, lidar=LidarInputs(points, torch.zeros(500, dtype=torch.long)))

    def step(model, optimizer, schedule):
        model(inputs).logits.square().mean().backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()

    config, model, optimizer, schedule, scaler = state(0)
    step(model, optimizer, schedule)
    data = {"batch": 1, "batches_per_epoch": 4, "batch_size": 1, "world_size": 1}
    save_checkpoint(tmp_path, 1, 0, model, config, optimizer, schedule, scaler, [capture_rng_state(torch.device("cpu"))], data)
    step(model, optimizer, schedule)

    _, fresh, fresh_optimizer, fresh_schedule, fresh_scaler = state(1)
    load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_optimizer, fresh_schedule, fresh_scaler)
    for parameter in fresh.parameters():
        for value in fresh_optimizer.state[parameter].values():
            if value.shape == parameter.shape:
                assert value.stride() == parameter.stride()
    step(fresh, fresh_optimizer, fresh_schedule)
    for (name, ours), theirs in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_resuming_an_earlier_versions_run_of_the_same_config_does_not_warn(dataroot, tmp_path, monkeypatch, caplog):
    """A checkpoint whose config hash an earlier version computed (other key names) resumes
    quietly when the run's config.yaml reads as the same config; a real change still warns."""
    import logging

    import yaml

    import bridgeta.engine.trainer as trainer_module

    config = small_config(dataroot, "train.max_steps=2", "train.checkpoint_every=1", "train.eval_every=0")
    with monkeypatch.context() as patch, torch_threads(1):
        patch.setattr(trainer_module, "config_hash", lambda _: "an-earlier-version")  # how it was saved
        train(config, tmp_path / "run")
    stored = tmp_path / "run" / "config.yaml"
    legacy = yaml.safe_load(stored.read_text())
    legacy["model"]["head"] = legacy["model"].pop("heads")["map"]  # the earlier key names
    longer = small_config(dataroot, "train.max_steps=3", "train.checkpoint_every=1", "train.eval_every=0")
    legacy["train"]["max_steps"] = 3
    stored.write_text(yaml.safe_dump(legacy))
    with caplog.at_level(logging.WARNING, logger="bridgeta.engine.trainer"), torch_threads(1):
        train(longer, tmp_path / "run", resume=True)
    assert "differs from the one it was saved with" not in caplog.text
    # A run whose stored config is not this one warns as before.
    changed = small_config(dataroot, "train.max_steps=4", "train.checkpoint_every=1", "train.eval_every=0",
                           "train.optimizer.lr=0.5")
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="bridgeta.engine.trainer"), torch_threads(1):
        patch.setattr(trainer_module, "config_hash", lambda _: "another")
        train(changed, tmp_path / "run", resume=True)
    assert "differs from the one it was saved with" in caplog.text
