"""``bridgeta synth``: generate towns, drive scenes through them, write a nuScenes dataroot.

Train, validation and test scenes are driven in *different towns* (``synth-train-*``,
``synth-val-*``, ``synth-test-*``), so settings are chosen on towns never reported on. All scenes
go into one version (``v1.0-trainval``: every split needs its labels) and
``bridgeta_splits.json`` names the scenes of each split.

Per scene: keyframes at 2 Hz (as nuScenes) with six cameras and LIDAR_TOP, plus
``lidar_sweeps`` intermediate LiDAR sweeps between keyframes (non-keyframe ``sample_data`` under
``sweeps/``), 3D box annotations of every vehicle and pedestrian within ``annotation_range``,
and per-pixel labels (class and depth) of every keyframe camera image under ``camera_labels/``
(``bridgeta.data.camera_labels``). Rendering is spread over worker processes; records are
written by the parent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bridgeta.data.camera_labels import LABELS_FOLDER, CameraLabelWriter
from bridgeta.data.map_expansion import write_map_expansion
from bridgeta.files import atomic_write_text, check_outputs, existing_outputs, remove_paths
from bridgeta.data.nuscenes_writer import NuScenesWriter
from bridgeta.data.synth.world import TownSettings, generate_town
from bridgeta.data.synth.world_types import Box, Town
from bridgeta.rig import NATIVE_IMAGE_SIZE, NUSCENES_CAMERAS

log = logging.getLogger(__name__)

VERSION = "v1.0-trainval"
SPLITS = ("train", "val", "test")
KEYFRAME_INTERVAL = 0.5  # seconds (2 Hz, as nuScenes)
# What a world consists of in its dataroot (the label cache of an older world would be stale).
WORLD_OUTPUTS = (VERSION, "samples", "sweeps", "maps", LABELS_FOLDER, "bridgeta_splits.json", ".bridgeta_cache")
# nuScenes LIDAR_TOP mounting: 0.94 m ahead of the rear axle, 1.84 m up, x to the right.
EGO_T_LIDAR = np.array(
    [[0.0, 1.0, 0.0, 0.94], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.84], [0.0, 0.0, 0.0, 1.0]]
)
CONDITION_DESCRIPTION = {
    "day": "Day, clear weather, synthetic town",
    "night": "Night, dark, synthetic town",
    "rain": "Rain, wet road, synthetic town",
}


@dataclass
class SynthPreset:
    """How big a world to make and at what sensor resolution."""

    town: TownSettings
    image_size: tuple[int, int]  # rendered camera images (H, W); intrinsics are scaled to it
    scenes_per_town: int = 4
    # Ground material raster (m per cell); paint coverage is anti-aliased within a cell.
    ground_resolution: float = 0.05
    lidar_sweeps: int = 4  # intermediate LiDAR sweeps per keyframe interval (10 Hz in total)
    annotation_range: float = 60.0
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)


def synth_presets() -> dict[str, SynthPreset]:
    return {
        # Small towns and 9:16 images at 0.16 of nuScenes' 1600x900: enough for the tiny presets.
        "tiny": SynthPreset(town=TownSettings.tiny(), image_size=(144, 256), scenes_per_town=2),
        # The tiny towns with busy streets, for the detection tables (docs/detection.md): in
        # "tiny" nearly every annotated vehicle is parked, most of them packed in car parks, and
        # moving ones are rare (scripts/world_census.py counts them), so a detection benchmark
        # there mostly measures occluded rows of parked cars. Here 24 vehicles and 16
        # pedestrians move in each scene and fewer stalls are taken; the street network, car
        # parks and buildings are drawn the same way.
        "tiny-traffic": SynthPreset(
            town=replace(TownSettings.tiny(), vehicles_per_scene=24, pedestrians_per_scene=16, parked_occupancy=0.3),
            image_size=(144, 256), scenes_per_town=2,
        ),
        "default": SynthPreset(
            town=TownSettings.default(), image_size=(225, 400), scenes_per_town=4, ground_resolution=0.1
        ),
    }


@dataclass
class GenerationReport:
    dataroot: str
    scenes: dict[str, list[str]]
    samples: int = 0
    sweeps: int = 0
    annotations: int = 0
    seconds: float = 0.0
    towns: list[str] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def allocate_scenes(total: int, fractions: tuple[float, float, float]) -> dict[str, int]:
    """Scenes per split; every split gets at least one when ``total >= 3``."""
    if total < 1:
        raise ValueError(f"--scenes must be >= 1, got {total}")
    counts = {split: int(math.floor(total * f)) for split, f in zip(SPLITS, fractions)}
    if total >= 3:
        for split in SPLITS:
            counts[split] = max(counts[split], 1)
    while sum(counts.values()) < total:
        counts["train"] += 1
    while sum(counts.values()) > total:
        largest = max(SPLITS, key=lambda s: counts[s])
        counts[largest] -= 1
    return counts


def stratified_conditions(count: int, mix: tuple[tuple[str, float], ...], rng: np.random.Generator) -> list[str]:
    """``count`` conditions in proportion to ``mix`` (largest remainder), shuffled.

    Drawing each scene's condition independently can leave a small split with no night scene at
    all; quotas keep every split evaluable by condition.
    """
    names = [name for name, _ in mix]
    weights = np.array([weight for _, weight in mix], dtype=float)
    exact = weights / weights.sum() * count
    quota = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - quota), kind="stable")[: count - quota.sum()]:
        quota[index] += 1
    conditions = [name for name, n in zip(names, quota) for _ in range(n)]
    rng.shuffle(conditions)
    return conditions


def camera_rig(image_size: tuple[int, int]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, intrinsics at ``image_size``, ego_T_camera) of the nuScenes rig, scaled from 1600x900."""
    scale_y = image_size[0] / NATIVE_IMAGE_SIZE[0]
    scale_x = image_size[1] / NATIVE_IMAGE_SIZE[1]
    rig = []
    for camera in NUSCENES_CAMERAS:
        intrinsics = camera.intrinsics().numpy().astype(np.float64)
        intrinsics[0] *= scale_x
        intrinsics[1] *= scale_y
        rig.append((camera.name, intrinsics, camera.ego_T_camera().numpy().astype(np.float64)))
    return rig


