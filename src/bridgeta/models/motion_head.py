"""Motion forecasting and planning on the shared BEV: the two heads TinyBEV adds to the object head.

* **Motion** (:class:`MotionHead`): at every cell of the decoded BEV, ``K`` future trajectories of
  the agent centred there (``T`` steps of x, y displacement from the cell's agent centre, in
  metres) and a logit per mode. It is dense like the object head's regressions and read the same
  way: at ground-truth centre cells in training (:func:`motion_losses`), at detected or true
  centres in evaluation (:meth:`MotionOutputs.at`). The loss is the multi-modal one of MTP /
  MultiPath: the mode closest to the truth (average displacement over the valid steps) is
  regressed (L1) and the mode logits learn to pick it (cross-entropy).
* **Planning** (:class:`PlanningHead`): the ego's ``T`` future positions (displacements from the
  ego, in the possibly augmented ego frame), one trajectory per driving command (left, straight,
  right) from a pooled BEV context; the batch's command picks the one that is trained and
  evaluated, as VAD's and UniAD's command-conditioned planners do. Loss: L1 over the valid steps.

Steps are keyframes at 2 Hz (``steps`` = 6: 3 s), the nuScenes prediction and ST-P3/UniAD horizons.
Frames follow docs/conventions.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bridgeta.geometry import BEVGrid
from bridgeta.models.layers import conv_bn_relu
from bridgeta.models.object_head import centre_cells, gather_cells

NUM_COMMANDS = 3  # left, straight, right (bridgeta.data.dataset.COMMANDS)
EGO_MOTION_SIZE = 3  # vx, vy (m/s), known (BEVInputs.ego_motion)
EGO_SPEED_SCALE = 0.1  # (1/(m/s)): the planner's MLP reads speeds of order 1
PLANNER_STATUS_SIZE = 2  # what the planner's MLP reads of the status: speed, known
MIN_HEADING_SPEED = 0.5  # m/s: below it the velocity's direction is not the ego's heading


@dataclass
class MotionOutputs:
    """``trajectories`` ``(B, K*T*2, X, Y)``: per cell, K modes of T (dx, dy) displacements (m) from
    the cell's agent centre; ``mode_logits`` ``(B, K, X, Y)``."""

    trajectories: torch.Tensor
    mode_logits: torch.Tensor

    @property
    def modes(self) -> int:
        return self.mode_logits.shape[1]

    def at(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """At flat cell indices ``(B, M)``: trajectories ``(B, M, K, T, 2)`` and mode logits ``(B, M, K)``."""
        values = gather_cells(self.trajectories.float(), index)  # (B, M, K*T*2)
        batch, slots = index.shape
        return values.reshape(batch, slots, self.modes, -1, 2), gather_cells(self.mode_logits.float(), index)


@dataclass
class MotionTargets:
    """Per object slot (the slots of ``ObjectTargets``: same order, same ``index``): the true
    ``displacement`` ``(B, M, T, 2)`` of the agent's future centres from its current centre, and
    ``mask`` ``(B, M, T)``, the steps its track has (False for empty slots)."""

    displacement: torch.Tensor
    mask: torch.Tensor
    index: torch.Tensor


@dataclass
class PlanTargets:
    """The ego's ``displacement`` ``(B, T, 2)`` from its current position, ``mask`` ``(B, T)`` (the
    scene may end earlier) and ``command`` ``(B,)`` (0 left, 1 straight, 2 right)."""

    displacement: torch.Tensor
    mask: torch.Tensor
    command: torch.Tensor


class MotionHead(nn.Module):
    """Trajectory and mode branches on the decoded BEV (``feature_grid`` is its grid)."""

    def __init__(self, in_channels: int, modes: int, steps: int, head_channels: int = 32) -> None:
        super().__init__()
        self.modes, self.steps = modes, steps
        self.shared = nn.Sequential(*conv_bn_relu(in_channels, head_channels, 3, 1))
        self.trajectory = nn.Sequential(*conv_bn_relu(head_channels, head_channels, 3, 1),
                                        nn.Conv2d(head_channels, modes * steps * 2, 1))
        self.mode = nn.Sequential(*conv_bn_relu(head_channels, head_channels, 3, 1), nn.Conv2d(head_channels, modes, 1))
        # The modes must start apart: with identical modes, winner-takes-all picks the first one
        # every time and the others never receive a gradient. The layer's default (random)
        # initialisation gives each mode its own start.

    def forward(self, decoded: torch.Tensor) -> MotionOutputs:  # type: ignore[override]
        features = self.shared(decoded)
        return MotionOutputs(self.trajectory(features), self.mode(features))


def constant_velocity_path(velocity: torch.Tensor, steps: int, step_seconds: float = 0.5) -> torch.Tensor:
    """``(..., steps, 2)``: the displacements of an ego keeping ``velocity`` ``(..., 2)`` (m/s)
    at each future step (``step_seconds`` apart): the planning head's prior and the planning
    metric's reference."""
    seconds = step_seconds * torch.arange(1, steps + 1, device=velocity.device, dtype=velocity.dtype)
    return velocity[..., None, :] * seconds[:, None]


class PlanningHead(nn.Module):
    """The ego's trajectory per command from the decoded BEV and the ego's status.

    The BEV goes through two stride-2 convs and an average pool to a ``pooled`` x ``pooled`` map
    (which keeps where things are relative to the ego at the centre); with the ego's speed (from
    ``BEVInputs.ego_motion``, and whether it is known) an MLP gives ``NUM_COMMANDS`` x ``steps`` x 2
    corrections to the constant-velocity path, the velocity times each step's time ahead
    (``step_seconds`` apart). One frame shows neither the ego's speed nor, under the BEV
    augmentation, its heading: the status gives both.

    The corrections are in the ego's heading frame (x along its velocity, y to its left) and
    turned into the BEV's frame by the velocity's direction, so a turn the command asks for is
    one set of weights whatever way the augmentation turned or mirrored the scene (a flip
    mirrors the command with it: bridgeta/data/dataset.py). Below ``MIN_HEADING_SPEED`` (or
    unknown) the velocity gives no direction and the corrections stay in the BEV's axes. The last
    layer starts at zero, so an untrained head plans the constant-velocity path (no motion where
    the velocity is unknown)."""

    def __init__(self, in_channels: int, steps: int, head_channels: int = 32, hidden: int = 128, pooled: int = 4,
                 step_seconds: float = 0.5) -> None:
        super().__init__()
        self.steps, self.pooled, self.step_seconds = steps, pooled, step_seconds
        self.encoder = nn.Sequential(*conv_bn_relu(in_channels, head_channels, 3, 2),
                                     *conv_bn_relu(head_channels, head_channels, 3, 2))
        self.mlp = nn.Sequential(nn.Linear(head_channels * pooled * pooled + PLANNER_STATUS_SIZE, hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, NUM_COMMANDS * steps * 2))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, decoded: torch.Tensor, ego_motion: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """``(B, NUM_COMMANDS, T, 2)`` ego displacements (m). ``ego_motion`` ``(B, 3)``: vx, vy
        (m/s) and known (1) or not (0); None: unknown for every sample."""
        if ego_motion is None:
            ego_motion = decoded.new_zeros(len(decoded), EGO_MOTION_SIZE)
        ego_motion = ego_motion.to(decoded.dtype)
        velocity, known = ego_motion[:, :2], ego_motion[:, 2:3]
        speed = velocity.norm(dim=1, keepdim=True)
        # The heading frame's axes: the velocity's direction, or the BEV's x where it has none.
        moving = speed >= MIN_HEADING_SPEED
        cos = torch.where(moving, velocity[:, :1] / speed.clamp(min=MIN_HEADING_SPEED), torch.ones_like(speed))
        sin = torch.where(moving, velocity[:, 1:] / speed.clamp(min=MIN_HEADING_SPEED), torch.zeros_like(speed))
        features = F.adaptive_avg_pool2d(self.encoder(decoded), self.pooled).flatten(1)
        # Speeds of ~10 m/s next to post-ReLU features of ~1: scaled to the same order.
        status = torch.cat([speed * EGO_SPEED_SCALE, known], dim=1)
        along, left = self.mlp(torch.cat([features, status], dim=1)).reshape(
            len(decoded), NUM_COMMANDS, self.steps, 2).unbind(-1)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, 1, 1) against (B, commands, T)
        correction = torch.stack([cos * along - sin * left, sin * along + cos * left], dim=-1)
        return constant_velocity_path(velocity, self.steps, self.step_seconds)[:, None] + correction


def select_command(plans: torch.Tensor, command: torch.Tensor) -> torch.Tensor:
    """``(B, C, T, 2)`` plans, ``(B,)`` commands -> ``(B, T, 2)``, each sample's commanded plan."""
    return plans[torch.arange(len(plans), device=plans.device), command.long()]


def build_motion_targets(boxes: list[torch.Tensor], futures: list[torch.Tensor], future_masks: list[torch.Tensor],
                         grid: BEVGrid, steps: int, max_objects: int = 500) -> MotionTargets:
    """Targets in the object slots: ``boxes[b]`` ``(N, 9)`` as for ``build_targets``, ``futures[b]``
    ``(N, T', 2)`` the future centres (same frame) and ``future_masks[b]`` ``(N, T')``."""
    batch = len(boxes)
    device = boxes[0].device if batch else torch.device("cpu")
    displacement = torch.zeros(batch, max_objects, steps, 2, device=device)
    mask = torch.zeros(batch, max_objects, steps, dtype=torch.bool, device=device)
    index = torch.zeros(batch, max_objects, dtype=torch.long, device=device)
    for b, (box, future, present) in enumerate(zip(boxes, futures, future_masks)):
        inside, cell = centre_cells(box, grid, max_objects)
        count = len(cell)
        if count == 0:
            continue
        future, present = future[inside][:, :steps].float(), present[inside][:, :steps]
        known = future.shape[1]
        displacement[b, :count, :known] = (future - box[inside][:, None, :2].float()) * present[..., None]
        mask[b, :count, :known] = present
        index[b, :count] = cell
    return MotionTargets(displacement, mask, index)


def best_mode(trajectories: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(..., K, T, 2)`` modes, ``(..., T, 2)`` truth, ``(..., T)`` mask -> ``(...,)`` the mode of
    least average displacement over the valid steps."""
    distance = (trajectories - truth[..., None, :, :]).norm(dim=-1)  # (..., K, T)
    valid = mask[..., None, :].float()
    return ((distance * valid).sum(-1) / valid.sum(-1).clamp(min=1)).argmin(dim=-1)


def winner_takes_all(trajectories: torch.Tensor, mode_logits: torch.Tensor, truth: torch.Tensor,
                     mask: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MTP's loss over agents: ``(N, K, T, 2)`` modes, ``(N, K)`` logits, ``(N, T, 2)`` truth with
    ``(N, T)`` mask. Returns (L1 of the best mode per valid step and coordinate, cross-entropy of
    the logits to the best mode), each a mean over the agents with a valid step, or over their
    ``weights`` ``(N,)`` when given (TinyBEV's region weights)."""
    agents = mask.any(dim=-1)
    if not bool(agents.any()):
        zero = trajectories.sum() * 0 + mode_logits.sum() * 0
        return zero, zero
    trajectories, mode_logits, truth, mask = trajectories[agents], mode_logits[agents], truth[agents], mask[agents]
    weight = torch.ones(len(truth), device=truth.device) if weights is None else weights[agents].float()
    with torch.no_grad():
        best = best_mode(trajectories, truth, mask)
    chosen = trajectories[torch.arange(len(best), device=best.device), best]  # (N, T, 2)
    valid = mask.float()
    l1 = ((chosen - truth).abs().sum(-1) * valid).sum(-1) / (2 * valid.sum(-1))
    ce = F.cross_entropy(mode_logits.float(), best, reduction="none")
    total = weight.sum().clamp(min=1e-6)
    return (l1 * weight).sum() / total, (ce * weight).sum() / total


def motion_losses(outputs: MotionOutputs, targets: MotionTargets, trajectory_weight: float = 1.0,
                  mode_weight: float = 0.5) -> dict[str, torch.Tensor]:
    """``{"trajectory": L1 of the best mode, "mode": its cross-entropy}`` at the true agents' cells."""
    trajectories, logits = outputs.at(targets.index)
    steps = targets.mask.shape[-1]
    l1, ce = winner_takes_all(trajectories[..., :steps, :].flatten(0, 1), logits.flatten(0, 1),
                              targets.displacement.flatten(0, 1), targets.mask.flatten(0, 1))
    return {"trajectory": trajectory_weight * l1, "mode": mode_weight * ce}


def planning_loss(plans: torch.Tensor, targets: PlanTargets) -> torch.Tensor:
    """L1 (per valid step and coordinate) of each sample's commanded plan to the logged ego path."""
    chosen = select_command(plans.float(), targets.command)
    valid = targets.mask.float()[..., None]
    return ((chosen - targets.displacement).abs() * valid).sum() / (2 * valid.sum()).clamp(min=1)
