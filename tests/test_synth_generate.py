"""`bridgeta synth` end to end on a very small world: nuScenes format, splits, determinism."""

import json
from dataclasses import replace

import numpy as np
import pytest

from bridgeta.cli import main
from bridgeta.data.check import check_dataroot
from bridgeta.data.synth.generate import (
    SynthPreset,
    allocate_scenes,
    generate_dataroot,
    stratified_conditions,
)
from bridgeta.data.synth.world import TownSettings

SMALL = SynthPreset(
    town=replace(TownSettings.tiny(), scene_duration=1.0),
    image_size=(36, 64),
    scenes_per_town=2,
    lidar_sweeps=1,
    ground_resolution=0.2,
)


@pytest.fixture(scope="module")
def dataroot(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    report = generate_dataroot(root, scenes=3, seed=3, preset=SMALL, workers=1)
    return root, report


def test_allocation_and_condition_quotas():
    assert allocate_scenes(10, (0.6, 0.2, 0.2)) == {"train": 6, "val": 2, "test": 2}
    assert allocate_scenes(3, (0.6, 0.2, 0.2)) == {"train": 1, "val": 1, "test": 1}
    assert sum(allocate_scenes(7, (0.6, 0.2, 0.2)).values()) == 7
    with pytest.raises(ValueError, match="--scenes must be >= 1"):
        allocate_scenes(0, (0.6, 0.2, 0.2))
    conditions = stratified_conditions(8, (("day", 0.5), ("night", 0.25), ("rain", 0.25)), np.random.default_rng(0))
    assert sorted(conditions) == ["day"] * 4 + ["night"] * 2 + ["rain"] * 2


def test_dataroot_is_valid_nuscenes_with_town_splits(dataroot):
    root, report = dataroot
    splits = json.loads((root / "bridgeta_splits.json").read_text())
    assert {k: len(v) for k, v in splits.items()} == {"train": 1, "val": 1, "test": 1}
    # Each split is driven in its own town: scene names carry their town.
    assert all(name.startswith(f"synth-{split}-") for split, names in splits.items() for name in names)
    assert report.samples == 3 * 2  # 1 s scenes at 2 Hz
    assert report.sweeps == report.samples  # one intermediate sweep per keyframe
    assert report.annotations > 0
    check = check_dataroot(root, "v1.0-trainval")
    assert check.ok, check.format()
    nuscenes = pytest.importorskip("nuscenes.nuscenes")
    nusc = nuscenes.NuScenes("v1.0-trainval", str(root), verbose=False)
    assert len(nusc.scene) == 3 and len(nusc.sample) == 6
    lidar = nusc.get("sample_data", nusc.sample[1]["data"]["LIDAR_TOP"])
    points = np.fromfile(root / lidar["filename"], dtype=np.float32).reshape(-1, 5)
    assert len(points) > 1000 and set(np.unique(points[:, 4]).astype(int)) <= set(range(32))
    assert lidar["prev"] != ""  # the intermediate sweep precedes the keyframe
    camera = nusc.get("sample_data", nusc.sample[1]["data"]["CAM_FRONT"])
    assert (camera["height"], camera["width"]) == (36, 64)
    # Every record has its own file: scenes of different towns must not overwrite each other.
    records = json.loads((root / "v1.0-trainval" / "sample_data.json").read_text())
    on_disk = [p for folder in ("samples", "sweeps") for p in (root / folder).rglob("*") if p.is_file()]
    assert len({r["filename"] for r in records}) == len(records) == len(on_disk)


def test_night_scenes_are_rendered_at_night(tmp_path):
    night = replace(SMALL, town=replace(SMALL.town, condition_mix=(("day", 0.5), ("night", 0.5))), lidar_sweeps=0)
    generate_dataroot(tmp_path, scenes=4, seed=1, preset=night, workers=1)
    from PIL import Image

    scenes = {s["token"]: s["description"] for s in json.loads((tmp_path / "v1.0-trainval" / "scene.json").read_text())}
    samples = {s["token"]: scenes[s["scene_token"]] for s in json.loads((tmp_path / "v1.0-trainval" / "sample.json").read_text())}
    brightness = {"Day": [], "Night": []}
    for record in json.loads((tmp_path / "v1.0-trainval" / "sample_data.json").read_text()):
        if record["fileformat"] == "jpg" and "CAM_BACK__" in record["filename"]:
            condition = samples[record["sample_token"]].split(",")[0]
            brightness[condition].append(np.asarray(Image.open(tmp_path / record["filename"])).mean())
    assert brightness["Day"] and brightness["Night"]
    assert max(brightness["Night"]) < 0.5 * min(brightness["Day"])


def test_generation_is_deterministic_and_refuses_to_overwrite(tmp_path):
    one_scene = replace(SMALL, town=replace(SMALL.town, scene_duration=0.5), lidar_sweeps=0)
    first = generate_dataroot(tmp_path / "a", scenes=1, seed=5, preset=one_scene, workers=1)
    generate_dataroot(tmp_path / "b", scenes=1, seed=5, preset=one_scene, workers=1)
    for table in ("sample_annotation", "ego_pose", "sample_data"):
        a = (tmp_path / "a" / "v1.0-trainval" / f"{table}.json").read_text()
        b = (tmp_path / "b" / "v1.0-trainval" / f"{table}.json").read_text()
        assert a == b, table
    lidar = sorted((tmp_path / "a" / "samples" / "LIDAR_TOP").iterdir())[0]
    assert lidar.read_bytes() == (tmp_path / "b" / "samples" / "LIDAR_TOP" / lidar.name).read_bytes()
    # Camera labels too: every label file and the index, byte for byte.
    labels = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / "camera_labels").rglob("*") if p.is_file())
    assert len(labels) == 2 * 6 + 1
    for relative in labels:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative
    assert first.samples == 1
    with pytest.raises(FileExistsError, match="already holds v1.0-trainval"):
        generate_dataroot(tmp_path / "a", scenes=1, seed=5, preset=one_scene, workers=1)


