"""BridgeTA: a teacher assistant that fuses teacher LiDAR BEV with student camera BEV (METHOD.md §1).

The TA has no backbone: ``ConvFuser([F_lid^T, F_cam^S]) -> F_fus^TA``, then a decoder and head
with the student's architecture -> ``F_dec^TA``, ``L^TA``; fresh (``distill.ta_init: scratch``)
or copied from the teacher's fuser, decoder and head (``teacher``). At each enabled level the
student is distilled through the TA with :func:`dual_path_loss`; the TA is trained jointly (its
own segmentation loss plus the teacher->TA terms, never pulled toward the student unless
``distill.ta_mutual``) and dropped after training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from bridgeta.config import DistillConfig
from bridgeta.distill.base import Distiller, bernoulli_kl, register
from bridgeta.distill.young import dual_path_loss
from bridgeta.models.bev_model import BEVModel
from bridgeta.models.decoder import BEVDecoder
from bridgeta.models.fuser import ConvFuser
from bridgeta.models.head import MapSegmentationHead
from bridgeta.models.object_head import ObjectHead, ObjectOutputs, object_loss_weights, object_losses
from bridgeta.models.types import BEVInputs, BEVOutputs


@dataclass
class AssistantOutputs:
    fused_bev: torch.Tensor
    decoded_bev: torch.Tensor
    logits: torch.Tensor
    objects: ObjectOutputs | None = None  # with a multi-task student: the TA's object head


class TeacherAssistant(nn.Module):
    """Fuser + decoder + head; the decoder and head copy the student's architecture, not weights."""

    def __init__(self, student: BEVModel, lidar_channels: int) -> None:
        super().__init__()
        assert student.camera_encoder is not None
        camera_channels = student.camera_encoder.out_channels
        decoder = student.config.decoder
        # F_fus^TA is compared with F_cam^S, so it has the student's camera channel count.
        self.fuser = ConvFuser([lidar_channels, camera_channels], camera_channels)
        self.decoder = BEVDecoder(
            camera_channels,
            list(decoder.blocks),
            in_indices=decoder.in_indices,
            out_channels=decoder.out_channels,
            scale_factor=decoder.scale_factor,
        )
        self.head = MapSegmentationHead(
            decoder.out_channels, student.feature_grid, student.output_grid, len(student.classes)
        )
        # A multi-task student's TA has its object head too (LLD and CrossKD on the heatmaps).
        self.object_head: ObjectHead | None = None
        if student.object_head is not None:
            self.object_head = ObjectHead(decoder.out_channels, len(student.object_classes), student.feature_grid,
                                          student.config.heads.object.head_channels)

    def forward(self, lidar_bev: torch.Tensor, camera_bev: torch.Tensor) -> AssistantOutputs:  # type: ignore[override]
        fused = self.fuser([lidar_bev, camera_bev])
        decoded = self.decoder(fused)
        objects = self.object_head(decoded) if self.object_head is not None else None
        return AssistantOutputs(fused, decoded, self.head(decoded), objects)

    @torch.no_grad()
    def copy_from_teacher(self, teacher: BEVModel) -> None:
        """Start from the teacher's fuser, decoder and head (``distill.ta_init: teacher``).

        The teacher's fuser reads ``[camera, lidar]`` and the TA's ``[lidar, camera]``, so the
        fuser's input channels are reordered: fed the teacher's own camera and LiDAR BEV, the TA
        then computes exactly the teacher's fused, decoded and logit maps.
        """
        assert teacher.fuser is not None and teacher.camera_encoder is not None
        camera_channels = teacher.camera_encoder.out_channels
        state = {key: value.clone() for key, value in teacher.fuser.state_dict().items()}
        weight = state["0.weight"]
        state["0.weight"] = torch.cat([weight[:, camera_channels:], weight[:, :camera_channels]], dim=1)
        self.fuser.load_state_dict(state)
        self.decoder.load_state_dict(teacher.decoder.state_dict())
        self.head.load_state_dict(teacher.head.state_dict())
        if self.object_head is not None and teacher.object_head is not None:
            self.object_head.load_state_dict(teacher.object_head.state_dict())


