"""Logit KD baseline: per-cell, per-class Bernoulli KL from teacher to student logits."""

from __future__ import annotations

import torch

from bridgeta.distill.base import Distiller, bernoulli_kl, register
from bridgeta.models.types import BEVInputs, BEVOutputs


@register("logit_kd")
class LogitKDDistiller(Distiller):
    """``lambda_3 * KL(sigmoid(L^T / T) || sigmoid(L^S / T)) * T^2`` (multi-label, so Bernoulli)."""

    teacher_fields = ("logits",)

    def distill(
        self, inputs: BEVInputs, labels: torch.Tensor, student: BEVOutputs, logs: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        teacher = self.teacher_forward(inputs)
        loss = bernoulli_kl(teacher.logits, student.logits, self.config.temperature)
        losses = {"kd/logit": self.config.weights.lld * loss}
        pair = self.object_pair(student, teacher)
        if pair is not None:  # the same KL on the object heatmap logits
            losses["kd/logit_object"] = self.config.weights.lld * bernoulli_kl(
                pair[1].heatmap, pair[0].heatmap, self.config.temperature)
        return losses
