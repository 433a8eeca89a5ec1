"""prepare_dataroot -> LabelCache: metadata, transforms, splits and labels of a tiny dataroot."""

import json
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
from shapely.geometry import LineString, box

from bridgeta.config import MAP_CLASSES
from bridgeta.data.cache import CacheError, LabelCache, default_cache_dir
from bridgeta.data.map_expansion import write_map_expansion
from bridgeta.data.nuscenes_writer import NuScenesWriter
from bridgeta.data.synth.world_types import MapLayers
from bridgeta.rig import NUSCENES_CAMERAS

VERSION = "v1.0-mini"
LOCATION = "synth-fixture"
IMAGE_SIZE = (90, 160)  # (H, W): nuScenes / 10
EGO_T_LIDAR = np.array(  # nuScenes LIDAR_TOP: x = ego right, y = ego forward
    [[0.0, 1.0, 0.0, 0.94], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.84], [0.0, 0.0, 0.0, 1.0]]
)
# Static world points written into every sweep (global frame) and their intensities.
STATIC_POINTS = np.array([[520.0, 503.0, 0.3], [512.0, 497.5, 1.2], [530.0, 500.0, 0.0]])
KNOWN_LIDAR_POINT = (10.0, 0.0, 0.0)  # in the keyframe LIDAR_TOP frame -> ego (0.94, -10, 1.84)
KNOWN_INTENSITY = 77.0
SELF_POINT = (0.3, -0.4, -1.0)  # the ego car's own roof, in the sensor frame
SWEEP_GAP = 0.25  # s between sweeps (one non-keyframe sweep between 0.5 s keyframes)
SCENES = (  # name, description, initial yaw (rad), split in bridgeta_splits.json
    ("scene-a", "Night, rain, intersection", 0.0, "train"),
    ("scene-b", "Heavy RAIN, parked cars", 0.2, "val"),
    ("scene-c", "Busy intersection, peds", -0.3, "test"),
)
MAP_LAYERS = MapLayers(
    drivable_area=[box(480.25, 494.25, 560.75, 505.75)],
    walkway=[box(480.25, 506.25, 560.75, 509.75)],
    ped_crossing=[box(520.25, 494.25, 523.75, 505.75)],
    stop_line=[box(517.25, 494.25, 517.75, 499.75)],
    carpark_area=[box(530.25, 510.25, 545.75, 525.75)],
    road_divider=[LineString([(480.1, 500.1), (560.1, 500.1)])],
    lane_divider=[LineString([(480.1, 497.1), (560.1, 497.1)])],
)


def ego_pose(scene_index: int, t: float) -> np.ndarray:
    """global_T_ego of the fixture's ego at ``t`` s into scene ``scene_index``: driving and turning."""
    yaw = SCENES[scene_index][2] + 0.05 * t
    pose = np.eye(4)
    pose[:2, :2] = [[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]]
    pose[:3, 3] = [500.0 + 4.0 * t, 500.0 + 0.5 * t, 0.0]
    return pose


def camera_intrinsics(camera) -> np.ndarray:
    intrinsics = camera.intrinsics().double().numpy()
    intrinsics[:2] *= 0.1
    return intrinsics


@dataclass
class Fixture:
    root: object
    keyframes: list = field(default_factory=list)  # (scene index, t) per sample, in scene/time order


def microseconds(scene_index: int, t: float) -> int:
    return int(round((100.0 * scene_index + t) * 1e6))


