"""3D object detection on the BEV: a CenterPoint-style head, its targets, loss and decoding.

In the form of CenterPoint and BEVFusion's TransFusion-free variant, in plain PyTorch:

* **Head**: per-class centre heatmap logits, and at every cell the box regressions: sub-cell
  offset (2), centre height (1), log size (3: length, width, height), yaw as (sin, cos) (2) and
  ground velocity (2), each a conv3x3-BN-ReLU + conv1x1 branch on the decoded BEV.
* **Targets** (:func:`build_targets`): per class, a Gaussian at each box centre (CenterPoint's
  radius for an overlap of 0.1, at least ``min_radius`` cells) and, at the centre cell, the
  regression targets. Boxes come in the (augmented) ego frame, so the targets follow the BEV
  augmentation exactly when the loader moves the boxes with it.
* **Loss** (:func:`object_losses`): CenterNet's Gaussian focal loss on the heatmap and an L1 per
  regression group on the centre cells, each normalised by the number of boxes.
* **Decoding** (:func:`decode`): top-K heatmap peaks (3x3 max-pool), the regressions at those
  cells, then per-class circle NMS (:func:`circle_nms`) with its exact greedy result computed by
  matrix iterations, not a Python loop over boxes.

Frames follow docs/conventions.md: ego frame x forward, y left; a grid cell ``(i, j)`` covers
``x_min + i dx`` and ``y_min + j dy``; yaw is about +z from +x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from bridgeta.geometry import BEVGrid
from bridgeta.models.layers import conv_bn_relu

# Regression groups and their channel counts, in the order of ``ObjectTargets.regression``.
REGRESSION_GROUPS = {"offset": 2, "height": 1, "size": 3, "rotation": 2, "velocity": 2}
BOX_FIELDS = 9  # x, y, z, length, width, height, yaw, vx, vy


@dataclass
class ObjectOutputs:
    """The object head's raw maps on its grid: ``heatmap`` ``(B, K, X, Y)`` logits and
    ``regression`` ``(B, 10, X, Y)`` (offset 2, height 1, log size 3, sin/cos 2, velocity 2)."""

    heatmap: torch.Tensor
    regression: torch.Tensor


@dataclass
class ObjectTargets:
    heatmap: torch.Tensor  # (B, K, X, Y) in [0, 1], 1 at box centres
    regression: torch.Tensor  # (B, M, 10) at each box's centre cell
    index: torch.Tensor  # (B, M) flat cell index x * Y + y of each box's centre
    mask: torch.Tensor  # (B, M) bool: a real box in that slot


class ObjectHead(nn.Module):
    """Heatmap and regression branches on the decoded BEV (``feature_grid`` is its grid)."""

    def __init__(self, in_channels: int, num_classes: int, feature_grid: BEVGrid, head_channels: int = 64) -> None:
        super().__init__()
        self.grid = feature_grid
        self.num_classes = num_classes
        self.shared = nn.Sequential(*conv_bn_relu(in_channels, head_channels, 3, 1))
        self.heatmap = nn.Sequential(*conv_bn_relu(head_channels, head_channels, 3, 1),
                                     nn.Conv2d(head_channels, num_classes, 1))
        # Focal-loss start (CenterPoint): every cell at prior probability 0.1.
        nn.init.constant_(self.heatmap[-1].bias, -2.19)
        self.regression = nn.ModuleDict({
            name: nn.Sequential(*conv_bn_relu(head_channels, head_channels, 3, 1), nn.Conv2d(head_channels, size, 1))
            for name, size in REGRESSION_GROUPS.items()
        })

    def forward(self, decoded: torch.Tensor) -> ObjectOutputs:  # type: ignore[override]
        features = self.shared(decoded)
        regression = torch.cat([branch(features) for branch in self.regression.values()], dim=1)
        return ObjectOutputs(heatmap=self.heatmap(features), regression=regression)


def gaussian_radius(length_cells: torch.Tensor, width_cells: torch.Tensor, min_overlap: float = 0.1) -> torch.Tensor:
    """CenterNet / CenterPoint's radius (cells): the smallest of the three cases in which a box
    moved by the radius still overlaps the true one by ``min_overlap`` IoU."""
    h, w = length_cells, width_cells
    b1 = h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (h + w)
    c2 = (1 - min_overlap) * w * h
    r2 = (b2 + torch.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (h + w)
    c3 = (min_overlap - 1) * w * h
    r3 = (b3 + torch.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def build_targets(
    boxes: list[torch.Tensor], labels: list[torch.Tensor], grid: BEVGrid, num_classes: int,
    max_objects: int = 500, min_radius: int = 2, min_overlap: float = 0.1,
) -> ObjectTargets:
    """Targets for a batch: ``boxes[b]`` ``(N, 9)`` (x, y, z, l, w, h, yaw, vx, vy; ego frame) and
    ``labels[b]`` ``(N,)`` class indices. Boxes whose centre is off the grid are skipped."""
    size_x, size_y = grid.shape
    (x_min, _, dx), (y_min, _, dy) = grid.x, grid.y
    batch = len(boxes)
    device = boxes[0].device if batch else torch.device("cpu")
    heatmap = torch.zeros(batch, num_classes, size_x, size_y, device=device)
    regression = torch.zeros(batch, max_objects, 10, device=device)
    index = torch.zeros(batch, max_objects, dtype=torch.long, device=device)
    mask = torch.zeros(batch, max_objects, dtype=torch.bool, device=device)
    xs = torch.arange(size_x, device=device, dtype=torch.float32)[:, None]
    ys = torch.arange(size_y, device=device, dtype=torch.float32)[None, :]
    for b, (box, label) in enumerate(zip(boxes, labels)):
        kept, _ = centre_cells(box, grid, max_objects)
        box, label = box[kept], label[kept]
        count = len(box)
        if count == 0:
            continue
        cx, cy = (box[:, 0] - x_min) / dx, (box[:, 1] - y_min) / dy
        ix, iy = cx.floor(), cy.floor()
        radius = gaussian_radius(box[:, 3] / dx, box[:, 4] / dy, min_overlap).floor().clamp(min=min_radius)
        sigma = (2 * radius + 1) / 6
        # (N, X, Y) Gaussians inside each box's radius window, merged per class by max.
        distance = (xs[None] - ix[:, None, None]) ** 2 + (ys[None] - iy[:, None, None]) ** 2
        window = ((xs[None] - ix[:, None, None]).abs() <= radius[:, None, None]) & \
                 ((ys[None] - iy[:, None, None]).abs() <= radius[:, None, None])
        gaussians = torch.exp(-distance / (2 * sigma[:, None, None] ** 2)) * window
        one_hot = F.one_hot(label.long(), num_classes).float()  # (N, K)
        per_class = (gaussians[:, None] * one_hot[:, :, None, None]).amax(dim=0)
        heatmap[b] = torch.maximum(heatmap[b], per_class)
        regression[b, :count] = torch.cat([
            torch.stack([cx - ix, cy - iy], dim=1),
            box[:, 2:3],
            box[:, 3:6].clamp(min=1e-3).log(),
            torch.stack([box[:, 6].sin(), box[:, 6].cos()], dim=1),
            box[:, 7:9],
        ], dim=1)
        index[b, :count] = (ix * size_y + iy).long()
        mask[b, :count] = True
    return ObjectTargets(heatmap, regression, index, mask)


def centre_cells(boxes: torch.Tensor, grid: BEVGrid, max_objects: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The boxes that get a target slot, in slot order: those whose centre is on the grid and
    whose footprint is not empty, at most ``max_objects``. Returns their indices into ``boxes``
    and their centre cells' flat index ``x * Y + y``. Every per-object target (the object head's,
    the motion head's) uses these slots, so slot ``m`` is the same agent in all of them."""
    size_x, size_y = grid.shape
    (x_min, _, dx), (y_min, _, dy) = grid.x, grid.y
    if len(boxes) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
        return empty, empty
    cx = (boxes[:, 0] - x_min) / dx
    cy = (boxes[:, 1] - y_min) / dy
    inside = (cx >= 0) & (cx < size_x) & (cy >= 0) & (cy < size_y) & (boxes[:, 3] > 0) & (boxes[:, 4] > 0)
    kept = inside.nonzero().flatten()[:max_objects]
    return kept, (cx[kept].floor() * size_y + cy[kept].floor()).long()


