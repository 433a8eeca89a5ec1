"""``w/o TA`` ablation (Table 4): direct teacher->student distance at the same levels as BridgeTA.

Uses the same Eq. 8 distance, level weights and CrossKD-style term as
:mod:`bridgeta.distill.bridgeta`, so the only difference from BridgeTA is the missing assistant:
with ``lld_aux`` (the recipe's), L_LLD also holds ``KL(L^T || teacher.head(F_dec^S))``, the half of
L_aux that needs no TA (the paper's second "w/o TA" row, 58.2; ``lld_aux: false`` is its first,
57.8). The relational term, where its weight is set, is BridgeTA's too.
"""

from __future__ import annotations

import torch

from bridgeta.distill.base import Distiller, cell_mse, register
from bridgeta.models.types import BEVInputs, BEVOutputs


@register("direct")
class DirectDistiller(Distiller):
    teacher_fields = ("fused_bev", "decoded_bev", "logits")

    def distill(
        self, inputs: BEVInputs, labels: torch.Tensor, student: BEVOutputs, logs: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        teacher = self.teacher_forward(inputs)
        weights = self.config.weights
        assert student.camera_bev is not None
        pairs = {
            "fld": (student.camera_bev, teacher.fused_bev, weights.fld),
            "dld": (student.decoded_bev, teacher.decoded_bev, weights.dld),
            "lld": (student.logits, teacher.logits, weights.lld),
        }
        losses = {}
        for level in self.config.levels:
            s, t, weight = pairs[level]
            loss = cell_mse(s, t)
            losses[f"kd/{level}"] = weight * loss
            logs[f"{level}/gap_l2"] = float(loss.detach().sqrt())
        aux = "lld" in self.config.levels and self.config.lld_aux
        if aux:
            losses["kd/lld_aux"] = weights.lld_aux * self.teacher_head_kl(student, teacher)
        pair = self.object_pair(student, teacher)
        if pair is not None and "lld" in self.config.levels:  # LLD on the object heatmap logits too
            loss = cell_mse(pair[0].heatmap, pair[1].heatmap)
            losses["kd/lld_object"] = weights.lld * loss
            logs["lld_object/gap_l2"] = float(loss.detach().sqrt())
            if aux:
                losses["kd/lld_aux_object"] = weights.lld_aux * self.teacher_object_head_kl(student, pair[1])
        losses.update(self.relational_terms(student, teacher))
        return losses