def build_dataroot(root, scenes=SCENES, splits_file=True, keyframes_per_scene=2) -> Fixture:
    """A tiny nuScenes dataroot: 2 keyframes per scene, a non-keyframe sweep before each."""
    rng = np.random.default_rng(0)
    writer = NuScenesWriter(root, VERSION)
    write_map_expansion(root, LOCATION, MAP_LAYERS, (0.0, 0.0, 1000.0, 1000.0))
    lidar = writer.calibrated_sensor("LIDAR_TOP", "lidar", EGO_T_LIDAR)
    cameras = [
        (c, writer.calibrated_sensor(c.name, "camera", c.ego_T_camera().numpy(), camera_intrinsics(c)))
        for c in NUSCENES_CAMERAS
    ]
    fixture = Fixture(root)
    logs = []
    for scene_index, (name, description, _, _) in enumerate(scenes):
        log = writer.log(LOCATION, f"log-{name}")
        logs.append(log)
        scene = writer.scene(name, description, log)
        for k in range(keyframes_per_scene):
            t = 1.0 + 0.5 * k
            sample = writer.sample(scene, microseconds(scene_index, t))
            fixture.keyframes.append((scene_index, t))
            for sweep_t, key in ((t - SWEEP_GAP, False), (t, True)):
                global_T_lidar = ego_pose(scene_index, sweep_t) @ EGO_T_LIDAR
                static = (np.linalg.inv(global_T_lidar) @ np.c_[STATIC_POINTS, np.ones(3)].T).T[:, :3]
                points = [[*p, 10.0 + i, 0.0] for i, p in enumerate(static)] + [[*SELF_POINT, 5.0, 0.0]]
                if key:
                    points.append([*KNOWN_LIDAR_POINT, KNOWN_INTENSITY, 0.0])
                stamp = microseconds(scene_index, sweep_t)
                pose_token = writer.ego_pose(stamp, ego_pose(scene_index, sweep_t))
                writer.lidar_sweep(
                    sample, lidar, pose_token, stamp, "LIDAR_TOP", np.array(points), is_key_frame=key
                )
            for index, (camera, calibration) in enumerate(cameras):
                camera_t = t + 0.005 * (index + 1)  # each camera fires a few ms after the LiDAR
                stamp = microseconds(scene_index, camera_t)
                pose_token = writer.ego_pose(stamp, ego_pose(scene_index, camera_t))
                image = rng.integers(0, 256, size=(*IMAGE_SIZE, 3), dtype=np.uint8)
                writer.camera_image(sample, calibration, pose_token, stamp, camera.name, image)
    writer.map(logs, np.zeros((8, 8), np.uint8))
    writer.finalize()
    if splits_file:
        splits = {}
        for name, _, _, split in scenes:
            splits.setdefault(split, []).append(name)
        (root / "bridgeta_splits.json").write_text(json.dumps(splits))
    return fixture


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    pytest.importorskip("nuscenes")
    from bridgeta.data.prepare import prepare_dataroot

    root = tmp_path_factory.mktemp("dataroot")
    fixture = build_dataroot(root)
    return fixture, prepare_dataroot(root, VERSION, progress=False)


def test_meta_and_records(prepared):
    fixture, cache_dir = prepared
    assert cache_dir == default_cache_dir(fixture.root, VERSION)
    cache = LabelCache(cache_dir)
    meta = cache.meta
    assert meta["version"] == VERSION and meta["dataroot"] == str(fixture.root.resolve())
    assert meta["classes"] == list(MAP_CLASSES) and meta["max_sweeps"] == 10
    assert meta["label_grid"] == {"x": [-50.0, 50.0, 0.5], "y": [-50.0, 50.0, 0.5], "z": [-10.0, 10.0, 20.0]}
    assert meta["counts"] == {"test": 2, "train": 2, "val": 2}
    assert len(cache) == 6 and cache.label_grid.shape == (200, 200)
    conditions = {"scene-a": "night", "scene-b": "rain", "scene-c": "day"}
    splits = {name: split for name, _, _, split in SCENES}
    for index, (scene_index, t) in enumerate(fixture.keyframes):
        record = cache.record(index)
        name = SCENES[scene_index][0]
        assert record["scene"] == name and record["split"] == splits[name]
        assert record["condition"] == conditions[name]
        assert record["location"] == LOCATION and record["timestamp"] == microseconds(scene_index, t)
        assert np.allclose(record["global_T_ego"], ego_pose(scene_index, t))
        assert np.allclose(record["lidar"]["ego_T_lidar"], EGO_T_LIDAR)
        assert record["lidar"]["path"].startswith("samples/LIDAR_TOP/")
        assert [c["name"] for c in record["cameras"]] == [c.name for c in NUSCENES_CAMERAS]
        for index_camera, (camera, entry) in enumerate(zip(NUSCENES_CAMERAS, record["cameras"])):
            assert (entry["height"], entry["width"]) == IMAGE_SIZE
            assert np.allclose(entry["intrinsics"], camera_intrinsics(camera))
            camera_pose = ego_pose(scene_index, t + 0.005 * (index_camera + 1))
            ego_T_camera = camera.ego_T_camera().double().numpy()
            expected = np.linalg.inv(ego_pose(scene_index, t)) @ camera_pose @ ego_T_camera
            assert np.allclose(entry["ego_T_camera"], expected, atol=1e-6)
            assert not np.allclose(entry["ego_T_camera"], ego_T_camera, atol=1e-3)  # went through global
            assert (fixture.root / entry["path"]).is_file()
    assert list(cache.indices("val")) == [2, 3]


