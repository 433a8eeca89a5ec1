"""Distillation through the trainer and the CLI: runs, model files, exact resume, export, plot-gap.

A narrow ``tiny-c`` student and a matching untrained ``tiny-lc`` teacher (``engine_helpers.py``)
on the session's synthetic world (``engine_world``, 4 training samples): a step takes about half
a second on one CPU thread. One BridgeTA run and one direct (w/o TA) run are shared by the module.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from engine_helpers import (
    SMALL_TINY_C,
    distill_config,
    read_metrics,
    small_config,
    small_student_config,
    small_teacher_config,
    torch_threads,
    write_teacher,
)

from bridgeta import cli
from bridgeta.distill import build_distiller
from bridgeta.engine.evaluate import evaluate_checkpoint
from bridgeta.engine.model_file import read_model_file
from bridgeta.engine.trainer import train
from bridgeta.models.bev_model import build_model

LEVELS = ("fld", "dld", "lld")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dataroot(engine_world):
    return engine_world


@pytest.fixture(scope="module")
def teacher(dataroot, tmp_path_factory):
    """An untrained, seeded fusion teacher file (and its bytes, to prove nothing rewrites it)."""
    path = write_teacher(tmp_path_factory.mktemp("teacher") / "teacher.safetensors", dataroot, seed=3)
    return path, path.read_bytes()


def _run(config, out):
    with torch_threads(1):
        return train(config, out)


@pytest.fixture(scope="module")
def bridgeta_run(dataroot, teacher, tmp_path_factory):
    config = distill_config(dataroot, teacher[0], "train.max_steps=3")
    out = tmp_path_factory.mktemp("bridgeta") / "run"
    return config, out, _run(config, out)


@pytest.fixture(scope="module")
def direct_run(dataroot, teacher, tmp_path_factory):
    config = distill_config(dataroot, teacher[0], "train.max_steps=2", recipe="distill/tiny-c-direct")
    out = tmp_path_factory.mktemp("direct") / "run"
    return config, out, _run(config, out)


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------
# Runs


def test_bridgeta_run_logs_every_term_and_saves_student_and_assistant(bridgeta_run, teacher):
    config, out, summary = bridgeta_run
    assert summary["method"] == "bridgeta" and summary["steps"] == 3
    assert math.isfinite(summary["final_loss"])

    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]  # log_every=1
    classes = config.model.heads.map.classes
    terms = [f"seg/{c}" for c in classes] + [f"ta_seg/{c}" for c in classes]
    terms += ["kd/fld", "kd/dld", "kd/lld", "kd/lld_aux"]
    diagnostics = [f"{level}/{name}" for level in LEVELS for name in ("epsilon", "ta2s", "t2ta", "gap_l2")]
    low, high = config.distill.epsilon_range
    for row in rows:
        missing = [k for k in terms + diagnostics if k not in row]
        assert not missing, f"step {row['step']} lacks {missing}"
        bad = {k: row[k] for k in terms + diagnostics if not _finite_number(row[k])}
        assert not bad, f"step {row['step']}: non-finite {bad}"
        assert row["loss"] == pytest.approx(sum(row[t] for t in terms), rel=1e-5)
        for level in LEVELS:
            assert low - 1e-6 <= row[f"{level}/epsilon"] <= high + 1e-6
            assert row[f"{level}/gap_l2"] > 0 and row[f"{level}/ta2s"] >= 0 and row[f"{level}/t2ta"] >= 0
        # Every loss group's share of the total is logged, and the shares add up to one.
        shares = {k: v for k, v in row.items() if k.startswith("share/")}
        assert set(shares) == {"share/seg", "share/ta_seg", "share/kd/fld", "share/kd/dld",
                               "share/kd/lld", "share/kd/lld_aux"}
        assert sum(shares.values()) == pytest.approx(1.0, rel=1e-6)
        seg = sum(row[f"seg/{c}"] for c in classes)
        assert shares["share/seg"] == pytest.approx(seg / row["loss"], rel=1e-6)
        # No other training term sneaks in (e.g. the teacher's own loss, focal/ of a bare model).
        assert not [k for k in row if k.startswith(("focal/", "kd/relational"))]

    _, state, kind = read_model_file(out / "model.safetensors")
    assert kind == "distiller"
    assert any(k.startswith("student.") for k in state) and any(k.startswith("assistant.") for k in state)
    assert not [k for k in state if k.startswith("teacher.")]
    assert all(k.startswith(("student.", "assistant.")) for k in state)
    # The student part is exactly the baseline architecture the config describes.
    baseline = build_model(config).state_dict()
    student = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    assert {k: v.shape for k, v in student.items()} == {k: v.shape for k, v in baseline.items()}
    # Checkpoints never hold the teacher either.
    checkpoint = load_file(str(out / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert checkpoint.keys() == state.keys()

    path, original = teacher
    assert path.read_bytes() == original  # the frozen teacher file is only read


def test_direct_run_logs_gaps_and_has_no_assistant(direct_run, teacher):
    config, out, summary = direct_run
    assert summary["method"] == "direct" and summary["steps"] == 2
    rows = read_metrics(out)
    assert len(rows) == 2
    for row in rows:
        for level in LEVELS:
            assert _finite_number(row[f"{level}/gap_l2"]) and row[f"{level}/gap_l2"] > 0
            assert f"{level}/epsilon" not in row  # no assistant, no eps*
        assert {"kd/fld", "kd/dld", "kd/lld"} <= set(row)
        assert not [k for k in row if k.startswith("ta_seg/")]
    _, state, kind = read_model_file(out / "model.safetensors")
    assert kind == "distiller"
    assert state and all(k.startswith("student.") for k in state)
    assert teacher[0].read_bytes() == teacher[1]


def test_distill_resume_gives_identical_student_and_assistant(dataroot, teacher, tmp_path):
    # Batch 1 over 4 samples: the interrupted run stops inside epoch 0 (3 of 4 batches), and the
    # resumed one has to continue at the right micro-batch and then cross into epoch 1.
    overrides = [
        "train.deterministic=true", "train.seed=7", "train.checkpoint_every=1", "train.batch_size=1",
        "train.optimizer.lr=0.003", "train.optimizer.warmup_steps=2",
    ]
    full = distill_config(dataroot, teacher[0], *overrides, "train.max_steps=6")
    first_half = distill_config(dataroot, teacher[0], *overrides, "train.max_steps=3")
    with torch_threads(1):
        reference = train(full, tmp_path / "a")
        stopped = train(first_half, tmp_path / "b")
        resumed = train(full, tmp_path / "b", resume=True)
    assert stopped["steps"] == 3 and reference["steps"] == resumed["steps"] == 6
    assert resumed["resumed_from"] == 3

    ours = load_file(str(tmp_path / "b" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert any(k.startswith("assistant.") for k in ours) and any(k.startswith("student.") for k in ours)
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"resumed weights differ from the uninterrupted run's: {different[:5]}"
    # The resumed run continued with the same losses and the same diagnostics.
    rows, reference_rows = read_metrics(tmp_path / "b"), read_metrics(tmp_path / "a")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["epoch"] for r in rows] == [0, 0, 0, 0, 1, 1]
    for key in ("loss", "kd/fld", "lld/epsilon", "dld/gap_l2"):
        assert [r[key] for r in rows] == [r[key] for r in reference_rows], key


# ----------------------------------------------------------------------------------------------
# export and eval


def test_export_writes_the_bare_student(bridgeta_run, dataroot, tmp_path, capsys):
    config, out, _ = bridgeta_run
    exported = tmp_path / "student.safetensors"
    assert cli.main(["export", "--checkpoint", str(out), "--out", str(exported)]) == 0
    assert str(exported) in capsys.readouterr().out

    loaded_config, state, kind = read_model_file(exported)
    assert kind == "model"
    expected = build_model(loaded_config).state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected.items()}
    assert not [k for k in state if k.startswith(("assistant.", "teacher.", "student."))]
    assert loaded_config.model == config.model
    # The weights are the trained student's, unchanged.
    distiller_state = load_file(str(out / "model.safetensors"))
    for key, value in state.items():
        assert torch.equal(value, distiller_state[f"student.{key}"]), key

    # eval reads the run (a distiller file) as its student: the same numbers as the export.
    assert cli.main(["eval", "--checkpoint", str(exported), "--split", "val", "--json"]) == 0
    from_export = json.loads(capsys.readouterr().out)
    from_run = evaluate_checkpoint(out, split="val", device="cpu")
    assert from_export["split"] == from_run["split"] == "val" and from_export["samples"] > 0
    assert from_export["miou"] == pytest.approx(from_run["miou"], abs=0)
    assert from_export["iou"] == from_run["iou"]

    # An existing output is kept unless --force.
    before = exported.read_bytes()
    assert cli.main(["export", "--checkpoint", str(out), "--out", str(exported)]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and len(err.strip().splitlines()) == 1
    assert exported.read_bytes() == before
    assert cli.main(["export", "--checkpoint", str(out), "--out", str(exported), "--force"]) == 0
    assert read_model_file(exported)[2] == "model"


def test_onnx_export_of_a_distilled_run_has_the_same_miou(bridgeta_run, tmp_path, capsys):
    """``export --format onnx`` on a BridgeTA run: the student alone, and onnxruntime gives the
    same logits (max abs < 1e-4) and the same mIoU as PyTorch on the world's validation town."""
    from bridgeta.engine.deploy import OnnxStudent
    from bridgeta.engine.evaluate import build_eval_loader, evaluate
    from bridgeta.engine.model_file import load_model_file

    config, out, _ = bridgeta_run
    exported = tmp_path / "student.onnx"
    with torch_threads(1):
        assert cli.main(["export", "--format", "onnx", "--checkpoint", str(out), "--out", str(exported)]) == 0
    printed = capsys.readouterr().out
    assert str(exported) in printed and "opset 17" in printed
    session = OnnxStudent(exported, threads=1)
    assert session.metadata["image_size"] == list(config.model.camera.image_size)

    student, student_config = load_model_file(out)
    loader = build_eval_loader(student_config, student, "val", batch_size=1, num_workers=0, distributed=False)
    largest = 0.0
    with torch.no_grad(), torch_threads(1):
        for inputs, _, _ in loader:
            expected = student.eval()(inputs).logits
            largest = max(largest, (session(inputs).logits - expected).abs().max().item())
        from_torch = evaluate(student, loader, "cpu", student.classes)
        from_onnx = evaluate(session, loader, "cpu", session.classes)
    assert largest < 1e-4
    assert from_onnx["samples"] == from_torch["samples"] > 0
    # The same up to the few cells whose probability lies within ~1e-7 of one of the metric's
    # thresholds: such a cell can land on either side, moving an IoU by 1 / (cells in its union).
    assert from_onnx["miou"] == pytest.approx(from_torch["miou"], abs=1e-4)
    assert from_onnx["iou"] == pytest.approx(from_torch["iou"], abs=1e-4)

    # Like the safetensors export, an existing file is kept unless --force.
    before = exported.read_bytes()
    assert cli.main(["export", "--format", "onnx", "--checkpoint", str(out), "--out", str(exported)]) == 2
    assert "--force" in capsys.readouterr().err and exported.read_bytes() == before
    plain = tmp_path / "student.safetensors"
    assert cli.main(["export", "--checkpoint", str(out), "--out", str(plain), "--batch-size", "2"]) == 2
    assert "--format onnx" in capsys.readouterr().err and not plain.exists()


