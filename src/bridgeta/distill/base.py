"""Distiller base class, method registry and the distances shared by every method.

A distiller owns the student (the model that is deployed), an optional frozen teacher and any
training-only modules (e.g. BridgeTA's teacher assistant). It computes the student's own
segmentation loss and delegates the distillation terms to :meth:`Distiller.distill`, so methods
with a different structure (MonoTAKD's residual branch, TinyBEV's region weighting) fit the same
interface. A distiller never changes the student module, so the deployed network is the one the
student's config describes. For most methods that is the baseline network, and distillation adds
no inference cost. MonoTAKD's student is a different network: its config adds the residual branch
(SAM) and FFM, and the deployed student runs them (docs/methods/monotakd.md#inference-cost).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bridgeta.config import DistillConfig, to_dict
from bridgeta.distill.output_cache import FrozenOutputCache, model_identity
from bridgeta.losses import map_segmentation_loss
from bridgeta.models.bev_model import BEVModel
from bridgeta.models.motion_head import MotionOutputs
from bridgeta.models.object_head import ObjectOutputs, ObjectTargets
from bridgeta.models.targets import TaskTargets
from bridgeta.models.types import BEVInputs, BEVOutputs
from bridgeta.precision import autocast_context

DISTILLERS: dict[str, type[Distiller]] = {}


def register(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    """Class decorator: make a distiller buildable by ``distill.method: <name>``."""

    def decorate(cls: type[Distiller]) -> type[Distiller]:
        if name in DISTILLERS:
            raise ValueError(f"distiller '{name}' is already registered ({DISTILLERS[name].__name__})")
        DISTILLERS[name] = cls
        cls.method = name
        return cls

    return decorate


def cell_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """METHOD.md Eq. 8: squared L2 distance of each cell's channel vector, averaged over cells.

    ``(B, C, H, W)`` inputs; the mean runs over batch and the H x W cells, the sum over channels,
    so the value does not depend on the map's resolution but does on its channel count (as in the
    paper's ``||R_ij||^2``). Computed in float32 so mixed precision does not change the loss.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot compare maps of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return (a.float() - b.float()).pow(2).sum(dim=1).mean()


def bernoulli_kl_elements(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """:func:`bernoulli_kl` of every (cell, class), not reduced, times T^2."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    log_p, log_not_p = F.logsigmoid(t), F.logsigmoid(-t)
    log_q, log_not_q = F.logsigmoid(s), F.logsigmoid(-s)
    kl = log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)
    return kl * temperature**2


def bernoulli_kl_cells(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-cell ``(B, X, Y)`` :func:`bernoulli_kl`: the mean over classes, times T^2 (TinyBEV
    weighs cells by region; :func:`bernoulli_kl` is the mean over cells)."""
    return bernoulli_kl_elements(teacher_logits, student_logits, temperature).mean(dim=1)


def bernoulli_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``KL(Bern(sigmoid(t/T)) || Bern(sigmoid(s/T)))`` per cell and class, averaged, times T^2.

    Map classes are multi-label (independent sigmoids), so a softmax KL over classes would be
    wrong; each (cell, class) is its own Bernoulli. Log-probabilities come from ``logsigmoid`` so
    saturated logits stay finite; the T^2 factor keeps the gradient scale independent of T
    (Hinton et al.), and is 1 at the default temperature.
    """
    return bernoulli_kl_cells(teacher_logits, student_logits, temperature).mean()


def affinity_loss(student: torch.Tensor, teacher: torch.Tensor, size: int = 32) -> torch.Tensor:
    """MSE between the cosine-similarity matrices of BEV cells of two maps (relational KD).

    Both maps are average-pooled to ``size x size`` first: the matrix is quadratic in the number of
    cells. Channel counts may differ, since only cell-to-cell similarities are compared.
    """

    def affinity(x: torch.Tensor) -> torch.Tensor:
        cells = F.adaptive_avg_pool2d(x.float(), size).flatten(2)  # (B, C, N)
        cells = F.normalize(cells, dim=1)
        return cells.transpose(1, 2) @ cells  # (B, N, N)

    return F.mse_loss(affinity(student), affinity(teacher))


def fused_bev_layout(model: BEVModel) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """``(channels, grid x, grid y)`` of ``model``'s fused BEV (the decoder's input): the fuser's
    output, or the single branch's BEV."""
    if model.fuser is not None:
        channels = model.fuser.out_channels
    else:
        branch = model.camera_encoder if model.camera_encoder is not None else model.lidar_encoder
        assert branch is not None
        channels = branch.out_channels
    return channels, model.feature_grid.x, model.feature_grid.y


