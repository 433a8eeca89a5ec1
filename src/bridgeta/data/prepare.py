"""Build the cache of a nuScenes-format dataroot: sample metadata and packed map labels.

This is the only step that needs the nuScenes devkit (``pip install 'bridgeta[nuscenes]'``); it
runs once per dataroot and version, and training then reads the cache (``bridgeta.data.cache``)
plus the sensor files. Real nuScenes and the synthetic world are read the same way.

The cache is written into a temporary sibling directory and renamed into place at the end, so an
interrupted run leaves no half-written cache. The cache format is documented in
``bridgeta.data.cache``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import multiprocessing
import os
import shutil
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import bridgeta
from bridgeta.config import MAP_CLASSES
from bridgeta.data.cache import CACHE_FORMAT, default_cache_dir, grid_to_dict
from bridgeta.data.conditions import scene_condition
from bridgeta.data.dataset import FUTURE_STEPS  # keyframes ahead for motion and planning targets
from bridgeta.data.devkit import load_map, load_nuscenes, scene_splits
from bridgeta.data.labels import rasterise_map_labels
from bridgeta.data.nuscenes_writer import quaternion_to_matrix
from bridgeta.geometry import BEVGrid
from bridgeta.rig import NUSCENES_CAMERAS

DEFAULT_LABEL_GRID = BEVGrid((-50.0, 50.0, 0.5), (-50.0, 50.0, 0.5))
CAMERA_NAMES = tuple(c.name for c in NUSCENES_CAMERAS)
SPLITS_FILE = "bridgeta_splits.json"
# Settings that define a cache: re-running prepare with the same ones is a no-op.
SETTING_KEYS = ("format", "version", "dataroot", "classes", "label_grid", "max_sweeps")


def pose_matrix(record: dict) -> np.ndarray:
    """4x4 ``a_T_b`` of an ``ego_pose`` / ``calibrated_sensor`` record (translation + quaternion)."""
    matrix = np.eye(4)
    matrix[:3, :3] = quaternion_to_matrix(record["rotation"])
    matrix[:3, 3] = record["translation"]
    return matrix


def _listed(matrix: np.ndarray) -> list[list[float]]:
    return [[float(v) for v in row] for row in np.asarray(matrix)]


def load_scene_splits(dataroot: Path, version: str) -> tuple[dict[str, str], str]:
    """``scene name -> split`` and where it came from (``bridgeta_splits.json`` or the devkit)."""
    path = dataroot / SPLITS_FILE
    if path.is_file():
        try:
            splits, source = json.loads(path.read_text()), str(path)
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
            raise ValueError(f"{path}: expected {{split: [scene names]}}")
    else:
        splits, source = scene_splits(version), f"the devkit's official splits for {version}"
    scene_split: dict[str, str] = {}
    for split, scenes in splits.items():
        for scene in scenes:
            if scene in scene_split:
                raise ValueError(f"{source}: scene {scene} is in both '{scene_split[scene]}' and '{split}'")
            scene_split[scene] = split
    return scene_split, source


class _Records:
    """Builds the cache record of a sample from the devkit's tables."""

    def __init__(self, nusc: Any, max_sweeps: int) -> None:
        self.nusc = nusc
        self.max_sweeps = max_sweeps

    def _pose(self, sample_data: dict) -> np.ndarray:
        return pose_matrix(self.nusc.get("ego_pose", sample_data["ego_pose_token"]))

    def _calibration(self, sample_data: dict) -> dict:
        return self.nusc.get("calibrated_sensor", sample_data["calibrated_sensor_token"])

    def _objects(self, sample: dict, ego_T_global: np.ndarray) -> list[dict]:
        """The sample's boxes of the nuScenes detection classes, in its keyframe ego frame:
        ``box`` = x, y, z, length, width, height, yaw, vx, vy (the devkit's track velocity,
        0 where a track has one annotation), with the class, attribute and LiDAR point count."""
        from nuscenes.eval.detection.utils import category_to_detection_name

        nusc = self.nusc
        rotation = ego_T_global[:3, :3]
        objects = []
        for token in sample["anns"]:
            annotation = nusc.get("sample_annotation", token)
            name = category_to_detection_name(annotation["category_name"])
            if name is None:
                continue
            centre = rotation @ np.asarray(annotation["translation"]) + ego_T_global[:3, 3]
            heading = rotation @ quaternion_to_matrix(annotation["rotation"])[:, 0]
            velocity = np.nan_to_num(nusc.box_velocity(token), nan=0.0)
            velocity = rotation @ velocity
            width, length, height = annotation["size"]
            attributes = [nusc.get("attribute", a)["name"] for a in annotation["attribute_tokens"]]
            objects.append({
                "future": self._future_track(annotation, ego_T_global, sample["timestamp"]),
                "instance": annotation["instance_token"],
                "token": token,
                "name": name,
                "box": [float(v) for v in (*centre, length, width, height, math.atan2(heading[1], heading[0]),
                                           velocity[0], velocity[1])],
                "attribute": attributes[0] if attributes else "",
                "num_lidar_pts": int(annotation["num_lidar_pts"]),
            })
        return objects

    def _future_track(self, annotation: dict, ego_T_global: np.ndarray, timestamp: int,
                      steps: int = FUTURE_STEPS) -> list[list[float]]:
        """The object's next ``steps`` annotated centres along its track, in this sample's ego
        frame, with the time ahead: ``[[x, y, seconds], ...]`` (shorter when the track ends).

        Centres only, the motion targets: the whole boxes of those keyframes, headings included,
        are in the later keyframes' own records, which the loader reads for the collision and
        occupancy truth (``BEVMapDataset._future_agents``)."""
        nusc = self.nusc
        future = []
        current = annotation
        while len(future) < steps and current["next"]:
            current = nusc.get("sample_annotation", current["next"])
            centre = ego_T_global[:3, :3] @ np.asarray(current["translation"]) + ego_T_global[:3, 3]
            ahead = (nusc.get("sample", current["sample_token"])["timestamp"] - timestamp) / 1e6
            future.append([float(centre[0]), float(centre[1]), float(ahead)])
        return future

    def _ego_future(self, sample: dict, ego_T_global: np.ndarray, steps: int = FUTURE_STEPS) -> list[list[float]]:
        """The ego's next ``steps`` keyframe poses in this sample's ego frame: ``[[x, y, yaw,
        seconds], ...]`` (the planning target; shorter at the end of a scene)."""
        nusc = self.nusc
        future = []
        current = sample
        while len(future) < steps and current["next"]:
            current = nusc.get("sample", current["next"])
            pose = ego_T_global @ self._pose(nusc.get("sample_data", current["data"]["LIDAR_TOP"]))
            future.append([float(pose[0, 3]), float(pose[1, 3]), math.atan2(pose[1, 0], pose[0, 0]),
                           (current["timestamp"] - sample["timestamp"]) / 1e6])
        return future

    def build(self, sample: dict, scene: dict, split: str, location: str) -> dict:
        nusc = self.nusc
        lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        global_T_ego = self._pose(lidar)
        ego_T_global = np.linalg.inv(global_T_ego)

        sweeps = []
        current = lidar
        while len(sweeps) < self.max_sweeps and current["prev"]:
            current = nusc.get("sample_data", current["prev"])
            keyframe_T_sweep = ego_T_global @ self._pose(current) @ pose_matrix(self._calibration(current))
            sweeps.append(
                {
                    "path": current["filename"],
                    "time_lag": (lidar["timestamp"] - current["timestamp"]) / 1e6,
                    "keyframe_ego_T_sweep_lidar": _listed(keyframe_T_sweep),
                }
            )

        cameras = []
        for name in CAMERA_NAMES:
            if name not in sample["data"]:
                raise ValueError(f"sample {sample['token']} of scene {scene['name']} has no {name} image")
            data = nusc.get("sample_data", sample["data"][name])
            calibration = self._calibration(data)
            # The camera fired at its own time: go through global with the camera's ego pose.
            ego_T_camera = ego_T_global @ self._pose(data) @ pose_matrix(calibration)
            cameras.append(
                {
                    "name": name,
                    "path": data["filename"],
                    "intrinsics": _listed(calibration["camera_intrinsic"]),
                    "ego_T_camera": _listed(ego_T_camera),
                    "width": int(data["width"]),
                    "height": int(data["height"]),
                }
            )

        return {
            "objects": self._objects(sample, ego_T_global),
            "ego_future": self._ego_future(sample, ego_T_global),
            "token": sample["token"],
            "scene": scene["name"],
            "split": split,
            "condition": scene_condition(scene["description"]),
            "description": scene["description"],
            "location": location,
            "timestamp": int(sample["timestamp"]),
            "global_T_ego": _listed(global_T_ego),
            "lidar": {
                "path": lidar["filename"],
                "ego_T_lidar": _listed(pose_matrix(self._calibration(lidar))),
            },
            "sweeps": sweeps,
            "cameras": cameras,
        }


