"""TinyBEV (METHOD.md §4): a compact multi-task camera student distilled from a large multi-task
teacher, with feature-level, output-level and adaptive region-aware terms, in three stages.

No code of TinyBEV is public; what follows is our reading (docs/methods/tinybev.md says why):

* **Adapters.** The student is narrower than the teacher, so each distilled feature level goes
  through a learned 1x1 convolution from the student's width to the teacher's. The adapters
  belong to the distiller, never to the student: the model file and the ONNX export hold none.
* **Feature level** (``feature``): MSE (mean over cells and channels) between the adapted
  student map and the teacher's, at ``fld`` (student camera BEV -> teacher fused BEV) and ``dld``
  (decoded -> decoded).
* **Output level** (``output``, per head in ``heads``):
  * map: the Bernoulli KL from the teacher's map logits, summed over the classes (as the task's
    map loss sums its per-class terms) and averaged over the cells;
  * object heatmap: the same KL on the heatmap logits, damped where the two nearly agree (times
    ``|p_t - p_s|^2``, quality focal loss's modulation), summed over cells and classes and divided
    by the number of the teacher's confident detections, as the task's focal loss divides by the
    objects (:func:`focal_heatmap_kl` says why);
  * boxes: L1 to the teacher's box regressions at its confident detections (decoded as its
    boxes are: 3x3 heatmap peaks with a score of at least ``confidence``, after its circle NMS),
    in the task's form and at its scale: each regression group's mean L1 weighted as the
    student's object loss weighs that group (velocity at 0.2), summed;
  * motion: at the same cells, the student's modes regress the teacher's most probable
    trajectory (winner takes all, with the mode cross-entropy);
  * occupancy: the per-cell Bernoulli KL from the teacher's occupancy logits, over the steps;
  * planning: L1 to the teacher's commanded plan (the batch's command on both sides: the
    teacher was trained on that plan only, its other two are untrained outputs).
* **Region-aware weights** (``region``, stage S3): per BEV cell and per head,
  ``r = (fg + d) / 2`` with ``fg`` the teacher's foreground confidence (its largest class
  probability) and ``d`` the largest teacher-student probability difference, both over that
  head's classes; ``w = (r + region_floor) / mean(r + region_floor)`` over the batch's cells,
  without gradient (:class:`RegionWeights`). So each weight map of a batch sums to its number of
  cells, and a cell the teacher finds empty and the student agrees on keeps
  ``region_floor / mean`` of the average weight. Each head's terms read its own map: the
  object heatmap's weights the heatmap, box, motion and occupancy terms; the map head's (resampled
  to the map grid) the map term; the feature terms, which serve every head, the cell-wise
  largest of both heads' ``fg`` and ``d``. Per head, because the map's foreground (drivable
  area, car parks) covers most of the road: one map of both would weigh an object cell about as
  much as any road cell. Every per-cell term is a mean weighted by its ``w`` (the heatmap's, a
  sum weighted by ``w``); the box and motion terms weigh their cells by ``w`` there.
* **Stages.** S1 (feature only), S2 (+ output) and S3 (+ region weights) are recipes
  (``distill/tiny-c-tinybev-s1..s3``); each later stage starts from the previous stage's student
  and adapters (``init_from``; :meth:`TinyBEVDistiller.continue_previous_stage`). What each
  stage holds is our reading too: the paper names three stages and three kinds of supervision,
  not this split.

The object-level terms (heatmap, boxes, motion at the teacher's detections) need both models'
object heads over the same classes; the map, occupancy and planning terms do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bridgeta.config import DistillConfig, TinyBEVConfig
from bridgeta.distill.base import Distiller, bernoulli_kl_cells, bernoulli_kl_elements, register
from bridgeta.geometry import BEVGrid
from bridgeta.models.bev_model import BEVModel
from bridgeta.models.head import BEVGridTransform
from bridgeta.models.motion_head import select_command, winner_takes_all
from bridgeta.models.object_head import (REGRESSION_GROUPS, ObjectOutputs, decode, gather_cells, nms_radii,
                                         regression_l1_by_group)
from bridgeta.models.types import BEVInputs, BEVOutputs

# The most confident teacher detections per sample whose boxes and trajectories are distilled.
MAX_TEACHER_DETECTIONS = 64
# The heatmap KL's focal modulation exponent (quality focal loss's beta, GFL's default).
HEATMAP_KL_BETA = 2.0


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``values`` ``(B, X, Y)``, weighted by ``weights`` of the same shape when given."""
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp(min=1e-6)


