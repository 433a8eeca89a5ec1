"""Motion forecasting and planning figures of a split, accumulated batch by batch in ``evaluate``.

* **Forecasting**, two ways. ``motion`` is detection-free: each annotated agent (with LiDAR
  support, of the object head's classes) is read at its *true* centre cell, so the figure
  measures the motion head alone, not the detector's recall. ``motion_detected`` reads it where
  the model detects the agent: every true agent matched by a detection (same class, centres
  within 2 m, greedy by score as the detection metric matches), its trajectories read at the
  detection's cell and placed at the detection's centre, against the true future positions, so
  localisation errors count; ``recall`` is the share of the detection-free set's agents matched.
  minADE over the head's K modes on every agent with a future step, minFDE and the two miss rates
  at 2 m on the agents whose future is complete (bridgeta/motion_metrics.py).
* **Occupancy**: the IoU per future step of the thresholded (0.5) occupancy against every vehicle's
  and pedestrian's annotated box at that keyframe, over the split, and its mean
  (bridgeta/models/occupancy_head.py).
* **Planning** (UniAD/VAD): on the samples whose every future step exists, the commanded plan
  against the logged ego path, L2 and the box-collision rate at 1, 2 and 3 s in UniAD's
  convention (at the horizon) and ST-P3's / VAD's (averaged up to it). The truth boxes are every
  vehicle and pedestrian annotated at each future keyframe, with the size and heading annotated
  then; the logged ego box takes the logged heading, the planned one the heading of the plan's
  motion (:func:`~bridgeta.motion_metrics.path_headings`). Steps where the logged path collides
  too are not counted, and the logged path's own rates are reported beside (``logged_collision@...``):
  the floor that annotation and the box approximation leave. ``planning.constant_velocity`` scores
  the same way the path the ego's status alone gives (its velocity times the time ahead, the
  planning head's prior): what the planner adds to it is what it read from the scene.
"""

from __future__ import annotations

import math

import torch

from bridgeta.models.motion_head import MotionOutputs, constant_velocity_path, select_command
from bridgeta.models.object_head import centre_cells, decode_with, match_detections
from bridgeta.models.occupancy_head import OccupancyIoU
from bridgeta.models.targets import build_task_targets
from bridgeta.motion_metrics import (
    FORECASTING_KEYS,
    PLANNING_HORIZONS,
    collision_rate,
    forecasting_metrics,
    path_headings,
    planning_l2,
)