class AssistantView(nn.Module):
    """A BridgeTA distiller's teacher assistant as a model of its own, for evaluation.

    It reads what it reads in training, the teacher's LiDAR BEV and the student's camera BEV, and
    returns :class:`AssistantOutputs` (``.logits`` on the student's output grid), so the map
    evaluation measures the TA like any model: the expected order is teacher > TA > student.
    """

    def __init__(self, distiller: BridgeTADistiller) -> None:
        super().__init__()
        assert distiller.teacher is not None
        self.distiller = distiller
        student = distiller.student
        self.config, self.output_grid, self.classes = student.config, student.output_grid, student.classes
        self.modalities = tuple(dict.fromkeys(student.modalities + distiller.teacher.modalities))

    def forward(self, inputs: BEVInputs) -> AssistantOutputs:  # type: ignore[override]
        distiller = self.distiller
        assert distiller.teacher is not None
        teacher, student = distiller.teacher(inputs), distiller.student(inputs)
        assert teacher.lidar_bev is not None and student.camera_bev is not None
        return distiller.assistant(teacher.lidar_bev, student.camera_bev)


def check_alignment(student: BEVModel, teacher: BEVModel) -> None:
    """BridgeTA uses no adapters: teacher and student levels must have equal shapes."""
    if student.camera_encoder is None or student.lidar_encoder is not None:
        raise ValueError("the BridgeTA student must be camera-only")
    if teacher.lidar_encoder is None or teacher.fuser is None:
        raise ValueError("the BridgeTA teacher must be a LiDAR-camera fusion model")
    camera_channels = student.camera_encoder.out_channels
    if teacher.fuser.out_channels != camera_channels:
        raise ValueError(
            f"teacher fuser gives {teacher.fuser.out_channels} channels, the student's camera BEV "
            f"{camera_channels}: they must match (no adapters)"
        )
    if teacher.feature_grid.shape != student.feature_grid.shape:
        raise ValueError(
            f"teacher BEV grid {teacher.feature_grid.shape} != student's {student.feature_grid.shape}"
        )
    if teacher.config.decoder != student.config.decoder or teacher.classes != student.classes:
        raise ValueError("teacher and student must share the decoder configuration and classes")
    if teacher.output_grid.shape != student.output_grid.shape:
        raise ValueError("teacher and student heads must predict on the same output grid")