def region_weights(foreground: torch.Tensor, disagreement: torch.Tensor, floor: float) -> torch.Tensor:
    """``(B, X, Y)`` weights from the teacher's foreground confidence and the teacher-student
    disagreement (both in [0, 1]): ``(r + floor) / mean(r + floor)``, ``r`` their mean, so that
    they sum to the number of cells of the batch."""
    score = (foreground + disagreement) / 2 + floor
    return (score / score.mean()).detach()


@dataclass(frozen=True)
class RegionWeights:
    """S3's region weights on the feature grid, ``(B, X, Y)`` each, of mean 1 over the batch: one
    map per group of terms, each from the heads those terms distil."""

    features: torch.Tensor  # the feature terms: both heads' foreground and disagreement
    map: torch.Tensor  # the map KL: the map head's
    objects: torch.Tensor  # heatmap, boxes, motion, occupancy: the object heatmap's

    @classmethod
    def same(cls, weights: torch.Tensor) -> "RegionWeights":
        """One map for every term."""
        return cls(features=weights, map=weights, objects=weights)


def box_l1_by_group(student_boxes: torch.Tensor, teacher_boxes: torch.Tensor, cell_weights: torch.Tensor,
                    group_weights: dict[str, float]) -> torch.Tensor:
    """The L1 between box regressions ``(B, N, 10)`` at ``N`` cells weighted by ``cell_weights``
    ``(B, N)``, in the object loss's form (:func:`regression_l1_by_group`): each regression
    group's mean over its channels and the cells, times its weight in ``group_weights``, summed. A
    plain mean over the ten channels would weigh velocity as much as the offset (two channels
    each), where the task weighs it 0.2 to 1."""
    groups = regression_l1_by_group(student_boxes, teacher_boxes, cell_weights, cell_weights.sum().clamp(min=1e-6))
    return sum(group_weights[name] * value for name, value in groups.items())


def focal_heatmap_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0,
                     beta: float = HEATMAP_KL_BETA) -> torch.Tensor:
    """``(B, X, Y)``: the Bernoulli KL of every (cell, class) of a detection heatmap times
    ``|p_teacher - p_student| ** beta`` (quality focal loss's modulation), summed over classes.

    The objects are a few cells of the grid: on a trained pair an undamped KL summed over it is
    almost all background and many times the task's heatmap loss, and its mean a small fraction
    of that loss. The modulation damps the cells the two models nearly agree on, as the task's
    focal loss damps easy negatives; the caller divides by the teacher's detections, as that
    loss divides by the objects (docs/methods/tinybev.md).
    """
    kl = bernoulli_kl_elements(teacher_logits, student_logits, temperature)
    teacher_p = torch.sigmoid(teacher_logits.float() / temperature)
    student_p = torch.sigmoid(student_logits.float() / temperature)
    gap = (teacher_p - student_p).abs()
    return (kl * gap.pow(beta)).sum(dim=1)


