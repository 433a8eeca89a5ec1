"""Feature KD baseline: Eq. 8 distance between the student's camera BEV and the teacher's fused BEV."""

from __future__ import annotations

import torch

from bridgeta.distill.base import Distiller, cell_mse, register
from bridgeta.models.types import BEVInputs, BEVOutputs


@register("feature_kd")
class FeatureKDDistiller(Distiller):
    """``lambda_1 * cell_mse(F_cam^S, F_fus^T)``: the FLD level alone, without a TA."""

    def distill(
        self, inputs: BEVInputs, labels: torch.Tensor, student: BEVOutputs, logs: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        teacher = self.teacher_forward(inputs)
        assert student.camera_bev is not None
        loss = cell_mse(student.camera_bev, teacher.fused_bev)
        logs["fld/gap_l2"] = float(loss.detach().sqrt())
        return {"kd/feature": self.config.weights.fld * loss}
