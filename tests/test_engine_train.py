"""``bridgeta.engine.trainer.train`` on a tiny synthetic world: outputs, schedule, overfit, NaN stop.

The world (4 training samples) is the session fixture ``engine_world`` (conftest.py); the narrow
``tiny-l`` variant and the other helpers live in ``engine_helpers.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from engine_helpers import SMALL_TINY_L, read_metrics, small_config

from bridgeta.config import load_config, to_dict
from bridgeta.engine import trainer as trainer_module
from bridgeta.engine.checkpoint import latest_checkpoint
from bridgeta.engine.model_file import load_model_file
from bridgeta.engine.schedule import WarmupCosineSchedule, lr_factor
from bridgeta.precision import autocast_dtype, cpu_has_native_bf16, use_channels_last
from bridgeta.engine.trainer import parameter_groups, train
from bridgeta.models.bev_model import BEVModel, build_model

@pytest.fixture(scope="module")
def dataroot(engine_world):
    return engine_world


# ----------------------------------------------------------------------------------------------
# Building blocks


def test_schedule_matches_the_hand_formula():
    warmup, total, ratio, base = 3, 10, 0.1, 2.0
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=base)
    schedule = WarmupCosineSchedule(optimizer, warmup, total, ratio)
    seen = []
    for _ in range(total + 2):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [base * (k + 1) / warmup for k in range(warmup)]
    expected += [
        base * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))))
        for k in range(warmup, total)
    ]
    expected += [base * ratio] * 2  # past the end: stays at the floor
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[warmup] == pytest.approx(base)  # the first cosine step is the peak
    assert lr_factor(0, 0, 5, 0.0) == 1.0  # no warm-up: start at the full rate

    # Resuming with a longer schedule keeps the step count but follows the new settings.
    state = json.loads(json.dumps(schedule.state_dict()))
    assert "total_steps" not in state
    longer = WarmupCosineSchedule(optimizer, warmup, 2 * total, ratio)
    longer.load_state_dict(state)
    assert longer.last_epoch == total + 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(base * lr_factor(total + 2, warmup, 2 * total, ratio))


def test_no_weight_decay_on_biases_and_norms():
    model = build_model(load_config("tiny-l", SMALL_TINY_L))
    decay, no_decay = parameter_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert all(id(m.weight) in no_decay_ids and id(m.bias) in no_decay_ids for m in norms)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_precision_resolution():
    cpu = torch.device("cpu")
    # bf16 only where the CPU computes it natively; emulated bf16 is slower than fp32.
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("fp16", cpu) is torch.float16
    # Channels-last follows bf16 on the CPU; explicit settings win; contiguous elsewhere.
    assert use_channels_last("auto", "bf16", cpu) and not use_channels_last("auto", "fp32", cpu)
    assert use_channels_last("auto", "auto", cpu) == cpu_has_native_bf16()
    assert use_channels_last("channels_last", "fp32", cpu) and not use_channels_last("contiguous", "bf16", cpu)
    assert not use_channels_last("auto", "bf16", torch.device("cuda"))
    with pytest.raises(ValueError, match="memory_format"):
        use_channels_last("nhwc", "fp32", cpu)


# ----------------------------------------------------------------------------------------------
# Runs


def test_validation_every_n_steps_draws_a_curve_without_repeats(dataroot, tmp_path):
    """``train.eval_every_steps`` validates inside epochs too; a step that is also an epoch end
    or the last step is validated once."""
    config = small_config(
        dataroot, "train.epochs=2", "train.batch_size=1", "train.eval_every=1", "train.eval_every_steps=3",
    )
    seen = []

    def evaluate(model, cfg, split):
        seen.append(len(seen))
        return {"miou": float(len(seen))}

    train(config, tmp_path / "run", evaluate_fn=evaluate)
    evals = [(r["step"], r["eval"]["miou"]) for r in read_metrics(tmp_path / "run") if "eval" in r]
    # 4 samples at batch 1: epochs end at steps 4 and 8; every 3 steps adds 3 and 6.
    assert [step for step, _ in evals] == [3, 4, 6, 8]
    assert [miou for _, miou in evals] == [1.0, 2.0, 3.0, 4.0]


def test_train_writes_a_complete_run_directory(dataroot, tmp_path):
    # Two persistent loader workers: the same loader serves both epochs.
    config = small_config(
        dataroot, "train.epochs=2", "train.batch_size=2", "train.eval_every=1", "train.checkpoint_every=0",
        "train.num_workers=2",
    )
    calls = []

    def evaluate(model, cfg, split):
        calls.append((type(model), cfg, split))
        return {"miou": 0.25 * len(calls), "iou": {"drivable_area": torch.tensor(0.5)}}

    out = tmp_path / "run"
    summary = train(config, out, evaluate_fn=evaluate)

    # 4 samples / batch 2 = 2 steps per epoch; an evaluation after each epoch, none repeated.
    assert summary["steps"] == 4 and summary["epochs"] == 2.0 and summary["resumed_from"] is None
    assert summary["eval"]["miou"] == 0.5 and summary["step_time_s"] > 0
    assert [c[0] for c in calls] == [BEVModel, BEVModel]  # the bare model, never a wrapper
    assert all(c[1] is config and c[2] == "val" for c in calls)

    assert yaml.safe_load((out / "config.yaml").read_text()) == to_dict(config)
    rows = read_metrics(out)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["epoch"] for r in steps] == [0, 0, 1, 1]
    terms = [f"focal/{name}" for name in config.model.heads.map.classes]
    for row in steps:
        assert {"lr", "loss", "samples_per_s", "grad_norm", "step_time_s", *terms} <= set(row)
        assert row["loss"] == pytest.approx(sum(row[t] for t in terms))
    assert steps[0]["lr"] < steps[1]["lr"]  # warming up
    assert [(r["step"], r["epoch"], r["eval"]["miou"]) for r in evals] == [(2, 0, 0.25), (4, 1, 0.5)]
    assert evals[0]["eval"]["iou"] == {"drivable_area": 0.5}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "eval/miou", "eval/iou/drivable_area", *terms} <= tags
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]

    # Checkpoints at the end of each epoch; the final weights equal the last one's.
    assert latest_checkpoint(out).name == "step-00000004"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000002", "step-00000004"]
    model, loaded_config = load_model_file(out / "model.safetensors")
    assert loaded_config == config
    final = load_file(str(out / "model.safetensors"))
    last = load_file(str(out / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)

    with pytest.raises(FileExistsError, match="--resume"):
        train(config, out)


def test_max_steps_accumulation_and_bf16(dataroot, tmp_path):
    # Batch 1 x 3 micro-batches: an epoch of 4 batches is one full and one partial step.
    config = small_config(
        dataroot, "train.epochs=5", "train.batch_size=1", "train.grad_accumulation=3",
        "train.max_steps=3", "train.precision=bf16",
    )
    summary = train(config, tmp_path / "run")
    assert summary["steps"] == 3 and summary["epochs"] == 1.5
    assert math.isfinite(summary["final_loss"])
    rows = read_metrics(tmp_path / "run")
    assert [(r["step"], r["epoch"]) for r in rows] == [(1, 0), (2, 0), (3, 1)]
    # Global batch of each step: 3 samples, then the epoch's remaining 1, then 3.
    ratios = [r["samples_per_s"] * r["step_time_s"] for r in rows]
    assert ratios == pytest.approx([3, 1, 3])
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert (state["epoch"], state["data"]["batch"]) == (1, 3)  # mid-epoch: 3 of 4 batches used


def test_overfits_two_samples(dataroot, tmp_path):
    config = small_config(
        dataroot, "data.load_interval=2", "data.augment.image=false", "data.augment.bev=false",
        "train.batch_size=2", "train.epochs=30", "train.checkpoint_every=30",
        "train.optimizer.lr=0.01", "train.optimizer.warmup_steps=3",
    )
    summary = train(config, tmp_path / "run")
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert summary["steps"] == 30 and len(losses) == 30
    assert losses[-1] < 0.4 * losses[0], losses
    assert losses[-1] < min(losses[:20])


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(dataroot, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = trainer_module.map_segmentation_loss

    def poisoned(logits, targets, classes):
        terms = original(logits, targets, classes)
        calls["n"] += 1
        if calls["n"] == 3:
            terms["focal/walkway"] = terms["focal/walkway"] * float("nan")
        return terms

    monkeypatch.setattr(trainer_module, "map_segmentation_loss", poisoned)
    config = small_config(dataroot, "train.epochs=2", "train.batch_size=1", "train.checkpoint_every=1")
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"step 3 \(epoch 0\): focal/walkway=nan") as error:
        train(config, out)
    assert "step-00000002" in str(error.value)
    assert latest_checkpoint(out).name == "step-00000002"
    assert not (out / "checkpoints" / "step-00000003").exists()
    assert not (out / "model.safetensors").exists()
    weights = load_file(str(out / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_data_position_after_steps_with_accumulation():
    # 5 micro-batches per epoch, 2 per step: steps take 2, 2, then the 1 left (3 steps an epoch).
    assert [trainer_module.data_position(s, 5, 2) for s in (0, 1, 2, 3, 4, 7)] == [
        (0, 0), (0, 2), (0, 4), (1, 0), (1, 2), (2, 2)]
    assert trainer_module.data_position(266, 360, 1) == (0, 266)


def test_a_run_started_at_a_data_step_sees_what_a_run_from_the_start_sees_there(dataroot, tmp_path, monkeypatch):
    """``train.data_start_step`` (a later TinyBEV stage going on to new samples): its steps take
    the samples, in order and across an epoch's end, that a run from step 0 takes at those steps."""
    seen: list[list[str]] = []
    original = trainer_module._Trainer._micro_step

    def recording(self, inputs, labels, group_size, sync, metas=None):
        seen[-1].append(tuple(meta["token"] for meta in metas))
        return original(self, inputs, labels, group_size, sync, metas=metas)

    monkeypatch.setattr(trainer_module._Trainer, "_micro_step", recording)
    common = ["train.batch_size=1", "train.eval_every=0", "train.epochs=3"]
    seen.append([])
    whole = train(small_config(dataroot, *common, "train.max_steps=6"), tmp_path / "whole")
    seen.append([])
    later = train(small_config(dataroot, *common, "train.max_steps=3", "train.data_start_step=3"), tmp_path / "later")
    per_epoch = whole["steps"] / whole["epochs"]
    assert per_epoch == 4 and later["steps"] == 3  # the step count and schedule still start at 0
    assert seen[1] == seen[0][3:6]  # the last sample of epoch 0, then epoch 1's first two
    assert len(set(seen[0][:4])) == 4  # an epoch is every sample once: the check sees a real order