def teacher_detection_cells(objects: ObjectOutputs, grid: BEVGrid, confidence: float,
                            nms_radius: dict[int, float] | None = None,
                            limit: int = MAX_TEACHER_DETECTIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's confident detections, decoded as its boxes are (:func:`decode`, with this
    term's threshold and count): 3x3 heatmap peaks scoring at least ``confidence``, after
    per-class circle NMS with ``nms_radius`` (metres; the teacher's object head's radii), so a
    large object whose heatmap has two peaks counts once; a cell two classes both detect counts
    once, for its best class; the ``limit`` best cells. Returns flat cell indices
    ``(B, limit)`` and a ``(B, limit)`` mask of the real ones."""
    # Decode every class's share of the limit: NMS and the one-cell rule then drop some, and the
    # limit is on the cells that remain.
    classes = objects.heatmap.shape[1]
    decoded = decode(objects, grid, top_k=limit * classes, score_threshold=confidence, nms_radius=nms_radius)
    batch, device = objects.heatmap.shape[0], objects.heatmap.device
    cells = torch.zeros(batch, limit, dtype=torch.long, device=device)
    real = torch.zeros(batch, limit, dtype=torch.bool, device=device)
    for b, sample in enumerate(decoded):
        found = sample["cells"]  # in descending score
        if len(found) == 0:
            continue
        first = (found[:, None] == found[None, :]).int().argmax(dim=1) == torch.arange(len(found), device=device)
        found = found[first][:limit]
        cells[b, :len(found)], real[b, :len(found)] = found, True
    return cells, real


def _fused_channels(model: BEVModel) -> int:
    if model.fuser is not None:
        return model.config.fuser.out_channels
    encoder = model.camera_encoder if model.camera_encoder is not None else model.lidar_encoder
    return encoder.out_channels


def init_from_previous_stage(student: BEVModel, previous: BEVModel, source: str = "distill.tinybev.init_from") -> None:
    """Start a stage's student from the previous stage's: the same architecture, every weight."""
    ours, theirs = student.state_dict(), previous.state_dict()
    wrong = sorted(k for k in set(ours) | set(theirs)
                   if k not in ours or k not in theirs or ours[k].shape != theirs[k].shape)
    if wrong:
        raise ValueError(f"{source}: the previous stage's model differs from this student at {wrong[:3]}: "
                         "a stage must continue the same student config")
    student.load_state_dict(theirs)


@register("tinybev")
class TinyBEVDistiller(Distiller):
    """Adapters + feature, output and region-aware terms (see the module docstring)."""

    def __init__(self, student: BEVModel, teacher: BEVModel | None, config: DistillConfig) -> None:
        if teacher is None:
            raise ValueError("tinybev needs a teacher")
        super().__init__(student, teacher, config)
        self.settings: TinyBEVConfig = config.tinybev or TinyBEVConfig()
        if student.camera_encoder is None:
            raise ValueError("the TinyBEV student must have a camera branch")
        # Maps are compared cell by cell and class by class: the same cells (extent and size, not
        # only the shape) and the map classes in the same order, or every term is silently wrong.
        for name in ("feature_grid", "output_grid"):
            ours, theirs = getattr(student, name), getattr(teacher, name)
            if (ours.x, ours.y) != (theirs.x, theirs.y):
                raise ValueError(f"TinyBEV compares BEV maps cell by cell: the student's {name} x {ours.x}, "
                                 f"y {ours.y} and the teacher's x {theirs.x}, y {theirs.y} must match")
        if tuple(student.classes) != tuple(teacher.classes):
            raise ValueError(f"TinyBEV distils the map class by class: the student's classes {list(student.classes)} "
                             f"and the teacher's {list(teacher.classes)} must be the same, in the same order")
        widths = {
            "fld": (student.camera_encoder.out_channels, _fused_channels(teacher)),
            "dld": (student.config.decoder.out_channels, teacher.config.decoder.out_channels),
        }
        # Training-only modules: the student stays a plain BEVModel. None without the feature
        # term: an adapter no loss reads would train nothing (and DDP refuses such parameters).
        self.adapters = nn.ModuleDict({level: nn.Conv2d(widths[level][0], widths[level][1], 1)
                                       for level in self.settings.levels if self.settings.feature > 0})
        self.to_output_grid = BEVGridTransform(student.feature_grid, student.output_grid)
        self.to_feature_grid = BEVGridTransform(student.output_grid, student.feature_grid)

    @property
    def reads_teacher(self) -> bool:
        """Whether any term reads the teacher (not the staged baseline's runs: every weight 0)."""
        return self.settings.feature > 0 or self.settings.output > 0

    def continue_previous_stage(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load the adapters of the previous stage's distiller file (``state``: its tensors other
        than the student's) for every level both stages have at the same widths, so a later stage
        goes on from the projection its feature terms were learned through; a level the previous
        stage lacked starts fresh. Returns the levels carried over."""
        carried = []
        for level, adapter in self.adapters.items():
            prefix = f"adapters.{level}."
            theirs = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            ours = adapter.state_dict()
            if set(theirs) == set(ours) and all(theirs[k].shape == ours[k].shape for k in ours):
                adapter.load_state_dict(theirs)
                carried.append(f"adapters.{level}")
        return carried

    def _region(self, student: BEVOutputs, teacher: BEVOutputs) -> RegionWeights:
        floor = self.settings.region_floor
        t_map = self.to_feature_grid(teacher.logits.float().sigmoid())
        s_map = self.to_feature_grid(student.logits.float().detach().sigmoid())
        map_fg, map_d = t_map.amax(dim=1), (t_map - s_map).abs().amax(dim=1)
        pair = self.object_pair(student, teacher)
        if pair is None:  # no object heatmap: occupancy reads the map's weights too
            return RegionWeights.same(region_weights(map_fg, map_d, floor))
        t_heat, s_heat = pair[1].heatmap.float().sigmoid(), pair[0].heatmap.float().detach().sigmoid()
        object_fg, object_d = t_heat.amax(dim=1), (t_heat - s_heat).abs().amax(dim=1)
        return RegionWeights(
            features=region_weights(torch.maximum(map_fg, object_fg), torch.maximum(map_d, object_d), floor),
            map=region_weights(map_fg, map_d, floor),
            objects=region_weights(object_fg, object_d, floor))

    @staticmethod
    def _cell_mean(name: str, values: torch.Tensor, weights: torch.Tensor | None, logs: dict[str, float]) -> torch.Tensor:
        """``values``' mean weighted by ``weights``; with weights, the plain mean goes to the logs
        too (``unweighted/<name>``): the weights are high where the loss is, so S3's weighted
        terms are larger than S2's for that alone, and the plain values tell the two apart."""
        if weights is not None:
            logs[f"unweighted/{name}"] = float(values.detach().mean())
        return weighted_mean(values, weights)

    def distill(
        self, inputs: BEVInputs, labels: torch.Tensor, student: BEVOutputs, logs: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        settings = self.settings
        if not self.reads_teacher:
            return {}  # the staged baseline's runs: the stage recipes without a term
        teacher = self.teacher_forward(inputs)
        weights = self._region(student, teacher) if settings.region else None
        if weights is not None:
            for group in ("features", "map", "objects"):
                logs[f"region/max_weight_{group}"] = float(getattr(weights, group).max())
        losses: dict[str, torch.Tensor] = {}
        if settings.feature > 0:
            assert student.camera_bev is not None
            pairs = {"fld": (student.camera_bev, teacher.fused_bev), "dld": (student.decoded_bev, teacher.decoded_bev)}
            for level in settings.levels:
                s, t = pairs[level]
                per_cell = (self.adapters[level](s.float()) - t.float()).pow(2).mean(dim=1)
                losses[f"kd/feature_{level}"] = settings.feature * self._cell_mean(
                    f"feature_{level}", per_cell, None if weights is None else weights.features, logs)
        if settings.output > 0:
            targets = self.task_targets
            command = targets.plan.command if targets is not None and targets.plan is not None else None
            losses.update(self._output_terms(student, teacher, weights, logs, command))
        return losses

    def _output_terms(self, student: BEVOutputs, teacher: BEVOutputs, weights: RegionWeights | None,
                      logs: dict[str, float], command: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The output-level terms; ``command`` ``(B,)``: the batch's driving commands (the plan
        term needs them)."""
        settings, heads, temperature = self.settings, self.settings.heads, self.config.temperature
        scale = settings.output
        map_weights = object_weights = None
        if weights is not None:
            map_weights = self.to_output_grid(weights.map[:, None])[:, 0]
            map_weights = map_weights / map_weights.mean().clamp(min=1e-6)
            object_weights = weights.objects
        # Summed over classes, as the task's map loss sums its per-class terms: their mean was a
        # class count smaller than the task's loss, and S2 all but left the map out.
        map_kl = bernoulli_kl_elements(teacher.logits, student.logits, temperature).sum(dim=1)
        losses = {"kd/out_map": scale * heads.map * self._cell_mean("out_map", map_kl, map_weights, logs)}
        pair = self.object_pair(student, teacher)
        if pair is not None:
            losses.update(self._object_terms(student, teacher, pair, object_weights, logs))
        if student.occupancy is not None and teacher.occupancy is not None and heads.occupancy > 0:
            steps = min(student.occupancy.shape[1], teacher.occupancy.shape[1])
            losses["kd/out_occupancy"] = scale * heads.occupancy * self._cell_mean(
                "out_occupancy", bernoulli_kl_cells(teacher.occupancy[:, :steps], student.occupancy[:, :steps],
                                                    temperature), object_weights, logs)
        if student.plan is not None and teacher.plan is not None and heads.plan > 0:
            if command is None:
                raise ValueError("tinybev's plan term distils the commanded plan: it needs the batch's "
                                 "plan targets (their command)")
            steps = min(student.plan.shape[2], teacher.plan.shape[2])
            # The teacher learnt the commanded plan only (planning_loss): its other two are
            # outputs no loss has shaped, nothing to teach.
            losses["kd/out_plan"] = scale * heads.plan * F.l1_loss(
                select_command(student.plan[:, :, :steps].float(), command),
                select_command(teacher.plan[:, :, :steps].float(), command))
        return losses

    def _object_terms(self, student: BEVOutputs, teacher: BEVOutputs, pair, weights: torch.Tensor | None,
                      logs: dict[str, float]) -> dict[str, torch.Tensor]:
        """Heatmap KL, boxes and motion at the teacher's confident detections; ``weights``: the
        object region weights (S3)."""
        settings, heads, temperature = self.settings, self.settings.heads, self.config.temperature
        scale = settings.output
        s_obj, t_obj = pair
        cells, confident = teacher_detection_cells(
            t_obj, self.teacher.feature_grid, settings.confidence, nms_radii(self.teacher.config.heads.object))
        logs["out/teacher_detections"] = float(confident.float().sum(dim=1).mean())
        detections = confident.sum().clamp(min=1)
        heat_kl = focal_heatmap_kl(t_obj.heatmap, s_obj.heatmap, temperature)
        if weights is not None:
            logs["unweighted/out_heatmap"] = float(heat_kl.detach().sum() / detections)
            heat_kl = heat_kl * weights
        losses = {"kd/out_heatmap": scale * heads.heatmap * heat_kl.sum() / detections}
        cell_weights = confident.float()
        if weights is not None:
            cell_weights = cell_weights * gather_cells(weights[:, None], cells)[..., 0]
        object_losses = self.student.config.heads.object.losses
        group_weights = {name: getattr(object_losses, name) for name in REGRESSION_GROUPS}
        s_boxes, t_boxes = gather_cells(s_obj.regression, cells), gather_cells(t_obj.regression, cells)
        losses["kd/out_box"] = scale * heads.box * box_l1_by_group(s_boxes, t_boxes, cell_weights, group_weights)
        if weights is not None:
            logs["unweighted/out_box"] = float(box_l1_by_group(s_boxes.detach(), t_boxes, confident.float(), group_weights))
        if student.motion is not None and teacher.motion is not None and heads.motion > 0:
            s_traj, s_logits = student.motion.at(cells)
            t_traj, t_logits = teacher.motion.at(cells)
            steps = min(s_traj.shape[-2], t_traj.shape[-2])
            best = t_logits.argmax(dim=-1)  # the teacher's most probable mode per cell
            target = t_traj.gather(2, best[..., None, None, None].expand(-1, -1, 1, *t_traj.shape[-2:]))[:, :, 0]
            mask = confident[..., None].expand(-1, -1, steps)
            flat = (s_traj[..., :steps, :].flatten(0, 1), s_logits.flatten(0, 1),
                    target[..., :steps, :].flatten(0, 1), mask.flatten(0, 1))
            l1, ce = winner_takes_all(*flat, cell_weights.flatten() if weights is not None else None)
            # The task's weights of the student's motion loss (motion_losses), as the box term
            # takes its regression groups': the term has the form of the loss it teaches.
            task = self.student.config.heads.motion
            losses["kd/out_motion"] = scale * heads.motion * (task.weight * l1 + task.mode_weight * ce)
            if weights is not None:
                with torch.no_grad():
                    plain_l1, plain_ce = winner_takes_all(*flat, None)
                logs["unweighted/out_motion"] = float(task.weight * plain_l1 + task.mode_weight * plain_ce)
        return losses
