"""One picture of a model's prediction on one sample: cameras, and per class prediction, truth, errors.

For judging a model by eye: where it misses (false negatives) and where it invents map (false
positives), next to what the cameras saw. Camera images are the original files, whatever the
model's modalities; BEV panels are drawn forward up, left to the left (``bev.flip(0, 1)``, see
docs/conventions.md) with axes in metres. Uses matplotlib's Agg canvas directly (no pyplot state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from bridgeta.config import ExperimentConfig
from bridgeta.data.dataset import BEVMapDataset, collate_bev
from bridgeta.data.show import CAMERA_LAYOUT, check_index, open_rgb, sample_title, save_figure
from bridgeta.engine.evaluate import DEFAULT_SPLIT, data_config_for, resolve_model_file, unwrap_model
from bridgeta.engine.model_file import load_model_file
from bridgeta.geometry import BEVGrid

# Error map colours (RGB in [0, 1]): correct cells green, invented map red, missed map blue.
ERROR_COLOURS = {
    "true positive": (0.20, 0.70, 0.25),
    "false positive": (0.90, 0.15, 0.15),
    "false negative": (0.15, 0.35, 0.95),
    "true negative": (1.0, 1.0, 1.0),
}
GROUND_TRUTH_COLOUR = (0.15, 0.15, 0.15)


def error_map(probability: np.ndarray, target: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """RGB ``(X, Y, 3)`` of one class: TP / FP / FN / TN cells in :data:`ERROR_COLOURS`.

    A cell is predicted when ``probability >= threshold``, as :class:`~bridgeta.metrics.MapMetric`
    counts it. Stays in the BEV layout ``(X, Y)``; flipping for display is the caller's.
    """
    if probability.shape != target.shape or probability.ndim != 2:
        raise ValueError(f"need two equal (X, Y) arrays, got {probability.shape} and {target.shape}")
    predicted = probability >= threshold
    target = target.astype(bool)
    rgb = np.empty((*target.shape, 3))
    rgb[...] = ERROR_COLOURS["true negative"]
    rgb[predicted & target] = ERROR_COLOURS["true positive"]
    rgb[predicted & ~target] = ERROR_COLOURS["false positive"]
    rgb[~predicted & target] = ERROR_COLOURS["false negative"]
    return rgb


def _load(
    checkpoint_or_model: str | Path | torch.nn.Module, config: ExperimentConfig | None, device: torch.device
) -> tuple[torch.nn.Module, ExperimentConfig, str]:
    """(model, config, label for the title); a given ``config`` wins over the embedded one."""
    if isinstance(checkpoint_or_model, torch.nn.Module):
        if config is None:
            raise ValueError("render_prediction needs the experiment config when given a model")
        return unwrap_model(checkpoint_or_model), config, config.name
    path = resolve_model_file(checkpoint_or_model)
    model, embedded = load_model_file(path, map_location=device)
    return model, config or embedded, path.parent.name + "/" + path.name


def _dataset_for(
    model: torch.nn.Module,
    config: ExperimentConfig,
    dataset_or_dataroot: BEVMapDataset | str | Path | None,
    split: str | None,
) -> BEVMapDataset:
    """The test-time dataset the model is shown; a given dataset must match its grid and classes."""
    if isinstance(dataset_or_dataroot, BEVMapDataset):
        dataset = dataset_or_dataroot
        if dataset.output_grid != model.output_grid or dataset.classes != tuple(model.classes):
            raise ValueError(
                "the dataset's output grid / classes differ from the model's: "
                f"{dataset.output_grid} {dataset.classes} vs {model.output_grid} {tuple(model.classes)}"
            )
        missing = set(model.modalities) - set(dataset.modalities)
        if missing:
            raise ValueError(f"the dataset does not load {sorted(missing)}, which the model needs")
        return dataset
    data = data_config_for(config, dataset_or_dataroot)
    return BEVMapDataset.for_model(data, model, split or DEFAULT_SPLIT, seed=config.train.seed)


def _class_thresholds(classes: Sequence[str], threshold: float | Mapping[str, float]) -> list[float]:
    if isinstance(threshold, Mapping):
        missing = [c for c in classes if c not in threshold]
        if missing:
            raise ValueError(f"no threshold for classes {missing}")
        return [float(threshold[c]) for c in classes]
    return [float(threshold)] * len(classes)


def _draw_bev(axes, image: np.ndarray, grid: BEVGrid, **imshow_args) -> object:
    """Draw an ``(X, Y[, 3])`` map forward up, left to the left, in ego metres; ego at the origin."""
    drawn = axes.imshow(
        image[::-1, ::-1],  # bev.flip(0, 1): row 0 = front, column 0 = left
        extent=(grid.y[1], grid.y[0], grid.x[0], grid.x[1]),
        interpolation="nearest",
        **imshow_args,
    )
    axes.plot([0], [0], marker="^", color="black", markersize=5)
    axes.tick_params(labelsize=7)
    return drawn


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """``(N, 8, 3)`` corners of boxes ``(N, >=7)`` (x, y, z, length, width, height, yaw, ...):
    the bottom four counter-clockwise from rear right, then the top four above them."""
    boxes = np.asarray(boxes, dtype=np.float64)
    boxes = boxes.reshape(-1, boxes.shape[-1]) if boxes.size else np.zeros((0, 9))
    footprint = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    out = np.empty((len(boxes), 8, 3))
    for i, (x, y, z, length, width, height, yaw) in enumerate(boxes[:, :7]):
        c, s = np.cos(yaw), np.sin(yaw)
        planar = (footprint * [length, width]) @ np.array([[c, s], [-s, c]]) + [x, y]
        out[i, :4, :2] = out[i, 4:, :2] = planar
        out[i, :4, 2], out[i, 4:, 2] = z - height / 2, z + height / 2
    return out


# The 12 edges of a box by corner index (bottom ring, top ring, verticals).
BOX_EDGES = [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7)]
BOX_COLOURS = {"ground truth": (0.1, 0.75, 0.2), "prediction": (0.95, 0.2, 0.15)}


def _draw_boxes_in_camera(axes, corners: np.ndarray, camera: dict, colour) -> None:
    """Project box corners (ego frame) into one original camera image and draw their edges."""
    ego_T_camera = np.asarray(camera["ego_T_camera"])
    intrinsics = np.asarray(camera["intrinsics"])
    for box in corners:
        in_camera = (box - ego_T_camera[:3, 3]) @ ego_T_camera[:3, :3]
        if (in_camera[:, 2] < 0.5).any():  # partly behind the camera: not drawn
            continue
        pixels = in_camera @ intrinsics.T
        pixels = pixels[:, :2] / pixels[:, 2:]
        if not ((pixels[:, 0] > -camera["width"]) & (pixels[:, 0] < 2 * camera["width"])).all():
            continue
        for a, b in BOX_EDGES:
            axes.plot(pixels[[a, b], 0], pixels[[a, b], 1], color=colour, linewidth=0.8)


def _draw_boxes_in_bev(axes, corners: np.ndarray, colour, label: str) -> None:
    """Box footprints in the BEV panels' axes (ego Y to the left, ego X up)."""
    for i, box in enumerate(corners):
        ring = box[[0, 1, 2, 3, 0]]
        axes.plot(ring[:, 1], ring[:, 0], color=colour, linewidth=0.9, label=label if i == 0 else None)