def gaussian_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, gamma: float = 4.0) -> torch.Tensor:
    """CenterNet's focal loss on a Gaussian heatmap: summed, divided by the number of peaks."""
    prob = logits.float().sigmoid().clamp(1e-4, 1 - 1e-4)
    peaks = target.eq(1).float()
    positive = -torch.log(prob) * (1 - prob) ** alpha * peaks
    negative = -torch.log(1 - prob) * prob ** alpha * (1 - target) ** gamma * (1 - peaks)
    return (positive.sum() + negative.sum()) / peaks.sum().clamp(min=1.0)


def gather_cells(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(B, C, X, Y)`` maps at flat cell indices ``(B, M)`` -> ``(B, M, C)``."""
    batch, channels = maps.shape[:2]
    flat = maps.reshape(batch, channels, -1)
    return flat.gather(2, index[:, None, :].expand(-1, channels, -1)).transpose(1, 2)


def object_loss_weights(settings, scale: float = 1.0) -> dict[str, float]:
    """Each object term's weight from a ``model.heads.object`` config: the head's ``weight`` times
    the term's, times ``scale`` (a BridgeTA TA's ``ta_seg_weight``)."""
    return {f.name: scale * settings.weight * getattr(settings.losses, f.name) for f in fields(settings.losses)}


def object_losses(outputs: ObjectOutputs, targets: ObjectTargets,
                  weights: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """``{"heatmap": focal, "offset"|"height"|"size"|"rotation"|"velocity": L1}``, each L1 the
    mean absolute error over the real boxes' centre cells and the group's channels."""
    weights = weights or {}
    losses = {"heatmap": weights.get("heatmap", 1.0) * gaussian_focal_loss(outputs.heatmap, targets.heatmap)}
    predicted = gather_cells(outputs.regression.float(), targets.index)  # (B, M, 10)
    mask = targets.mask.float()
    groups = regression_l1_by_group(predicted, targets.regression, mask, mask.sum().clamp(min=1.0))
    losses.update({name: weights.get(name, 1.0) * value for name, value in groups.items()})
    return losses


def regression_l1_by_group(predicted: torch.Tensor, target: torch.Tensor, cell_weights: torch.Tensor,
                           total: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{group: L1}`` between box regressions ``(..., 10)``, one per group of
    :data:`REGRESSION_GROUPS`: the absolute error summed over the cells weighted by
    ``cell_weights`` ``(...)`` and over the group's channels, divided by ``total`` times the
    group's channel count. Per group, so that each group weighs the same whatever its number of
    channels (velocity's two as much as height's one). The task's loss and TinyBEV's box
    distillation both take this form."""
    weights = cell_weights[..., None].float()
    losses, start = {}, 0
    for name, size in REGRESSION_GROUPS.items():
        group = slice(start, start + size)
        error = (predicted[..., group].float() - target[..., group].float()).abs() * weights
        losses[name] = error.sum() / (total * size)
        start += size
    return losses


