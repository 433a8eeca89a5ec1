"""MonoTAKD (METHOD.md §3): a camera teaching assistant, intra-modal and cross-modal residual
distillation, in our BEV map-segmentation setting.

* **The TA** is the student's camera network lifting its image features with projected LiDAR
  depth (one-hot bins, ``model.camera.vtransform.depth_source: lidar``), trained first on the map
  labels (``bridgeta train-assistant``). It shares the student's modality, so its BEV is a small
  step from the student's, and the student starts from its weights.
* **IMD**: MSE between the student's camera BEV and the TA's, both min-max normalised per sample,
  with real gradients into the student (the public code's normalisation detaches both sides, so
  its IMD trains nothing: tested here as a regression).
* **CMRD**: the residual ``|norm(TA BEV) - norm(teacher BEV)|``, entries below ``threshold`` x
  the sample's largest set to 0, detached; the student's residual branch (``model.residual``:
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

from bridgeta.config import DistillConfig, ExperimentConfig, MonoTAKDConfig
from bridgeta.distill.base import Distiller, bernoulli_kl, register
from bridgeta.models.bev_model import BEVModel
from bridgeta.models.types import BEVInputs, BEVOutputs

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
    sample's largest set to 0 (the large residuals keep their value), without gradient."""
    with torch.no_grad():
        residual = (minmax_per_sample(assistant_bev.float()) - minmax_per_sample(teacher_bev.float())).abs()
        peak = residual.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
        return torch.where(residual >= threshold * peak, residual, torch.zeros_like(residual))


# The same change as config overrides, for tools that train presets by name (bench accuracy).
ASSISTANT_OVERRIDES = ("distill=null", "model.residual=null", "model.camera.vtransform.depth_source=lidar")


def assistant_config(recipe: ExperimentConfig) -> ExperimentConfig:
    """The teaching assistant a MonoTAKD recipe needs: its student's camera network, lifting with
    projected LiDAR depth, without the student-only branches and without distillation."""
    model = recipe.model
    if model.camera is None:
        raise ValueError(f"config '{recipe.name}' has no camera branch: MonoTAKD's assistant is a camera model")
    camera = replace(model.camera, vtransform=replace(model.camera.vtransform, depth_source="lidar"))
    return replace(recipe, name=f"{recipe.name}-assistant",
                   description=f"MonoTAKD teaching assistant of {recipe.name}: LiDAR-depth lift",
                   model=replace(model, camera=camera, residual=None), distill=None)


def assistant_config_check(student: BEVModel, assistant: BEVModel) -> None:
    """The TA must be the student's camera network with LiDAR depth, so that weights transfer."""
    camera = assistant.camera_encoder
    if camera is None or assistant.lidar_encoder is not None or camera.vtransform.depth_source != "lidar":
        raise ValueError("the MonoTAKD assistant must be a camera-only model with "
                         "model.camera.vtransform.depth_source: lidar (bridgeta train-assistant)")
    ours, theirs = student.state_dict(), assistant.state_dict()
    shared = [k for k in ours if k.startswith(_SHARED_PREFIXES)]
    wrong = [k for k in shared if k not in theirs or theirs[k].shape != ours[k].shape]
    if wrong:
        raise ValueError(f"the assistant's network differs from the student's at {wrong[:3]}: train it from "
                         "the same student config (bridgeta train-assistant --config <this recipe>)")


@register("monotakd")
class MonoTAKDDistiller(Distiller):
    """IMD + CMRD + logit KD through a camera teaching assistant (see the module docstring)."""

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
        if student.camera_encoder is None:
            raise ValueError("the MonoTAKD student must have a camera branch")
        channels = student.camera_encoder.out_channels
        if settings.cmrd > 0 and teacher.fuser is not None and teacher.fuser.out_channels != channels:
            raise ValueError(f"CMRD compares the teacher's fused BEV ({teacher.fuser.out_channels} channels) "
                             f"with the student's camera BEV ({channels}): they must match")
        needs_assistant = settings.ta_source == "frozen" or settings.init_from_assistant
        if needs_assistant and assistant is None:
            raise ValueError("monotakd needs its trained assistant: set distill.monotakd.assistant "
                             "(bridgeta train-assistant writes it)")
        self.assistant: BEVModel | None = None
        if assistant is not None:
            assistant_config_check(student, assistant)
            if settings.init_from_assistant:
                shared = {k: v for k, v in assistant.state_dict().items() if k.startswith(_SHARED_PREFIXES)}
                student.load_state_dict(shared, strict=False)
            if settings.ta_source == "frozen":
                self.freeze(assistant)
                self.assistant = assistant

    @property
    def input_modalities(self) -> tuple[str, ...]:
        # The TA lifts with projected LiDAR depth, in either source mode.
        return tuple(dict.fromkeys((*super().input_modalities, "camera", "depth")))

    def assistant_bev(self, inputs: BEVInputs) -> torch.Tensor:
        """The TA's camera BEV for this batch, a constant target."""
        assert inputs.camera is not None
        with torch.no_grad():
            if self.assistant is not None:
                bev, _ = self.assistant.camera_encoder(inputs.camera, inputs.bev_aug)
            else:  # "shared": the student's own image features, lifted where the LiDAR says
                # In eval mode, a probe: its BatchNorm must not learn the LiDAR lift's statistics.
                encoder = self.student.camera_encoder
                was_training = encoder.training
                encoder.eval()
                try:
                    bev, _ = encoder(inputs.camera, inputs.bev_aug, depth_source="lidar")
                finally:
                    encoder.train(was_training)
        return bev.float()

    def distill(
        self, inputs: BEVInputs, labels: torch.Tensor, student: BEVOutputs, logs: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        settings = self.settings
        teacher = self.teacher_forward(inputs)
        assert student.camera_bev is not None
        losses: dict[str, torch.Tensor] = {}
        if settings.imd > 0 or settings.cmrd > 0:
            assistant = self.assistant_bev(inputs)
        if settings.imd > 0:
            imd = F.mse_loss(minmax_per_sample(student.camera_bev.float()), minmax_per_sample(assistant))
            losses["kd/imd"] = settings.imd * imd
        if settings.cmrd > 0:
            assert student.residual_bev is not None
            target = residual_target(assistant, teacher.fused_bev, settings.threshold)
            losses["kd/cmrd"] = settings.cmrd * F.mse_loss(student.residual_bev.float(), target)
            logs["cmrd/target_density"] = float((target > 0).float().mean())
        if settings.logit > 0:
            losses["kd/logit"] = settings.logit * bernoulli_kl(teacher.logits, student.logits, self.config.temperature)
        return losses