def test_export_of_a_missing_checkpoint_exits_2(tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x.st")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.st").exists()


# ----------------------------------------------------------------------------------------------
# plot-gap


def test_plot_gap_draws_both_runs(bridgeta_run, direct_run, tmp_path, capsys):
    png = tmp_path / "plots" / "gap.png"
    argv = ["plot-gap", str(bridgeta_run[1]), str(direct_run[1]), "--out", str(png)]
    assert cli.main(argv) == 0
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert str(png) in capsys.readouterr().out

    labelled = tmp_path / "labelled.png"
    argv = ["plot-gap", str(bridgeta_run[1]), str(direct_run[1]), "--out", str(labelled), "--labels", "ta", "direct"]
    assert cli.main(argv) == 0 and labelled.read_bytes().startswith(PNG_SIGNATURE)
    # One label for two runs is refused before anything is drawn.
    wrong = tmp_path / "wrong.png"
    argv = ["plot-gap", str(bridgeta_run[1]), str(direct_run[1]), "--out", str(wrong), "--labels", "one"]
    assert cli.main(argv) == 2 and not wrong.exists()
    assert "labels" in capsys.readouterr().err


def test_plot_gap_refuses_runs_without_gaps(dataroot, tmp_path, capsys):
    baseline = tmp_path / "baseline"
    train(small_config(dataroot, "train.max_steps=1"), baseline)
    assert read_metrics(baseline)  # a real run directory with metrics, just no gap values
    capsys.readouterr()
    png = tmp_path / "gap.png"
    assert cli.main(["plot-gap", str(baseline), "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert "gap_l2" in err and len(err.strip().splitlines()) == 1
    assert not png.exists()

    assert cli.main(["plot-gap", str(tmp_path / "missing"), "--out", str(png)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    assert not png.exists()


# ----------------------------------------------------------------------------------------------
# CLI errors


def _distill_argv(dataroot, out, *extra: str) -> list[str]:
    argv = ["distill", "--out", str(out), "--dataroot", str(dataroot), *extra]
    for override in SMALL_TINY_C:
        argv += ["--set", override]
    return argv


def test_distill_cli_refuses_bad_configs_and_teachers(dataroot, teacher, tmp_path, capsys):
    out = tmp_path / "run"
    # A plain preset: no distill section (with and without --teacher).
    assert cli.main(_distill_argv(dataroot, out, "--config", "tiny-c")) == 2
    assert "'distill'" in capsys.readouterr().err
    assert cli.main(_distill_argv(dataroot, out, "--config", "tiny-c", "--teacher", str(teacher[0]))) == 2
    assert "distill" in capsys.readouterr().err
    # A recipe without --teacher.
    assert cli.main(_distill_argv(dataroot, out, "--config", "distill/tiny-c-bridgeta")) == 2
    err = capsys.readouterr().err
    assert "distill.teacher" in err and "--teacher" in err
    # A teacher that does not exist.
    missing = tmp_path / "no-teacher.safetensors"
    assert cli.main(_distill_argv(dataroot, out, "--config", "distill/tiny-c-bridgeta", "--teacher", str(missing))) == 2
    err = capsys.readouterr().err
    assert "distill.teacher" in err and str(missing) in err and len(err.strip().splitlines()) == 1
    # A file that is not a model file.
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    assert cli.main(_distill_argv(dataroot, out, "--config", "distill/tiny-c-direct", "--teacher", str(junk))) == 2
    assert "distill.teacher" in capsys.readouterr().err
    assert not out.exists()  # nothing was started


def test_distill_cli_runs_a_recipe_with_the_given_teacher(dataroot, teacher, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _distill_argv(
        dataroot, out, "--config", "distill/tiny-c-direct", "--teacher", str(teacher[0]),
        "--set", "train.max_steps=1", "--set", "distill.teacher=/elsewhere/ignored.safetensors",
    )
    with torch_threads(1):
        assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "direct" and summary["steps"] == 1
    assert summary["eval"]["split"] == "val" and math.isfinite(summary["eval"]["miou"])
    # --teacher wins over a --set of the same key, and the run records where its teacher was.
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["distill"]["teacher"] == str(teacher[0])
    assert written["distill"]["method"] == "direct"
    assert read_model_file(out / "model.safetensors")[2] == "distiller"


# ----------------------------------------------------------------------------------------------
# Distiller units


def _pair(dataroot, *teacher_overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    student_config = small_student_config(dataroot)
    student = build_model(student_config)
    teacher = build_model(small_teacher_config(dataroot, *teacher_overrides))
    return student_config, student, teacher


def test_teacher_with_other_image_size_is_refused(dataroot, teacher):
    _, student, other = _pair(dataroot, "model.camera.image_size=[64,176]")
    config = distill_config(dataroot, teacher[0])
    with pytest.raises(ValueError, match=r"\(64, 176\).*\(32, 88\)"):
        build_distiller(config, student, other)


def test_distiller_state_dict_leaves_the_teacher_out(dataroot, teacher):
    config = distill_config(dataroot, teacher[0])
    _, student, fusion = _pair(dataroot)
    distiller = build_distiller(config, student, fusion)
    state = distiller.state_dict()
    assert state and not [k for k in state if k.startswith("teacher.")]
    assert {k.split(".", 1)[0] for k in state} == {"student", "assistant"}
    # Nested (as under DDP's ``module.``): the prefixed teacher keys are dropped too.
    wrapper = torch.nn.Module()
    wrapper.module = distiller
    nested = wrapper.state_dict()
    assert set(nested) == {f"module.{k}" for k in state}

    # Its own state loads back strictly into a fresh distiller with another teacher.
    _, student2, fusion2 = _pair(dataroot, seed=1)
    fresh = build_distiller(config, student2, fusion2)
    teacher_before = {k: v.clone() for k, v in fusion2.state_dict().items()}
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(v, fusion2.state_dict()[k]) for k, v in teacher_before.items())

    with pytest.raises(ValueError, match="teacher"):
        fresh.load_state_dict({**state, "teacher.x": torch.zeros(1)})
    assistant_key = next(k for k in state if k.startswith("assistant."))
    partial = {k: v for k, v in state.items() if k != assistant_key}
    with pytest.raises(RuntimeError, match="missing"):
        fresh.load_state_dict(partial)
    with pytest.raises(RuntimeError, match="unexpected"):
        fresh.load_state_dict({**state, "assistant.extra": torch.zeros(1)})
    result = fresh.load_state_dict(partial, strict=False)
    assert result.missing_keys == [assistant_key] and not result.unexpected_keys


def test_training_diagnostics_average_the_last_quarter_and_range_epsilon(bridgeta_run):
    from bridgeta.engine.logging import read_metrics as read_run_metrics
    from bridgeta.engine.logging import training_diagnostics

    rows = [{"step": 0, "eval": {"miou": 0.1}}]  # evaluation rows are skipped
    rows += [{"step": s, "loss": 1.0, "share/seg": s / 8, "share/kd/fld": 1 - s / 8, "fld/epsilon": e}
             for s, e in zip(range(1, 9), (3.0, 0.5, 1.0, 2.0, 1.5, 0.7, 0.9, 1.1))]
    summary = training_diagnostics(rows)
    assert summary["rows"] == 8
    assert summary["shares"] == pytest.approx({"seg": 7.5 / 8, "kd/fld": 0.5 / 8})  # steps 7 and 8
    assert summary["epsilon"] == {"fld": {"min": 0.5, "median": 1.1, "max": 3.0}}

    config, out, _ = bridgeta_run
    summary = training_diagnostics(read_run_metrics(out))
    assert sum(summary["shares"].values()) == pytest.approx(1.0, rel=1e-6)
    low, high = config.distill.epsilon_range
    assert set(summary["epsilon"]) == set(LEVELS)
    assert all(low - 1e-6 <= e["min"] <= e["median"] <= e["max"] <= high + 1e-6 for e in summary["epsilon"].values())


def test_the_assistant_is_evaluated_from_the_run_file_as_trained(bridgeta_run, dataroot):
    """``evaluate_assistant`` rebuilds the TA from the distiller file and the run's teacher: its
    metrics equal those of the trained TA evaluated in memory, batch by batch (MapMetric)."""
    from bridgeta.distill.bridgeta import AssistantView
    from bridgeta.engine.evaluate import build_eval_loader, evaluate, evaluate_assistant
    from bridgeta.engine.trainer import load_teacher

    config, out, _ = bridgeta_run
    _, state, _ = read_model_file(out / "model.safetensors")
    distiller = build_distiller(config, build_model(config), load_teacher(config))
    distiller.load_state_dict(state)
    view = AssistantView(distiller)
    with torch_threads(1):
        loader = build_eval_loader(config, view, "val", 2, 0, distributed=False)
        expected = evaluate(view, loader, "cpu", view.classes)
        measured = evaluate_assistant(out / "model.safetensors", split="val")
    assert measured["iou"] == pytest.approx(expected["iou"], abs=1e-6)
    assert measured["samples"] == expected["samples"] > 0
    # The view is the TA of training: teacher LiDAR BEV and student camera BEV in, TA logits out.
    inputs, _, _ = next(iter(loader))
    view.eval()
    with torch.no_grad():
        teacher_out, student_out = distiller.teacher(inputs), distiller.student(inputs)
        logits = distiller.assistant(teacher_out.lidar_bev, student_out.camera_bev).logits
        assert torch.equal(view(inputs).logits, logits)


def test_evaluate_assistant_refuses_a_run_without_one(direct_run):
    from bridgeta.engine.evaluate import evaluate_assistant

    _, out, _ = direct_run
    with pytest.raises(ValueError, match="not a BridgeTA distillation run"):
        evaluate_assistant(out / "model.safetensors")


def test_plot_epsilon_draws_bridgeta_and_skips_direct(bridgeta_run, direct_run, tmp_path):
    from bridgeta.engine.gap_plot import plot_gap, read_gap_curves

    bridgeta_out, direct_out = bridgeta_run[1], direct_run[1]
    curves = read_gap_curves(bridgeta_out, "epsilon")
    assert set(curves) == set(LEVELS) and all(v > 0 for level in curves.values() for _, v in level)
    path = plot_gap([direct_out, bridgeta_out], tmp_path / "eps.png", labels=["direct", "bridgeta"], quantity="epsilon")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="none of the runs logs"):
        plot_gap([direct_out], tmp_path / "none.png", quantity="epsilon")