# -- label rasterisation, optionally in worker processes ------------------------------------


class _LabelJob:
    """Packed ``(C, X, ceil(Y/8))`` labels of a (location, global_T_ego); loads each map once."""

    def __init__(self, dataroot: str, grid: BEVGrid, classes: tuple[str, ...]) -> None:
        self.dataroot, self.grid, self.classes = dataroot, grid, classes
        self.maps: dict[str, Any] = {}

    def __call__(self, job: tuple[str, list[list[float]]]) -> np.ndarray:
        location, global_T_ego = job
        if location not in self.maps:
            self.maps[location] = load_map(self.dataroot, location)
        labels = rasterise_map_labels(self.maps[location], np.asarray(global_T_ego), self.grid, self.classes)
        return np.packbits(labels, axis=-1)


_WORKER_JOB: _LabelJob | None = None  # one per worker process (maps are too big to send around)


def _init_worker(dataroot: str, grid: BEVGrid, classes: tuple[str, ...]) -> None:
    global _WORKER_JOB
    _WORKER_JOB = _LabelJob(dataroot, grid, classes)


def _run_worker_job(job: tuple[str, list[list[float]]]) -> np.ndarray:
    return _WORKER_JOB(job)


def _label_stream(
    jobs: list[tuple[str, list[list[float]]]],
    dataroot: Path,
    grid: BEVGrid,
    classes: tuple[str, ...],
    workers: int,
) -> Iterator[np.ndarray]:
    """Packed labels of ``jobs`` in order, computed here or in ``workers`` processes."""
    if workers <= 0:
        yield from map(_LabelJob(str(dataroot), grid, classes), jobs)
        return
    with multiprocessing.get_context().Pool(
        workers, initializer=_init_worker, initargs=(str(dataroot), grid, classes)
    ) as pool:
        yield from pool.imap(_run_worker_job, jobs, chunksize=4)


