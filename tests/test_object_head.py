"""The CenterPoint-style object head: targets decode back to their boxes, the Gaussian focal loss
on fixed values, decoding of a perfect prediction, and circle NMS against a plain greedy loop."""

from __future__ import annotations

import math

import pytest
import torch

from bridgeta.geometry import BEVGrid
from bridgeta.models.object_head import (
    ObjectHead,
    ObjectOutputs,
    boxes_from_regression_targets,
    build_targets,
    circle_nms,
    decode,
    gaussian_focal_loss,
    object_losses,
    wrap_angle,
)

GRID = BEVGrid((-51.2, 51.2, 0.8), (-51.2, 51.2, 0.8))


def _boxes() -> tuple[torch.Tensor, torch.Tensor]:
    boxes = torch.tensor([
        # x, y, z, l, w, h, yaw, vx, vy
        [10.3, -4.1, 0.8, 4.6, 1.9, 1.6, 0.3, 5.0, 1.0],
        [-20.05, 15.7, 1.5, 11.5, 2.6, 3.3, -2.8, 0.0, 0.0],
        [3.0, 3.0, 0.9, 0.7, 0.7, 1.8, 1.2, 1.1, -0.4],
        [80.0, 0.0, 0.8, 4.6, 1.9, 1.6, 0.0, 0.0, 0.0],  # off the grid: no target
    ])
    return boxes, torch.tensor([0, 2, 3, 0])


