"""One picture of a sample: six cameras, LiDAR points in BEV and the label map.

For checking a dataroot by eye: the BEV panels are drawn forward up and left to the left, with the
same axes, so a road edge in the points must line up with the drivable area in the labels, and the
cameras above show what the car saw. Uses matplotlib's Agg canvas directly (no pyplot state).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from bridgeta.data.augment import apply_bev_aug_points
from bridgeta.data.cache import LabelCache
from bridgeta.data.dataset import BEVMapDataset, load_points
from bridgeta.files import atomic_path
from bridgeta.geometry import BEVGrid

CAMERA_LAYOUT = (
    ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"),
    ("CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"),
)
CLASS_COLOURS = {
    "drivable_area": (0.62, 0.62, 0.66),
    "carpark_area": (0.95, 0.80, 0.45),
    "walkway": (0.45, 0.75, 0.45),
    "ped_crossing": (0.95, 0.45, 0.20),
    "stop_line": (0.85, 0.10, 0.15),
    "divider": (0.20, 0.35, 0.95),
}
# Painted large areas first so thin classes stay visible on top.
PAINT_ORDER = ("drivable_area", "carpark_area", "walkway", "ped_crossing", "stop_line", "divider")


def _label_image(labels: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    """RGB ``(X, Y, 3)`` of bool labels ``(C, X, Y)``, white where no class is set."""
    rgb = np.ones((*labels.shape[1:], 3))
    for name in PAINT_ORDER:
        if name in classes:
            rgb[labels[classes.index(name)]] = CLASS_COLOURS[name]
    return rgb


@dataclass
class _Content:
    """What one picture shows: images by camera name, points (P, >=4), labels (C, X, Y) on grid."""

    record: dict
    images: dict[str, np.ndarray]
    points: np.ndarray
    labels: np.ndarray
    grid: BEVGrid
    classes: tuple[str, ...]


def parse_sample(text: str) -> int | str:
    """A ``--sample`` argument: an index (digits) or a sample token; a negative index is an error
    (it would otherwise be read as a token and reported as unknown)."""
    stripped = text.strip()
    if stripped.lstrip("+-").isdigit():
        index = int(stripped)
        if index < 0:
            raise ValueError(f"--sample {text}: an index counts from 0 (or pass a sample token)")
        return index
    return stripped


def check_index(index: int, size: int, where: str) -> int:
    if not 0 <= index < size:
        raise IndexError(f"--sample {index} is out of range: {where} has {size} samples (0..{size - 1})")
    return index


def _from_cache(cache: LabelCache, index_or_token: int | str) -> _Content:
    if isinstance(index_or_token, str):
        index = cache.index_of(index_or_token)
    else:
        index = check_index(int(index_or_token), len(cache), f"the cache {cache.cache_dir}")
    record = cache.record(index)
    images = {
        c["name"]: np.asarray(open_rgb(cache.dataroot / c["path"])) for c in record["cameras"]
    }
    points = load_points(cache.dataroot, record, max_sweeps=0, max_sweep_lag=0.0)
    return _Content(record, images, points, cache.labels(index), cache.label_grid, cache.classes)


def _from_dataset(dataset: BEVMapDataset, index_or_token: int | str) -> _Content:
    if isinstance(index_or_token, str):
        index = dataset.index_of(index_or_token)
    else:
        index = check_index(int(index_or_token), len(dataset), f"split '{dataset.split}'")
    sample = dataset[index]
    record = dataset.cache.record(sample.meta["index"])
    images = {}
    if sample.images is not None:
        mean, std = np.array(dataset.config.mean), np.array(dataset.config.std)
        for camera, image in zip(record["cameras"], sample.images.numpy()):
            pixels = (image.transpose(1, 2, 0) * std + mean).clip(0, 1)
            images[camera["name"]] = (pixels * 255).astype(np.uint8)
    if sample.points is not None:
        points = sample.points.numpy()
    else:  # a camera-only dataset: read the keyframe points anyway, in the same augmented frame
        raw = load_points(dataset.dataroot, record, max_sweeps=0, max_sweep_lag=0.0)
        points = apply_bev_aug_points(raw, sample.bev_aug.double().numpy())
    return _Content(record, images, points, sample.labels.numpy(), dataset.output_grid, dataset.classes)


def open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:  # missing, truncated or not an image
        raise ValueError(f"{path}: cannot read the image ({exc})") from None


def sample_title(meta: dict, prefix: str = "") -> str:
    """The picture title naming the sample: scene, token, split and condition."""
    return f"{prefix}{meta['scene']}  {meta['token']}  split={meta['split']}  condition={meta['condition']}"


def save_figure(figure: Figure, title: str, out_png: str | Path) -> Path:
    """Title the figure and write it as PNG, creating the folder; returns the path."""
    figure.suptitle(title, fontsize=11)
    out_png = Path(out_png)
    with atomic_path(out_png) as temporary:
        figure.savefig(temporary, dpi=72, format="png")
    return out_png


def render_sample_picture(
    source: LabelCache | BEVMapDataset, index_or_token: int | str, out_png: str | Path
) -> Path:
    """Write a PNG of one sample (by index in ``source`` or sample token); returns its path.

    Top: the six cameras in rig layout (front row FL, F, FR; back row BL, B, BR). Bottom: LiDAR
    points in BEV coloured by intensity, and the label map, both forward up / left to the left.
    From a ``LabelCache``: original images, keyframe points, labels on the label grid. From a
    ``BEVMapDataset``: exactly what the model gets (augmented images, points and labels).
    """
    if isinstance(source, LabelCache):
        content = _from_cache(source, index_or_token)
    else:
        content = _from_dataset(source, index_or_token)
    grid, points, record = content.grid, content.points, content.record

    figure = Figure(figsize=(18, 15))
    layout = figure.add_gridspec(3, 6, height_ratios=(1, 1, 3.2), hspace=0.15, wspace=0.08)
    for row, names in enumerate(CAMERA_LAYOUT):
        for column, name in enumerate(names):
            axes = figure.add_subplot(layout[row, 2 * column : 2 * column + 2])
            if name in content.images:
                axes.imshow(content.images[name])
            axes.set_title(name, fontsize=9)
            axes.axis("off")

    points_axes = figure.add_subplot(layout[2, :3])
    labels_axes = figure.add_subplot(layout[2, 3:])
    inside = (
        (points[:, 0] >= grid.x[0])
        & (points[:, 0] < grid.x[1])
        & (points[:, 1] >= grid.y[0])
        & (points[:, 1] < grid.y[1])
    )
    shown = points[inside]
    size = float(np.clip(3000.0 / max(len(shown), 1), 0.3, 12.0))  # visible for few points too
    scatter = points_axes.scatter(
        shown[:, 1], shown[:, 0], c=shown[:, 3], s=size, cmap="viridis", linewidths=0
    )
    bar_axes = points_axes.inset_axes((0.04, 0.05, 0.3, 0.025))
    colour_bar = figure.colorbar(scatter, cax=bar_axes, orientation="horizontal")
    colour_bar.set_label("intensity", fontsize=8)
    points_axes.set_title(f"LiDAR, {len(shown)} points", fontsize=10)
    # Row 0 of the flipped map is the front, column 0 the left: extent (left, right, bottom, top).
    labels_axes.imshow(
        _label_image(content.labels, content.classes)[::-1, ::-1],
        extent=(grid.y[1], grid.y[0], grid.x[0], grid.x[1]),
        interpolation="nearest",
    )
    labels_axes.legend(
        handles=[Patch(color=CLASS_COLOURS[c], label=c) for c in content.classes],
        loc="upper right",
        fontsize=8,
    )
    labels_axes.set_title("labels", fontsize=10)
    for axes in (points_axes, labels_axes):
        axes.set_xlim(grid.y[1], grid.y[0])
        axes.set_ylim(grid.x[0], grid.x[1])
        axes.set_aspect("equal")
        axes.set_xlabel("ego Y (m, left is +)")
        axes.set_ylabel("ego X (m, forward)")
        axes.plot([0], [0], marker="^", color="black", markersize=8)
    return save_figure(figure, sample_title(record), out_png)
