"""Motion forecasting and planning metrics (for multi-task students such as TinyBEV).

* **Forecasting** (the definitions of nuScenes prediction): for each agent, ``K`` predicted
  trajectories against the true one.
  * minADE_K: the least mean displacement over the K modes (the devkit's ``MinADEK``), over
    every agent with at least one future step, each on the steps its track has;
  * minFDE_K: the least displacement at the last step (``MinFDEK``), over the agents whose
    future is complete (every step annotated): at a track that ends early, the "final" step
    would be an earlier horizon, and FDE would mix horizons;
  * two miss rates at ``miss_threshold`` (2 m), on the same complete agents:
    ``miss_rate_all_steps``, nuScenes' ``MissRateTopK`` (with k = K): a miss unless some mode
    stays within the threshold at *every* step; ``miss_rate_fde``, UniAD's and VAD's: a miss when
    the least final displacement over the modes exceeds it. A mode that drifts away mid-way and
    comes back is a hit for the second and a miss for the first.
* **Planning** (on samples whose every future step exists), in both conventions of the field:
  * L2: the distance between the planned and the logged ego positions. ``l2@Ns`` is UniAD's: at
    the step of that horizon. ``l2_avg@Ns`` is ST-P3's and VAD's: averaged over the steps up to
    that horizon;
  * collision rate: per step, the share of samples whose planned ego box overlaps a true agent
    box at that step while the logged path's box does not. ``collision@Ns`` is the rate at the
    step of the horizon (UniAD); ``collision_avg@Ns`` the mean of the per-step rates up to it
    (ST-P3, VAD). Boxes are rotated rectangles in BEV, tested by the separating-axis theorem; the
    ego box is nuScenes' (4.084 m × 1.85 m), its centre 0.5 m ahead of the pose;
  * ``...@mean``: each figure's mean over 1, 2 and 3 s (the "avg" column of the UniAD and VAD
    tables), given when all three horizons are.

Masks mark the steps that exist (a track or a scene may end early); a trajectory with no valid
step is left out.
"""

from __future__ import annotations

import torch

# The nuScenes ego vehicle (Renault Zoe) footprint, as the ST-P3 / UniAD planning metric uses it.
EGO_LENGTH, EGO_WIDTH = 4.084, 1.85
# The protocol's horizons; the "@mean" figures average over exactly these.
PLANNING_HORIZONS = (1.0, 2.0, 3.0)
# The forecasting figures forecasting_metrics gives, NaN where no agent qualifies.
FORECASTING_KEYS = ("minADE", "minFDE", "miss_rate_all_steps", "miss_rate_fde")


def forecasting_metrics(predicted: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor,
                        miss_threshold: float = 2.0) -> dict[str, float]:
    """``predicted`` ``(N, K, T, 2)``, ``truth`` ``(N, T, 2)``, ``mask`` ``(N, T)`` bool:
    minADE over the agents with at least one valid step (``agents``), minFDE and the two miss
    rates over those whose every step is valid (``complete_agents``); see the module docstring."""
    valid = mask.any(dim=1)
    predicted, truth, mask = predicted[valid], truth[valid], mask[valid]
    out = {key: float("nan") for key in FORECASTING_KEYS}
    out.update(agents=int(len(truth)), complete_agents=0)
    if len(truth) == 0:
        return out
    distance = (predicted - truth[:, None]).norm(dim=-1)  # (N, K, T)
    weights = mask.float()[:, None]
    ade = (distance * weights).sum(dim=-1) / weights.sum(dim=-1)
    out["minADE"] = float(ade.min(dim=1).values.mean())
    complete = mask.all(dim=1)
    out["complete_agents"] = int(complete.sum())
    if bool(complete.any()):
        distance = distance[complete]
        fde = distance[..., -1].min(dim=1).values  # (N,): the best mode's final displacement
        worst = distance.amax(dim=-1)  # (N, K): the largest error of each mode
        out["minFDE"] = float(fde.mean())
        out["miss_rate_all_steps"] = float((worst.min(dim=1).values > miss_threshold).float().mean())
        out["miss_rate_fde"] = float((fde > miss_threshold).float().mean())
    return out


def _horizon_steps(horizon: float, step_seconds: float) -> int:
    return int(round(horizon / step_seconds))


