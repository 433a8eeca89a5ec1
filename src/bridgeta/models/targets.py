"""Every head's targets of a batch, and the student's task losses, in one place.

The loader gives each sample's annotations in its metadata (``meta["objects"]``: boxes, labels,
the agents' future centres, every vehicle's and pedestrian's future boxes, the ego's future path
and command; bridgeta/data/dataset.py). A multi-task model's trainer and its distiller both need
the same targets and the same task terms, so they are built here once per batch, for whichever
heads the model has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bridgeta.models.motion_head import MotionTargets, PlanTargets, build_motion_targets, motion_losses, planning_loss
from bridgeta.models.object_head import ObjectTargets, build_targets, object_loss_weights, object_losses
from bridgeta.models.occupancy_head import occupancy_loss, occupancy_targets


@dataclass
class TaskTargets:
    """The targets of the heads a model has beyond the map (which reads the label tensor)."""

    objects: ObjectTargets | None = None
    motion: MotionTargets | None = None
    occupancy: torch.Tensor | None = None  # (B, T, X, Y) on the decoded BEV grid
    occupancy_exists: torch.Tensor | None = None  # (B, T) bool: the future steps with a keyframe
    plan: PlanTargets | None = None


def build_task_targets(model, metas: list[dict], device: torch.device | str) -> TaskTargets | None:
    """``model`` (a ``BEVModel``) decides which targets are built; None for a map-only model."""
    config = model.config
    if config.heads.object is None or not metas:
        return None
    annotations = [m["objects"] for m in metas]
    boxes = [a["boxes"].to(device) for a in annotations]
    settings = config.heads.object
    targets = TaskTargets(objects=build_targets(
        boxes, [a["labels"].to(device) for a in annotations], model.feature_grid, len(model.object_classes),
        settings.max_objects, settings.min_radius,
    ))
    if config.heads.motion is not None:
        missing = [m["token"] for m, a in zip(metas, annotations) if "future" not in a]
        if missing:
            raise ValueError(f"sample {missing[0]} has no agent futures in its cache; run bridgeta data prepare "
                             "--force for a model with a motion head")
        targets.motion = build_motion_targets(
            boxes, [a["future"].to(device) for a in annotations], [a["future_mask"].to(device) for a in annotations],
            model.feature_grid, config.heads.motion.steps, settings.max_objects,
        )
    if config.heads.occupancy is not None:
        missing = [m["token"] for m, a in zip(metas, annotations) if "future_agents" not in a]
        if missing:
            raise ValueError(f"sample {missing[0]} has no agent futures in its cache; run bridgeta data prepare "
                             "--force for a model with an occupancy head")
        targets.occupancy, targets.occupancy_exists = occupancy_targets(
            annotations, model.feature_grid, config.heads.occupancy.steps, device)
    if config.heads.plan is not None:  # its collisions read the agents' futures too
        missing = [m["token"] for m, a in zip(metas, annotations) if "ego_future" not in a or "future_agents" not in a]
        if missing:
            raise ValueError(f"sample {missing[0]} has no ego or agent futures in its cache; run bridgeta data prepare "
                             "--force for a model with a planning head")
        steps = config.heads.plan.steps
        displacement = torch.zeros(len(metas), steps, 2, device=device)
        mask = torch.zeros(len(metas), steps, dtype=torch.bool, device=device)
        for b, a in enumerate(annotations):
            path = (a["ego_future"] - a["ego_position"])[:steps]
            displacement[b, : len(path)] = path.to(device)
            mask[b, : len(path)] = a["ego_future_mask"][:steps].to(device)
        displacement = displacement * mask[..., None]
        command = torch.tensor([int(a["command"]) for a in annotations], dtype=torch.long, device=device)
        targets.plan = PlanTargets(displacement, mask, command)
    return targets


def task_losses(model, outputs, targets: TaskTargets | None) -> dict[str, torch.Tensor]:
    """The weighted terms of every head but the map's: ``object/<term>``, ``motion/trajectory``,
    ``motion/mode``, ``occupancy/focal`` and ``plan/l1``; none for a map-only model."""
    config = model.config
    if targets is None:
        return {}
    terms: dict[str, torch.Tensor] = {}
    if outputs.objects is not None and targets.objects is not None:
        losses = object_losses(outputs.objects, targets.objects, object_loss_weights(config.heads.object))
        terms.update({f"object/{name}": value for name, value in losses.items()})
    if outputs.motion is not None and targets.motion is not None:
        m = config.heads.motion
        terms.update({f"motion/{name}": value
                      for name, value in motion_losses(outputs.motion, targets.motion, m.weight, m.mode_weight).items()})
    if outputs.occupancy is not None and targets.occupancy is not None:
        terms["occupancy/focal"] = config.heads.occupancy.weight * occupancy_loss(
            outputs.occupancy, targets.occupancy, targets.occupancy_exists)
    if outputs.plan is not None and targets.plan is not None:
        terms["plan/l1"] = config.heads.plan.weight * planning_loss(outputs.plan, targets.plan)
    return terms