def test_targets_decode_back_to_their_boxes():
    boxes, labels = _boxes()
    targets = build_targets([boxes], [labels], GRID, num_classes=4)
    assert int(targets.mask.sum()) == 3
    (decoded,) = boxes_from_regression_targets(targets, GRID)
    expected = boxes[:3]
    assert torch.allclose(decoded[:, :6], expected[:, :6], atol=1e-4)
    assert torch.allclose(wrap_angle(decoded[:, 6] - expected[:, 6]), torch.zeros(3), atol=1e-5)
    assert torch.allclose(decoded[:, 7:], expected[:, 7:])
    # The heatmap peaks (exactly 1) sit at the centre cells of each box's own class.
    for box, label in zip(expected, labels[:3]):
        i, j = int((box[0] + 51.2) // 0.8), int((box[1] + 51.2) // 0.8)
        assert targets.heatmap[0, label, i, j] == 1.0
    assert int((targets.heatmap == 1).sum()) == 3
    # A 0.7 m pedestrian still gets the minimum radius of 2 cells.
    i, j = int((3.0 + 51.2) // 0.8), int((3.0 + 51.2) // 0.8)
    assert targets.heatmap[0, 3, i + 2, j] > 0 and targets.heatmap[0, 3, i + 3, j] == 0


def test_gaussian_focal_loss_on_fixed_values():
    target = torch.tensor([[[[1.0, 0.5]]]])
    logits = torch.log(torch.tensor([[[[0.8 / 0.2, 0.3 / 0.7]]]]))  # probabilities 0.8 and 0.3
    expected = -math.log(0.8) * 0.2 ** 2 - math.log(0.7) * 0.3 ** 2 * 0.5 ** 4  # one peak
    assert gaussian_focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)


def _perfect_outputs(targets, num_classes: int) -> ObjectOutputs:
    heat = targets.heatmap.clamp(1e-6, 1 - 1e-6)
    regression = torch.zeros(1, 10, *GRID.shape)
    flat = regression.view(1, 10, -1)
    for m in range(int(targets.mask.sum())):
        flat[0, :, targets.index[0, m]] = targets.regression[0, m]
    return ObjectOutputs(heatmap=torch.log(heat / (1 - heat)), regression=regression)


def test_a_perfect_prediction_decodes_to_the_boxes_and_has_zero_regression_loss():
    boxes, labels = _boxes()
    targets = build_targets([boxes], [labels], GRID, num_classes=4)
    outputs = _perfect_outputs(targets, 4)
    losses = object_losses(outputs, targets)
    assert all(losses[name].item() == pytest.approx(0.0, abs=1e-6) for name in ("offset", "height", "size", "rotation", "velocity"))
    (result,) = decode(outputs, GRID, top_k=10, score_threshold=0.99)
    assert len(result["scores"]) == 3 and set(result["labels"].tolist()) == {0, 2, 3}
    order = result["labels"].argsort()  # labels 0, 2, 3 are boxes 0, 1, 2
    assert torch.allclose(result["boxes"][order][:, :6], boxes[:3, :6], atol=1e-4)


def test_head_shapes_and_gradients():
    head = ObjectHead(16, 4, GRID, head_channels=8)
    out = head(torch.randn(2, 16, *GRID.shape))
    assert out.heatmap.shape == (2, 4, 128, 128) and out.regression.shape == (2, 10, 128, 128)
    assert out.heatmap.sigmoid().mean().item() == pytest.approx(0.1, abs=0.03)  # the focal prior
    boxes, labels = _boxes()
    targets = build_targets([boxes, boxes[:1]], [labels, labels[:1]], GRID, num_classes=4)
    sum(object_losses(out, targets).values()).backward()
    assert all(p.grad is not None for p in head.parameters())


def _greedy(centres: torch.Tensor, scores: torch.Tensor, radius: float) -> torch.Tensor:
    keep = torch.zeros(len(scores), dtype=torch.bool)
    for i in scores.argsort(descending=True, stable=True).tolist():
        kept = keep.nonzero().flatten()
        if len(kept) == 0 or ((centres[kept] - centres[i]).norm(dim=1) > radius).all():
            keep[i] = True
    return keep


@pytest.mark.parametrize("seed", range(6))
def test_circle_nms_equals_the_plain_greedy_loop(seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(60, 2, generator=g) * 10.0
    scores = torch.rand(60, generator=g)
    for radius in (0.5, 1.5, 4.0):
        assert torch.equal(circle_nms(centres, scores, radius), _greedy(centres, scores, radius))


def test_circle_nms_chain_keeps_the_first_and_third():
    # 0 suppresses 1; 1 would suppress 2 but is itself suppressed: greedy keeps 0 and 2.
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    assert circle_nms(centres, torch.tensor([0.9, 0.8, 0.7]), 1.2).tolist() == [True, False, True]


def test_default_nms_radii_are_metres_and_keep_cars_in_adjacent_lanes():
    from bridgeta.config import ObjectHeadConfig
    from bridgeta.models.object_head import decode_with

    settings = ObjectHeadConfig()
    # CenterPoint's squared-distance thresholds 4, 12, 10, 0.175 (m^2), as metres.
    assert settings.nms_radius == pytest.approx([math.sqrt(v) for v in (4.0, 12.0, 10.0, 0.175)], abs=0.01)
    heatmap = torch.full((1, 4, 128, 128), -8.0)
    # Two cars side by side in adjacent lanes (3.2 m apart, 4 cells), and a duplicate peak 1.6 m
    # from the first (2 cells): NMS removes only the duplicate.
    heatmap[0, 0, 70, 64], heatmap[0, 0, 70, 68], heatmap[0, 0, 72, 64] = 3.0, 2.0, 1.0
    decoded = decode_with(settings, ObjectOutputs(heatmap, torch.zeros(1, 10, 128, 128)), GRID)[0]
    assert sorted(decoded["cells"].tolist()) == [70 * 128 + 64, 70 * 128 + 68]


def test_a_zero_threshold_returns_peaks_only():
    heatmap = torch.full((1, 4, 16, 16), -30.0)  # far below any peak, still above 0 after sigmoid
    heatmap[0, 1, 3, 4] = 2.0
    grid = BEVGrid((-6.4, 6.4, 0.8), (-6.4, 6.4, 0.8))
    outputs = ObjectOutputs(heatmap, torch.zeros(1, 10, 16, 16))
    # Every other cell of class 1 is suppressed by the 3x3 max-pool; class 0, 2, 3 cells are
    # their own plateau maxima, so they count as peaks: only cells masked to exactly 0 must go.
    decoded = decode(outputs, grid, top_k=2000, score_threshold=0.0)[0]
    assert bool((decoded["scores"] > 0).all())
    assert len(decoded["scores"]) < 4 * 16 * 16