def inputs_of(model: BEVModel, inputs: BEVInputs) -> BEVInputs:
    """``inputs`` with only what ``model`` reads: its modalities (the camera's LiDAR depth only for
    a model that lifts with it) and the ego status only for a model with a planning head. An output
    cache keys a sample by these, so batches that carry more for another module share its files."""
    modalities = model.modalities
    camera = inputs.camera if "camera" in modalities else None
    if camera is not None and "depth" not in modalities:
        camera = replace(camera, depth=None)
    return BEVInputs(
        batch_size=inputs.batch_size,
        camera=camera,
        lidar=inputs.lidar if "lidar" in modalities else None,
        bev_aug=inputs.bev_aug,
        ego_motion=inputs.ego_motion if model.planning_head is not None else None,
    )


def frozen_model_identity(model: BEVModel, what: str, config: DistillConfig) -> str:
    """:func:`~bridgeta.distill.output_cache.model_identity` of a frozen input of a run, under the
    run's ``teacher_precision``, where the model is now."""
    return model_identity(model, what, config.teacher_precision, to_dict(model.config))


def check_camera_bev_matches_teacher(student: BEVModel, teacher: BEVModel, what: str) -> None:
    """``what`` compares the student's camera BEV with the teacher's fused BEV cell by cell and
    channel by channel: their channel counts and BEV grids must agree. Checked when the distiller
    is built, so a mismatch stops the run before its first batch, not at the first loss."""
    if student.camera_encoder is None:
        raise ValueError(f"{what} reads the student's camera BEV: the student needs model.camera")
    camera = student.camera_encoder
    ours = (camera.out_channels, camera.output_grid.x, camera.output_grid.y)
    theirs = fused_bev_layout(teacher)
    if ours != theirs:
        def describe(layout):
            channels, x, y = layout
            return f"{channels} channels on the grid x {list(x)}, y {list(y)}"
        raise ValueError(
            f"{what} compares the teacher's fused BEV ({describe(theirs)}) with the student's camera BEV "
            f"({describe(ours)}): they must match (the student's model.camera.vtransform.out_channels and "
            "downsample, the teacher's model.fuser.out_channels and grid)"
        )


@dataclass
class DistillOutput:
    """One distillation step: the student's outputs, named loss terms and scalar diagnostics.

    ``losses`` holds already-weighted terms; the training loss is their sum (:attr:`total`).
    ``logs`` holds unweighted diagnostics (per-level epsilon*, L_ta2s, L_t2ta, ||R^S - R^T||).
    """

    student: BEVOutputs
    losses: dict[str, torch.Tensor]
    logs: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> torch.Tensor:
        return torch.stack([value.float() for value in self.losses.values()]).sum()


