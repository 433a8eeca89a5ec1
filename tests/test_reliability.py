"""The probe: bad input and faults, run through the command line as a user would.

Every case asserts the exit code, that the one-line message names the culprit (key, file, flag
or token) and that every file that existed before the command is unchanged, with nothing added
(no temporaries, no half-written outputs). The cases are listed with their counts in
docs/reliability.md (``scripts/reliability_counts.py`` counts them from the collection).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_fixture import VERSION, build_dataroot
from engine_helpers import SMALL_TINY_C, SMALL_TINY_L

from bridgeta.cli import main

pytest.importorskip("nuscenes")

TRAIN_SET = [f"data.version={VERSION}", "train.max_steps=1", "train.epochs=1", "train.batch_size=2"]
TABLE_NAMES = (
    "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
    "scene", "sample", "sample_data", "sample_annotation", "map",
)


# ----------------------------------------------------------------------------------------------
# Helpers


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (sha256) and folder under ``roots``: equal snapshots mean nothing changed."""
    state = {}
    for root in roots:
        if not root.exists():
            state[str(root)] = "absent"
            continue
        if root.is_file():
            state[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for path in sorted(root.rglob("*")):
            state[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def probe(capsys, argv: list[str], culprits: list[str], watched: list[Path], code: int = 2) -> str:
    """Run ``bridgeta argv``; check exit code, a one-line message naming ``culprits``, ``watched`` unchanged."""
    before = snapshot(*watched)
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("bridgeta")]
    assert message, err
    last = message[-1]
    for culprit in culprits:
        assert str(culprit) in last, (culprit, last)
    assert snapshot(*watched) == before
    print(f"probe message: {last}")  # scripts/reliability_counts.py --messages lists them
    return last


def copy_root(source: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(source, root)
    return root


def train_args(root: Path, out: Path, *extra: str, preset: str = "tiny-l", small=SMALL_TINY_L) -> list:
    sets = [item for value in [*small, *TRAIN_SET, *extra] for item in ("--set", value)]
    return ["train", "--config", preset, "--dataroot", root, "--out", out, *sets]


def record(root: Path, split: str = "train") -> dict:
    samples = json.loads((root / ".bridgeta_cache" / VERSION / "samples.json").read_text())
    return next(r for r in samples if r["split"] == split)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The hand-built dataroot (train, val and test: 2 samples each), prepared."""
    from bridgeta.data.prepare import prepare_dataroot

    root = tmp_path_factory.mktemp("probe") / "root"
    build_dataroot(root)
    prepare_dataroot(root, VERSION, progress=False)
    return root


@pytest.fixture(scope="module")
def unprepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe-raw") / "root"
    build_dataroot(root)
    return root


@pytest.fixture(scope="module")
def finished_run(prepared, tmp_path_factory) -> Path:
    """A one-step run of the narrow tiny-l with its checkpoint and model file."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main([str(a) for a in train_args(prepared, out)]) == 0
    assert (out / "checkpoints" / "latest").is_file() and (out / "model.safetensors").is_file()
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# ----------------------------------------------------------------------------------------------
# Config keys, values and tags


BAD_SETTINGS = [
    ("train.lrr=1", "train.lrr"),  # unknown key
    ("train.epochs=abc", "train.epochs"),  # wrong type
    ("train.optimizer.lr=0", "train.optimizer.lr"),
    ("train.optimizer.lr=-1e-3", "train.optimizer.lr"),
    ("train.optimizer.warmup_steps=-1", "train.optimizer.warmup_steps"),
    ("train.checkpoint_every=-1", "train.checkpoint_every"),
    ("train.eval_every=-1", "train.eval_every"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accumulation=0", "train.grad_accumulation"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.optimizer.betas=[1.0,0.9]", "train.optimizer.betas"),
    ("train.optimizer.grad_clip=0", "train.optimizer.grad_clip"),
    ("train.optimizer.min_lr_ratio=2", "train.optimizer.min_lr_ratio"),
    ("train.optimizer.weight_decay=-0.1", "train.optimizer.weight_decay"),
    ("train.precision=fp8", "train.precision"),
    ("data.max_sweeps=-1", "data.max_sweeps"),
    ("data.load_interval=0", "data.load_interval"),
    ("model.camera.image_size=[33,88]", "model.camera.image_size"),
]


@pytest.mark.parametrize("setting, key", BAD_SETTINGS, ids=[key for _, key in BAD_SETTINGS])
def test_config_value(capsys, prepared, tmp_path, setting, key):
    out = tmp_path / "run"
    probe(capsys, train_args(prepared, out, setting, preset="tiny-c", small=SMALL_TINY_C), [key], [prepared, out])


@pytest.mark.parametrize(
    "text, culprit",
    [
        ("base: tiny-l\ntrain: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
        ("- a list\n- not a mapping\n", "top level must be a mapping"),
        ("base: loop.yaml\n", "loops back"),
        ("base: no-such-preset\n", "no-such-preset"),
    ],
    ids=["yaml-tag", "not-a-mapping", "base-loop", "unknown-base"],
)
def test_config_file(capsys, prepared, tmp_path, text, culprit):
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    out = tmp_path / "run"
    probe(capsys, ["train", "--config", path, "--dataroot", prepared, "--out", out], [culprit], [prepared, path, out])


def test_config_override_without_value(capsys, prepared, tmp_path):
    out = tmp_path / "run"
    probe(capsys, ["train", "--config", "tiny-l", "--dataroot", prepared, "--out", out, "--set", "train.epochs"],
          ["train.epochs", "key.path=value"], [prepared, out])


def test_distill_key_range(capsys, prepared, tmp_path):
    out = tmp_path / "run"
    argv = train_args(prepared, out, "distill.temperature=0", preset="distill/tiny-c-bridgeta", small=SMALL_TINY_C)
    argv[0] = "distill"
    probe(capsys, argv, ["distill.temperature"], [prepared, out])


# ----------------------------------------------------------------------------------------------
# Data files met by a run: found before the first step, named with their sample


def test_truncated_jpeg(capsys, prepared, tmp_path):
    root = copy_root(prepared, tmp_path)
    camera = record(root)["cameras"][1]["path"]
    data = (root / camera).read_bytes()
    (root / camera).write_bytes(data[: len(data) // 2])
    out = tmp_path / "run"
    probe(capsys, train_args(root, out, preset="tiny-c", small=SMALL_TINY_C),
          [camera, record(root)["token"], "cannot decode"], [root, out])


def test_jpeg_that_is_not_an_image(capsys, prepared, tmp_path):
    root = copy_root(prepared, tmp_path)
    camera = record(root)["cameras"][0]["path"]
    (root / camera).write_text("not a jpeg")
    out = tmp_path / "run"
    probe(capsys, train_args(root, out, preset="tiny-c", small=SMALL_TINY_C), [camera, "cannot decode"], [root, out])


def test_missing_jpeg(capsys, prepared, tmp_path):
    root = copy_root(prepared, tmp_path)
    camera = record(root)["cameras"][3]["path"]
    (root / camera).unlink()
    out = tmp_path / "run"
    probe(capsys, train_args(root, out, preset="tiny-c", small=SMALL_TINY_C),
          [camera, record(root)["token"], "missing", "bridgeta data check"], [root, out])


def test_truncated_pcd_bin(capsys, prepared, tmp_path):
    root = copy_root(prepared, tmp_path)
    lidar = record(root)["lidar"]["path"]
    data = (root / lidar).read_bytes()
    (root / lidar).write_bytes(data[:-6])
    out = tmp_path / "run"
    probe(capsys, train_args(root, out), [lidar, record(root)["token"], "truncated"], [root, out])


def test_missing_pcd_bin(capsys, prepared, tmp_path):
    root = copy_root(prepared, tmp_path)
    lidar = record(root)["lidar"]["path"]
    (root / lidar).unlink()
    out = tmp_path / "run"
    probe(capsys, train_args(root, out), [lidar, "missing"], [root, out])


def test_missing_sweep_pcd_bin(capsys, prepared, tmp_path):
    root = copy_root(prepared, tmp_path)
    sweep = record(root)["sweeps"][0]["path"]
    (root / sweep).unlink()
    out = tmp_path / "run"
    probe(capsys, train_args(root, out), [sweep, "missing"], [root, out])


def test_nan_lidar_points_are_dropped_with_a_warning(prepared, tmp_path, caplog):
    root = copy_root(prepared, tmp_path)
    lidar = record(root)["lidar"]["path"]
    points = np.fromfile(root / lidar, dtype=np.float32).reshape(-1, 5)
    points[0, 0], points[1, 3] = np.nan, np.inf
    points.tofile(root / lidar)
    before = snapshot(root)
    with caplog.at_level("WARNING"):
        assert main([str(a) for a in train_args(root, tmp_path / "run")]) == 0
    warnings = [r.getMessage() for r in caplog.records if "NaN/Inf" in r.getMessage()]
    assert warnings and lidar in warnings[0] and "dropped 2 of" in warnings[0]
    assert snapshot(root) == before
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "NaN" not in metrics and '"loss": null' not in metrics


def test_missing_eval_split_found_before_training(capsys, prepared, tmp_path):
    out = tmp_path / "run"
    probe(capsys, train_args(prepared, out, "train.eval_split=nope"), ["train.eval_split", "nope"], [prepared, out])


def test_train_without_a_prepared_cache(capsys, unprepared, tmp_path):
    out = tmp_path / "run"
    probe(capsys, train_args(unprepared, out), ["bridgeta data prepare"], [unprepared, out])


@pytest.mark.parametrize("name", ["meta.json", "samples.json", "labels.npy"])
def test_corrupt_cache_file(capsys, prepared, tmp_path, name):
    root = copy_root(prepared, tmp_path)
    path = root / ".bridgeta_cache" / VERSION / name
    path.write_bytes(path.read_bytes()[:40])
    out = tmp_path / "run"
    probe(capsys, train_args(root, out), [name, "bridgeta data prepare --force"], [root, out])


# ----------------------------------------------------------------------------------------------
# Data files met by prepare: every JSON table, the map, the splits


@pytest.mark.parametrize("table", TABLE_NAMES)
def test_broken_json_table(capsys, unprepared, tmp_path, table):
    root = copy_root(unprepared, tmp_path)
    path = root / VERSION / f"{table}.json"
    path.write_text(path.read_text()[:-7])  # cut mid-record, as an interrupted copy leaves it
    probe(capsys, ["data", "prepare", "--dataroot", root, "--version", VERSION], [f"{table}.json", "not valid JSON"], [root])


def test_missing_json_table(capsys, unprepared, tmp_path):
    root = copy_root(unprepared, tmp_path)
    (root / VERSION / "ego_pose.json").unlink()
    probe(capsys, ["data", "prepare", "--dataroot", root, "--version", VERSION], ["ego_pose.json"], [root])


def test_dangling_token_in_a_table(capsys, unprepared, tmp_path):
    root = copy_root(unprepared, tmp_path)
    path = root / VERSION / "log.json"
    logs = json.loads(path.read_text())
    logs[0]["token"] = "f" * 32  # every scene of this log now refers to a log that does not exist
    path.write_text(json.dumps(logs))
    probe(capsys, ["data", "prepare", "--dataroot", root, "--version", VERSION], ["f" * 32], [root])


def test_broken_map_expansion(capsys, unprepared, tmp_path):
    root = copy_root(unprepared, tmp_path)
    path = next((root / "maps" / "expansion").glob("*.json"))
    path.write_text(path.read_text()[:100])
    probe(capsys, ["data", "prepare", "--dataroot", root, "--version", VERSION], [path.name, "map expansion"], [root])


def test_map_expansion_without_a_layer(capsys, unprepared, tmp_path):
    root = copy_root(unprepared, tmp_path)
    path = next((root / "maps" / "expansion").glob("*.json"))
    data = json.loads(path.read_text())
    del data["walkway"]
    path.write_text(json.dumps(data))
    probe(capsys, ["data", "prepare", "--dataroot", root, "--version", VERSION], [path.name], [root])


def test_missing_map_expansion(capsys, unprepared, tmp_path):
    root = copy_root(unprepared, tmp_path)
    path = next((root / "maps" / "expansion").glob("*.json"))
    path.unlink()
    probe(capsys, ["data", "prepare", "--dataroot", root, "--version", VERSION], [path.name], [root])


def test_broken_splits_file(capsys, unprepared, tmp_path):
    root = copy_root(unprepared, tmp_path)
    (root / "bridgeta_splits.json").write_text('{"train": ["scene-a"')
    probe(capsys, ["data", "prepare", "--dataroot", root, "--version", VERSION], ["bridgeta_splits.json"], [root])


def test_scene_in_no_split(capsys, unprepared, tmp_path):
    root = copy_root(unprepared, tmp_path)
    (root / "bridgeta_splits.json").write_text('{"train": ["scene-a"], "val": ["scene-b"]}')
    probe(capsys, ["data", "prepare", "--dataroot", root, "--version", VERSION], ["scene-c"], [root])


def test_prepare_wrong_version(capsys, unprepared, tmp_path):
    probe(capsys, ["data", "prepare", "--dataroot", unprepared, "--version", "v1.0-nope"], ["v1.0-nope", "--version"],
          [unprepared])


def test_prepare_refuses_a_cache_with_other_settings(capsys, prepared):
    probe(capsys, ["data", "prepare", "--dataroot", prepared, "--version", VERSION, "--max-sweeps", "3"],
          ["meta.json", "max_sweeps", "--force"], [prepared])


def test_labels_unknown_sample(capsys, prepared, tmp_path):
    out = tmp_path / "labels.npy"
    probe(capsys, ["data", "labels", "--dataroot", prepared, "--version", VERSION, "--sample", "nope", "--out", out],
          ["nope"], [prepared, out])


def test_labels_disk_full_leaves_no_temporary(capsys, prepared, tmp_path, monkeypatch):
    token = record(prepared)["token"]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    out = tmp_path / "out" / "labels.npy"
    out.parent.mkdir()
    probe(capsys, ["data", "labels", "--dataroot", prepared, "--version", VERSION, "--sample", token, "--out", out],
          ["No space left", "labels.npy"], [prepared, out.parent])


# ----------------------------------------------------------------------------------------------
# Run directories: nothing written is lost


def test_train_refuses_a_run_with_a_model_and_metrics(capsys, prepared, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    shutil.rmtree(out / "checkpoints")
    probe(capsys, train_args(prepared, out), ["model.safetensors", "metrics.jsonl", "--force"], [prepared, out])


def test_train_refuses_a_run_with_checkpoints(capsys, prepared, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    probe(capsys, train_args(prepared, out), ["checkpoints", "--resume", "--force"], [prepared, out])


def test_train_force_replaces_the_run(prepared, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    (out / "notes.txt").write_text("mine")  # not a run output: kept
    old = (out / "model.safetensors").read_bytes()
    assert main([str(a) for a in train_args(prepared, out, "train.seed=3")] + ["--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "model.safetensors").read_bytes() != old
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(
        (finished_run / "metrics.jsonl").read_text().splitlines()
    )


def test_resume_into_an_empty_directory(capsys, prepared, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    probe(capsys, [*train_args(prepared, out), "--resume"], ["--resume", "no checkpoint"], [prepared, out])


def test_resume_and_force_together(capsys, prepared, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    probe(capsys, [*train_args(prepared, out), "--resume", "--force"], ["--resume", "--force"], [prepared, out])


CHECKPOINT_DAMAGE = {
    "truncated-model": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
    "truncated-optimizer": ("optimizer.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
    "truncated-rng": ("rng.safetensors", lambda p: p.write_bytes(p.read_bytes()[:50])),
    "corrupt-state": ("state.json", lambda p: p.write_text(p.read_text()[:30])),
    "missing-optimizer": ("optimizer.safetensors", lambda p: p.unlink()),
    "wrong-format": ("state.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "format": 9}))),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_failed_resume_changes_no_file(capsys, prepared, finished_run, tmp_path, damage):
    out = copy_run(finished_run, tmp_path)
    name, spoil = CHECKPOINT_DAMAGE[damage]
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    spoil(latest / name)
    argv = [*train_args(prepared, out, "train.max_steps=2", "train.epochs=2"), "--resume"]
    probe(capsys, argv, [latest.name, name], [prepared, out])


def test_resume_with_latest_naming_a_missing_checkpoint(capsys, prepared, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    (out / "checkpoints" / "latest").write_text("step-00000099\n")
    probe(capsys, [*train_args(prepared, out), "--resume"], ["latest", "step-00000099"], [prepared, out])


def test_resume_with_another_models_checkpoint(capsys, prepared, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    argv = [*train_args(prepared, out, "model.lidar.out_channels=24", "train.max_steps=2", "train.epochs=2"), "--resume"]
    probe(capsys, argv, ["model.safetensors", "another model"], [prepared, out])


def test_disk_space_checked_before_the_first_step(capsys, prepared, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    out = tmp_path / "run"
    probe(capsys, train_args(prepared, out), ["MB free", "checkpoint"], [prepared, out])


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(capsys, prepared, finished_run, tmp_path, monkeypatch):
    import bridgeta.engine.checkpoint as checkpoint

    out = copy_run(finished_run, tmp_path)
    kept = snapshot(out / "checkpoints")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    before = snapshot(prepared)
    rc = main([str(a) for a in [*train_args(prepared, out, "train.max_steps=2", "train.epochs=2"), "--resume"]])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left" in err and "step-00000002" in err
    assert snapshot(out / "checkpoints") == kept  # no temporary, the old checkpoint intact
    assert snapshot(prepared) == before


def test_sigkill_while_writing_a_checkpoint_then_resume(prepared, tmp_path):
    """A process killed inside a checkpoint write leaves ``latest`` on the previous one; resume works."""
    out = tmp_path / "run"
    script = (
        "import os, signal, sys\n"
        "import bridgeta.engine.checkpoint as ck\n"
        "from bridgeta.cli import main\n"
        "real, calls = ck.save_file, []\n"
        "def dying(tensors, path, *a, **k):\n"
        "    calls.append(path)\n"
        "    if len(calls) == 3:  # optimizer.safetensors of the second checkpoint\n"
        "        open(path, 'wb').write(b'partial')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(tensors, path, *a, **k)\n"
        "ck.save_file = dying\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = [str(a) for a in train_args(prepared, out, "train.max_steps=3", "train.epochs=3", "train.checkpoint_every=1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-00000001"
    assert (checkpoints / ".tmp-step-00000002").is_dir()  # the torn write, never named by latest
    first = snapshot(checkpoints / "step-00000001")
    assert main(argv + ["--resume"]) == 0
    assert (checkpoints / "latest").read_text().strip() == "step-00000003"
    assert not list(checkpoints.glob(".tmp-*")) and (out / "model.safetensors").is_file()
    assert snapshot(checkpoints / "step-00000001") == first


# ----------------------------------------------------------------------------------------------
# Model files: eval, export, distill's teacher


def test_eval_corrupt_pcd_bin_met_in_a_loader_worker(capsys, prepared, finished_run, tmp_path):
    """An error raised in a DataLoader worker arrives with the worker's traceback; one line is shown."""
    root = copy_root(prepared, tmp_path)
    lidar = record(root, "test")["lidar"]["path"]
    (root / lidar).write_bytes(b"\x00" * 7)
    probe(capsys, ["eval", "--checkpoint", finished_run, "--dataroot", root, "--version", VERSION, "--workers", "1"],
          [lidar, record(root, "test")["token"], "truncated"], [root, finished_run])


def test_eval_truncated_model_file(capsys, prepared, finished_run, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((finished_run / "model.safetensors").read_bytes()[:1000])
    probe(capsys, ["eval", "--checkpoint", path, "--dataroot", prepared, "--version", VERSION],
          [str(path), "not a readable safetensors"], [prepared, path])


def test_eval_safetensors_that_is_not_a_model_file(capsys, prepared, tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    probe(capsys, ["eval", "--checkpoint", path, "--dataroot", prepared, "--version", VERSION],
          [str(path), "not a bridgeta model file"], [prepared, path])


def test_model_file_of_an_unknown_kind(capsys, prepared, finished_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = finished_run / "model.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    path = tmp_path / "odd.safetensors"
    save_file(tensors, str(path), metadata={**metadata, "bridgeta_kind": "teacher-assistant"})
    probe(capsys, ["eval", "--checkpoint", path, "--dataroot", prepared, "--version", VERSION],
          ["teacher-assistant", str(path)], [prepared, path])


def test_eval_missing_checkpoint(capsys, prepared, tmp_path):
    probe(capsys, ["eval", "--checkpoint", tmp_path / "nope", "--dataroot", prepared, "--version", VERSION],
          [str(tmp_path / "nope")], [prepared])


def test_eval_unknown_split(capsys, prepared, finished_run):
    probe(capsys, ["eval", "--checkpoint", finished_run, "--dataroot", prepared, "--version", VERSION,
                   "--split", "nope"], ["nope", "meta.json"], [prepared, finished_run])


def test_export_onto_a_directory(capsys, finished_run, tmp_path):
    out = tmp_path / "exports"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for force in ([], ["--force"]):
        probe(capsys, ["export", "--checkpoint", finished_run, "--out", out, *force], ["--out", "is a directory"],
              [finished_run, out])


def test_export_onto_an_existing_file(capsys, finished_run, tmp_path):
    out = tmp_path / "student.safetensors"
    out.write_text("an older export")
    probe(capsys, ["export", "--checkpoint", finished_run, "--out", out], ["student.safetensors", "--force"],
          [finished_run, out])


def test_export_disk_full_leaves_no_temporary(capsys, finished_run, tmp_path, monkeypatch):
    import bridgeta.engine.model_file as model_file

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_file, "save_file", full)
    folder = tmp_path / "exports"
    folder.mkdir()
    probe(capsys, ["export", "--checkpoint", finished_run, "--out", folder / "s.safetensors"],
          ["No space left", "s.safetensors"], [finished_run, folder])


def test_distill_without_a_teacher_file(capsys, prepared, tmp_path):
    out = tmp_path / "run"
    argv = ["distill", *train_args(prepared, out, preset="distill/tiny-c-bridgeta", small=SMALL_TINY_C)[1:],
            "--teacher", tmp_path / "no-teacher"]
    probe(capsys, argv, ["distill.teacher", "no-teacher"], [prepared, out])


def test_distill_with_an_incompatible_teacher(capsys, prepared, finished_run, tmp_path):
    out = tmp_path / "run"  # finished_run is LiDAR-only: BridgeTA needs a fusion teacher
    argv = ["distill", *train_args(prepared, out, preset="distill/tiny-c-bridgeta", small=SMALL_TINY_C)[1:],
            "--teacher", finished_run]
    probe(capsys, argv, ["distill.teacher", str(finished_run), "fusion"], [prepared, finished_run, out])


def test_distill_with_a_plain_preset(capsys, prepared, tmp_path):
    out = tmp_path / "run"
    argv = ["distill", *train_args(prepared, out, preset="tiny-c", small=SMALL_TINY_C)[1:]]
    probe(capsys, argv, ["'distill' section"], [prepared, out])


def test_distill_with_a_teacher_on_another_grid(capsys, prepared, tmp_path):
    from engine_helpers import write_teacher

    teacher = write_teacher(tmp_path / "teacher.safetensors", prepared, 0, "model.heads.map.output_grid.x=[-40.0,40.0,2.0]")
    out = tmp_path / "run"
    argv = ["distill", *train_args(prepared, out, preset="distill/tiny-c-bridgeta", small=SMALL_TINY_C)[1:],
            "--teacher", teacher]
    probe(capsys, argv, ["distill.teacher", "teacher.safetensors"], [prepared, teacher, out])


# ----------------------------------------------------------------------------------------------
# CLI flags


@pytest.mark.parametrize("sample, culprit", [("-1", "--sample -1"), ("999", "out of range"), ("nope", "nope")],
                         ids=["negative", "out-of-range", "unknown-token"])
def test_viz_sample(capsys, prepared, finished_run, tmp_path, sample, culprit):
    out = tmp_path / "viz.png"
    probe(capsys, ["viz", "--checkpoint", finished_run, "--dataroot", prepared, "--split", "val", "--sample", sample,
                   "--out", out], [culprit], [prepared, finished_run, out])


@pytest.mark.parametrize("sample, culprit", [("-2", "--sample -2"), ("6", "--sample 6 is out of range")],
                         ids=["negative", "out-of-range"])
def test_data_show_sample(capsys, prepared, tmp_path, sample, culprit):
    out = tmp_path / "show.png"
    probe(capsys, ["data", "show", "--dataroot", prepared, "--version", VERSION, "--sample", sample, "--out", out],
          [culprit], [prepared, out])


@pytest.mark.parametrize("duration", ["0", "-1", "0.2", "nan"])
def test_synth_duration(capsys, tmp_path, duration):
    out = tmp_path / "world"
    probe(capsys, ["synth", "--out", out, "--scenes", "1", "--duration", duration], ["--duration"], [out])


def test_synth_refuses_an_existing_world(capsys, unprepared):
    probe(capsys, ["synth", "--out", unprepared, "--scenes", "1", "--duration", "0.5"], ["samples", "maps", "--force"],
          [unprepared])


def test_synth_failure_leaves_no_partial_world(capsys, tmp_path, monkeypatch):
    import bridgeta.data.synth.generate as generate

    def broken(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "camera.jpg")

    out = tmp_path / "world"
    out.mkdir()
    (out / "README").write_text("mine")
    monkeypatch.setattr(generate, "_write_town", broken)
    probe(capsys, ["synth", "--out", out, "--scenes", "1", "--duration", "0.5", "--workers", "1"],
          ["No space left", "camera.jpg"], [out])


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (["train", "--config", "tiny-l", "--out", "x", "--nope"], "--nope"),
        (["train", "--config", "tiny-l"], "--out"),
        (["eval", "--checkpoint", "x", "--batch-size", "0"], "--batch-size"),
        (["synth", "--out", "w", "--scenes", "two"], "--scenes"),
        (["data", "prepare"], "--dataroot"),
    ],
    ids=["unknown-flag", "missing-out", "batch-size-0", "scenes-not-a-number", "prepare-without-dataroot"],
)
def test_cli_flag(capsys, tmp_path, argv, culprit):
    probe(capsys, argv, [culprit], [tmp_path])


def test_debug_flag_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "eval", "--checkpoint", str(tmp_path / "nope")])