def global_T_ego_at(pose: tuple[float, float, float]) -> np.ndarray:
    x, y, yaw = pose
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0, x], [s, c, 0.0, y], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def points_in_box(points_global: np.ndarray, box: Box) -> int:
    """How many points lie inside an oriented box (nuScenes' num_lidar_pts)."""
    c, s = math.cos(box.yaw), math.sin(box.yaw)
    offset = points_global[:, :3] - np.asarray(box.center)
    local_x = offset[:, 0] * c + offset[:, 1] * s
    local_y = -offset[:, 0] * s + offset[:, 1] * c
    length, width, height = box.size
    inside = (np.abs(local_x) <= length / 2) & (np.abs(local_y) <= width / 2) & (np.abs(offset[:, 2]) <= height / 2)
    return int(inside.sum())


# ---- rendering in worker processes ---------------------------------------------------------

_WORKER: dict = {}


def _init_worker(town: Town, image_size: tuple[int, int], ground_resolution: float) -> None:
    from bridgeta.data.synth.pixel_labels import GroundSemantics
    from bridgeta.data.synth.scene_mesh import GroundRaster, StaticScene

    _WORKER["town"] = town
    _WORKER["static"] = StaticScene.build(town)
    _WORKER["raster"] = GroundRaster.build(town, resolution=ground_resolution)
    _WORKER["semantics"] = GroundSemantics(town, _WORKER["raster"])
    _WORKER["rig"] = camera_rig(image_size)
    _WORKER["image_size"] = image_size