@register("bridgeta")
class BridgeTADistiller(Distiller):
    """FLD / DLD / LLD dual-path distillation through a LiDAR-camera teacher assistant."""

    # The three levels' targets, and the LiDAR BEV the TA fuses with the student's camera BEV.
    teacher_fields = ("lidar_bev", "fused_bev", "decoded_bev", "logits")

    def __init__(self, student: BEVModel, teacher: BEVModel | None, config: DistillConfig) -> None:
        if teacher is None:
            raise ValueError("bridgeta needs a teacher")
        check_alignment(student, teacher)
        super().__init__(student, teacher, config)
        assert teacher.lidar_encoder is not None
        self.assistant = TeacherAssistant(student, teacher.lidar_encoder.out_channels)
        if config.ta_init == "teacher":
            self.assistant.copy_from_teacher(teacher)

    def assistant_forward(self, student: BEVOutputs, teacher: BEVOutputs) -> AssistantOutputs:
        """TA outputs; the student's camera BEV is detached unless ``ta_grad_to_student``."""
        assert student.camera_bev is not None and teacher.lidar_bev is not None
        camera = student.camera_bev if self.config.ta_grad_to_student else student.camera_bev.detach()
        return self.assistant(teacher.lidar_bev.detach(), camera)

    def crosskd_aux(self, student: BEVOutputs, teacher: BEVOutputs, ta: AssistantOutputs) -> torch.Tensor:
        """``KL(L^T || teacher.head(F_dec^S)) + KL(L^TA || ta.head(F_dec^S))``.

        Both heads act as fixed probes, so this term trains only the student (as in CrossKD): the
        teacher's head is frozen and in eval mode; the TA's runs with detached weights and, by
        default (``distill.ta_probe_mode: eval``), in eval mode too, on its running BatchNorm
        statistics instead of the student's batch statistics. In ``train`` mode (an ablation) it
        normalises with the batch's statistics and throw-away copies of the buffers. The TA's
        target is detached for the same reason.
        """
        teacher_half = self.teacher_head_kl(student, teacher)
        through_ta = self.probe(self.assistant.head, student.decoded_bev)
        return teacher_half + bernoulli_kl(ta.logits.detach(), through_ta, self.config.temperature)

    def probe(self, head: nn.Module, features: torch.Tensor):
        """``head(features)`` as a fixed probe: detached weights, throw-away buffer copies, and
        eval mode unless ``distill.ta_probe_mode`` is ``train`` (see :meth:`crosskd_aux`)."""
        state = {name: p.detach() for name, p in head.named_parameters()}
        state.update({name: b.clone() for name, b in head.named_buffers()})
        was_training = head.training
        head.train(self.config.ta_probe_mode == "train" and was_training)
        try:
            return functional_call(head, state, (features,))
        finally:
            head.train(was_training)

    def object_terms(self, student: BEVOutputs, teacher: BEVOutputs, ta: AssistantOutputs, epsilon,
                     logs: dict[str, float]) -> dict[str, torch.Tensor]:
        """A multi-task pair's object terms: the TA's own object loss (it learns the task like it
        learns the map), LLD's dual path on the heatmap logits, and the CrossKD-style KL through
        the teacher's and the TA's object heads (probes, as for the map)."""
        pair = self.object_pair(student, teacher)
        if pair is None or ta.objects is None:
            return {}
        config, settings = self.config, self.student.config.heads.object
        s_obj, t_obj = pair
        losses: dict[str, torch.Tensor] = {}
        if self.object_targets is not None:
            weights = object_loss_weights(settings, config.ta_seg_weight)
            for name, value in object_losses(ta.objects, self.object_targets, weights).items():
                losses[f"ta_object/{name}"] = value
        if "lld" in config.levels:
            loss, terms = dual_path_loss(s_obj.heatmap, ta.objects.heatmap, t_obj.heatmap, epsilon,
                                         config.epsilon_range, mutual=config.ta_mutual)
            losses["kd/lld_object"] = config.weights.lld * loss
            logs.update({f"lld_object/{name}": float(value) for name, value in terms.items()})
            if config.lld_aux:
                teacher_half = self.teacher_object_head_kl(student, t_obj)
                through_ta = self.probe(self.assistant.object_head, student.decoded_bev).heatmap
                losses["kd/lld_aux_object"] = config.weights.lld_aux * (
                    teacher_half + bernoulli_kl(ta.objects.heatmap.detach(), through_ta, config.temperature))
        return losses

    def distill(
        self, inputs: BEVInputs, labels: torch.Tensor, student: BEVOutputs, logs: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        config = self.config
        teacher = self.teacher_forward(inputs)
        ta = self.assistant_forward(student, teacher)
        losses = self.segmentation_losses(ta.logits, labels, "ta_seg", config.ta_seg_weight)
        epsilon = "optimal" if config.epsilon == "optimal" else config.epsilon_fixed
        assert student.camera_bev is not None
        triples = {
            "fld": (student.camera_bev, ta.fused_bev, teacher.fused_bev, config.weights.fld),
            "dld": (student.decoded_bev, ta.decoded_bev, teacher.decoded_bev, config.weights.dld),
            "lld": (student.logits, ta.logits, teacher.logits, config.weights.lld),
        }
        for level in config.levels:
            s, a, t, weight = triples[level]
            loss, terms = dual_path_loss(s, a, t, epsilon, config.epsilon_range, mutual=config.ta_mutual)
            losses[f"kd/{level}"] = weight * loss
            logs.update({f"{level}/{name}": float(value) for name, value in terms.items()})
        if "lld" in config.levels and config.lld_aux:
            losses["kd/lld_aux"] = config.weights.lld_aux * self.crosskd_aux(student, teacher, ta)
        losses.update(self.object_terms(student, teacher, ta, epsilon, logs))
        losses.update(self.relational_terms(student, teacher))
        return losses