def render_prediction(
    checkpoint_or_model: str | Path | torch.nn.Module,
    config: ExperimentConfig | None,
    dataset_or_dataroot: BEVMapDataset | str | Path | None,
    sample: int | str,
    out_png: str | Path,
    split: str | None = None,
    threshold: float | Mapping[str, float] = 0.5,
    device: str | torch.device | None = None,
) -> Path:
    """``bridgeta viz``: write a PNG of the model's prediction on one sample; returns its path.

    checkpoint_or_model: a model file / checkpoint or run directory, or a model (then ``config``
        is required: it says where the data is).
    config: overrides the model file's embedded config when given.
    dataset_or_dataroot: a test-time dataset for the model, a dataroot that replaces the config's,
        or ``None`` for the config's own.
    sample: index in the split (``int``) or sample token (``str``).
    split: the split to read when no dataset is given (default ``test``).
    threshold: where a probability counts as predicted in the error maps: one value, or one per
        class (e.g. each class's best threshold from the metric).

    Layout: the six cameras (front row FL, F, FR; back row BL, B, BR), then one column per class
    with prediction probability, ground truth and error map (TP / FP / FN) below each other.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config, model_name = _load(checkpoint_or_model, config, device)
    dataset = _dataset_for(model, config, dataset_or_dataroot, split)
    if isinstance(sample, str):
        index = dataset.index_of(sample)
    else:
        index = check_index(int(sample), len(dataset), f"split '{dataset.split}'")
    item = dataset[index]
    inputs, labels, metas = collate_bev([item])
    model_device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            outputs = model(inputs.to(model_device))
            probabilities = outputs.logits.float().sigmoid()[0].cpu().numpy()
            detected = None
            if getattr(model, "object_head", None) is not None and outputs.objects is not None:
                from bridgeta.models.object_head import decode_with

                settings = model.config.heads.object
                detected = decode_with(settings, outputs.objects, model.feature_grid,
                                       max(settings.score_threshold, 0.3))[0]["boxes"].cpu().numpy()
    finally:
        model.train(was_training)
    # Boxes (a model with an object head): ground truth and predictions, in the ego frame.
    boxes = {}
    if detected is not None and "objects" in item.meta:
        boxes = {"ground truth": box_corners(item.meta["objects"]["boxes"].numpy()), "prediction": box_corners(detected)}
    targets = labels[0].numpy()
    classes = tuple(model.classes)
    thresholds = _class_thresholds(classes, threshold)
    record = dataset.cache.record(item.meta["index"])
    grid = dataset.output_grid

    figure = Figure(figsize=(max(12.0, 3.2 * len(classes)), 15.5))
    outer = figure.add_gridspec(2, 1, height_ratios=(4.6, 9.5), hspace=0.1, top=0.94, bottom=0.07)
    cameras = outer[0].subgridspec(2, 3, wspace=0.04, hspace=0.2)
    images = {c["name"]: c for c in record["cameras"]}
    for row, names in enumerate(CAMERA_LAYOUT):
        for column, name in enumerate(names):
            axes = figure.add_subplot(cameras[row, column])
            if name in images:
                picture = open_rgb(dataset.dataroot / images[name]["path"])
                axes.imshow(picture)
                for kind, corners in boxes.items():
                    _draw_boxes_in_camera(axes, corners, images[name], BOX_COLOURS[kind])
                axes.set_xlim(0, picture.size[0])
                axes.set_ylim(picture.size[1], 0)
            axes.set_title(name, fontsize=8)
            axes.axis("off")

    # A narrow last column holds the probability colour bar, so the class panels stay aligned.
    panels = outer[1].subgridspec(
        3, len(classes) + 1, width_ratios=(1.0,) * len(classes) + (0.05,), wspace=0.25, hspace=0.25
    )
    for k, name in enumerate(classes):
        probability_axes = figure.add_subplot(panels[0, k])
        probability_image = _draw_bev(
            probability_axes, probabilities[k], grid, cmap="viridis", vmin=0.0, vmax=1.0
        )
        probability_axes.set_title(f"{name}\nprediction", fontsize=9)
        truth_axes = figure.add_subplot(panels[1, k])
        truth = np.ones((*targets[k].shape, 3))
        truth[targets[k]] = GROUND_TRUTH_COLOUR
        _draw_bev(truth_axes, truth, grid)
        truth_axes.set_title("ground truth", fontsize=9)
        if k == 0 and boxes:  # the boxes over the first class's truth, in the same frame
            for kind, corners in boxes.items():
                _draw_boxes_in_bev(truth_axes, corners, BOX_COLOURS[kind], kind)
            truth_axes.set_xlim(grid.y[1], grid.y[0])
            truth_axes.set_ylim(grid.x[0], grid.x[1])
            truth_axes.legend(fontsize=6, loc="upper right")
            truth_axes.set_title("ground truth + boxes", fontsize=9)
        error_axes = figure.add_subplot(panels[2, k])
        _draw_bev(error_axes, error_map(probabilities[k], targets[k], thresholds[k]), grid)
        error_axes.set_title(f"errors @ {thresholds[k]:g}", fontsize=9)
        if k == 0:
            for axes in (probability_axes, truth_axes, error_axes):
                axes.set_ylabel("ego X (m, forward)", fontsize=8)
        error_axes.set_xlabel("ego Y (m, left is +)", fontsize=8)

    colour_bar = figure.colorbar(probability_image, cax=figure.add_subplot(panels[0, -1]))
    colour_bar.set_label("probability", fontsize=8)
    figure.legend(
        handles=[Patch(facecolor=c, edgecolor="0.5", label=n) for n, c in ERROR_COLOURS.items()]
        + [Patch(facecolor=GROUND_TRUTH_COLOUR, edgecolor="0.5", label="ground truth")],
        loc="lower center",
        ncol=5,
        fontsize=9,
    )
    return save_figure(figure, sample_title(metas[0], prefix=f"{model_name}  |  "), out_png)