class Distiller(nn.Module):
    """Student + frozen teacher + training-only modules; subclasses implement :meth:`distill`.

    The teacher's parameters never require gradients and it stays in eval mode whatever
    ``train()`` is called with, so its BatchNorm statistics cannot drift during distillation. A
    subclass may hold more frozen inputs of the run (MonoTAKD's trained assistant): it names
    their attributes in ``frozen`` and freezes them with :meth:`freeze`.
    """

    method: str = ""
    # Attributes holding frozen models that are inputs of the run, not part of what it trains:
    # they stay in eval mode, and state dicts (checkpoints, model files) leave them out.
    frozen: tuple[str, ...] = ("teacher",)
    # The teacher outputs (BEVOutputs fields holding tensors) that this method's terms read:
    # with an output cache (:meth:`use_output_cache`) only these are stored and read back, and
    # the others are None. None: the method reads more (nested head outputs), so it runs its
    # teacher on every batch.
    teacher_fields: tuple[str, ...] | None = None

    def __init__(self, student: BEVModel, teacher: BEVModel | None, config: DistillConfig) -> None:
        super().__init__()
        self.student = student
        self.config = config
        self.teacher = teacher
        self.task_targets: TaskTargets | None = None  # the batch's, during forward
        self.teacher_cache: FrozenOutputCache | None = None
        if teacher is not None:
            self.freeze(teacher)

    def use_output_cache(self, root: str | Path) -> list[FrozenOutputCache]:
        """Read the frozen models' outputs from ``root`` (and store them there) instead of running
        the models on every batch (:mod:`bridgeta.distill.output_cache`). Returns the caches in
        use (the trainer counts their hits): none where the method's teacher outputs cannot be
        cached (``teacher_fields`` None)."""
        if self.teacher is None or self.teacher_fields is None or self.teacher.head_names != ("map",):
            return []  # nested head outputs (objects, motion, ...) are not cached
        self.teacher_cache = FrozenOutputCache(root, frozen_model_identity(self.teacher, "teacher", self.config))
        return [self.teacher_cache]

    @staticmethod
    def freeze(model: nn.Module) -> None:
        model.requires_grad_(False)
        model.eval()

    @property
    def reads_teacher(self) -> bool:
        """Whether a term of this run reads the teacher. Methods whose weights can switch every
        teacher term off (a sweep's lambda = 0, a baseline run of a staged recipe) say so here:
        the batch then leaves out the teacher's inputs (:attr:`input_modalities`)."""
        return self.teacher is not None

    @property
    def input_modalities(self) -> tuple[str, ...]:
        """What the batch must carry beyond the student's inputs (the teacher's, and so on)."""
        return self.teacher.modalities if self.teacher is not None and self.reads_teacher else ()

    def continue_previous_stage(self, state: dict[str, torch.Tensor]) -> list[str]:
        """A staged recipe's later stage: take over the training-only modules of the previous
        stage's file (``state``: its tensors other than the student's) where they fit; returns
        what was carried. Methods without stages carry nothing."""
        return []

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        for name in self.frozen:
            module = getattr(self, name, None)
            if module is not None:
                module.eval()
        return self

    # Frozen inputs (the teacher: ``distill.teacher``) are not part of what a run trains: state
    # dicts, hence checkpoints and model files, hold the student and training-only modules only.
    def _frozen_prefixes(self, prefix: str = "") -> tuple[str, ...]:
        return tuple(f"{prefix}{name}." for name in self.frozen)

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        state = super().state_dict(*args, **kwargs)
        prefixes = self._frozen_prefixes(kwargs.get("prefix", ""))
        for key in [key for key in state if key.startswith(prefixes)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Load the student and training-only modules; frozen inputs' keys are refused, not loaded."""
        prefixes = self._frozen_prefixes()
        frozen_keys = [key for key in state_dict if key.startswith(prefixes)]
        if frozen_keys:
            raise ValueError(
                f"a distiller state must not hold teacher (or other frozen input) weights (found "
                f"{frozen_keys[:3]}...): the teacher comes from distill.teacher"
            )
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [key for key in result.missing_keys if not key.startswith(prefixes)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"distiller '{self.method}' state does not fit: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        return type(result)(missing, result.unexpected_keys)

    def learnable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the student and of training-only modules; never a frozen input's."""
        frozen = [getattr(self, name, None) for name in self.frozen]
        for module in self.children():
            if not any(module is f for f in frozen):
                yield from module.parameters()

    def segmentation_losses(
        self, logits: torch.Tensor, labels: torch.Tensor, prefix: str, weight: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Per-class focal terms renamed ``<prefix>/<class>`` and scaled by ``weight``."""
        terms = map_segmentation_loss(logits, labels, self.student.classes)
        return {f"{prefix}/{key.split('/', 1)[1]}": weight * value for key, value in terms.items()}

    def teacher_forward(self, inputs: BEVInputs) -> BEVOutputs:
        """The teacher's outputs without an autograd graph (its weights are frozen anyway).

        Runs under ``distill.teacher_precision`` whatever the training precision is, and returns
        float32 maps, so the losses and the modules that read them see one dtype.
        """
        if self.teacher is None:
            raise RuntimeError(f"distiller '{self.method}' needs a teacher")
        if self.teacher_cache is not None and self.teacher_fields is not None:
            names = self.teacher_fields

            def compute(batch: BEVInputs) -> dict[str, torch.Tensor]:
                computed = self._run_teacher(batch)
                return {name: getattr(computed, name) for name in names}

            device = next(self.teacher.parameters()).device
            read = self.teacher_cache.fetch(inputs_of(self.teacher, inputs), names, compute, device)
            return BEVOutputs(**{**{f.name: None for f in fields(BEVOutputs)}, **read})
        return self._run_teacher(inputs)

    def _run_teacher(self, inputs: BEVInputs) -> BEVOutputs:
        """:meth:`teacher_forward` without the output cache: the teacher run on ``inputs``."""
        assert self.teacher is not None
        device = next(self.teacher.parameters()).device
        with torch.no_grad(), autocast_context(device, self.config.teacher_precision):
            outputs = self.teacher(inputs)
        maps = {f.name: getattr(outputs, f.name) for f in fields(outputs)}
        floats = {name: m.float() for name, m in maps.items() if isinstance(m, torch.Tensor)}
        if isinstance(outputs.objects, ObjectOutputs):
            floats["objects"] = ObjectOutputs(outputs.objects.heatmap.float(), outputs.objects.regression.float())
        if isinstance(outputs.motion, MotionOutputs):
            floats["motion"] = MotionOutputs(outputs.motion.trajectories.float(), outputs.motion.mode_logits.float())
        return replace(outputs, **floats)

    def object_pair(self, student: BEVOutputs, teacher: BEVOutputs) -> tuple[ObjectOutputs, ObjectOutputs] | None:
        """The student's and the teacher's object maps when both have an object head over the
        same classes (the object-level terms of a multi-task pair), else None."""
        if student.objects is None or teacher.objects is None or self.teacher is None:
            return None
        if tuple(self.teacher.object_classes) != tuple(self.student.object_classes):
            return None
        return student.objects, teacher.objects

    def teacher_head_kl(self, student: BEVOutputs, teacher: BEVOutputs) -> torch.Tensor:
        """CrossKD's teacher half, ``KL(L^T || teacher.head(F_dec^S))``: the student's decoded BEV
        read by the frozen teacher's map head (eval mode, weights without gradient), so only the
        student learns from it. BridgeTA adds the TA's half; ``direct`` (w/o TA) has this half alone."""
        assert self.teacher is not None
        return bernoulli_kl(teacher.logits, self.teacher.head(student.decoded_bev), self.config.temperature)

    def teacher_object_head_kl(self, student: BEVOutputs, teacher_objects: ObjectOutputs) -> torch.Tensor:
        """:meth:`teacher_head_kl` on the object heatmap: the student's decoded BEV through the
        frozen teacher's object head, against the teacher's own heatmap logits."""
        assert self.teacher is not None and self.teacher.object_head is not None
        through_teacher = self.teacher.object_head(student.decoded_bev).heatmap
        return bernoulli_kl(teacher_objects.heatmap, through_teacher, self.config.temperature)

    def relational_terms(self, student: BEVOutputs, teacher: BEVOutputs) -> dict[str, torch.Tensor]:
        """The optional relational term, ``kd/relational`` (``relational_weight`` > 0; none at 0):
        the affinity of the student's decoded BEV cells against the teacher's
        (:func:`affinity_loss`). BridgeTA and ``direct`` share it, so ``w/o TA`` differs from
        BridgeTA only by the missing assistant."""
        weight = self.config.relational_weight
        if weight <= 0:
            return {}
        return {"kd/relational": weight * affinity_loss(student.decoded_bev, teacher.decoded_bev)}

    def forward(self, inputs: BEVInputs, labels: torch.Tensor, targets: TaskTargets | None = None) -> DistillOutput:
        """The student's segmentation terms and the method's terms. ``targets``: the batch's other
        heads' targets for a multi-task student (the trainer adds the student's own task terms; a
        method's own modules with an object head, the BridgeTA TA's, learn from them);
        :meth:`distill` reads them as ``self.task_targets`` and the object ones as
        ``self.object_targets``."""
        student = self.student(inputs)
        losses = self.segmentation_losses(student.logits, labels, "seg", self.student.config.heads.map.weight)
        logs: dict[str, float] = {}
        self.task_targets = targets
        try:
            losses.update(self.distill(inputs, labels, student, logs))
        finally:
            self.task_targets = None
        return DistillOutput(student=student, losses=losses, logs=logs)

    @property
    def object_targets(self) -> ObjectTargets | None:
        return self.task_targets.objects if self.task_targets is not None else None

    def distill(
        self, inputs: BEVInputs, labels: torch.Tensor, student: BEVOutputs, logs: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        """The method's weighted loss terms; may add diagnostics to ``logs``."""
        raise NotImplementedError
