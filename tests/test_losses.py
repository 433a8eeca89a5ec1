"""Focal loss and per-class map loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bridgeta.losses import map_segmentation_loss, sigmoid_focal_loss

LOGITS = torch.tensor([2.0, -1.0, 0.5, -3.0])
TARGETS = torch.tensor([1.0, 0.0, 0.0, 1.0])
# p = sigmoid(x); positives: -(1 - p)^2 log p; negatives: -p^2 log(1 - p).
#   x =  2, t = 1: p = 0.880797, -(0.119203)^2 * log(0.880797) = 0.00180356
#   x = -1, t = 0: p = 0.268941, -(0.268941)^2 * log(0.731059) = 0.02265806
#   x = .5, t = 0: p = 0.622459, -(0.622459)^2 * log(0.377541) = 0.37741160
#   x = -3, t = 1: p = 0.047426, -(0.952574)^2 * log(0.047426) = 2.76628044
FOCAL = torch.tensor([0.0018035628, 0.0226580575, 0.3774116009, 2.7662804410])
# gamma = 0: -log p for positives, -log(1 - p) for negatives.
BCE = torch.tensor([0.1269280110, 0.3132616875, 0.9740769842, 3.0485873516])


def test_focal_loss_by_hand() -> None:
    loss = sigmoid_focal_loss(LOGITS, TARGETS, reduction="none")
    torch.testing.assert_close(loss, FOCAL)
    p = 1 / (1 + math.exp(-2.0))
    assert loss[0].item() == pytest.approx(-((1 - p) ** 2) * math.log(p), rel=1e-5)
    assert sigmoid_focal_loss(LOGITS, TARGETS).item() == pytest.approx(FOCAL.mean().item(), rel=1e-6)
    assert sigmoid_focal_loss(LOGITS, TARGETS, reduction="sum").item() == pytest.approx(
        FOCAL.sum().item(), rel=1e-6
    )


def test_bool_targets_and_half_logits() -> None:
    loss = sigmoid_focal_loss(LOGITS.half(), TARGETS.bool(), reduction="none")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, FOCAL, rtol=1e-3, atol=1e-3)


def test_gamma_zero_is_bce() -> None:
    loss = sigmoid_focal_loss(LOGITS, TARGETS, gamma=0.0, reduction="none")
    torch.testing.assert_close(loss, BCE)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(LOGITS, TARGETS, reduction="none"))


def test_alpha_weights_positives_and_negatives() -> None:
    loss = sigmoid_focal_loss(LOGITS, TARGETS, alpha=0.25, reduction="none")
    torch.testing.assert_close(loss, FOCAL * torch.tensor([0.25, 0.75, 0.75, 0.25]))


@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_gradient_finite_for_saturated_logits(gamma: float) -> None:
    logits = torch.tensor([50.0, -50.0, 50.0, -50.0], requires_grad=True)
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = sigmoid_focal_loss(logits, targets, gamma=gamma, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    # Confident and right: no gradient. Confidently wrong: (1 - p_t) ~ 1, the BCE gradient -/+1.
    torch.testing.assert_close(logits.grad, torch.tensor([0.0, 0.0, 1.0, -1.0]))
    assert loss.item() == pytest.approx(100.0, rel=1e-5)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        sigmoid_focal_loss(LOGITS, TARGETS, reduction="avg")
    with pytest.raises(ValueError):
        sigmoid_focal_loss(LOGITS, TARGETS, alpha=1.5)
    with pytest.raises(ValueError):
        sigmoid_focal_loss(LOGITS, TARGETS[:3])


def map_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    # (B=1, K=2, X=2, Y=2): class 0 holds LOGITS/TARGETS, class 1 the same negated.
    logits = torch.stack([LOGITS, -LOGITS]).view(1, 2, 2, 2)
    targets = torch.stack([TARGETS, 1 - TARGETS]).view(1, 2, 2, 2)
    return logits, targets


def test_map_loss_is_per_class_mean() -> None:
    logits, targets = map_inputs()
    logits[0, 1, 0, 0] = 0.0  # class 1, cell 0: p = 0.5, t = 0 -> 0.25 * log 2
    terms = map_segmentation_loss(logits, targets, ["drivable_area", "divider"])
    assert list(terms) == ["focal/drivable_area", "focal/divider"]
    assert terms["focal/drivable_area"].item() == pytest.approx(FOCAL.mean().item(), rel=1e-6)
    divider = (0.25 * math.log(2.0) + FOCAL[1:].sum().item()) / 4
    assert terms["focal/divider"].item() == pytest.approx(divider, rel=1e-6)


@pytest.mark.parametrize("layout", ["BXY", "B1XY"])
def test_map_loss_valid_mask(layout: str) -> None:
    logits, targets = map_inputs()
    valid = torch.tensor([[True, False], [True, True]]).unsqueeze(0)  # drops cell 1 (x=-1, t=0)
    if layout == "B1XY":
        valid = valid.unsqueeze(1)
    terms = map_segmentation_loss(logits, targets, ["a", "b"], valid_mask=valid)
    expected = (FOCAL[0] + FOCAL[2] + FOCAL[3]).item() / 3
    assert terms["focal/a"].item() == pytest.approx(expected, rel=1e-6)
    assert terms["focal/b"].item() == pytest.approx(expected, rel=1e-6)


def test_map_loss_all_invalid_is_zero_with_gradient() -> None:
    logits, targets = map_inputs()
    logits.requires_grad_(True)
    terms = map_segmentation_loss(logits, targets, ["a", "b"], valid_mask=torch.zeros(1, 2, 2, dtype=torch.bool))
    total = sum(terms.values())
    total.backward()
    assert total.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_map_loss_checks_classes() -> None:
    logits, targets = map_inputs()
    with pytest.raises(ValueError, match="classes"):
        map_segmentation_loss(logits, targets, ["only_one"])
