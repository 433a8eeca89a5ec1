"""MonoTAKD through the CLI on the session's tiny world: train-assistant (imitating the teacher),
distill with it, and the exported student (the baseline plus the residual branch, SAM and FFM) through eval and ONNX."""

from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import SMALL_TINY_C, export_onnx_and_run, torch_threads, write_teacher

from bridgeta import cli
from bridgeta.engine.evaluate import evaluate_checkpoint
from bridgeta.engine.model_file import load_model_file, read_model_file

SMALL = [arg for override in SMALL_TINY_C for arg in ("--set", override)]


@pytest.fixture(scope="module")
def runs(engine_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("monotakd")
    teacher = write_teacher(root / "teacher.safetensors", engine_world, seed=4)
    common = ["--config", "distill/tiny-c-monotakd", "--dataroot", str(engine_world), *SMALL,
              "--set", "train.max_steps=2", "--set", "train.eval_every=0"]
    with torch_threads(1):
        assert cli.main(["train-assistant", *common, "--teacher", str(teacher), "--out", str(root / "assistant")]) == 0
        assert cli.main(["distill", *common, "--teacher", str(teacher), "--assistant", str(root / "assistant"),
                         "--out", str(root / "student")]) == 0
    return root


def test_the_assistant_is_the_students_camera_network_imitating_the_teacher(runs):
    config, state, kind = read_model_file(runs / "assistant")
    # A feature_kd run on the TA network: the teacher's fused BEV aligns its channels for CMRD.
    assert kind == "distiller" and config.distill.method == "feature_kd" and config.model.residual is None
    assert config.distill.teacher == str(runs / "teacher.safetensors")
    assert config.distill.weights.fld == 1.0  # distill.monotakd.assistant_imitation of the recipe
    assert config.model.camera.vtransform.depth_source == "lidar"
    assert not any(k.startswith("teacher.") for k in state)
    model, _ = load_model_file(runs / "assistant")
    assert model.modalities == ("camera", "depth")
    rows = [json.loads(line) for line in (runs / "assistant" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps and all(r["kd/feature"] > 0 for r in steps)


def test_train_assistant_without_a_teacher_stops_at_once_naming_the_option(engine_world, tmp_path, capsys):
    assert cli.main(["train-assistant", "--config", "distill/tiny-c-monotakd", "--dataroot", str(engine_world),
                     *SMALL, "--out", str(tmp_path / "ta")]) == 2
    err = capsys.readouterr().err
    assert "--teacher" in err and "distill.monotakd.assistant_imitation" in err
    assert not (tmp_path / "ta").exists()


def test_distilled_student_logs_every_term_and_exports_its_branches(runs, tmp_path, capsys):
    rows = [json.loads(line) for line in (runs / "student" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert {"kd/imd", "kd/cmrd", "kd/logit", "share/kd/imd", "share/kd/cmrd"} <= set(steps[-1])
    capsys.readouterr()
    exported = tmp_path / "student.safetensors"
    assert cli.main(["export", "--checkpoint", str(runs / "student"), "--out", str(exported)]) == 0
    config, state, kind = read_model_file(exported)
    assert kind == "model" and config.model.residual is not None
    assert any(k.startswith("residual_branch.sam.") for k in state) and any(k.startswith("feature_fusion.") for k in state)
    assert not any(k.startswith(("teacher.", "assistant.", "student.")) for k in state)
    # The export is the run's student, weight for weight (its residual branch and FFM included).
    exported_model, _ = load_model_file(exported)
    run_model, _ = load_model_file(runs / "student")
    ours, theirs = exported_model.state_dict(), run_model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # The exported file round-trips through eval: the same numbers as the run itself.
    from_export = evaluate_checkpoint(exported, split="val", device="cpu")
    from_run = evaluate_checkpoint(runs / "student", split="val", device="cpu")
    assert from_export["iou"] == from_run["iou"] and from_export["samples"] > 0


def test_the_monotakd_student_exports_to_onnx_with_parity(runs, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    session, inputs, expected = export_onnx_and_run(runs / "student", tmp_path / "student.onnx")
    assert (session(inputs).logits - expected.logits).abs().max().item() < 1e-4


def test_distill_refuses_an_assistant_for_another_method(engine_world, tmp_path, capsys):
    assert cli.main(["distill", "--config", "distill/tiny-c-bridgeta", "--dataroot", str(engine_world),
                     "--teacher", str(tmp_path / "t"), "--assistant", str(tmp_path / "a"),
                     "--out", str(tmp_path / "run")]) == 2
    assert "--assistant is MonoTAKD's" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_distill_refuses_an_assistant_that_imitated_another_teacher(runs, engine_world, tmp_path, capsys):
    other = write_teacher(tmp_path / "other.safetensors", engine_world, seed=5)
    assert cli.main(["distill", "--config", "distill/tiny-c-monotakd", "--dataroot", str(engine_world), *SMALL,
                     "--teacher", str(other), "--assistant", str(runs / "assistant"),
                     "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "distill.monotakd.assistant" in err and "imitate the teacher" in err and str(other) in err
    assert not (tmp_path / "run").exists()


def test_a_copy_of_the_imitated_teacher_is_the_same_teacher(runs, tmp_path):
    import shutil
    from dataclasses import replace

    from bridgeta.engine.trainer import check_assistant_teacher

    config, _, _ = read_model_file(runs / "assistant")
    copy = shutil.copy(runs / "teacher.safetensors", tmp_path / "copy.safetensors")
    check_assistant_teacher(config, str(copy), "ta")  # the same bytes elsewhere: accepted
    check_assistant_teacher(config, str(runs / "teacher.safetensors"), "ta")
    moved = replace(config, distill=replace(config.distill, teacher=str(tmp_path / "gone.safetensors")))
    check_assistant_teacher(moved, str(copy), "ta")  # a recorded teacher that is gone: only logged
