"""Write a dataroot in the real nuScenes format (tables, sensor files, maps).

The synthetic world and the tests write through this one class, so whatever reads real nuScenes
(the official devkit, our loader) reads what we write. Table schemas follow the nuScenes schema
(``v1.0-*/*.json``): ``category, attribute, visibility, instance, sensor, calibrated_sensor,
ego_pose, log, scene, sample, sample_data, sample_annotation, map``. Rotations are quaternions
``[w, x, y, z]``; translations metres; timestamps microseconds.

Records are kept in memory (they are small) and linked (``prev``/``next``, scene and instance
summaries) by :meth:`NuScenesWriter.finalize`, which writes every table atomically. Sensor files
are written immediately so a long generation streams to disk.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np

from bridgeta.files import atomic_write_text

TABLES = (
    "category",
    "attribute",
    "visibility",
    "instance",
    "sensor",
    "calibrated_sensor",
    "ego_pose",
    "log",
    "scene",
    "sample",
    "sample_data",
    "sample_annotation",
    "map",
)

# nuScenes visibility levels (fraction of the annotation visible in all cameras).
VISIBILITY_LEVELS = (
    ("1", "v0-40", "visibility of whole object is between 0 and 40%"),
    ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
    ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
    ("4", "v80-100", "visibility of whole object is between 80 and 100%"),
)


def yaw_to_quaternion(yaw: float) -> list[float]:
    """``[w, x, y, z]`` of a rotation by ``yaw`` radians about +Z."""
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def matrix_to_quaternion(rotation: np.ndarray) -> list[float]:
    """``[w, x, y, z]`` (w >= 0) of a 3x3 rotation matrix (Shepperd's method, numerically stable)."""
    m = np.asarray(rotation, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * math.sqrt(trace + 1.0)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    if q[0] < 0:
        q = [-v for v in q]
    norm = math.sqrt(sum(v * v for v in q))
    return [v / norm for v in q]


def quaternion_to_matrix(quaternion: Iterable[float]) -> np.ndarray:
    w, x, y, z = quaternion
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def pose_to_record(transform: np.ndarray) -> tuple[list[float], list[float]]:
    """(translation, rotation quaternion) of a 4x4 ``a_T_b``, as nuScenes stores it."""
    transform = np.asarray(transform, dtype=np.float64)
    return [float(v) for v in transform[:3, 3]], matrix_to_quaternion(transform[:3, :3])


class NuScenesWriter:
    """Accumulates nuScenes records for one ``version`` and writes the dataroot.

    Tokens are deterministic (md5 of ``namespace`` and a per-table counter), so the same
    generation produces byte-identical tables.
    """

    def __init__(self, dataroot: str | Path, version: str, namespace: str = "bridgeta") -> None:
        self.dataroot = Path(dataroot)
        self.version = version
        self.namespace = namespace
        self.tables: dict[str, list[dict]] = {name: [] for name in TABLES}
        self._counters: dict[str, int] = defaultdict(int)
        self._by_name: dict[tuple[str, str], str] = {}
        self._sample_data_channel: dict[str, str] = {}
        self._sample_data_filename: dict[str, str] = {}
        self._calibrated_channel: dict[str, str] = {}
        self._sample_scene: dict[str, str] = {}
        self.visibility_tokens = {
            level: self._add("visibility", {"token": token, "level": level, "description": text})
            for token, level, text in VISIBILITY_LEVELS
        }

    # -- tokens and bookkeeping -------------------------------------------------------------

    def _token(self, table: str) -> str:
        self._counters[table] += 1
        key = f"{self.namespace}/{self.version}/{table}/{self._counters[table]}"
        return hashlib.md5(key.encode()).hexdigest()

    def _add(self, table: str, record: dict) -> str:
        record.setdefault("token", self._token(table))
        self.tables[table].append(record)
        return record["token"]

    def _named(self, table: str, name: str, make: dict) -> str:
        """Token of the record called ``name`` in ``table``, creating it the first time."""
        if (table, name) not in self._by_name:
            self._by_name[(table, name)] = self._add(table, make)
        return self._by_name[(table, name)]

    def _sensor_filename(self, channel: str, timestamp: int, is_key_frame: bool, extension: str) -> str:
        """nuScenes layout: keyframes under samples/, other sweeps under sweeps/."""
        folder = "samples" if is_key_frame else "sweeps"
        return f"{folder}/{channel}/{self.namespace}__{channel}__{int(timestamp)}.{extension}"

    def _new_file(self, filename: str) -> Path:
        """Path of a sensor file to create; an existing file is never overwritten.

        Two records must never share a file: a collision means two frames were given the same
        channel and timestamp, and silently overwriting would corrupt the earlier record's data.
        """
        path = self.dataroot / filename
        if path.exists():
            raise FileExistsError(f"{path} already exists: two sample_data records would share one file")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # -- static tables ----------------------------------------------------------------------

    def category(self, name: str, description: str = "") -> str:
        return self._named("category", name, {"name": name, "description": description})

    def attribute(self, name: str, description: str = "") -> str:
        return self._named("attribute", name, {"name": name, "description": description})

    def sensor(self, channel: str, modality: str) -> str:
        if modality not in ("camera", "lidar", "radar"):
            raise ValueError(f"sensor {channel}: modality must be camera/lidar/radar, got {modality}")
        return self._named("sensor", channel, {"channel": channel, "modality": modality})

    def calibrated_sensor(
        self, channel: str, modality: str, ego_T_sensor: np.ndarray, intrinsics: np.ndarray | None = None
    ) -> str:
        translation, rotation = pose_to_record(ego_T_sensor)
        camera_intrinsic = [] if intrinsics is None else np.asarray(intrinsics, dtype=float).tolist()
        if modality == "camera" and not camera_intrinsic:
            raise ValueError(f"camera {channel} needs intrinsics")
        token = self._add(
            "calibrated_sensor",
            {
                "sensor_token": self.sensor(channel, modality),
                "translation": translation,
                "rotation": rotation,
                "camera_intrinsic": camera_intrinsic,
            },
        )
        self._calibrated_channel[token] = channel
        return token

    def log(self, location: str, logfile: str, vehicle: str = "bridgeta-synth", date_captured: str = "2026-01-01") -> str:
        return self._add(
            "log",
            {"logfile": logfile, "vehicle": vehicle, "date_captured": date_captured, "location": location},
        )

    def map(self, log_tokens: list[str], image: np.ndarray, category: str = "semantic_prior") -> str:
        """A map record with its raster (uint8 2D array, e.g. a drivable-area prior) as PNG."""
        from PIL import Image

        token = self._token("map")
        filename = f"maps/{token}.png"
        path = self._new_file(filename)
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)
        return self._add(
            "map", {"token": token, "log_tokens": list(log_tokens), "category": category, "filename": filename}
        )

    # -- scenes, samples, sensor data ----------------------------------------------------------

    def scene(self, name: str, description: str, log_token: str) -> str:
        return self._add("scene", {"name": name, "description": description, "log_token": log_token})

    def sample(self, scene_token: str, timestamp: int) -> str:
        token = self._add("sample", {"timestamp": int(timestamp), "scene_token": scene_token})
        self._sample_scene[token] = scene_token
        return token

    def ego_pose(self, timestamp: int, global_T_ego: np.ndarray) -> str:
        translation, rotation = pose_to_record(global_T_ego)
        return self._add(
            "ego_pose", {"timestamp": int(timestamp), "translation": translation, "rotation": rotation}
        )

    def _sample_data(
        self,
        sample_token: str,
        calibrated_sensor_token: str,
        ego_pose_token: str,
        timestamp: int,
        filename: str,
        fileformat: str,
        is_key_frame: bool,
        width: int = 0,
        height: int = 0,
    ) -> str:
        channel = self._calibrated_channel[calibrated_sensor_token]
        token = self._add(
            "sample_data",
            {
                "sample_token": sample_token,
                "ego_pose_token": ego_pose_token,
                "calibrated_sensor_token": calibrated_sensor_token,
                "timestamp": int(timestamp),
                "fileformat": fileformat,
                "is_key_frame": bool(is_key_frame),
                "height": int(height),
                "width": int(width),
                "filename": filename,
            },
        )
        self._sample_data_channel[token] = channel
        self._sample_data_filename[token] = filename
        return token

    def filename(self, sample_data_token: str) -> str:
        """The file (relative to the dataroot) of a ``sample_data`` record written here."""
        return self._sample_data_filename[sample_data_token]

    def camera_image(
        self,
        sample_token: str,
        calibrated_sensor_token: str,
        ego_pose_token: str,
        timestamp: int,
        channel: str,
        image: np.ndarray,
        is_key_frame: bool = True,
        quality: int = 90,
    ) -> str:
        """Write ``image`` (uint8 H x W x 3) as JPEG under samples/ (keyframe) or sweeps/."""
        from PIL import Image

        filename = self._sensor_filename(channel, timestamp, is_key_frame, "jpg")
        path = self._new_file(filename)
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path, quality=quality)
        height, width = image.shape[:2]
        return self._sample_data(
            sample_token,
            calibrated_sensor_token,
            ego_pose_token,
            timestamp,
            filename,
            "jpg",
            is_key_frame,
            width,
            height,
        )

    def lidar_sweep(
        self,
        sample_token: str,
        calibrated_sensor_token: str,
        ego_pose_token: str,
        timestamp: int,
        channel: str,
        points: np.ndarray,
        is_key_frame: bool = True,
    ) -> str:
        """Write ``points`` (N x 5 float32: x, y, z, intensity, ring; sensor frame) as .pcd.bin."""
        points = np.asarray(points, dtype=np.float32)
        if points.ndim != 2 or points.shape[1] != 5:
            raise ValueError(f"{channel} points must be (N, 5), got {points.shape}")
        filename = self._sensor_filename(channel, timestamp, is_key_frame, "pcd.bin")
        path = self._new_file(filename)
        points.tofile(path)
        return self._sample_data(
            sample_token, calibrated_sensor_token, ego_pose_token, timestamp, filename, "pcd", is_key_frame
        )

    # -- annotations ---------------------------------------------------------------------------

    def instance(self, category_name: str) -> str:
        return self._add("instance", {"category_token": self.category(category_name)})

    def annotation(
        self,
        sample_token: str,
        instance_token: str,
        center: Iterable[float],
        size_wlh: Iterable[float],
        yaw: float,
        visibility: str = "v80-100",
        attributes: Iterable[str] = (),
        num_lidar_pts: int = 0,
    ) -> str:
        """A 3D box in the global frame; ``size_wlh`` is (width, length, height) as in nuScenes."""
        return self._add(
            "sample_annotation",
            {
                "sample_token": sample_token,
                "instance_token": instance_token,
                "visibility_token": self.visibility_tokens[visibility],
                "attribute_tokens": [self.attribute(a) for a in attributes],
                "translation": [float(v) for v in center],
                "size": [float(v) for v in size_wlh],
                "rotation": yaw_to_quaternion(yaw),
                "num_lidar_pts": int(num_lidar_pts),
                "num_radar_pts": 0,
            },
        )

    # -- linking and writing ----------------------------------------------------------------

    @staticmethod
    def _link(records: list[dict], key) -> None:
        """Set prev/next along each group of ``records`` (grouped by ``key``), in timestamp order."""
        groups: dict[object, list[dict]] = defaultdict(list)
        for record in records:
            groups[key(record)].append(record)
        for group in groups.values():
            group.sort(key=lambda r: r.get("timestamp", 0))
            for previous, current in zip([None] + group[:-1], group):
                current["prev"] = previous["token"] if previous else ""
                if previous:
                    previous["next"] = current["token"]
            group[-1]["next"] = ""

    def finalize(self) -> Path:
        """Link records, fill the summaries, and write ``DATAROOT/<version>/*.json``."""
        tables = self.tables
        self._link(tables["sample"], key=lambda r: r["scene_token"])
        self._link(
            tables["sample_data"],
            key=lambda r: (self._sample_scene[r["sample_token"]], self._sample_data_channel[r["token"]]),
        )
        sample_time = {s["token"]: s["timestamp"] for s in tables["sample"]}
        for record in tables["sample_annotation"]:
            record["timestamp"] = sample_time[record["sample_token"]]
        self._link(tables["sample_annotation"], key=lambda r: r["instance_token"])
        for record in tables["sample_annotation"]:
            del record["timestamp"]

        samples_by_scene: dict[str, list[dict]] = defaultdict(list)
        for sample in tables["sample"]:
            samples_by_scene[sample["scene_token"]].append(sample)
        for scene in tables["scene"]:
            samples = sorted(samples_by_scene.get(scene["token"], []), key=lambda s: s["timestamp"])
            if not samples:
                raise ValueError(f"scene {scene['name']} has no samples")
            scene["nbr_samples"] = len(samples)
            scene["first_sample_token"] = samples[0]["token"]
            scene["last_sample_token"] = samples[-1]["token"]

        annotations_by_instance: dict[str, list[dict]] = defaultdict(list)
        for annotation in tables["sample_annotation"]:
            annotations_by_instance[annotation["instance_token"]].append(annotation)
        for instance in tables["instance"]:
            chain = annotations_by_instance.get(instance["token"], [])
            first = next((a for a in chain if a["prev"] == ""), None)
            last = next((a for a in chain if a["next"] == ""), None)
            instance["nbr_annotations"] = len(chain)
            instance["first_annotation_token"] = first["token"] if first else ""
            instance["last_annotation_token"] = last["token"] if last else ""
        # An instance with no annotation is not valid nuScenes; drop it.
        tables["instance"] = [i for i in tables["instance"] if i["nbr_annotations"] > 0]

        folder = self.dataroot / self.version
        folder.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            atomic_write_text(folder / f"{name}.json", json.dumps(tables[name], indent=0))
        return folder
