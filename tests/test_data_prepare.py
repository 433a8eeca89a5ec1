"""prepare_dataroot -> LabelCache: metadata, transforms, splits and labels of a tiny dataroot."""

import sys

import numpy as np
import pytest
from data_fixture import (
    EGO_T_LIDAR,
    IMAGE_SIZE,
    LOCATION,
    SCENES,
    STATIC_POINTS,
    SWEEP_GAP,
    VERSION,
    build_dataroot,
    camera_intrinsics,
    ego_pose,
    microseconds,
)

from bridgeta.config import MAP_CLASSES
from bridgeta.data.cache import CacheError, LabelCache, default_cache_dir
from bridgeta.rig import NUSCENES_CAMERAS


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
    assert not (tmp_path / ".bridgeta_cache").exists()  # not even an empty cache folder


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
