"""MonoTAKD (METHOD.md §3): a camera teaching assistant, intra-modal and cross-modal residual
distillation, in our BEV map-segmentation setting.

* **The TA** is the student's camera network lifting its image features with projected LiDAR
  depth (one-hot bins, ``model.camera.vtransform.depth_source: lidar``), trained first on the map
  labels (``bridgeta train-assistant``). It shares the student's modality, so its BEV is a small
  step from the student's, and the student starts from its weights. It also imitates the
  teacher's fused BEV (``assistant_imitation``, the ``feature_kd`` loss on the TA network), as the
  public code's camera network starts from a CMKD checkpoint: CMRD subtracts the teacher's
  channel c from the TA's channel c, which means something only when the TA's channels live in
  the teacher's feature space.
* **IMD**: MSE between the student's camera BEV and the TA's, both min-max normalised per sample,
  with real gradients into the student (the public code's normalisation detaches both sides, so
  its IMD trains nothing: tested here as a regression).
* **CMRD**: the residual ``|norm(TA BEV) - norm(teacher BEV)|`` (the public code's absolute
  value: the branch that regresses it ends in a ReLU), entries below ``threshold`` x the
  sample's largest set to 0, detached; the student's residual branch (``model.residual``:
  conv1x1 + SAM) regresses it, weight 0.2 as in the public code. With ``ffm`` the residual branch
  is fused into the BEV the decoder reads, so it runs at inference.
* **Logit term**: the Bernoulli KL from the teacher's map logits (the detection code's quality
  focal loss on teacher scores, read for multi-label segmentation).

Every component is a switch (weights to 0, ``model.residual.sam``/``ffm``), so the ablation rows
are settings. Our readings where the public code is ambiguous: docs/methods/monotakd.md.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
import yaml

from bridgeta.config import (
    DistillConfig, ExperimentConfig, MonoTAKDConfig, apply_overrides, parse_config, to_dict, validate,
)
from bridgeta.distill.base import (
    Distiller,
    bernoulli_kl,
    check_camera_bev_matches_teacher,
    frozen_model_identity,
    inputs_of,
    register,
)
from bridgeta.distill.output_cache import FrozenOutputCache
from bridgeta.models.bev_model import BEVModel
from bridgeta.models.types import BEVInputs, BEVOutputs
from bridgeta.precision import autocast_context

# What the student copies from the TA: the networks they share (not the student-only branches).
_SHARED_PREFIXES = ("camera_encoder.", "decoder.", "head.")


def minmax_per_sample(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x`` scaled to [0, 1] per sample (over channels and cells), keeping the autograd graph.

    Per sample rather than the public code's one min and max over the whole batch, so a sample's
    target does not depend on what else is in its batch.
    """
    flat = x.flatten(1)
    low = flat.min(dim=1).values.view(-1, *([1] * (x.dim() - 1)))
    high = flat.max(dim=1).values.view(-1, *([1] * (x.dim() - 1)))
    return (x - low) / (high - low + eps)


def residual_target(assistant_bev: torch.Tensor, teacher_bev: torch.Tensor, threshold: float) -> torch.Tensor:
    """CMRD's target: ``|norm(TA) - norm(teacher)|`` with entries below ``threshold`` x the
    sample's largest set to 0 (the large residuals keep their value), without gradient.

    The absolute value is the public code's form (METHOD.md writes "teacher - TA"): the residual
    branch that regresses it ends in SAM's ReLU, so it can only produce values >= 0, and a
    signed target's negative half could never be reached.
    """
    with torch.no_grad():
        residual = (minmax_per_sample(assistant_bev.float()) - minmax_per_sample(teacher_bev.float())).abs()
        peak = residual.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
        return torch.where(residual >= threshold * peak, residual, torch.zeros_like(residual))


def _yaml(value: object) -> str:
    """``value`` as the YAML text of an override (floats such as 1e-05 and odd paths quoted right)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def assistant_overrides(recipe: ExperimentConfig, teacher: str | None) -> list[str]:
    """The config overrides that turn a MonoTAKD recipe into its teaching assistant: the
    student's camera network lifting with projected LiDAR depth, without the student-only
    branches, trained on the map labels and, with ``distill.monotakd.assistant_imitation`` > 0,
    the ``feature_kd`` imitation of ``teacher``'s fused BEV at that weight.

    One list for ``train-assistant`` (:func:`assistant_config`) and the benchmark, which trains
    presets by name, so both train the same TA.
    """
    if recipe.model.camera is None:
        raise ValueError(f"config '{recipe.name}' has no camera branch: MonoTAKD's assistant is a camera model")
    settings = (recipe.distill.monotakd if recipe.distill is not None else None) or MonoTAKDConfig()
    network = ["model.residual=null", "model.camera.vtransform.depth_source=lidar"]
    weight = settings.assistant_imitation
    if weight == 0:  # the label-only TA
        return [*network, "distill=null"]
    if not teacher:
        raise ValueError(
            f"distill.monotakd.assistant_imitation is {weight:g}: the assistant imitates the teacher's fused "
            "BEV, so it needs the teacher: pass --teacher (its run directory or model file), or set "
            "distill.monotakd.assistant_imitation=0 for an assistant trained on the map labels alone"
        )
    weights = {"fld": float(weight), "dld": 0.0, "lld": 0.0, "lld_aux": 0.0}
    # feature_kd reads the FLD weight only; the others are zeroed so the config says what trains.
    return [*network, "distill.method=feature_kd", f"distill.teacher={_yaml(str(teacher))}",
            f"distill.weights={_yaml(weights)}", "distill.levels=[fld]", "distill.monotakd=null"]


def assistant_config(recipe: ExperimentConfig, teacher: str | None = None) -> ExperimentConfig:
    """The teaching assistant a MonoTAKD recipe needs (:func:`assistant_overrides`); ``teacher``
    defaults to the recipe's ``distill.teacher``."""
    if teacher is None and recipe.distill is not None:
        teacher = recipe.distill.teacher
    data = apply_overrides(to_dict(recipe), assistant_overrides(recipe, teacher))
    config = parse_config(data, f"{recipe.name} (assistant)")
    validate(config, f"{recipe.name} (assistant)")
    return replace(config, name=f"{recipe.name}-assistant",
                   description=f"MonoTAKD teaching assistant of {recipe.name}: LiDAR-depth lift")


