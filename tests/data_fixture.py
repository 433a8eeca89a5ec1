"""A hand-built nuScenes-format dataroot with known geometry, shared by the data tests."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
from shapely.geometry import LineString, Polygon, box

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


# Geometry as real maps have it, which our synthetic writer never produces: polygons of one layer
# that overlap or share an edge, a polygon with a hole that holds an island (another record of the
# layer) and is partly covered by a third, and a ring touching itself at a vertex (invalid). Each
# shape is (exterior, holes) with every vertex on a 0.5 m cell centre of an ego at (500, 500), so a
# plain point-in-polygon rasterisation predicts every cell (tests/test_data_labels.py).
_COURTYARD = (485.25, 500.25, 499.75, 512.75), [(488.25, 503.25, 496.75, 509.75)]
REAL_MAP_SHAPES = {
    "drivable_area": [
        ((505.25, 490.25, 515.75, 497.75), []),  # overlaps the next one
        ((510.25, 494.25, 520.75, 500.75), []),
        ((520.75, 490.25, 525.25, 500.75), []),  # shares the edge x = 520.75 with the previous one
        _COURTYARD,
        ((490.25, 505.25, 494.75, 507.75), []),  # an island inside the courtyard's hole
        ((495.25, 504.25, 498.75, 506.25), []),  # covers part of the hole and of its border
    ],
    "walkway": [
        ((480.25, 480.25, 490.75, 484.75), []),
        ((486.25, 482.25, 494.75, 488.75), []),  # overlaps the previous one
    ],
}
# One ring through (504.25, 489.25) twice: two squares touching at a corner, an invalid polygon
# that the devkit drops from every layer but drivable_area.
SELF_TOUCHING_RING = Polygon([
    (500.25, 485.25), (504.25, 485.25), (504.25, 489.25), (508.25, 489.25),
    (508.25, 493.25), (504.25, 493.25), (504.25, 489.25), (500.25, 489.25),
])
SELF_TOUCHING_SQUARES = [((500.25, 485.25, 504.25, 489.25), []), ((504.25, 489.25, 508.25, 493.25), [])]


def _shape(exterior, holes) -> Polygon:
    return Polygon(box(*exterior).exterior.coords, [box(*h).exterior.coords for h in holes])


REAL_MAP_LAYERS = MapLayers(
    drivable_area=[_shape(*s) for s in REAL_MAP_SHAPES["drivable_area"]],
    walkway=[_shape(*s) for s in REAL_MAP_SHAPES["walkway"]] + [SELF_TOUCHING_RING],
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


def build_dataroot(
    root, scenes=SCENES, splits_file=True, keyframes_per_scene=2, map_layers=MAP_LAYERS
) -> Fixture:
    """A tiny nuScenes dataroot: 2 keyframes per scene, a non-keyframe sweep before each."""
    rng = np.random.default_rng(0)
    writer = NuScenesWriter(root, VERSION)
    write_map_expansion(root, LOCATION, map_layers, (0.0, 0.0, 1000.0, 1000.0))
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
