"""Future occupancy of agents on the shared BEV: TinyBEV's (and UniAD's) occupancy task.

The head predicts, per BEV cell of the decoded grid and per future keyframe (2 Hz), the logit
that an agent's box covers the cell then. Targets are rasterised from the annotations of each
future keyframe: every vehicle and pedestrian box annotated then, with its own size and heading,
the same boxes the planning metric's collisions read (``meta["objects"]["future_agents"]``,
bridgeta/data/dataset.py; :func:`occupancy_targets`); a cell is occupied when its centre lies
inside a box. The loss is the sigmoid focal loss of the map head (occupied cells are few), and the
figure is the IoU per future step over the grid (:class:`OccupancyIoU`), as FIERY and UniAD
report future occupancy.
"""

from __future__ import annotations

import torch
from torch import nn

from bridgeta.geometry import BEVGrid
from bridgeta.losses import sigmoid_focal_loss
from bridgeta.models.layers import conv_bn_relu


class OccupancyHead(nn.Module):
    """``(B, T, X, Y)`` occupancy logits, one channel per future step, on the decoded BEV."""

    def __init__(self, in_channels: int, steps: int, head_channels: int = 32) -> None:
        super().__init__()
        self.steps = steps
        self.layers = nn.Sequential(*conv_bn_relu(in_channels, head_channels, 3, 1),
                                    *conv_bn_relu(head_channels, head_channels, 3, 1),
                                    nn.Conv2d(head_channels, steps, 1))
        nn.init.constant_(self.layers[-1].bias, -4.6)  # start at p = 0.01: most cells stay empty

    def forward(self, decoded: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.layers(decoded)


def rasterise_boxes(boxes: torch.Tensor, grid: BEVGrid) -> torch.Tensor:
    """``(X, Y)`` bool: the cells whose centre lies inside any of ``boxes`` ``(N, 5)`` (x, y,
    length, width, yaw) on ``grid``."""
    xs = grid.cell_centers("x", dtype=torch.float32).to(boxes.device)
    ys = grid.cell_centers("y", dtype=torch.float32).to(boxes.device)
    occupied = torch.zeros(len(xs), len(ys), dtype=torch.bool, device=boxes.device)
    if len(boxes) == 0:
        return occupied
    dx = xs[None, :, None] - boxes[:, 0, None, None]  # (N, X, 1)
    dy = ys[None, None, :] - boxes[:, 1, None, None]  # (N, 1, Y)
    cos, sin = boxes[:, 4].cos()[:, None, None], boxes[:, 4].sin()[:, None, None]
    along = dx * cos + dy * sin  # the cell centre in each box's own frame
    across = -dx * sin + dy * cos
    inside = (along.abs() <= boxes[:, 2, None, None] / 2) & (across.abs() <= boxes[:, 3, None, None] / 2)
    return inside.any(dim=0)


def occupancy_targets(annotations: list[dict], grid: BEVGrid, steps: int,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T, X, Y)`` float: per sample and future step, the cells the agents' boxes cover, and
    ``(B, T)`` bool: the steps whose keyframe exists. ``annotations[b]`` is a sample's
    ``meta["objects"]``: its ``future_agents`` ``(A, T', 5)`` boxes, ``future_agents_mask``
    ``(A, T')`` and ``ego_future_mask`` (the future keyframes the scene has). Near a scene's end
    the later steps have no keyframe: their truth is unknown, not empty, so the loss and the IoU
    leave them out."""
    out = torch.zeros(len(annotations), steps, *grid.shape, device=device)
    exists = torch.zeros(len(annotations), steps, dtype=torch.bool, device=device)
    for b, objects in enumerate(annotations):
        known = objects["ego_future_mask"][:steps]
        exists[b, : len(known)] = known.to(device)
        agents, present = objects["future_agents"][:, :steps].float(), objects["future_agents_mask"][:, :steps]
        for t in range(agents.shape[1]):
            here = present[:, t]
            if here.any():
                out[b, t] = rasterise_boxes(agents[here, t].to(device), grid).float()
    return out, exists


def occupancy_loss(logits: torch.Tensor, targets: torch.Tensor, exists: torch.Tensor) -> torch.Tensor:
    """The sigmoid focal loss (the map head's), the mean over the cells of the steps that exist
    (``exists`` ``(B, T)``)."""
    elementwise = sigmoid_focal_loss(logits.float(), targets, reduction="none")
    weight = exists[:, :, None, None].expand_as(elementwise).float()
    return (elementwise * weight).sum() / weight.sum().clamp(min=1.0)


class OccupancyIoU:
    """IoU per future step of thresholded occupancy over a split (true / false positives and
    false negatives summed over samples, so a sample with few agents weighs what it holds)."""

    def __init__(self, steps: int, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.tp = torch.zeros(steps, dtype=torch.float64)
        self.fp = torch.zeros(steps, dtype=torch.float64)
        self.fn = torch.zeros(steps, dtype=torch.float64)

    def update(self, logits: torch.Tensor, targets: torch.Tensor, exists: torch.Tensor) -> None:
        """``exists`` ``(B, T)``: the steps whose keyframe exists; the others are not scored."""
        scored = exists[:, :, None, None]
        predicted = (logits.float().sigmoid() >= self.threshold) & scored
        truth = (targets > 0.5) & scored
        self.tp += (predicted & truth).sum(dim=(0, 2, 3)).double().cpu()
        self.fp += (predicted & ~truth).sum(dim=(0, 2, 3)).double().cpu()
        self.fn += (~predicted & truth).sum(dim=(0, 2, 3)).double().cpu()

    def compute(self, step_seconds: float = 0.5) -> dict[str, float]:
        union = self.tp + self.fp + self.fn
        iou = torch.where(union > 0, self.tp / union.clamp(min=1), torch.full_like(union, float("nan")))
        out = {f"IoU@{(t + 1) * step_seconds:g}s": float(v) for t, v in enumerate(iou)}
        present = iou[~iou.isnan()]
        out["mIoU"] = float(present.mean()) if len(present) else float("nan")
        return out