def _render(job: tuple[int, float, bool, int]) -> dict:
    """Render one time step of scene ``scene_index``: cameras (keyframes only) and LiDAR.

    Keyframe cameras come with their per-pixel labels, PNG-encoded here so that the encoding
    runs in the worker processes, not in the parent that writes every file.
    """
    from bridgeta.data.camera_labels import depth_png, semantic_png
    from bridgeta.data.synth.sensors import render_sample

    scene_index, time_s, with_cameras, seed = job
    town: Town = _WORKER["town"]
    scene = town.scenes[scene_index]
    pose = scene.ego.pose_at(time_s)
    boxes = [(agent.category, agent.box_at(time_s)) for agent in scene.agents]
    result = render_sample(
        _WORKER["static"],
        _WORKER["raster"],
        boxes,
        pose,
        _WORKER["rig"] if with_cameras else [],
        _WORKER["image_size"],
        global_T_ego_at(pose),
        EGO_T_LIDAR,
        scene.condition,
        np.random.default_rng(seed),
        threads=1,  # one process per core already
        semantics=_WORKER["semantics"] if with_cameras else None,
    )
    if with_cameras:
        result["labels"] = {
            name: (semantic_png(result["semantic"][name]), depth_png(result["depth"][name]))
            for name in result["images"]
        }
        del result["semantic"], result["depth"]
    result["pose"] = pose
    result["boxes"] = boxes
    result["speeds"] = [agent.speed_at(time_s) for agent in scene.agents]
    return result


# ---- the generator ---------------------------------------------------------------------------


def generate_dataroot(
    out: str | Path,
    scenes: int,
    seed: int,
    preset: str | SynthPreset = "tiny",
    workers: int | None = None,
    duration: float | None = None,
    force: bool = False,
) -> GenerationReport:
    """Write a synthetic world into ``out``.

    Arguments are checked before anything is written. ``out`` may exist but must not hold a
    world (``WORLD_OUTPUTS``) unless ``force``, which deletes it first. A generation that fails
    removes what it wrote, so the next try starts clean.
    """
    presets = synth_presets()
    if isinstance(preset, SynthPreset):
        settings = preset
    elif preset in presets:
        settings = presets[preset]
    else:
        raise ValueError(f"unknown synth preset '{preset}' (presets: {', '.join(presets)})")
    if duration is not None:
        if not (math.isfinite(duration) and duration >= KEYFRAME_INTERVAL):
            raise ValueError(
                f"--duration {duration:g}: a scene needs at least one keyframe, i.e. >= {KEYFRAME_INTERVAL} s"
            )
        settings = replace(settings, town=replace(settings.town, scene_duration=duration))
    if isinstance(scenes, bool) or not isinstance(scenes, int) or scenes < 1:
        raise ValueError(f"--scenes must be >= 1, got {scenes!r}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file: the dataroot is a directory")
    remove_paths(check_outputs(out, WORLD_OUTPUTS, force))
    workers = workers or max(1, min(os.cpu_count() or 1, 4))
    try:
        return _generate(out, scenes, seed, settings, workers)
    except BaseException:
        remove_paths(existing_outputs(out, WORLD_OUTPUTS))  # none of them existed before
        raise


def _generate(out: Path, scenes: int, seed: int, settings: SynthPreset, workers: int) -> GenerationReport:
    start = time.perf_counter()

    writer = NuScenesWriter(out, VERSION, namespace=f"synth-{seed}")
    labels = CameraLabelWriter(out)
    report = GenerationReport(dataroot=str(out), scenes={split: [] for split in SPLITS})
    rng = np.random.default_rng(seed)
    for split, count in allocate_scenes(scenes, settings.split_fractions).items():
        conditions = stratified_conditions(count, settings.town.condition_mix, rng)
        town_index = 0
        while count > 0:
            in_town = min(count, settings.scenes_per_town)
            location = f"synth-{split}-{town_index}"
            town_settings = replace(settings.town, num_scenes=in_town)
            town = generate_town(location, int(rng.integers(2**31)), town_settings)
            town.scenes = [replace(scene, condition=conditions.pop()) for scene in town.scenes]
            _write_town(writer, labels, out, town, settings, int(rng.integers(2**31)), workers, report,
                        first_scene=sum(len(names) for names in report.scenes.values()))
            report.scenes[split] += [scene.name for scene in town.scenes]
            report.towns.append(location)
            count -= in_town
            town_index += 1

    atomic_write_text(out / "bridgeta_splits.json", json.dumps(report.scenes, indent=2))
    writer.finalize()
    labels.finalize()
    report.seconds = time.perf_counter() - start
    return report


def _write_town(
    writer: NuScenesWriter,
    labels: CameraLabelWriter,
    out: Path,
    town: Town,
    settings: SynthPreset,
    seed: int,
    workers: int,
    report: GenerationReport,
    first_scene: int,
) -> None:
    """Render and write every scene of ``town``; ``first_scene`` numbers its scenes globally."""
    write_map_expansion(out, town.location, town.layers, town.bounds)
    rig = camera_rig(settings.image_size)
    logs = []
    plan = []  # (scene index, keyframe index, time, is keyframe)
    rng = np.random.default_rng(seed)
    for scene_index, scene in enumerate(town.scenes):
        keyframes = int(scene.duration / KEYFRAME_INTERVAL)
        for k in range(keyframes):
            keyframe_time = KEYFRAME_INTERVAL * (k + 1)  # the first sweeps then have a past
            for j in range(settings.lidar_sweeps, 0, -1):
                sweep_time = keyframe_time - j * KEYFRAME_INTERVAL / (settings.lidar_sweeps + 1)
                plan.append((scene_index, k, sweep_time, False))
            plan.append((scene_index, k, keyframe_time, True))
    jobs = [(s, t, key, int(rng.integers(2**31))) for s, _, t, key in plan]

    scene_tokens, calibrations = {}, {}
    for scene_index, scene in enumerate(town.scenes):
        log_token = writer.log(town.location, logfile=scene.name)
        logs.append(log_token)
        scene_tokens[scene_index] = writer.scene(scene.name, CONDITION_DESCRIPTION[scene.condition], log_token)
        calibrations[scene_index] = {
            "LIDAR_TOP": writer.calibrated_sensor("LIDAR_TOP", "lidar", EGO_T_LIDAR),
            **{name: writer.calibrated_sensor(name, "camera", ego_T_camera, intrinsics)
               for name, intrinsics, ego_T_camera in rig},
        }
    writer.map(logs, _drivable_prior(town))

    instances: dict[tuple, str] = {}
    pending_sweeps: list[tuple[dict, int]] = []
    base_time = 1_700_000_000_000_000
    with ProcessPoolExecutor(workers, initializer=_init_worker,
                             initargs=(town, settings.image_size, settings.ground_resolution)) as pool:
        results = pool.map(_render, jobs, chunksize=4)
        for (scene_index, keyframe, time_s, is_key), result in tqdm(
            zip(plan, results), total=len(plan), desc=f"rendering {town.location}", unit="frame"
        ):
            # Scenes 100 s apart on one global clock: timestamps (and so file names) are unique.
            timestamp = base_time + (first_scene + scene_index) * 100_000_000 + int(round(time_s * 1e6))
            if not is_key:
                pending_sweeps.append((result, timestamp))
                continue
            scene_token = scene_tokens[scene_index]
            calibration = calibrations[scene_index]
            sample = writer.sample(scene_token, timestamp)
            for sweep, sweep_time in pending_sweeps:
                sweep_pose = writer.ego_pose(sweep_time, global_T_ego_at(sweep["pose"]))
                writer.lidar_sweep(sample, calibration["LIDAR_TOP"], sweep_pose, sweep_time, "LIDAR_TOP",
                                   sweep["lidar"], is_key_frame=False)
                report.sweeps += 1
            pending_sweeps = []
            global_T_ego = global_T_ego_at(result["pose"])
            pose = writer.ego_pose(timestamp, global_T_ego)
            writer.lidar_sweep(sample, calibration["LIDAR_TOP"], pose, timestamp, "LIDAR_TOP", result["lidar"])
            for name, image in result["images"].items():
                token = writer.camera_image(sample, calibration[name], pose, timestamp, name, image)
                labels.add(writer.filename(token), *result["labels"][name])
            points_global = _lidar_to_global(result["lidar"], global_T_ego)
            report.annotations += _annotate(writer, town, scene_index, sample, result, points_global,
                                            settings.annotation_range, instances)
            report.samples += 1


# Below this ground speed (m/s) a road user is "stopped" (vehicles) or "standing" (pedestrians).
MOVING_SPEED = 0.5


def annotation_attribute(category: str, agent: bool, speed: float) -> str:
    """The nuScenes attribute of a box, from what the world knows: parked cars never move; an
    agent is moving above ``MOVING_SPEED``, else a vehicle is stopped and a pedestrian standing
    (the detection metric's attribute error compares these)."""
    if category.startswith("vehicle"):
        if not agent:
            return "vehicle.parked"
        return "vehicle.moving" if speed >= MOVING_SPEED else "vehicle.stopped"
    return "pedestrian.moving" if agent and speed >= MOVING_SPEED else "pedestrian.standing"


def _lidar_to_global(points: np.ndarray, global_T_ego: np.ndarray) -> np.ndarray:
    global_T_lidar = global_T_ego @ EGO_T_LIDAR
    return points[:, :3] @ global_T_lidar[:3, :3].T + global_T_lidar[:3, 3]


def _annotate(
    writer: NuScenesWriter,
    town: Town,
    scene_index: int,
    sample: str,
    result: dict,
    points_global: np.ndarray,
    annotation_range: float,
    instances: dict[tuple, str],
) -> int:
    """Boxes of moving agents and parked vehicles near the ego; one instance per object per scene."""
    ego_x, ego_y, _ = result["pose"]
    objects = [(("agent", i), category, box) for i, (category, box) in enumerate(result["boxes"])]
    objects += [
        (("parked", i), static.category, static.box)
        for i, static in enumerate(town.statics)
        if static.category is not None
    ]
    count = 0
    for key, category, box in objects:
        if math.hypot(box.center[0] - ego_x, box.center[1] - ego_y) > annotation_range:
            continue
        instance_key = (scene_index, key)
        if instance_key not in instances:
            instances[instance_key] = writer.instance(category)
        hits = points_in_box(points_global, box)
        # Without a camera-visibility model we grade visibility by LiDAR support.
        visibility = "v80-100" if hits >= 10 else "v40-60" if hits > 0 else "v0-40"
        attribute = annotation_attribute(category, key[0] == "agent", result["speeds"][key[1]] if key[0] == "agent" else 0.0)
        length, width, height = box.size
        writer.annotation(sample, instances[instance_key], box.center, (width, length, height), box.yaw,
                          visibility=visibility, attributes=[attribute], num_lidar_pts=hits)
        count += 1
    return count


def _drivable_prior(town: Town, pixels_per_metre: float = 1.0) -> np.ndarray:
    """The map table's raster: drivable area at 1 px/m (nuScenes ships a semantic prior PNG)."""
    from PIL import Image, ImageDraw

    width = int(math.ceil(town.bounds[2] * pixels_per_metre))
    height = int(math.ceil(town.bounds[3] * pixels_per_metre))
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    for polygon in town.layers.drivable_area:
        draw.polygon([(x * pixels_per_metre, y * pixels_per_metre) for x, y in polygon.exterior.coords], fill=255)
    return np.asarray(image)
