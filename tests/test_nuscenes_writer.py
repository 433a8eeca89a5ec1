"""The nuScenes writer: what it writes is real nuScenes format (the official devkit reads it)."""

import json
import math

import numpy as np
import pytest

from bridgeta.data.nuscenes_writer import (
    NuScenesWriter,
    matrix_to_quaternion,
    pose_to_record,
    quaternion_to_matrix,
    yaw_to_quaternion,
)
from bridgeta.rig import NUSCENES_CAMERAS


def write_tiny_dataroot(root, num_samples=3):
    writer = NuScenesWriter(root, "v1.0-mini")
    log = writer.log("synth-test", "log-0")
    writer.map([log], np.zeros((8, 8), np.uint8))
    ego_T_lidar = np.eye(4)
    ego_T_lidar[:3, :3] = [[0, 1, 0], [-1, 0, 0], [0, 0, 1]]  # LiDAR x = ego right
    ego_T_lidar[:3, 3] = [0.94, 0.0, 1.84]
    lidar = writer.calibrated_sensor("LIDAR_TOP", "lidar", ego_T_lidar)
    cameras = {
        c.name: writer.calibrated_sensor(c.name, "camera", c.ego_T_camera().numpy(), c.intrinsics().numpy())
        for c in NUSCENES_CAMERAS
    }
    scene = writer.scene("scene-0001", "Night, light traffic", log)
    car = writer.instance("vehicle.car")
    for k in range(num_samples):
        timestamp = 1_000_000 + 500_000 * k
        sample = writer.sample(scene, timestamp)
        global_T_ego = np.eye(4)
        global_T_ego[:3, 3] = [100.0 + 5 * k, 200.0, 0.0]
        pose = writer.ego_pose(timestamp, global_T_ego)
        writer.lidar_sweep(sample, lidar, pose, timestamp, "LIDAR_TOP", np.ones((10, 5), np.float32))
        for name, token in cameras.items():
            writer.camera_image(sample, token, pose, timestamp, name, np.zeros((18, 32, 3), np.uint8))
        writer.annotation(sample, car, [110.0 + 5 * k, 200.0, 0.8], [1.8, 4.5, 1.6], 0.3, num_lidar_pts=4)
    writer.finalize()
    return writer


def test_quaternions_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        rotation = quaternion_to_matrix(q)
        back = matrix_to_quaternion(rotation)
        assert np.allclose(quaternion_to_matrix(back), rotation, atol=1e-9)
        assert back[0] >= 0
    assert np.allclose(quaternion_to_matrix(yaw_to_quaternion(math.pi / 2)), [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
    translation, rotation = pose_to_record(np.diag([1.0, 1.0, 1.0, 1.0]))
    assert translation == [0, 0, 0] and rotation == [1, 0, 0, 0]


def test_tables_are_linked(tmp_path):
    write_tiny_dataroot(tmp_path)
    tables = {name: json.loads((tmp_path / "v1.0-mini" / f"{name}.json").read_text())
              for name in ("scene", "sample", "sample_data", "instance", "sample_annotation")}
    scene = tables["scene"][0]
    samples = {s["token"]: s for s in tables["sample"]}
    assert scene["nbr_samples"] == 3
    first = samples[scene["first_sample_token"]]
    assert first["prev"] == "" and samples[first["next"]]["prev"] == first["token"]
    assert samples[scene["last_sample_token"]]["next"] == ""
    front = [d for d in tables["sample_data"] if "CAM_FRONT__" in d["filename"]]
    assert sum(d["prev"] == "" for d in front) == 1 and sum(d["next"] == "" for d in front) == 1
    assert {d["fileformat"] for d in tables["sample_data"]} == {"jpg", "pcd"}
    instance = tables["instance"][0]
    assert instance["nbr_annotations"] == 3 and instance["first_annotation_token"] != instance["last_annotation_token"]
    assert (tmp_path / front[0]["filename"]).is_file()


def test_lidar_points_must_have_five_columns(tmp_path):
    writer = NuScenesWriter(tmp_path, "v1.0-mini")
    calibrated = writer.calibrated_sensor("LIDAR_TOP", "lidar", np.eye(4))
    with pytest.raises(ValueError, match=r"LIDAR_TOP points must be \(N, 5\)"):
        writer.lidar_sweep("s", calibrated, "e", 0, "LIDAR_TOP", np.zeros((4, 4), np.float32))


def test_sensor_files_are_never_overwritten(tmp_path):
    writer = NuScenesWriter(tmp_path, "v1.0-mini")
    calibrated = writer.calibrated_sensor("LIDAR_TOP", "lidar", np.eye(4))
    points = np.zeros((3, 5), np.float32)
    writer.lidar_sweep("s", calibrated, "e", 7, "LIDAR_TOP", points)
    with pytest.raises(FileExistsError, match="would share one file"):
        writer.lidar_sweep("s", calibrated, "e", 7, "LIDAR_TOP", points)


def test_official_devkit_loads_and_renders(tmp_path):
    nuscenes = pytest.importorskip("nuscenes.nuscenes")
    import matplotlib

    matplotlib.use("Agg")
    write_tiny_dataroot(tmp_path)
    nusc = nuscenes.NuScenes("v1.0-mini", str(tmp_path), verbose=False)
    sample = nusc.sample[0]
    assert set(sample["data"]) == {"LIDAR_TOP"} | {c.name for c in NUSCENES_CAMERAS}
    assert len(sample["anns"]) == 1
    box = nusc.get_box(sample["anns"][0])
    assert np.allclose(box.center, [110.0, 200.0, 0.8]) and box.orientation.yaw_pitch_roll[0] == pytest.approx(0.3)
    lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    calibration = nusc.get("calibrated_sensor", lidar["calibrated_sensor_token"])
    assert np.allclose(calibration["translation"], [0.94, 0.0, 1.84])
    nusc.render_sample(sample["token"], out_path=str(tmp_path / "sample.png"), verbose=False)
    assert (tmp_path / "sample.png").stat().st_size > 0