def test_cli_reports_bad_arguments_without_writing(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["synth", "--out", str(out), "--scenes", "3", "--preset", "nope"]) == 2
    assert "unknown synth preset 'nope'" in capsys.readouterr().err
    assert main(["synth", "--out", str(out), "--scenes", "0"]) == 2
    assert "--scenes must be >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_cli_check_exit_codes(dataroot, tmp_path, capsys):
    root, _ = dataroot
    assert main(["data", "check", "--dataroot", str(root), "--version", "v1.0-trainval", "--quick"]) == 0
    assert main(["data", "check", "--dataroot", str(tmp_path), "--version", "v1.0-trainval"]) == 1
    assert "v1.0-trainval" in capsys.readouterr().out


def test_cli_prepare_labels_show_agree(dataroot, tmp_path, capsys):
    root, _ = dataroot
    cache = tmp_path / "cache"
    args = ["--dataroot", str(root), "--version", "v1.0-trainval"]
    assert main(["data", "prepare", *args, "--cache", str(cache)]) == 0
    assert "samples per split" in capsys.readouterr().out
    from bridgeta.data.cache import LabelCache

    labels_cache = LabelCache(cache)
    token = labels_cache.tokens[1]
    out = tmp_path / "labels.npy"
    assert main(["data", "labels", *args, "--sample", token, "--out", str(out)]) == 0
    written = np.load(out)
    assert written.dtype == np.uint8 and written.shape == (6, 200, 200)
    assert np.array_equal(written.astype(bool), labels_cache.labels(1))
    assert written[0].any()  # the ego drives on drivable area
    picture = tmp_path / "show.png"
    assert main(["data", "show", *args, "--cache", str(cache), "--sample", token, "--out", str(picture)]) == 0
    # With the default cache prepared, `data check` reports label coverage per split and class.
    assert main(["data", "prepare", *args]) == 0
    capsys.readouterr()
    assert main(["data", "check", *args, "--quick"]) == 0
    assert "label coverage train: drivable_area" in capsys.readouterr().out
    assert picture.stat().st_size > 10_000
    assert main(["data", "labels", *args, "--sample", "f" * 32, "--out", str(out)]) == 2
    assert "is not in" in capsys.readouterr().err
