"""The staged cpu protocol end to end on a tiny world: pretraining, teacher and baselines with
validation curves, the fair sweep, test seeds at the chosen lambda, and the fields tools read."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bridgeta.bench import accuracy
from bridgeta.bench import distill as bench_distill
from bridgeta.config import load_config
from engine_helpers import SMALL_TINY_C, SMALL_TINY_LC


def _preset() -> accuracy.AccuracyPreset:
    protocol = bench_distill.Protocol(
        student_steps=2, teacher_steps=2, curve_points=2, teacher_seeds=1,
        student_overrides=tuple(SMALL_TINY_C), teacher_overrides=tuple(SMALL_TINY_LC),
    )
    return replace(
        accuracy.PRESETS["cpu"], protocol=protocol, methods=("baseline", "direct", "bridgeta"),
        seeds={"baseline": 2, "direct": 2, "bridgeta": 1}, default_seeds=1, pretrain_steps=2,
        lambdas=(0.0, 1.0), sweep_seeds=1, scratch=("baseline",),
    )


def test_staged_protocol_end_to_end(engine_world, tmp_path, monkeypatch):
    preset = _preset()
    out, work = tmp_path / "results" / "accuracy", tmp_path / "work"
    result = accuracy.run_staged("test", out, work, engine_world, preset=preset)

    protocol = result["protocol"]
    assert protocol["test_scenes"] == 1 and protocol["student_steps"] == 2
    assert protocol["pretrained"] == str(work / "backbone" / "backbone.safetensors")
    # Every camera branch starts from the pretrained backbone, except the scratch baselines.
    runs = work / "runs"
    for run in ("tiny-lc-seed0", "tiny-c-seed0", f"tiny-c-bridgeta-lam{protocol['lambdas']['bridgeta']:g}-seed0"):
        stored = load_config(str(runs / run / "config.yaml"))
        assert stored.model.camera.backbone.pretrained == protocol["pretrained"], run
    assert load_config(str(runs / "scratch" / "tiny-c-seed0" / "config.yaml")).model.camera.backbone.pretrained is None

    # Curves: validation at every step // curve_points steps, for seed 0 of teacher and baseline.
    assert [step for step, _ in result["convergence"]["baseline"]] == [1, 2]
    assert [step for step, _ in result["convergence"]["teacher"]] == [1, 2]

    # The sweep: both methods at both lambdas on the validation towns; direct's lambda 0 is the
    # baseline's own run, BridgeTA's lambda 0 trains its TA.
    sweep = json.loads((tmp_path / "results" / "distill_sweep.json").read_text())
    points = {(p["method"], p["lambda"]): p for p in sweep["points"]}
    assert set(points) == {("bridgeta", 0.0), ("bridgeta", 1.0), ("direct", 0.0), ("direct", 1.0)}
    assert points[("direct", 0.0)]["runs"] == ["tiny-c-seed0"]
    assert points[("bridgeta", 0.0)]["runs"] == ["tiny-c-bridgeta-lam0-seed0"]
    for method, lam in sweep["chosen"].items():
        best = max(p["val_miou"] for p in sweep["points"] if p["method"] == method)
        assert points[(method, lam)]["val_miou"] == best

    # The table: seeds per method, paired deltas against the same seeds, the TA's own mIoU.
    table = result["table"]
    assert table["baseline"]["seeds"] == [0, 1] and table["direct"]["seeds"] == [0, 1]
    assert table["bridgeta"]["seeds"] == [0] and table["teacher"]["seeds"] == [0]
    assert table["baseline_scratch"]["seeds"] == [0, 1]
    by_seed = {r["seed"]: r["test"]["miou"] for r in result["runs"]["baseline"]}
    deltas = [r["test"]["miou"] - by_seed[r["seed"]] for r in result["runs"]["direct"]]
    assert table["direct"]["paired_vs_baseline"]["mean"] == pytest.approx(sum(deltas) / 2)
    assert table["direct"]["paired_vs_baseline"]["n"] == 2
    assert table["bridgeta"]["paired_vs_direct"]["n"] == 1
    assert 0.0 <= table["bridgeta"]["assistant_val_miou"]["mean"] <= 1.0
    assert set(result["learned_classes"]) <= set(table["teacher"]["iou"])
    assert result["camera_fusion_ratio"] == pytest.approx(table["baseline"]["miou"]["mean"] / table["teacher"]["miou"]["mean"])
    assert (out / "table.md").read_text().startswith("| method |")

    # A second call reuses every finished run: nothing trains again.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("bridgeta.engine.trainer.train", refuse)
    again = accuracy.run_staged("test", out, work, engine_world, preset=preset)
    assert again["table"]["bridgeta"]["miou"] == table["bridgeta"]["miou"]