def _with_means(out: dict[str, float], names: tuple[str, ...], horizons: tuple[float, ...]) -> dict[str, float]:
    """Adds ``<name>@mean``, the mean over 1, 2 and 3 s, when ``horizons`` are exactly those."""
    if tuple(horizons) == PLANNING_HORIZONS:
        for name in names:
            out[f"{name}@mean"] = sum(out[f"{name}@{h:g}s"] for h in horizons) / len(horizons)
    return out


def planning_l2(planned: torch.Tensor, logged: torch.Tensor, mask: torch.Tensor, step_seconds: float = 0.5,
                horizons: tuple[float, ...] = PLANNING_HORIZONS) -> dict[str, float]:
    """``planned``, ``logged`` ``(N, T, 2)``, ``mask`` ``(N, T)``: L2 (m) per horizon, the mean
    over the samples valid there of the distance at the horizon's step (``l2@Ns``, UniAD) and the
    mean distance over every valid (sample, step) up to it (``l2_avg@Ns``, ST-P3 / VAD; the same
    as the mean over samples of their means when every sample is complete, as eval passes them),
    with their ``@mean``."""
    distance = (planned - logged).norm(dim=-1)
    out = {}
    for horizon in horizons:
        steps = _horizon_steps(horizon, step_seconds)
        at, valid_at = distance[:, steps - 1], mask[:, steps - 1].float()
        out[f"l2@{horizon:g}s"] = float((at * valid_at).sum() / valid_at.sum().clamp(min=1))
        part, valid = distance[:, :steps], mask[:, :steps].float()
        out[f"l2_avg@{horizon:g}s"] = float((part * valid).sum() / valid.sum().clamp(min=1))
    return _with_means(out, ("l2", "l2_avg"), horizons)


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
                   horizons: tuple[float, ...] = PLANNING_HORIZONS) -> dict[str, float]:
    """The box-collision rate of ``planned`` ``(N, T, 3)`` (x, y, yaw) against the true agent
    boxes (:func:`box_collisions`): per step, the share of samples whose planned box hits an agent
    while the ``logged`` path's box does not (a collision the log itself has is not the
    planner's). At a horizon: that rate at its step (``collision@Ns``, UniAD) and the mean of the
    per-step rates up to it (``collision_avg@Ns``, ST-P3 / VAD), with their ``@mean``. Also the
    logged path's own rates (``logged_collision@...``, ``logged_collision_avg@...``), the floor
    that the annotations leave. Pass complete futures only (UniAD scores the samples whose every
    future step is valid)."""
    planned_hits = box_collisions(planned, agents, agent_mask)
    logged_hits = box_collisions(logged, agents, agent_mask)
    new = (planned_hits & ~logged_hits).float().mean(dim=0)  # (T,)
    floor = logged_hits.float().mean(dim=0)
    out = {}
    for horizon in horizons:
        steps = _horizon_steps(horizon, step_seconds)
        out[f"collision@{horizon:g}s"] = float(new[steps - 1])
        out[f"collision_avg@{horizon:g}s"] = float(new[:steps].mean())
        out[f"logged_collision@{horizon:g}s"] = float(floor[steps - 1])
        out[f"logged_collision_avg@{horizon:g}s"] = float(floor[:steps].mean())
    return _with_means(out, ("collision", "collision_avg", "logged_collision", "logged_collision_avg"), horizons)


def path_headings(path: torch.Tensor, initial: torch.Tensor, mask: torch.Tensor | None = None,
                  min_step: float = 0.2) -> torch.Tensor:
    """The yaw at every point of paths ``(N, T, 2)`` whose point 0 is the current position, with
    ``initial`` ``(N,)`` the yaw there: each later point's yaw is the direction of the move into it
    when that move is at least ``min_step`` m (and both points are valid in ``mask`` ``(N, T)``),
    else the previous yaw, so a standing ego keeps its heading. A planned path is positions only,
    and the collision metric needs its boxes; the logged path and the agents have their annotated
    headings."""
    yaw = [initial]
    for t in range(1, path.shape[1]):
        step = path[:, t] - path[:, t - 1]
        moving = step.norm(dim=-1) >= min_step
        if mask is not None:
            moving = moving & mask[:, t] & mask[:, t - 1]
        yaw.append(torch.where(moving, torch.atan2(step[:, 1], step[:, 0]), yaw[-1]))
    return torch.stack(yaw, dim=1)