def assistant_config_check(student: BEVModel, assistant: BEVModel) -> None:
    """The TA must be the student's camera network with LiDAR depth, so that weights transfer."""
    camera = assistant.camera_encoder
    if camera is None or assistant.lidar_encoder is not None or camera.vtransform.depth_source != "lidar":
        raise ValueError("the MonoTAKD assistant must be a camera-only model with "
                         "model.camera.vtransform.depth_source: lidar (bridgeta train-assistant)")
    # Equal shapes can hide other geometry (depth bins of another range, another BEV extent):
    # the TA's BEV must lie on the student's cells for IMD and CMRD to compare them.
    mine, yours = student.config, assistant.config
    geometry = {
        "model.grid": (mine.grid, yours.grid),
        "model.camera.image_size": (tuple(mine.camera.image_size), tuple(yours.camera.image_size)),
        "model.camera.vtransform.depth": (tuple(mine.camera.vtransform.depth), tuple(yours.camera.vtransform.depth)),
        "model.camera.vtransform.feature_stride": (mine.camera.vtransform.feature_stride,
                                                   yours.camera.vtransform.feature_stride),
    }
    differ = [f"{key} {a} (student) vs {b} (assistant)" for key, (a, b) in geometry.items() if a != b]
    if differ:
        raise ValueError(f"the assistant's geometry differs from the student's: {'; '.join(differ)}: train it from "
                         "the same student config (bridgeta train-assistant --config <this recipe>)")
    ours, theirs = student.state_dict(), assistant.state_dict()
    shared = [k for k in ours if k.startswith(_SHARED_PREFIXES)]
    wrong = [k for k in shared if k not in theirs or theirs[k].shape != ours[k].shape]
    if wrong:
        raise ValueError(f"the assistant's network differs from the student's at {wrong[:3]}: train it from "
                         "the same student config (bridgeta train-assistant --config <this recipe>)")