def test_sweeps_time_lags_and_transforms(prepared):
    fixture, cache_dir = prepared
    cache = LabelCache(cache_dir)
    first, second = cache.record(0), cache.record(1)
    assert [s["time_lag"] for s in first["sweeps"]] == pytest.approx([0.25])
    # The walk crosses the earlier keyframe: non-keyframe, keyframe, non-keyframe.
    assert [s["time_lag"] for s in second["sweeps"]] == pytest.approx([0.25, 0.5, 0.75])
    assert [s["path"].split("/")[0] for s in second["sweeps"]] == ["sweeps", "samples", "sweeps"]
    scene_index, t = fixture.keyframes[1]
    expected_static = (np.linalg.inv(ego_pose(scene_index, t)) @ np.c_[STATIC_POINTS, np.ones(3)].T).T[:, :3]
    keyframe = (second["lidar"]["path"], second["lidar"]["ego_T_lidar"])
    for path, transform in [keyframe] + [(s["path"], s["keyframe_ego_T_sweep_lidar"]) for s in second["sweeps"]]:
        raw = np.fromfile(fixture.root / path, dtype=np.float32).reshape(-1, 5)
        transform = np.asarray(transform)
        ego = (transform @ np.c_[raw[:3, :3], np.ones(3)].T).T[:, :3]
        # Static points written from different ego poses land on the same keyframe-ego point.
        assert np.allclose(ego, expected_static, atol=1e-4)
    sweep_pose = ego_pose(scene_index, t - SWEEP_GAP)
    assert not np.allclose(sweep_pose, ego_pose(scene_index, t))  # the poses do differ


def test_labels_match_direct_rasterisation(prepared):
    from bridgeta.data.devkit import load_map
    from bridgeta.data.labels import rasterise_map_labels
    from bridgeta.data.prepare import DEFAULT_LABEL_GRID

    fixture, cache_dir = prepared
    cache = LabelCache(cache_dir)
    nusc_map = load_map(fixture.root, LOCATION)
    packed = np.load(cache_dir / "labels.npy")
    assert packed.dtype == np.uint8 and packed.shape == (6, 6, 200, 25)
    coverage = {split: np.zeros(6) for split in ("train", "val", "test")}
    for index, (scene_index, t) in enumerate(fixture.keyframes):
        direct = rasterise_map_labels(nusc_map, ego_pose(scene_index, t), DEFAULT_LABEL_GRID)
        assert np.array_equal(cache.labels(index), direct)
        assert np.array_equal(np.unpackbits(packed[index], axis=-1).astype(bool), direct)
        coverage[cache.record(index)["split"]] += direct.mean(axis=(1, 2)) / 2
    assert direct[0, 100, 100] and not direct[2, 100, 100]  # the ego is on the road, not the walkway
    for split, values in coverage.items():
        assert list(cache.meta["coverage"][split].values()) == pytest.approx(values.tolist())
        assert all(v > 0 for v in values)  # every class is visible in every split


def test_rerun_is_a_noop_and_settings_are_guarded(tmp_path):
    pytest.importorskip("nuscenes")
    from bridgeta.data import prepare

    build_dataroot(tmp_path, scenes=SCENES[:1])
    cache_dir = prepare.prepare_dataroot(tmp_path, VERSION, max_sweeps=2, progress=False)
    stamp = (cache_dir / "labels.npy").stat().st_mtime_ns
    assert prepare.prepare_dataroot(tmp_path, VERSION, max_sweeps=2, progress=False) == cache_dir
    assert (cache_dir / "labels.npy").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="max_sweeps"):
        prepare.prepare_dataroot(tmp_path, VERSION, max_sweeps=1, progress=False)
    prepare.prepare_dataroot(tmp_path, VERSION, max_sweeps=1, overwrite=True, progress=False)
    cache = LabelCache(cache_dir)
    assert cache.meta["max_sweeps"] == 1 and len(cache.record(1)["sweeps"]) == 1
    assert sorted(p.name for p in cache_dir.parent.iterdir()) == [VERSION]  # nothing left over


