"""The training/evaluation dataset over a prepared cache, and its collate function.

Reads ``LabelCache`` (metadata + labels) and the sensor files of the dataroot; never imports the
nuScenes devkit. Per sample it returns a :class:`BEVSample`; :func:`collate_bev` batches them into
the model's :class:`~bridgeta.models.types.BEVInputs`, the labels and the metadata.

Augmentation is deterministic per ``(seed, epoch, sample)`` (call :meth:`BEVMapDataset.set_epoch`
before each epoch) so a resumed run sees the same data. The BEV and image augmentations draw from
separate streams, so a camera-only student and a LiDAR teacher built with the same seed see the
same ``bev_aug`` for the same sample.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bridgeta.config import MAP_CLASSES
from bridgeta.data.augment import (
    AugmentConfig,
    apply_bev_aug_boxes,
    apply_bev_aug_points,
    apply_image_aug,
    image_aug_scale,
    resample_labels,
    sample_bev_aug,
    sample_image_aug,
)
from bridgeta.data.cache import CacheError, LabelCache
from bridgeta.data.config import DataConfig
from bridgeta.data.epoch import EpochStreams, SharedEpoch
from bridgeta.geometry import BEVGrid, project_depth
from bridgeta.models.types import BEVInputs, CameraInputs, LidarInputs

__all__ = ["AugmentConfig", "BEVMapDataset", "BEVSample", "DataConfig", "DataFileError", "collate_bev", "load_points"]

log = logging.getLogger(__name__)

# "depth": projected LiDAR depth per camera pixel (CameraInputs.depth), read from the keyframe
# LiDAR sweep; it comes with the camera modality.
MODALITIES = ("camera", "lidar", "depth")
# Sweep points this close (m, |x| and |y| in the sweep's sensor frame) to the sensor are the ego
# vehicle itself; BEVFusion's LoadPointsFromMultiSweeps drops them the same way.
SWEEP_SELF_RADIUS = 1.0
POINT_BYTES = 5 * 4  # nuScenes .pcd.bin: float32 x, y, z, intensity, ring


class DataFileError(ValueError):
    """A sensor file is missing, truncated or undecodable; the message names it (and the sample)."""


_warned_non_finite: set[str] = set()  # one warning per file and process, not one per epoch


def read_pcd_bin(path: Path) -> np.ndarray:
    """``(P, 5)`` float32 points of a ``.pcd.bin``; non-finite points are dropped with a warning.

    Dropped, not refused: a NaN or infinite return carries no position, the other points of the
    sweep are valid, and one bad return should not stop a run that has trained for hours. Kept,
    it would turn the pillar features and then the loss into NaN far from the file that caused it.
    """
    try:
        data = np.fromfile(path, dtype=np.float32)
    except FileNotFoundError:
        raise DataFileError(f"{path}: LiDAR file is missing") from None
    except OSError as exc:
        raise DataFileError(f"{path}: cannot read the LiDAR file ({exc})") from None
    if data.size % 5:
        raise DataFileError(
            f"{path}: {data.size * 4} bytes is not a whole number of {POINT_BYTES}-byte points (truncated?)"
        )
    points = data.reshape(-1, 5)
    finite = np.isfinite(points[:, :4]).all(axis=1)
    if not finite.all():
        if str(path) not in _warned_non_finite:
            _warned_non_finite.add(str(path))
            log.warning("%s: dropped %d of %d points with NaN/Inf values", path, int((~finite).sum()), len(points))
        points = points[finite]
    return points


@dataclass
class BEVSample:
    """One sample. Camera fields are ``None`` without the camera modality, ``points`` without LiDAR.

    images:       ``(N, 3, H, W)`` float, normalised, augmented.
    intrinsics:   ``(N, 3, 3)`` of the original images; ``ego_T_camera`` ``(N, 4, 4)``;
                  ``image_aug`` ``(N, 3, 3)``.
    bev_aug:      ``(4, 4)`` augmented_ego_T_ego.
    depth:        ``(N, H, W)`` projected keyframe LiDAR depth per augmented pixel (``depth`` modality).
    points:       ``(P, 5)`` float32: x, y, z (augmented keyframe ego frame), intensity, time lag (s).
    ego_motion:   ``(3,)`` the ego's velocity (vx, vy, m/s, augmented frame) over the last
                  ``EGO_MOTION_WINDOW`` s and 1, or zeros where no earlier pose is cached
                  (:func:`ego_motion`).
    labels:       ``(C, X, Y)`` bool on the output grid, augmented frame.
    meta:         token, scene, condition, split, location, timestamp, index (in the cache).
    """

    bev_aug: torch.Tensor
    labels: torch.Tensor
    meta: dict[str, Any]
    ego_motion: torch.Tensor
    images: torch.Tensor | None = None
    intrinsics: torch.Tensor | None = None
    ego_T_camera: torch.Tensor | None = None
    image_aug: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    points: torch.Tensor | None = None


def load_points(dataroot: Path, record: dict, max_sweeps: int, max_sweep_lag: float) -> np.ndarray:
    """``(P, 5)`` float32 keyframe + sweep points in the keyframe ego frame (not augmented).

    Columns: x, y, z, intensity (from the file), time lag (s; 0 for the keyframe). Files are
    nuScenes ``.pcd.bin``: float32 ``(x, y, z, intensity, ring)`` in the sensor frame.
    """
    def read(path: str, transform: Sequence[Sequence[float]], lag: float, drop_self: bool) -> np.ndarray:
        raw = read_pcd_bin(dataroot / path)
        if drop_self:
            raw = raw[~((np.abs(raw[:, 0]) < SWEEP_SELF_RADIUS) & (np.abs(raw[:, 1]) < SWEEP_SELF_RADIUS))]
        matrix = np.asarray(transform, dtype=np.float64)
        xyz = raw[:, :3].astype(np.float64) @ matrix[:3, :3].T + matrix[:3, 3]
        out = np.empty((len(raw), 5), dtype=np.float32)
        out[:, :3], out[:, 3], out[:, 4] = xyz, raw[:, 3], lag
        return out

    lidar = record["lidar"]
    parts = [read(lidar["path"], lidar["ego_T_lidar"], 0.0, drop_self=False)]
    for sweep in record["sweeps"][:max_sweeps]:
        if sweep["time_lag"] > max_sweep_lag:
            break
        transform, lag = sweep["keyframe_ego_T_sweep_lidar"], sweep["time_lag"]
        parts.append(read(sweep["path"], transform, lag, drop_self=True))
    return np.concatenate(parts)


def load_image(
    path: Path, matrix: np.ndarray, original_size: tuple[int, int], final_size: tuple[int, int]
) -> Image.Image:
    """The augmented ``final_size`` RGB image; JPEGs are decoded at a reduced size when that suffices.

    ``Image.draft`` lets libjpeg decode at 1/2, 1/4 or 1/8 size (much faster); the matrix is
    rescaled to the decoded size, so the result still follows ``matrix``.
    """
    height, width = original_size
    scale = image_aug_scale(matrix)
    try:
        with Image.open(path) as source:
            if source.size != (width, height):
                actual = f"{source.size[1]}x{source.size[0]}"
                raise DataFileError(f"{path}: image is {actual}, the cache says {height}x{width}")
            source.draft("RGB", (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))
            image = source.convert("RGB")  # decodes: a truncated JPEG fails here
    except FileNotFoundError:
        raise DataFileError(f"{path}: image file is missing") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for truncated or foreign files
        if isinstance(exc, DataFileError):
            raise
        raise DataFileError(f"{path}: cannot decode the image ({exc})") from None
    decoded_w, decoded_h = image.size
    matrix = matrix @ np.diag([width / decoded_w, height / decoded_h, 1.0])
    return apply_image_aug(image, matrix, final_size)


# Keyframes of future targets (3 s at 2 Hz) and the lateral offset (m) at the last one that makes
# the driving command a turn (ST-P3's rule): 0 = left, 1 = straight, 2 = right.
FUTURE_STEPS = 6
COMMAND_LATERAL = 2.0
COMMANDS = ("left", "straight", "right")
# The annotations a planned ego box must not hit and the occupancy head predicts, at each future
# keyframe: every vehicle and pedestrian (the nuScenes detection classes they map to), whatever
# the object head detects and whether or not LiDAR saw them. ST-P3, UniAD and VAD score
# collisions against every vehicle and pedestrian annotation of each future frame the same way.
FUTURE_AGENT_CLASSES = ("car", "truck", "bus", "trailer", "construction_vehicle", "motorcycle", "bicycle", "pedestrian")


# The ego's status, an input of the planning head: its velocity over the last half second, from
# the poses of the cached LiDAR sweeps (prepare keeps the last 10: 0.5 s of nuScenes' 20 Hz
# LiDAR, 1 s of the synthetic world's 10 Hz). A single
# frame cannot see how fast the ego moves, and the BEV augmentation turns its heading; the
# velocity, turned with the augmentation, carries both (UniAD feeds the CAN bus for the same
# reason). Poses only: the sweeps' points are not read.
EGO_MOTION_WINDOW = 0.55


def ego_motion(record: dict, bev_aug: np.ndarray) -> np.ndarray:
    """``(3,)`` float32 ``(vx, vy, known)``: the ego's mean velocity (m/s) from the oldest cached
    sweep within ``EGO_MOTION_WINDOW`` s to the keyframe, in the augmented keyframe ego frame
    (scaled with it, as the plan targets are), and ``known`` = 1; zeros where no earlier pose is
    cached (a scene's first keyframe in nuScenes, or a cache prepared with ``max_sweeps`` 0)."""
    earlier = [s for s in record["sweeps"] if 0.0 < s["time_lag"] <= EGO_MOTION_WINDOW]
    if not earlier:
        return np.zeros(3, dtype=np.float32)
    oldest = max(earlier, key=lambda s: s["time_lag"])
    # keyframe_ego_T_sweep_ego: the sweep's LiDAR pose less the (fixed) LiDAR mounting.
    keyframe_T_sweep_ego = np.asarray(oldest["keyframe_ego_T_sweep_lidar"], dtype=np.float64) @ np.linalg.inv(
        np.asarray(record["lidar"]["ego_T_lidar"], dtype=np.float64))
    velocity = -keyframe_T_sweep_ego[:2, 3] / oldest["time_lag"]  # where the ego was, to where it is
    return np.array([*(bev_aug[:2, :2] @ velocity), 1.0], dtype=np.float32)


def _padded_future(tracks: list[list[tuple[float, float, float]]], step_seconds: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``(N, FUTURE_STEPS, 2)`` positions and ``(N, FUTURE_STEPS)`` bool mask of tracks given as
    ``(x, y, seconds ahead)`` points. Each point goes to the keyframe slot of its time (2 Hz), not
    of its rank: a track whose annotations skip keyframes (an agent out of range for a while)
    keeps its later points at their own times, and the skipped slots are masked."""
    positions = np.zeros((len(tracks), FUTURE_STEPS, 2), dtype=np.float32)
    mask = np.zeros((len(tracks), FUTURE_STEPS), dtype=bool)
    for i, track in enumerate(tracks):
        for x, y, seconds in track:
            slot = int(round(seconds / step_seconds)) - 1
            if 0 <= slot < FUTURE_STEPS:
                positions[i, slot], mask[i, slot] = (x, y), True
    return positions, mask


def _boxes_through(transform: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``(N, 9)`` boxes (x, y, z, length, width, height, yaw, vx, vy) of one frame seen from
    another: ``transform`` is ``this_T_that``, 4x4. The heading turns with the rotation about z."""
    out = np.array(boxes, dtype=np.float64, copy=True)
    if len(out) == 0:
        return out
    rotation = transform[:3, :3]
    out[:, :3] = boxes[:, :3] @ rotation.T + transform[:3, 3]
    heading = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6]), np.zeros(len(boxes))], axis=1) @ rotation.T
    out[:, 6] = np.arctan2(heading[:, 1], heading[:, 0])
    out[:, 7:9] = boxes[:, 7:9] @ rotation[:2, :2].T
    return out