class MotionPlanningMetric:
    """Collects a model's motion and planning predictions with their truths; :meth:`compute`
    gives ``{"motion": {...}, "planning": {...}}`` for the heads the model has."""

    def __init__(self, model) -> None:
        self.model = model
        self.motion = getattr(model, "motion_head", None) is not None
        self.planning = getattr(model, "planning_head", None) is not None
        head = getattr(model, "occupancy_head", None)
        self.occupancy = OccupancyIoU(head.steps) if head is not None else None
        self.forecasts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.detected: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.agents_seen = 0
        self.plans: list[torch.Tensor] = []
        self.constant_velocity: list[torch.Tensor] = []
        self.logged: list[torch.Tensor] = []
        self.plan_masks: list[torch.Tensor] = []
        self.agents: list[torch.Tensor] = []
        self.agent_masks: list[torch.Tensor] = []

    @property
    def active(self) -> bool:
        return self.motion or self.planning or self.occupancy is not None

    def update(self, outputs, metas: list[dict], device: torch.device) -> None:
        if not self.active:
            return
        targets = build_task_targets(self.model, metas, device)
        if self.motion and targets is not None and targets.motion is not None:
            trajectories, _ = outputs.motion.at(targets.motion.index)  # (B, M, K, T, 2)
            steps = targets.motion.mask.shape[-1]
            present = targets.motion.mask.any(dim=-1)
            self.forecasts.append((trajectories[..., :steps, :][present].float().cpu(),
                                   targets.motion.displacement[present].cpu(), targets.motion.mask[present].cpu()))
            self._forecast_detected(outputs, metas, steps)
        if self.occupancy is not None and targets is not None and targets.occupancy is not None:
            self.occupancy.update(outputs.occupancy, targets.occupancy, targets.occupancy_exists)
        if self.planning and targets is not None and targets.plan is not None:
            plan = targets.plan
            planned = select_command(outputs.plan.float(), plan.command)
            for b, meta in enumerate(metas):
                objects = meta["objects"]
                origin, yaw = objects["ego_position"].float().to(device), float(objects.get("ego_yaw", 0.0))
                self.plans.append(self._planned_boxes(planned[b] + origin, origin, yaw, plan.mask[b]).cpu())
                constant = constant_velocity_path(objects["ego_motion"][:2].float().to(device), plan.mask.shape[-1])
                self.constant_velocity.append(self._planned_boxes(constant + origin, origin, yaw, plan.mask[b]).cpu())
                self.logged.append(self._logged_boxes(plan.displacement[b] + origin, objects, plan.mask[b]).cpu())
                self.plan_masks.append(plan.mask[b].cpu())
                agents, masks = self._agent_boxes(objects, plan.mask.shape[-1])
                self.agents.append(agents)
                self.agent_masks.append(masks)

    def _forecast_detected(self, outputs, metas: list[dict], steps: int) -> None:
        """The motion head read at the detections that match true agents (see the module docstring)."""
        grid = self.model.feature_grid
        for b, (meta, sample) in enumerate(zip(metas, decode_with(self.model.config.heads.object, outputs.objects, grid))):
            truth = meta["objects"]
            if "future" not in truth or len(truth["boxes"]) == 0:
                continue
            future, mask = truth["future"].float(), truth["future_mask"]
            if future.shape[1] < steps:  # a head that looks further than the cache's tracks
                pad = steps - future.shape[1]
                future = torch.cat([future, future.new_zeros(len(future), pad, 2)], dim=1)
                mask = torch.cat([mask, mask.new_zeros(len(mask), pad)], dim=1)
            future, mask = future[:, :steps], mask[:, :steps]
            # The agents the heads can see (centre on the grid: the detection-free set), with a future.
            on_grid = torch.zeros(len(mask), dtype=torch.bool)
            on_grid[centre_cells(truth["boxes"], grid, self.model.config.heads.object.max_objects)[0].cpu()] = True
            agents = mask.any(dim=1) & on_grid
            self.agents_seen += int(agents.sum())
            match = match_detections(sample["boxes"], sample["scores"], sample["labels"], truth["boxes"].float(),
                                     truth["labels"])
            pairs = [(i, j) for i, j in enumerate(match.tolist()) if j >= 0 and bool(agents[j])]
            if not pairs:
                continue
            detections, agents_index = torch.tensor([i for i, _ in pairs]), torch.tensor([j for _, j in pairs])
            centres = sample["boxes"][detections.to(sample["boxes"].device), :2].float().cpu()
            # This sample's motion maps, read at the detections' own peak cells.
            motion = MotionOutputs(outputs.motion.trajectories[b:b + 1], outputs.motion.mode_logits[b:b + 1])
            trajectories, _ = motion.at(sample["cells"][detections.to(sample["cells"].device)][None])
            placed = trajectories[0, ..., :steps, :].float().cpu() + centres[:, None, None, :]
            self.detected.append((placed, future[agents_index], mask[agents_index]))

    @staticmethod
    def _planned_boxes(path: torch.Tensor, origin: torch.Tensor, yaw: float, mask: torch.Tensor) -> torch.Tensor:
        """``(T, 3)`` x, y, yaw of the planned ego along ``path`` ``(T, 2)`` (absolute, same
        frame): a plan is positions only, so each box takes the heading of the plan's motion."""
        full = torch.cat([origin[None], path], dim=0)[None]
        valid = torch.cat([torch.ones(1, dtype=torch.bool, device=mask.device), mask])[None]
        headings = path_headings(full, torch.tensor([yaw], device=path.device), valid)[0, 1:]
        return torch.cat([path, headings[:, None]], dim=1)

    @staticmethod
    def _logged_boxes(path: torch.Tensor, objects: dict, mask: torch.Tensor) -> torch.Tensor:
        """``(T, 3)`` x, y, yaw of the logged ego along ``path`` ``(T, 2)``: its logged headings
        (``ego_future_yaw``), padded where the head looks further than the cache's path."""
        steps = len(path)
        yaw = objects["ego_future_yaw"].float()[:steps].to(path.device)
        yaw = torch.cat([yaw, yaw.new_zeros(steps - len(yaw))]) * mask.float()
        return torch.cat([path, yaw[:, None]], dim=1)

    @staticmethod
    def _agent_boxes(objects: dict, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample's future agents (every vehicle and pedestrian annotated at each future
        keyframe) as ``(A, T, 5)`` boxes (x, y, length, width, yaw), present where ``(A, T)``."""
        agents, present = objects["future_agents"][:, :steps].float(), objects["future_agents_mask"][:, :steps]
        if agents.shape[1] < steps:  # a head that looks further than the cache's keyframes
            pad = steps - agents.shape[1]
            agents = torch.cat([agents, agents.new_zeros(len(agents), pad, 5)], dim=1)
            present = torch.cat([present, present.new_zeros(len(present), pad)], dim=1)
        return agents, present

    def compute(self) -> dict:
        out: dict = {}
        if self.motion and self.agents_seen:
            if self.detected:
                predicted, truth, mask = (torch.cat([d[k] for d in self.detected]) for k in range(3))
                matched = forecasting_metrics(predicted, truth, mask)
            else:
                matched = {**dict.fromkeys(FORECASTING_KEYS, math.nan), "agents": 0, "complete_agents": 0}
            out["motion_detected"] = {**matched, "recall": matched["agents"] / self.agents_seen,
                                      "matched_to": "detections (same class, 2 m)"}
        if self.motion:
            if self.forecasts:
                predicted = torch.cat([f[0] for f in self.forecasts])
                truth = torch.cat([f[1] for f in self.forecasts])
                mask = torch.cat([f[2] for f in self.forecasts])
                out["motion"] = {**forecasting_metrics(predicted, truth, mask), "matched_to": "ground-truth agents"}
            else:
                out["motion"] = {**dict.fromkeys(FORECASTING_KEYS, math.nan), "agents": 0, "complete_agents": 0,
                                 "matched_to": "ground-truth agents"}
        if self.occupancy is not None:
            out["occupancy"] = self.occupancy.compute()
        if self.planning and self.plans:
            planned, logged, mask = torch.stack(self.plans), torch.stack(self.logged), torch.stack(self.plan_masks)
            complete = mask.all(dim=1)  # UniAD scores the samples whose every future step exists
            index = complete.nonzero().flatten().tolist()
            # The protocol's horizons (1, 2, 3 s) that the head's steps (2 Hz) reach.
            horizons = tuple(h for h in PLANNING_HORIZONS if h <= 0.5 * mask.shape[1])
            if index and horizons:
                out["planning"] = {
                    **planning_l2(planned[complete, :, :2], logged[complete, :, :2], mask[complete], horizons=horizons),
                    **collision_rate(planned[complete], logged[complete], [self.agents[i] for i in index],
                                     [self.agent_masks[i] for i in index], horizons=horizons),
                    "samples": len(index),
                    "incomplete_skipped": int((~complete).sum()),
                }
                constant = torch.stack(self.constant_velocity)[complete]
                out["planning"]["constant_velocity"] = {
                    **planning_l2(constant[:, :, :2], logged[complete, :, :2], mask[complete], horizons=horizons),
                    **collision_rate(constant, logged[complete], [self.agents[i] for i in index],
                                     [self.agent_masks[i] for i in index], horizons=horizons),
                }
        return out
