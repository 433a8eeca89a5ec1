"""Per-pixel labels of camera images: a semantic class map and a depth map per image, plus an index.

The synthetic renderer writes them for every keyframe camera image (it knows what each ray hits);
a user with real images writes the same files (from 2D annotations, a segmentation model,
projected LiDAR, ...) and ``bridgeta pretrain-backbone`` reads both the same way
(docs/data.md, "Camera labels"). Layout inside a dataroot::

    camera_labels/index.json
    camera_labels/semantic/<image path>.png    # uint8 class index, 255 = not labelled
    camera_labels/depth/<image path>.png       # uint16, metres * 256, 0 = no depth

``index.json`` holds the class names (their order defines the indices), the ignore value, the
depth scale and one row per labelled image: ``{"image", "semantic", "depth"}``, paths relative to
the dataroot (``depth`` may be null). The two PNG encodings are those of well-known real datasets
(Cityscapes-style train-id maps with 255 as ignore; KITTI's depth maps, uint16 metres * 256 with
0 for no measurement), so existing converters and viewers apply. nuImages' own schema does not
fit: its reader hard-codes nuImages' 25 categories, its only surface class is the drivable surface
(no walkway, crossing or markings) and it has no depth (docs/data.md says more).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bridgeta.files import atomic_write_text

LABELS_FOLDER = "camera_labels"
INDEX_FILE = f"{LABELS_FOLDER}/index.json"
INDEX_FORMAT = "bridgeta-camera-labels"
INDEX_VERSION = 1
IGNORE_INDEX = 255
DEPTH_SCALE = 256.0  # KITTI: metres = value / 256, so 1/256 m steps up to 255.99 m
MAX_DEPTH = 65535 / DEPTH_SCALE

# What the synthetic world models, one class per pixel. Where map layers overlap the later class
# wins on the ground (a stop line on a road is a stop line), as a camera sees the paint on top.
CAMERA_CLASSES = (
    "sky",  # the ray hits nothing
    "terrain",  # ground outside roads, walkways and car parks (grass)
    "road",  # drivable area not covered by the classes below
    "carpark",  # carpark_area, its stall lines included
    "ped_crossing",  # the whole crossing: stripes and the road between them
    "stop_line",
    "divider",  # lane-divider dashes and the double yellow road divider
    "walkway",  # the raised walkway: its top and its curb face
    "building",
    "vegetation",  # tree trunks and crowns
    "pole",
    "vehicle",  # moving and parked cars, trucks, buses
    "pedestrian",
)
CAMERA_CLASS_ID = {name: index for index, name in enumerate(CAMERA_CLASSES)}


class CameraLabelError(ValueError):
    """The label index or a label file is missing or malformed; the message names the file."""


# ---- encoding ---------------------------------------------------------------------------------


def encode_depth(metres: np.ndarray) -> np.ndarray:
    """uint16 KITTI depth: ``round(metres * 256)``; 0 where there is no depth (<= 0, NaN, too far)."""
    metres = np.asarray(metres, dtype=np.float64)
    valid = np.isfinite(metres) & (metres > 0) & (metres <= MAX_DEPTH)
    out = np.zeros(metres.shape, dtype=np.uint16)
    out[valid] = np.clip(np.round(metres[valid] * DEPTH_SCALE), 1, 65535).astype(np.uint16)
    return out


def decode_depth(values: np.ndarray) -> np.ndarray:
    """float32 metres of a uint16 depth map (0 stays 0: no depth)."""
    return (np.asarray(values).astype(np.float32) / DEPTH_SCALE).astype(np.float32)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # Level 1: these maps are flat regions that compress well anyway, and generation writes one
    # pair per camera image, so the fast setting keeps labelling cheap next to rendering.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def semantic_png(classes: np.ndarray) -> bytes:
    """PNG bytes of an ``(H, W)`` uint8 class map."""
    classes = np.asarray(classes)
    if classes.ndim != 2 or classes.dtype != np.uint8:
        raise ValueError(f"a semantic map is (H, W) uint8, got {classes.shape} {classes.dtype}")
    return _png(Image.fromarray(classes))


def depth_png(metres: np.ndarray) -> bytes:
    """PNG bytes (16-bit greyscale) of an ``(H, W)`` depth map in metres."""
    metres = np.asarray(metres)
    if metres.ndim != 2:
        raise ValueError(f"a depth map is (H, W), got {metres.shape}")
    return _png(Image.fromarray(encode_depth(metres)))


def read_semantic(path: Path) -> np.ndarray:
    """``(H, W)`` uint8 class map of a semantic PNG."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P"):
                raise CameraLabelError(f"{path}: a semantic map is an 8-bit PNG, got mode {image.mode}")
            return np.array(image, dtype=np.uint8)
    except FileNotFoundError:
        raise CameraLabelError(f"{path}: semantic label file is missing") from None
    except OSError as exc:
        raise CameraLabelError(f"{path}: cannot read the semantic label file ({exc})") from None