def _move_xy(points: np.ndarray, bev_aug: np.ndarray) -> np.ndarray:
    """x, y of ground points ``(..., 2)`` moved by the BEV augmentation (z = 0)."""
    flat = np.concatenate([points.reshape(-1, 2), np.zeros((points.reshape(-1, 2).shape[0], 1))], axis=1)
    return apply_bev_aug_points(flat, bev_aug)[:, :2].reshape(points.shape).astype(np.float32)


def driving_command(displacement: np.ndarray, mask: np.ndarray) -> int:
    """The command of a future ego path ``(T, 2)`` of displacements from the ego: left when its
    last valid point lies more than ``COMMAND_LATERAL`` m to the left (+y), right below minus
    that, else straight."""
    if not mask.any():
        return COMMANDS.index("straight")
    lateral = float(displacement[np.flatnonzero(mask)[-1], 1])
    if lateral > COMMAND_LATERAL:
        return COMMANDS.index("left")
    if lateral < -COMMAND_LATERAL:
        return COMMANDS.index("right")
    return COMMANDS.index("straight")


class BEVMapDataset(EpochStreams, Dataset):
    """BEV map segmentation samples of one split of a prepared dataroot.

    Only the files of the requested ``modalities`` are read (a camera-only model never opens a
    LiDAR file). ``output_grid`` is the model's label grid; cached labels are resampled onto it
    through the BEV augmentation. ``split`` overrides ``config.split``.
    """

    def __init__(
        self,
        config: DataConfig,
        image_size: tuple[int, int],
        output_grid: BEVGrid,
        classes: Sequence[str] = MAP_CLASSES,
        train: bool = False,
        modalities: Sequence[str] = MODALITIES,
        seed: int = 0,
        split: str | None = None,
        object_classes: Sequence[str] = (),
    ) -> None:
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        self.config = config
        self.image_size = tuple(image_size)
        self.output_grid = output_grid
        self.classes = tuple(classes)
        self.train = train
        self.modalities = tuple(modalities)
        # Detection classes to load boxes of (a model with an object head); none: no boxes.
        self.object_classes = tuple(object_classes)
        if "depth" in self.modalities and "camera" not in self.modalities:
            raise ValueError("the 'depth' modality is per camera pixel: it needs the 'camera' modality too")
        self.seed = seed
        self._epoch = SharedEpoch()  # read by the loader workers (data/epoch.py)
        self.split = split or config.split
        self.dataroot = Path(config.dataroot).expanduser()
        self.cache = LabelCache(config.resolved_cache_dir())
        if self.cache.meta["version"] != config.version:
            raise CacheError(
                f"{self.cache.cache_dir / 'meta.json'}: prepared for {self.cache.meta['version']}, "
                f"not data.version={config.version}"
            )
        if "lidar" in self.modalities and self.cache.meta["max_sweeps"] < config.max_sweeps:
            raise CacheError(
                f"{self.cache.cache_dir / 'meta.json'}: prepared with max_sweeps="
                f"{self.cache.meta['max_sweeps']}, fewer than data.max_sweeps={config.max_sweeps}"
            )
        self.class_indices = self.cache.class_indices(self.classes)
        self.indices = self.cache.indices(self.split)[:: config.load_interval]
        mean, std = torch.tensor(config.mean).view(3, 1, 1), torch.tensor(config.std).view(3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), mean / std

    @classmethod
    def for_model(
        cls,
        config: DataConfig,
        model: Any,
        split: str,
        train: bool = False,
        seed: int = 0,
        modalities: Sequence[str] | None = None,
    ) -> "BEVMapDataset":
        """The samples ``model`` (a ``BEVModel``) consumes: its image size, output grid, classes and
        modalities (``modalities`` widens them, e.g. to LiDAR for a distillation teacher)."""
        camera = model.config.camera
        return cls(
            config,
            tuple(camera.image_size) if camera is not None else (0, 0),
            model.output_grid,
            model.classes,
            train=train,
            modalities=tuple(modalities) if modalities is not None else model.modalities,
            seed=seed,
            split=split,
            object_classes=getattr(model, "object_classes", ()),
        )

    def __len__(self) -> int:
        return len(self.indices)

    def index_of(self, token: str) -> int:
        """Position in this dataset of the sample ``token``."""
        position = np.flatnonzero(self.indices == self.cache.index_of(token))
        if not len(position):
            raise KeyError(
                f"sample {token} is not in split '{self.split}' (load_interval {self.config.load_interval})"
            )
        return int(position[0])

    def _rng(self, cache_index: int, stream: int) -> np.random.Generator:
        """Keyed by the cache index, so a sample's augmentation ignores split and load_interval."""
        return np.random.default_rng([self.seed, self.augment_epoch, cache_index, stream])

    def missing_files(self) -> list[tuple[str, Path]]:
        """``(sample token, path)`` of every sensor file this dataset would read that does not exist."""
        missing = []
        for cache_index in self.indices:
            record = self.cache.record(int(cache_index))
            paths = []
            if "camera" in self.modalities:
                paths += [camera["path"] for camera in record["cameras"]]
            if "lidar" in self.modalities:
                sweeps = [s for s in record["sweeps"][: self.config.max_sweeps] if s["time_lag"] <= self.config.max_sweep_lag]
                paths += [record["lidar"]["path"], *(s["path"] for s in sweeps)]
            elif "depth" in self.modalities:
                paths.append(record["lidar"]["path"])
            missing += [(record["token"], self.dataroot / p) for p in paths if not (self.dataroot / p).is_file()]
        return missing

    def __getitem__(self, index: int) -> BEVSample:
        cache_index = int(self.indices[index])
        record = self.cache.record(cache_index)
        try:
            return self._load(cache_index, record)
        except DataFileError as exc:  # the file is named; add the sample it belongs to
            raise DataFileError(f"sample {record['token']}: {exc}") from None

    def _load(self, cache_index: int, record: dict) -> BEVSample:
        bev_aug = sample_bev_aug(self._rng(cache_index, 0), self.config.augment, self.train)
        labels = self.cache.labels(cache_index)[self.class_indices]
        labels = resample_labels(labels, self.cache.label_grid, self.output_grid, bev_aug)
        motion = torch.from_numpy(ego_motion(record, bev_aug))
        sample = BEVSample(
            bev_aug=torch.from_numpy(bev_aug).float(),
            labels=torch.from_numpy(labels),
            ego_motion=motion,
            meta={
                "token": record["token"],
                "scene": record["scene"],
                "condition": record["condition"],
                "split": record["split"],
                "location": record["location"],
                "timestamp": record["timestamp"],
                "index": cache_index,
                "global_T_ego": record["global_T_ego"],  # to put predicted boxes in the global frame
            },
        )
        if self.object_classes:
            sample.meta["objects"] = self._objects(cache_index, record, bev_aug, motion)
        if "camera" in self.modalities:
            self._add_cameras(sample, record, self._rng(cache_index, 1))
        if "depth" in self.modalities:
            # The keyframe sweep only: earlier sweeps see a world that has moved since.
            keyframe = torch.from_numpy(load_points(self.dataroot, record, 0, 0.0)[:, :3])
            sample.depth = project_depth(keyframe, sample.intrinsics, sample.ego_T_camera, sample.image_aug,
                                         self.image_size)
        if "lidar" in self.modalities:
            points = load_points(self.dataroot, record, self.config.max_sweeps, self.config.max_sweep_lag)
            sample.points = torch.from_numpy(apply_bev_aug_points(points, bev_aug))
        return sample

    def _objects(self, cache_index: int, record: dict, bev_aug: np.ndarray,
                 motion: torch.Tensor) -> dict[str, torch.Tensor]:
        """The sample's boxes of ``object_classes`` with LiDAR support (BEVFusion's valid flag), in
        the augmented ego frame: ``{"boxes": (N, 9), "labels": (N,)}`` (class index).

        With the tracks cached, also what the motion, occupancy and planning heads need (all in
        the augmented frame of this sample):

        * ``future`` ``(N, T, 2)`` and ``future_mask`` ``(N, T)``: those boxes' next annotated
          centres along their tracks (the motion targets);
        * ``future_agents`` ``(A, T, 5)`` (x, y, length, width, yaw) and ``future_agents_mask``
          ``(A, T)``: every ``FUTURE_AGENT_CLASSES`` annotation of each future keyframe, one row
          per instance, each with its own annotated box and heading then (the collision and
          occupancy truth);
        * ``ego_future`` ``(T, 2)``, ``ego_future_yaw`` ``(T,)`` and ``ego_future_mask`` ``(T,)``:
          the logged ego poses, with ``ego_position``, ``ego_yaw``, the ``command`` and the
          ``ego_motion`` the model reads (``motion``: the constant-velocity reference of the
          planning metric).
        """
        if "objects" not in record:
            raise CacheError(
                f"{self.cache.cache_dir}: prepared before boxes were cached; run bridgeta data prepare "
                f"--dataroot {self.dataroot} --force for a model with an object head"
            )
        index = {name: i for i, name in enumerate(self.object_classes)}
        kept = [o for o in record["objects"] if o["name"] in index and o["num_lidar_pts"] > 0]
        boxes = np.array([o["box"] for o in kept], dtype=np.float64).reshape(-1, 9)
        out = {
            "boxes": torch.from_numpy(apply_bev_aug_boxes(boxes, bev_aug)),
            "labels": torch.tensor([index[o["name"]] for o in kept], dtype=torch.long),
        }
        if all("future" in o for o in kept):  # caches prepared with the tracks (motion targets)
            future, mask = _padded_future([[(x, y, ahead) for x, y, ahead in o["future"]] for o in kept])
            out["future"] = torch.from_numpy(_move_xy(future, bev_aug))
            out["future_mask"] = torch.from_numpy(mask)
        if "ego_future" in record:
            ego, ego_mask = _padded_future([[(x, y, ahead) for x, y, _, ahead in record["ego_future"]]])
            moved = _move_xy(ego[0], bev_aug)
            origin = _move_xy(np.zeros((1, 2), dtype=np.float32), bev_aug)[0]  # where the ego is after the augmentation
            heading = bev_aug[:2, 0]  # the ego's forward axis after it (times the scale)
            yaw = float(np.arctan2(heading[1], heading[0]))
            # The logged headings (ego_pose's yaw, cached as step[2]), turned by the augmentation
            # as a box's heading is.
            logged_yaw = np.zeros((FUTURE_STEPS, 9))
            steps = record["ego_future"][:FUTURE_STEPS]
            logged_yaw[: len(steps), 6] = [step[2] for step in steps]
            out["ego_future"] = torch.from_numpy(moved)
            out["ego_future_yaw"] = torch.from_numpy(apply_bev_aug_boxes(logged_yaw, bev_aug)[:, 6] * ego_mask[0])
            out["ego_position"] = torch.from_numpy(origin)
            out["ego_yaw"] = yaw
            out["ego_future_mask"] = torch.from_numpy(ego_mask[0])
            agents, agents_mask = self._future_agents(cache_index, record, bev_aug)
            out["future_agents"] = torch.from_numpy(agents)
            out["future_agents_mask"] = torch.from_numpy(agents_mask)
            # The command is relative to the ego's own heading, as in ST-P3: the augmented path
            # turned back by that heading and unscaled. A rotation leaves the command as it was; a
            # flip mirrors the world, and a left turn becomes a right one with it.
            c, s_ = np.cos(-yaw), np.sin(-yaw)
            relative = (moved - origin) @ np.array([[c, s_], [-s_, c]]) / np.linalg.norm(heading)
            out["command"] = driving_command(relative, ego_mask[0])
            out["ego_motion"] = motion
        return out

    def _future_agents(self, cache_index: int, record: dict, bev_aug: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(A, FUTURE_STEPS, 5)`` float32 boxes (x, y, length, width, yaw) in this sample's
        augmented frame and their ``(A, FUTURE_STEPS)`` mask: the ``FUTURE_AGENT_CLASSES``
        annotations of each future keyframe, one row per instance (in order of first appearance),
        present at the keyframes that annotate it. So an agent that enters the scene later counts,
        and each box has the size and heading annotated then.

        The future keyframes are the records that follow this one in the cache: prepare writes a
        scene's keyframes in order. Each is checked against the cached ego path (same scene, the
        same time ahead)."""
        ego_T_global = np.linalg.inv(np.asarray(record["global_T_ego"], dtype=np.float64))
        rows: dict[str, int] = {}
        found: list[tuple[int, np.ndarray, list[str]]] = []
        for step, pose in enumerate(record["ego_future"][:FUTURE_STEPS]):
            index = cache_index + step + 1
            later = self.cache.record(index) if index < len(self.cache) else None
            if (later is None or later["scene"] != record["scene"]
                    or abs((later["timestamp"] - record["timestamp"]) / 1e6 - pose[-1]) > 1e-3):
                raise CacheError(
                    f"{self.cache.cache_dir}: the record after sample {record['token']} is not its next keyframe "
                    f"({pose[-1]:.2f} s ahead); rebuild the cache with bridgeta data prepare --dataroot "
                    f"{self.dataroot} --force"
                )
            kept = [o for o in later["objects"] if o["name"] in FUTURE_AGENT_CLASSES]
            boxes = np.array([o["box"] for o in kept], dtype=np.float64).reshape(-1, 9)
            boxes = _boxes_through(ego_T_global @ np.asarray(later["global_T_ego"], dtype=np.float64), boxes)
            instances = [o["instance"] for o in kept]
            for instance in instances:
                rows.setdefault(instance, len(rows))
            found.append((step, apply_bev_aug_boxes(boxes, bev_aug), instances))
        agents = np.zeros((len(rows), FUTURE_STEPS, 5), dtype=np.float32)
        mask = np.zeros((len(rows), FUTURE_STEPS), dtype=bool)
        for step, boxes, instances in found:
            where = [rows[i] for i in instances]
            agents[where, step] = boxes[:, [0, 1, 3, 4, 6]]
            mask[where, step] = True
        return agents, mask

    def _add_cameras(self, sample: BEVSample, record: dict, rng: np.random.Generator) -> None:
        images, augs = [], []
        for camera in record["cameras"]:
            original_size = (camera["height"], camera["width"])
            matrix = sample_image_aug(rng, original_size, self.image_size, self.config.augment, self.train)
            image = load_image(self.dataroot / camera["path"], matrix, original_size, self.image_size)
            pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()
            images.append(pixels.mul_(self._scale).sub_(self._shift))  # (pixels / 255 - mean) / std
            augs.append(matrix)
        cameras = record["cameras"]
        sample.images = torch.stack(images)
        sample.image_aug = torch.from_numpy(np.stack(augs)).float()
        sample.intrinsics = torch.tensor([c["intrinsics"] for c in cameras], dtype=torch.float32)
        sample.ego_T_camera = torch.tensor([c["ego_T_camera"] for c in cameras], dtype=torch.float32)


def collate_bev(batch: Sequence[BEVSample]) -> tuple[BEVInputs, torch.Tensor, list[dict[str, Any]]]:
    """Batch samples into ``(BEVInputs, labels (B, C, X, Y) bool, metas)``.

    LiDAR points are concatenated over the batch with ``batch_index`` naming each point's sample.
    """
    camera = None
    if batch[0].images is not None:
        camera = CameraInputs(
            images=torch.stack([s.images for s in batch]),
            intrinsics=torch.stack([s.intrinsics for s in batch]),
            ego_T_camera=torch.stack([s.ego_T_camera for s in batch]),
            image_aug=torch.stack([s.image_aug for s in batch]),
            depth=torch.stack([s.depth for s in batch]) if batch[0].depth is not None else None,
        )
    lidar = None
    if batch[0].points is not None:
        lidar = LidarInputs(
            points=torch.cat([s.points for s in batch]),
            batch_index=torch.cat(
                [torch.full((len(s.points),), k, dtype=torch.long) for k, s in enumerate(batch)]
            ),
        )
    inputs = BEVInputs(
        batch_size=len(batch), camera=camera, lidar=lidar, bev_aug=torch.stack([s.bev_aug for s in batch]),
        ego_motion=torch.stack([s.ego_motion for s in batch]),
    )
    return inputs, torch.stack([s.labels for s in batch]), [s.meta for s in batch]
