"""Segmentation losses of the BEV map task.

BEVFusion trains its map head with a per-class sigmoid focal loss (``gamma=2``, no alpha: ``alpha=-1``
in mmdet/torchvision terms), takes the mean over each class's cells and sums the per-class means
(``mmdet3d/models/heads/segm/vanilla.py`` in mit-han-lab/bevfusion). The functions here reproduce
that, computed in float32 so that mixed-precision training does not change the loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_REDUCTIONS = ("none", "mean", "sum")


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Element-wise sigmoid focal loss ``-alpha_t * (1 - p_t)**gamma * log(p_t)``.

    ``targets`` are binary (bool, or float in ``{0, 1}``). ``alpha=None`` applies no class balance
    (BEVFusion's default); a float in ``[0, 1]`` weights positives by ``alpha`` and negatives by
    ``1 - alpha``. ``gamma=0`` and ``alpha=None`` give plain binary cross-entropy.

    The cross-entropy comes from ``binary_cross_entropy_with_logits`` and the modulating factor is
    ``exp(gamma * logsigmoid(±logits))`` (for binary targets ``1 - p_t = sigmoid(logits * (1 - 2t))``),
    so both the value and the gradient stay finite for saturated logits and for ``gamma < 1``,
    where ``(1 - sigmoid(x))**gamma`` would differentiate ``0**gamma``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be None or in [0, 1], got {alpha}")
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    logits = logits.float()
    targets = targets.float()
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if gamma != 0:
        loss = loss * torch.exp(gamma * F.logsigmoid(logits * (1 - 2 * targets)))
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def expand_valid_mask(valid_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Broadcast a ``(B, X, Y)``, ``(B, 1, X, Y)`` or ``(B, K, X, Y)`` cell mask to ``shape``.

    Shared by the loss and the metric so that both accept the same mask layouts.
    """
    if valid_mask.dim() == 3:
        valid_mask = valid_mask.unsqueeze(1)
    if valid_mask.dim() != 4 or valid_mask.shape[1] not in (1, shape[1]):
        raise ValueError(
            f"valid_mask must be (B, X, Y), (B, 1, X, Y) or (B, K, X, Y) for {tuple(shape)}, "
            f"got {tuple(valid_mask.shape)}"
        )
    return valid_mask.expand(shape)


def map_segmentation_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    classes: Sequence[str],
    gamma: float = 2.0,
    *,
    alpha: float | None = None,
    valid_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-class focal loss terms ``{"focal/<class>": mean over that class's cells}``.

    ``logits`` and ``targets`` are ``(B, K, X, Y)`` with ``K == len(classes)``. Every class gets its
    own mean (so rare classes are not drowned by frequent ones in a joint mean), as in BEVFusion;
    the caller sums the terms. ``valid_mask`` (bool, ``(B, X, Y)``, ``(B, 1, X, Y)`` or
    ``(B, K, X, Y)``; true = counted) excludes cells such as those outside the map from both the
    numerator and the denominator of each mean; a class with no valid cell contributes 0.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, K, X, Y), got {tuple(logits.shape)}")
    if len(classes) != logits.shape[1]:
        raise ValueError(f"{len(classes)} classes for {logits.shape[1]} logit channels")
    loss = sigmoid_focal_loss(logits, targets, gamma=gamma, alpha=alpha, reduction="none")
    if valid_mask is None:
        per_class = loss.mean(dim=(0, 2, 3))
    else:
        weight = expand_valid_mask(valid_mask, loss.shape).to(loss.dtype)
        per_class = (loss * weight).sum(dim=(0, 2, 3)) / weight.sum(dim=(0, 2, 3)).clamp_min(1.0)
    return {f"focal/{name}": per_class[index] for index, name in enumerate(classes)}