TIE_BREAK = 1e-6


def calibrated_scores(logits: torch.Tensor, labels: torch.Tensor, calibration=()) -> torch.Tensor:
    """The reported scores ``sigmoid(a_k * logit + b_k)`` of detections with heatmap ``logits``
    and class ``labels`` (same shape), ``calibration`` one ``(a, b)`` per class
    (``model.heads.object.score_calibration``); the raw sigmoid without one."""
    if len(calibration) == 0:
        return logits.float().sigmoid()
    logits = logits.double()
    table = torch.as_tensor(calibration, dtype=torch.float64, device=logits.device)
    calibrated = (logits * table[labels.long(), 0] + table[labels.long(), 1]).sigmoid()
    # A steep fit saturates the sigmoid (exactly 1.0 past a logit of about 37 in float64), and
    # tied scores would let the metric's unstable sort reorder a class's detections, changing its
    # AP. A 1e-6 share of the raw sigmoid keeps the scores strictly increasing in the logit
    # within each class (``a > 0``), so the ranking, and AP, stay those of the raw scores.
    return (1 - TIE_BREAK) * calibrated + TIE_BREAK * logits.sigmoid()


def decode(outputs: ObjectOutputs, grid: BEVGrid, top_k: int = 100, score_threshold: float = 0.1,
           nms_radius: dict[int, float] | None = None, calibration=()) -> list[dict[str, torch.Tensor]]:
    """Boxes per sample: ``{"boxes": (N, 9), "scores": (N,), "labels": (N,), "cells": (N,),
    "logits": (N,)}`` (ego frame; ``cells`` the flat index ``x * Y + y`` of each peak on the grid,
    ``logits`` its heatmap logit).

    Peaks are cells that equal their 3x3 max-pooled heatmap; the ``top_k`` highest over classes
    and cells are kept, thresholded at ``score_threshold`` and, per class with a radius in
    ``nms_radius`` (metres), reduced by :func:`circle_nms`. All of that reads the raw sigmoid;
    ``calibration`` (per-class Platt scaling) then changes the reported scores only, so which
    boxes come out, and each class's ranking and AP, do not depend on it.
    """
    heat = outputs.heatmap.float().sigmoid()
    batch, classes, size_x, size_y = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    scores, flat = peaks.reshape(batch, -1).topk(min(top_k, classes * size_x * size_y), dim=1)
    label = flat // (size_x * size_y)
    cell = flat % (size_x * size_y)
    ix, iy = (cell // size_y).float(), (cell % size_y).float()
    values = gather_cells(outputs.regression.float(), cell)  # (B, K, 10)
    (x_min, _, dx), (y_min, _, dy) = grid.x, grid.y
    x = (ix + values[..., 0]) * dx + x_min
    y = (iy + values[..., 1]) * dy + y_min
    boxes = torch.stack([
        x, y, values[..., 2], *values[..., 3:6].exp().unbind(-1),
        torch.atan2(values[..., 6], values[..., 7]), values[..., 8], values[..., 9],
    ], dim=-1)
    decoded = []
    for b in range(batch):
        # ``> 0`` too: cells that are not peaks score exactly 0, and must not become boxes when
        # the threshold is 0 and the top K reaches past the peaks.
        keep = (scores[b] >= score_threshold) & (scores[b] > 0)
        sample = {"boxes": boxes[b][keep], "scores": scores[b][keep], "labels": label[b][keep], "cells": cell[b][keep]}
        if nms_radius:
            kept = torch.ones(len(sample["scores"]), dtype=torch.bool, device=heat.device)
            for cls, radius in nms_radius.items():
                members = (sample["labels"] == cls).nonzero().flatten()
                if len(members) > 1 and radius > 0:
                    survivors = circle_nms(sample["boxes"][members, :2], sample["scores"][members], radius)
                    kept[members] = survivors
            sample = {key: value[kept] for key, value in sample.items()}
        heatmap = outputs.heatmap[b].float().flatten(1)  # (K, X*Y)
        sample["logits"] = heatmap[sample["labels"], sample["cells"]]
        if len(calibration):
            sample["scores"] = calibrated_scores(sample["logits"], sample["labels"], calibration)
        decoded.append(sample)
    return decoded


def match_detections(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, true_boxes: torch.Tensor,
                     true_labels: torch.Tensor, distance: float = 2.0) -> torch.Tensor:
    """For each detection, the index of the true box it matches, or -1: in descending score, a
    detection takes the nearest still unmatched true box of its class whose centre lies within
    ``distance`` m (the nuScenes metric's greedy centre-distance matching)."""
    match = torch.full((len(scores),), -1, dtype=torch.long)
    if len(true_boxes) == 0 or len(scores) == 0:
        return match
    taken = torch.zeros(len(true_boxes), dtype=torch.bool)
    gaps = torch.cdist(boxes[:, :2].double().cpu(), true_boxes[:, :2].double().cpu())  # (N, M)
    same = labels.cpu()[:, None] == true_labels.cpu()[None, :]
    for i in scores.cpu().argsort(descending=True, stable=True).tolist():
        candidates = same[i] & ~taken & (gaps[i] <= distance)
        if candidates.any():
            j = int(torch.where(candidates, gaps[i], torch.full_like(gaps[i], float("inf"))).argmin())
            taken[j], match[i] = True, j
    return match


def nms_radii(settings) -> dict[int, float]:
    """A ``model.heads.object`` config's circle-NMS radius per class index, for the classes
    that have one (a radius of 0 turns NMS off for its class)."""
    return {i: r for i, r in enumerate(settings.nms_radius) if r > 0}


def decode_with(settings, outputs: ObjectOutputs, grid: BEVGrid,
                score_threshold: float | None = None) -> list[dict[str, torch.Tensor]]:
    """:func:`decode` with a ``model.heads.object`` config's top-K, threshold (or
    ``score_threshold``), circle-NMS radii and score calibration."""
    threshold = settings.score_threshold if score_threshold is None else score_threshold
    return decode(outputs, grid, settings.top_k, threshold, nms_radii(settings), settings.score_calibration)


def circle_nms(centres: torch.Tensor, scores: torch.Tensor, radius: float) -> torch.Tensor:
    """Greedy circle NMS (CenterPoint's, for nuScenes): in score order, a box is kept unless a
    kept, higher-scored box's centre lies within ``radius`` m. Returns a keep mask in input order.

    Computed exactly with matrix iterations (Cluster-NMS): start with every box kept; repeatedly
    keep a box iff no *currently kept* higher-scored box suppresses it. The fixed point is the
    greedy result and is reached in at most as many iterations as the longest suppression chain.
    """
    count = len(scores)
    if count == 0:
        return torch.zeros(0, dtype=torch.bool, device=scores.device)
    order = scores.argsort(descending=True, stable=True)
    ordered = centres[order]
    close = torch.cdist(ordered.double(), ordered.double()) <= radius
    suppresses = torch.triu(close, diagonal=1)  # row i (higher score) suppresses column j
    keep = torch.ones(count, dtype=torch.bool, device=scores.device)
    for _ in range(count):  # a bound, not a loop over boxes: it ends at the fixed point
        new = ~(suppresses & keep[:, None]).any(dim=0)
        if torch.equal(new, keep):
            break
        keep = new
    out = torch.zeros(count, dtype=torch.bool, device=scores.device)
    out[order] = keep
    return out


def boxes_from_regression_targets(targets: ObjectTargets, grid: BEVGrid) -> list[torch.Tensor]:
    """The boxes the regression targets encode (``(N, 9)`` per sample): what decoding gives back
    from a perfect prediction, for testing the round trip."""
    size_y = grid.shape[1]
    (x_min, _, dx), (y_min, _, dy) = grid.x, grid.y
    out = []
    for b in range(targets.index.shape[0]):
        reg, cell = targets.regression[b][targets.mask[b]], targets.index[b][targets.mask[b]]
        ix, iy = (cell // size_y).float(), (cell % size_y).float()
        out.append(torch.stack([
            (ix + reg[:, 0]) * dx + x_min, (iy + reg[:, 1]) * dy + y_min, reg[:, 2],
            *reg[:, 3:6].exp().unbind(-1), torch.atan2(reg[:, 6], reg[:, 7]), reg[:, 8], reg[:, 9],
        ], dim=1))
    return out


def wrap_angle(angle: torch.Tensor) -> torch.Tensor:
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi
