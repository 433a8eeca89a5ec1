"""Motion forecasting and planning metrics (for multi-task students such as TinyBEV).

* **Forecasting** (the definitions of nuScenes prediction): for each agent, ``K`` predicted
  trajectories against the true one over the steps it has.
  * ADE: the mean displacement over the steps;
  * FDE: the displacement at the last step;
  * minADE_K and minFDE_K: the best of the K modes, each on its own (the devkit's
    ``MinADEK`` / ``MinFDEK``);
  * miss rate: the share of agents for which *no* mode stays within ``miss_threshold`` (2 m) at
    every step (``MissRateTopK``).
* **Planning** (the UniAD / VAD protocol, on samples whose every future step exists):
  * L2 at 1, 2 and 3 s: the per-step distance between the planned and the logged ego positions,
    averaged over the steps up to that horizon;
  * collision rate at a horizon: per step, the share of samples whose planned ego box overlaps a
    true agent box at that step while the logged path's box does not, averaged over the steps up
    to the horizon. Boxes are rotated rectangles in BEV, tested by the separating-axis theorem;
    the ego box is nuScenes' (4.084 m × 1.85 m), its centre 0.5 m ahead of the pose.

Masks mark the steps that exist (a track or a scene may end early); a trajectory with no valid
step is left out.
"""

from __future__ import annotations

import torch

# The nuScenes ego vehicle (Renault Zoe) footprint, as the ST-P3 / UniAD planning metric uses it.
EGO_LENGTH, EGO_WIDTH = 4.084, 1.85


def forecasting_metrics(predicted: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor,
                        miss_threshold: float = 2.0) -> dict[str, float]:
    """``predicted`` ``(N, K, T, 2)``, ``truth`` ``(N, T, 2)``, ``mask`` ``(N, T)`` bool:
    minADE, minFDE and miss rate over the agents with at least one valid step."""
    valid = mask.any(dim=1)
    predicted, truth, mask = predicted[valid], truth[valid], mask[valid].float()
    if len(truth) == 0:
        return {"minADE": float("nan"), "minFDE": float("nan"), "miss_rate": float("nan"), "agents": 0}
    distance = (predicted - truth[:, None]).norm(dim=-1)  # (N, K, T)
    steps = mask.sum(dim=1)  # (N,)
    ade = (distance * mask[:, None]).sum(dim=-1) / steps[:, None]
    last = (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(dim=1)  # last valid step
    fde = distance.gather(2, last[:, None, None].expand(-1, distance.shape[1], 1))[..., 0]
    worst = (distance * mask[:, None]).amax(dim=-1)  # (N, K): the largest error of each mode
    return {
        "minADE": float(ade.min(dim=1).values.mean()),
        "minFDE": float(fde.min(dim=1).values.mean()),
        "miss_rate": float((worst.min(dim=1).values > miss_threshold).float().mean()),
        "agents": int(len(truth)),
    }


def planning_l2(planned: torch.Tensor, logged: torch.Tensor, mask: torch.Tensor, step_seconds: float = 0.5,
                horizons: tuple[float, ...] = (1.0, 2.0, 3.0)) -> dict[str, float]:
    """``planned``, ``logged`` ``(N, T, 2)``, ``mask`` ``(N, T)``: L2 (m) at each horizon, the mean
    over samples and over the valid steps up to it (ST-P3 / UniAD)."""
    distance = (planned - logged).norm(dim=-1)
    out = {}
    for horizon in horizons:
        steps = int(round(horizon / step_seconds))
        part, valid = distance[:, :steps], mask[:, :steps].float()
        out[f"L2@{horizon:g}s"] = float((part * valid).sum() / valid.sum().clamp(min=1))
    return out


def _corners(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4, 2)`` BEV corners of ``(..., 5)`` boxes: x, y, length, width, yaw."""
    x, y, length, width, yaw = boxes.unbind(-1)
    c, s = yaw.cos(), yaw.sin()
    half_l, half_w = length / 2, width / 2
    signs = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, -1.0], [-1.0, 1.0]], device=boxes.device, dtype=boxes.dtype)
    u = signs[:, 0] * half_l[..., None]
    v = signs[:, 1] * half_w[..., None]
    return torch.stack([x[..., None] + u * c[..., None] - v * s[..., None],
                        y[..., None] + u * s[..., None] + v * c[..., None]], dim=-1)


def boxes_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether rotated BEV rectangles ``a`` ``(..., 5)`` and ``b`` ``(..., 5)`` (broadcast)
    overlap, by the separating-axis theorem: they are disjoint iff some edge normal of either
    separates their projections."""
    ca, cb = _corners(a), _corners(b)
    ca, cb = torch.broadcast_tensors(ca, cb)
    axes = []
    for corners in (ca, cb):
        edges = corners[..., [1, 3], :] - corners[..., [0, 0], :]  # two edge directions per box
        axes.append(torch.stack([-edges[..., 1], edges[..., 0]], dim=-1))
    normals = torch.cat(axes, dim=-2)  # (..., 4, 2)
    pa = torch.einsum("...kd,...cd->...kc", normals, ca)
    pb = torch.einsum("...kd,...cd->...kc", normals, cb)
    separated = (pa.amax(-1) < pb.amin(-1)) | (pb.amax(-1) < pa.amin(-1))
    return ~separated.any(dim=-1)


def box_collisions(path: torch.Tensor, agents: list[torch.Tensor], agent_mask: list[torch.Tensor],
                   forward_offset: float = 0.5) -> torch.Tensor:
    """``(N, T)``: whether the ego box at each step of ``path`` ``(N, T, 3)`` (x, y, yaw) overlaps
    one of sample ``n``'s agent boxes at that step (``agents[n]`` ``(A, T, 5)`` x, y, length,
    width, yaw, present where ``agent_mask[n]`` ``(A, T)``). The ego box is nuScenes' footprint,
    its centre ``forward_offset`` m ahead of the pose along the heading (UniAD's and VAD's 0.5 m)."""
    hits = torch.zeros(path.shape[:2], dtype=torch.bool, device=path.device)
    for n, (boxes, present) in enumerate(zip(agents, agent_mask)):
        if len(boxes) == 0:
            continue
        yaw = path[n, :, 2:3]
        centre = path[n, :, :2] + forward_offset * torch.cat([yaw.cos(), yaw.sin()], dim=-1)
        ego = torch.cat([centre, torch.full_like(yaw, EGO_LENGTH), torch.full_like(yaw, EGO_WIDTH), yaw], dim=-1)
        hits[n] = (boxes_overlap(ego[None], boxes) & present).any(dim=0)
    return hits


def collision_rate(planned: torch.Tensor, logged: torch.Tensor, agents: list[torch.Tensor],
                   agent_mask: list[torch.Tensor], step_seconds: float = 0.5,
                   horizons: tuple[float, ...] = (1.0, 2.0, 3.0)) -> dict[str, float]:
    """The UniAD/VAD box-collision rate of ``planned`` ``(N, T, 3)`` (x, y, yaw) against the true
    agent boxes (:func:`box_collisions`): per step, the share of samples whose planned box hits an
    agent while the ``logged`` path's box does not (a collision the log itself has is not the
    planner's); at a horizon, the mean of those per-step rates up to it. Also the logged path's
    own rate (``logged_collision@...``), the floor that the annotations leave. Pass complete
    futures only (UniAD scores the samples whose every future step is valid)."""
    planned_hits = box_collisions(planned, agents, agent_mask)
    logged_hits = box_collisions(logged, agents, agent_mask)
    new = (planned_hits & ~logged_hits).float().mean(dim=0)  # (T,)
    floor = logged_hits.float().mean(dim=0)
    out = {}
    for horizon in horizons:
        steps = int(round(horizon / step_seconds))
        out[f"collision@{horizon:g}s"] = float(new[:steps].mean())
        out[f"logged_collision@{horizon:g}s"] = float(floor[:steps].mean())
    return out


def future_boxes(boxes: torch.Tensor, future: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``(A, T, 5)`` BEV boxes (x, y, length, width, yaw) of agents at their future centres:
    ``boxes`` ``(A, 9)`` now, ``future`` ``(A, T, 2)`` with ``present`` ``(A, T)``. Each keeps its
    size and takes the heading of its motion (:func:`path_headings`, from its yaw now): what the
    collision metric and the occupancy targets need, since annotations give only centres."""
    boxes, future = boxes.float(), future.float()
    path = torch.cat([boxes[:, None, :2], future], dim=1)
    valid = torch.cat([torch.ones(len(boxes), 1, dtype=torch.bool, device=present.device), present], dim=1)
    headings = path_headings(path, boxes[:, 6], valid)[:, 1:]
    sizes = boxes[:, None, 3:5].expand(-1, future.shape[1], -1)
    return torch.cat([future, sizes, headings[..., None]], dim=-1)


def path_headings(path: torch.Tensor, initial: torch.Tensor, mask: torch.Tensor | None = None,
                  min_step: float = 0.2) -> torch.Tensor:
    """The yaw at every point of paths ``(N, T, 2)`` whose point 0 is the current position, with
    ``initial`` ``(N,)`` the yaw there: each later point's yaw is the direction of the move into it
    when that move is at least ``min_step`` m (and both points are valid in ``mask`` ``(N, T)``),
    else the previous yaw, so a standing agent keeps its heading. The collision metric needs boxes
    at future steps, and annotations give only their centres."""
    yaw = [initial]
    for t in range(1, path.shape[1]):
        step = path[:, t] - path[:, t - 1]
        moving = step.norm(dim=-1) >= min_step
        if mask is not None:
            moving = moving & mask[:, t] & mask[:, t - 1]
        yaw.append(torch.where(moving, torch.atan2(step[:, 1], step[:, 0]), yaw[-1]))
    return torch.stack(yaw, dim=1)