def read_depth(path: Path) -> np.ndarray:
    """``(H, W)`` float32 metres of a 16-bit depth PNG (0: no depth)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("I;16", "I"):
                raise CameraLabelError(f"{path}: a depth map is a 16-bit PNG, got mode {image.mode}")
            return decode_depth(np.array(image))
    except FileNotFoundError:
        raise CameraLabelError(f"{path}: depth label file is missing") from None
    except OSError as exc:
        raise CameraLabelError(f"{path}: cannot read the depth label file ({exc})") from None


def label_paths(image: str) -> tuple[str, str]:
    """Where the synthetic world puts the labels of ``image`` (relative path): semantic, depth."""
    stem = str(Path(image).with_suffix(".png"))
    return f"{LABELS_FOLDER}/semantic/{stem}", f"{LABELS_FOLDER}/depth/{stem}"


# ---- the index --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CameraLabelRow:
    image: str
    semantic: str
    depth: str | None


@dataclass
class CameraLabelIndex:
    """``index.json`` of a dataroot: classes and the labelled images, by image path."""

    dataroot: Path
    classes: tuple[str, ...]
    rows: dict[str, CameraLabelRow]
    ignore_index: int = IGNORE_INDEX

    def semantic(self, row: CameraLabelRow) -> np.ndarray:
        return read_semantic(self.dataroot / row.semantic)

    def depth(self, row: CameraLabelRow) -> np.ndarray | None:
        return None if row.depth is None else read_depth(self.dataroot / row.depth)


def read_index(dataroot: str | Path) -> CameraLabelIndex:
    """Read and check ``DATAROOT/camera_labels/index.json``."""
    dataroot = Path(dataroot).expanduser()
    path = dataroot / INDEX_FILE
    if not path.is_file():
        raise CameraLabelError(
            f"{path} is missing: camera labels come with a synthetic world (bridgeta synth) or are "
            "written for real images as docs/data.md describes"
        )
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise CameraLabelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        raise CameraLabelError(f"{path}: 'format' must be '{INDEX_FORMAT}'")
    if data.get("version") != INDEX_VERSION:
        raise CameraLabelError(f"{path}: version {data.get('version')!r} is not {INDEX_VERSION}")
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise CameraLabelError(f"{path}: 'classes' must be a non-empty list of names")
    if len(set(classes)) != len(classes) or len(classes) > IGNORE_INDEX:
        raise CameraLabelError(f"{path}: 'classes' must be unique and fewer than {IGNORE_INDEX + 1}")
    if data.get("ignore_index", IGNORE_INDEX) != IGNORE_INDEX:
        raise CameraLabelError(f"{path}: 'ignore_index' must be {IGNORE_INDEX}")
    if data.get("depth_scale", DEPTH_SCALE) != DEPTH_SCALE:
        raise CameraLabelError(f"{path}: 'depth_scale' must be {DEPTH_SCALE:g} (KITTI's encoding)")
    rows: dict[str, CameraLabelRow] = {}
    for number, row in enumerate(data.get("images", [])):
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("semantic"), str):
            raise CameraLabelError(f"{path}: images[{number}] needs 'image' and 'semantic' paths")
        depth = row.get("depth")
        if depth is not None and not isinstance(depth, str):
            raise CameraLabelError(f"{path}: images[{number}].depth must be a path or null")
        if row["image"] in rows:
            raise CameraLabelError(f"{path}: image {row['image']} is listed twice")
        rows[row["image"]] = CameraLabelRow(row["image"], row["semantic"], depth)
    return CameraLabelIndex(dataroot, tuple(classes), rows)


class CameraLabelWriter:
    """Writes label files as they come and the index at the end (atomically, so a reader never
    sees an index naming files that are not there yet)."""

    def __init__(self, dataroot: str | Path, classes: Sequence[str] = CAMERA_CLASSES) -> None:
        self.dataroot = Path(dataroot)
        self.classes = tuple(classes)
        self.rows: list[dict] = []

    def add(self, image: str, semantic: bytes, depth: bytes | None) -> None:
        """Write the encoded maps (:func:`semantic_png`, :func:`depth_png`) of ``image``."""
        semantic_path, depth_path = label_paths(image)
        for relative, data in ((semantic_path, semantic), (depth_path, depth)):
            if data is None:
                continue
            path = self.dataroot / relative
            if path.exists():
                raise FileExistsError(f"{path} already exists: two images would share one label file")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self.rows.append({"image": image, "semantic": semantic_path, "depth": depth_path if depth is not None else None})

    def finalize(self) -> Path:
        index = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "classes": list(self.classes),
            "ignore_index": IGNORE_INDEX,
            "depth_scale": DEPTH_SCALE,
            "images": self.rows,
        }
        return atomic_write_text(self.dataroot / INDEX_FILE, json.dumps(index, indent=1))