def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch):
    pytest.importorskip("nuscenes")
    from bridgeta.data import prepare

    build_dataroot(tmp_path, scenes=SCENES[:1])
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return np.zeros((6, 200, 200), dtype=bool)

    monkeypatch.setattr(prepare, "rasterise_map_labels", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataroot(tmp_path, VERSION, progress=False)
    assert list((tmp_path / ".bridgeta_cache").iterdir()) == []


def test_official_mini_splits_without_a_splits_file(tmp_path):
    pytest.importorskip("nuscenes")
    from bridgeta.data.prepare import prepare_dataroot

    scenes = (("scene-0061", "Parked truck, night", 0.0, None), ("scene-0103", "Rain", 0.1, None))
    build_dataroot(tmp_path, scenes=scenes, splits_file=False, keyframes_per_scene=1)
    cache = LabelCache(prepare_dataroot(tmp_path, VERSION, progress=False))
    assert [cache.record(i)["split"] for i in range(2)] == ["train", "val"]  # mini_train / mini_val
    assert cache.meta["counts"] == {"train": 1, "val": 1}

    unknown = tmp_path / "other"
    build_dataroot(unknown, scenes=(("scene-x", "", 0.0, None),), splits_file=False, keyframes_per_scene=1)
    with pytest.raises(ValueError, match="scene scene-x is in no split"):
        prepare_dataroot(unknown, VERSION, progress=False)


@pytest.mark.parametrize(
    "description, condition",
    [("Night, rain", "night"), ("NIGHT driving", "night"), ("Rain, wet road", "rain"), ("light rain", "rain"),
     ("Wait at intersection, peds", "day"), ("", "day"), ("Train station, drain", "day"),
     ("rainy afternoon", "rain")],
)
def test_scene_condition(description, condition):
    from bridgeta.data.conditions import scene_condition

    assert scene_condition(description) == condition


def test_cache_errors_name_the_file(prepared, tmp_path):
    import shutil

    _, cache_dir = prepared
    with pytest.raises(CacheError, match="class 'road' was not prepared"):
        LabelCache(cache_dir).class_indices(["drivable_area", "road"])
    with pytest.raises(CacheError, match="no split 'mini_train'"):
        LabelCache(cache_dir).indices("mini_train")
    with pytest.raises(CacheError, match="no prepared cache"):
        LabelCache(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(cache_dir, broken)
    (broken / "labels.npy").unlink()
    with pytest.raises(CacheError, match=r"labels\.npy is missing"):
        LabelCache(broken)
    np.save(broken / "labels.npy", np.zeros((6, 5, 200, 25), np.uint8))  # a class short
    with pytest.raises(CacheError, match=r"labels\.npy: shape \(6, 5, 200, 25\)"):
        LabelCache(broken)


def test_devkit_is_required_with_a_hint(monkeypatch, tmp_path):
    from bridgeta.data import devkit

    for name in [m for m in sys.modules if m == "nuscenes" or m.startswith("nuscenes.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "nuscenes", None)
    with pytest.raises(ImportError, match=r"pip install 'bridgeta\[nuscenes\]'"):
        devkit.require_devkit()
    with pytest.raises(ImportError, match="bridgeta"):
        devkit.load_nuscenes(tmp_path, VERSION)


def test_worker_processes_give_the_same_cache(prepared, tmp_path):
    from bridgeta.data.prepare import prepare_dataroot

    fixture, cache_dir = prepared
    other = prepare_dataroot(fixture.root, VERSION, cache_dir=tmp_path / "cache", workers=2, progress=False)
    assert np.array_equal(np.load(other / "labels.npy"), np.load(cache_dir / "labels.npy"))
    assert (other / "samples.json").read_text() == (cache_dir / "samples.json").read_text()