@register("monotakd")
class MonoTAKDDistiller(Distiller):
    """IMD + CMRD + logit KD through a camera teaching assistant (see the module docstring)."""

    teacher_fields = ("fused_bev", "logits")  # CMRD's target and the logit term's

    frozen = ("teacher", "assistant")

    def __init__(self, student: BEVModel, teacher: BEVModel | None, config: DistillConfig,
                 assistant: BEVModel | None = None) -> None:
        if teacher is None:
            raise ValueError("monotakd needs a teacher")
        settings = config.monotakd or MonoTAKDConfig()
        super().__init__(student, teacher, config)
        self.settings = settings
        if settings.cmrd > 0 and student.residual_branch is None:
            raise ValueError("MonoTAKD's CMRD needs the student's residual branch: set model.residual "
                             "(or distill.monotakd.cmrd=0, the IMD-only ablation)")
        if settings.cmrd == 0 and student.residual_branch is not None and student.feature_fusion is None:
            # Without FFM only CMRD reads the branch: it would run every step and train nothing
            # (and DDP refuses parameters that get no gradient).
            raise ValueError("model.residual without ffm is read only by CMRD, and distill.monotakd.cmrd is 0: "
                             "set model.residual=null (the IMD-only ablation) or model.residual.ffm=true")
        if student.camera_encoder is None:
            raise ValueError("the MonoTAKD student must have a camera branch")
        if settings.cmrd > 0:  # with a fuser or without: CMRD subtracts the maps cell by cell
            check_camera_bev_matches_teacher(student, teacher, "MonoTAKD's CMRD")
        needs_assistant = settings.ta_source == "frozen" or settings.init_from_assistant
        if needs_assistant and assistant is None:
            raise ValueError("monotakd needs its trained assistant: set distill.monotakd.assistant "
                             "(bridgeta train-assistant writes it)")
        self.assistant: BEVModel | None = None
        self.assistant_cache: FrozenOutputCache | None = None
        if assistant is not None:
            assistant_config_check(student, assistant)
            if settings.init_from_assistant:
                shared = {k: v for k, v in assistant.state_dict().items() if k.startswith(_SHARED_PREFIXES)}
                student.load_state_dict(shared, strict=False)
            if settings.ta_source == "frozen":
                self.freeze(assistant)
                self.assistant = assistant

    @property
    def reads_teacher(self) -> bool:
        """Whether a term reads the teacher: CMRD and the logit term do, IMD reads the TA only (so
        the sweep's lambda = 0 point and the IMD-only ablation never run the teacher)."""
        return self.settings.cmrd > 0 or self.settings.logit > 0

    @property
    def input_modalities(self) -> tuple[str, ...]:
        # The TA lifts with projected LiDAR depth, in either source mode: the keyframe's points.
        # The teacher's inputs (its LiDAR sweeps) come only when a term runs it (reads_teacher).
        return tuple(dict.fromkeys((*super().input_modalities, "camera", "depth")))

    def use_output_cache(self, root) -> list[FrozenOutputCache]:
        """The teacher's outputs and, with the frozen TA (not ``shared``: that lift is the student's,
        which trains), the TA's camera BEV."""
        caches = super().use_output_cache(root)
        if self.assistant is not None:
            identity = frozen_model_identity(self.assistant, "assistant.camera_encoder", self.config)
            self.assistant_cache = FrozenOutputCache(root, identity)
            caches.append(self.assistant_cache)
        return caches

    def assistant_bev(self, inputs: BEVInputs, student: BEVOutputs | None = None) -> torch.Tensor:
        """The TA's camera BEV for this batch, a constant target.

        ``frozen``: like the teacher (:meth:`Distiller.teacher_forward`), a frozen forward without
        autograd, under ``distill.teacher_precision``, not the training step's autocast.
        ``shared``: the image features of the student's own forward in this step
        (``student.camera_context``), detached and lifted again with the LiDAR depth by the
        student's own view transform, in fp32: ``student`` is required there.
        """
        assert inputs.camera is not None
        if self.assistant is None:
            if student is None:
                raise ValueError("MonoTAKD's shared TA lift reads the student's outputs of this step: pass student")
            return self._shared_lift(inputs, student)
        if self.assistant_cache is not None:
            device = next(self.student.parameters()).device
            read = self.assistant_cache.fetch(inputs_of(self.assistant, inputs), ("camera_bev",),
                                              lambda batch: {"camera_bev": self._assistant_lift(batch)}, device)
            return read["camera_bev"]
        return self._assistant_lift(inputs)

    def _assistant_lift(self, inputs: BEVInputs) -> torch.Tensor:
        """The frozen TA's camera BEV without the output cache: its lift run on ``inputs``."""
        assert self.assistant is not None and self.assistant.camera_encoder is not None
        device = next(self.student.parameters()).device
        with torch.no_grad(), autocast_context(device, self.config.teacher_precision):
            bev = self.assistant.camera_encoder(inputs.camera, inputs.bev_aug).bev
        return bev.float()

    def _shared_lift(self, inputs: BEVInputs, student: BEVOutputs) -> torch.Tensor:
        """``shared``: the student's image features of this very forward (the public code's TA
        branch reads the same features as the student's lift), placed where the LiDAR says. No
        second encoder pass: a pass of its own would see other BatchNorm statistics (or, in eval
        mode, the running ones), so the target would differ by more than the depth."""
        if student.camera_context is None:
            raise ValueError("MonoTAKD's shared TA lift reads the student's camera_context: its camera "
                             "branch returned none")
        assert self.student.camera_encoder is not None and inputs.camera is not None
        device = student.camera_context.device
        with torch.autocast(device.type, enabled=False):
            bev = self.student.camera_encoder.vtransform.lift_with_lidar_depth(
                student.camera_context.detach().float(), inputs.camera, inputs.bev_aug
            )
        return bev.float()

    def distill(
        self, inputs: BEVInputs, labels: torch.Tensor, student: BEVOutputs, logs: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        settings = self.settings
        teacher = self.teacher_forward(inputs) if self.reads_teacher else None
        assert student.camera_bev is not None
        losses: dict[str, torch.Tensor] = {}
        if settings.imd > 0 or settings.cmrd > 0:
            assistant = self.assistant_bev(inputs, student)
        if settings.imd > 0:
            imd = F.mse_loss(minmax_per_sample(student.camera_bev.float()), minmax_per_sample(assistant))
            losses["kd/imd"] = settings.imd * imd
        if settings.cmrd > 0:
            assert student.residual_bev is not None and teacher is not None
            target = residual_target(assistant, teacher.fused_bev, settings.threshold)
            losses["kd/cmrd"] = settings.cmrd * F.mse_loss(student.residual_bev.float(), target)
            logs["cmrd/target_density"] = float((target > 0).float().mean())
        if settings.logit > 0:
            assert teacher is not None
            losses["kd/logit"] = settings.logit * bernoulli_kl(teacher.logits, student.logits, self.config.temperature)
        return losses
