"""Feature KD baseline: Eq. 8 distance between the student's camera BEV and the teacher's fused BEV.

It is also how MonoTAKD's teaching assistant learns the teacher's feature space
(``bridgeta train-assistant``, ``distill.monotakd.assistant_imitation``): the CMKD-style imitation
the public code's camera network starts from.
"""

from __future__ import annotations

import torch

from bridgeta.config import DistillConfig
from bridgeta.distill.base import Distiller, cell_mse, check_camera_bev_matches_teacher, register
from bridgeta.models.bev_model import BEVModel
from bridgeta.models.types import BEVInputs, BEVOutputs


@register("feature_kd")
class FeatureKDDistiller(Distiller):
    """``lambda_1 * cell_mse(F_cam^S, F_fus^T)``: the FLD level alone, without a TA."""

    teacher_fields = ("fused_bev",)

    def __init__(self, student: BEVModel, teacher: BEVModel | None, config: DistillConfig) -> None:
        super().__init__(student, teacher, config)
        if teacher is None:
            raise ValueError("feature_kd needs a teacher")
        check_camera_bev_matches_teacher(student, teacher, "feature_kd")

    def distill(
        self, inputs: BEVInputs, labels: torch.Tensor, student: BEVOutputs, logs: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        teacher = self.teacher_forward(inputs)
        assert student.camera_bev is not None
        loss = cell_mse(student.camera_bev, teacher.fused_bev)
        logs["fld/gap_l2"] = float(loss.detach().sqrt())
        return {"kd/feature": self.config.weights.fld * loss}