# -- the cache --------------------------------------------------------------------------------


def _settings(meta: dict) -> dict:
    return {key: meta.get(key) for key in SETTING_KEYS}


def _existing_cache(cache_dir: Path, settings: dict, overwrite: bool) -> bool:
    """True when ``cache_dir`` already holds a complete cache made with ``settings``."""
    meta_path = cache_dir / "meta.json"
    if overwrite or not cache_dir.exists():
        return False
    complete = all((cache_dir / name).is_file() for name in ("meta.json", "samples.json", "labels.npy"))
    if not complete:
        raise FileExistsError(f"{cache_dir} exists but is not a complete cache: rebuild it with bridgeta data prepare --force")
    existing = _settings(json.loads(meta_path.read_text()))
    if existing != settings:
        changed = [key for key in SETTING_KEYS if existing[key] != settings[key]]
        raise FileExistsError(
            f"{meta_path} was prepared with different settings ({', '.join(changed)}: "
            f"{[existing[k] for k in changed]} vs {[settings[k] for k in changed]}); "
            "rebuild it with bridgeta data prepare --force, or pass another --cache"
        )
    return True


def prepare_dataroot(
    dataroot: str | Path,
    version: str,
    cache_dir: str | Path | None = None,
    label_grid: BEVGrid = DEFAULT_LABEL_GRID,
    classes: Sequence[str] = MAP_CLASSES,
    max_sweeps: int = 10,
    overwrite: bool = False,
    workers: int = 0,
    progress: bool = True,
) -> Path:
    """Write the cache of every keyframe sample of ``version`` in ``dataroot``; return its directory.

    ``max_sweeps`` previous LIDAR_TOP sweeps are recorded per sample (keyframes and non-keyframes
    alike, newest first); training may use fewer. ``workers`` > 0 rasterises labels in that many
    processes (the devkit's map queries dominate the run time on real nuScenes). Re-running with
    the same settings returns the existing cache unless ``overwrite``.
    """
    if max_sweeps < 0:
        raise ValueError(f"max_sweeps must be >= 0, got {max_sweeps}")
    dataroot = Path(dataroot).expanduser().resolve()
    if not (dataroot / version).is_dir():
        raise FileNotFoundError(f"no nuScenes tables for {version}: {dataroot / version} is missing (--version?)")
    cache_dir = Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir(dataroot, version)
    classes = tuple(classes)
    settings = {
        "format": CACHE_FORMAT,
        "version": version,
        "dataroot": str(dataroot),
        "classes": list(classes),
        "label_grid": grid_to_dict(label_grid),
        "max_sweeps": max_sweeps,
    }
    if _existing_cache(cache_dir, settings, overwrite):
        return cache_dir

    nusc = load_nuscenes(dataroot, version)
    scene_split, split_source = load_scene_splits(dataroot, version)
    scenes = sorted(nusc.scene, key=lambda s: s["name"])
    missing = [s["name"] for s in scenes if s["name"] not in scene_split]
    if missing:
        raise ValueError(f"scene {missing[0]} is in no split of {split_source}")
    builder = _Records(nusc, max_sweeps)
    records = []
    for scene in tqdm(scenes, desc=f"records {version}", unit="scene", disable=not progress):
        try:
            location = nusc.get("log", scene["log_token"])["location"]
            token = scene["first_sample_token"]
            while token:
                sample = nusc.get("sample", token)
                records.append(builder.build(sample, scene, scene_split[scene["name"]], location))
                token = sample["next"]
        except KeyError as exc:  # the devkit's "token not in table" is a bare KeyError
            raise ValueError(
                f"{dataroot / version}: scene {scene['name']} refers to {exc}, which is not in its table; "
                f"bridgeta data check --dataroot {dataroot} --version {version} lists every problem"
            ) from None

    nx, ny = label_grid.shape
    temporary = cache_dir.parent / f".{cache_dir.name}.tmp-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    new_parent = not cache_dir.parent.exists()  # a failed prepare leaves no empty .bridgeta_cache
    temporary.mkdir(parents=True)
    try:
        shape = (len(records), len(classes), nx, (ny + 7) // 8)
        labels = np.lib.format.open_memmap(temporary / "labels.npy", mode="w+", dtype=np.uint8, shape=shape)
        cells: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(classes), dtype=np.int64))
        jobs = [(r["location"], r["global_T_ego"]) for r in records]
        stream = _label_stream(jobs, dataroot, label_grid, classes, workers)
        bar = tqdm(stream, total=len(jobs), desc=f"labels {version}", unit="sample", disable=not progress)
        for index, packed in enumerate(bar):
            labels[index] = packed
            cells[records[index]["split"]] += np.unpackbits(packed, axis=-1, count=ny).sum(
                axis=(1, 2), dtype=np.int64
            )
        labels.flush()
        del labels

        counts = {split: sum(r["split"] == split for r in records) for split in sorted(cells)}
        meta = {
            **settings,
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "bridgeta_version": bridgeta.__version__,
            "splits_from": split_source,
            "num_samples": len(records),
            "counts": counts,
            "coverage": {
                split: {c: float(cells[split][k]) / (counts[split] * nx * ny) for k, c in enumerate(classes)}
                for split in counts
            },
            "cameras": list(CAMERA_NAMES),
        }
        (temporary / "samples.json").write_text(json.dumps(records, separators=(",", ":")))
        (temporary / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _replace_directory(temporary, cache_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if new_parent and not any(cache_dir.parent.iterdir()):
            cache_dir.parent.rmdir()
        raise
    return cache_dir


def _replace_directory(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an old ``target`` is set aside first and deleted after."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
