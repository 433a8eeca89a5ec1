"""PillarEncoder: cell indexing, filtering, pooling against a Python reference, shapes, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from bridgeta.geometry import BEVGrid
from bridgeta.models.lidar import PillarEncoder
from bridgeta.models.types import LidarInputs

# X and Y differ in extent (32 x 24 cells of 1 m) so that a swapped axis changes the shape.
GRID = BEVGrid(x=(-16.0, 16.0, 1.0), y=(-12.0, 12.0, 1.0))


def make_encoder(downsample: int = 1, pillar_channels: int = 8) -> PillarEncoder:
    torch.manual_seed(0)
    return PillarEncoder(
        GRID,
        pillar_channels=pillar_channels,
        channels=(8, 16),
        out_channels=12,
        downsample=downsample,
    )


def lidar(rows: list[list[float]], batch: list[int]) -> LidarInputs:
    points = torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)
    return LidarInputs(points, torch.tensor(batch, dtype=torch.long))


def random_points(count: int, batch_size: int, seed: int) -> LidarInputs:
    generator = torch.Generator().manual_seed(seed)
    xyz = torch.rand(count, 3, generator=generator)
    xyz = xyz * torch.tensor([32.0, 24.0, 8.0]) + torch.tensor([-16.0, -12.0, -5.0])
    extra = torch.rand(count, 2, generator=generator)
    batch = torch.randint(0, batch_size, (count,), generator=generator)
    return LidarInputs(torch.cat([xyz, extra], dim=1), batch)


def occupied(pillars: torch.Tensor) -> set[tuple[int, int, int]]:
    return {tuple(index) for index in (pillars.abs().sum(dim=1) > 0).nonzero().tolist()}


def test_pillars_land_in_forward_and_left_cells() -> None:
    encoder = make_encoder().eval()
    points = lidar(
        [
            # x = +10 (forward), y = -5 (right): ix = floor((10 + 16) / 1) = 26, iy = floor((-5 + 12) / 1) = 7.
            [10.0, -5.0, 0.0, 0.5, 0.0],
            [10.5, -4.5, 1.0, 0.1, 0.05],  # same pillar (26, 7)
            [-3.5, 7.25, -1.0, 0.3, 0.0],  # ix = floor(12.5) = 12, iy = floor(19.25) = 19
        ],
        [0, 0, 0],
    )
    with torch.no_grad():
        pillars = encoder.pillar_map(points, batch_size=1)
    assert pillars.shape == (1, 8, 32, 24)
    assert occupied(pillars) == {(0, 26, 7), (0, 12, 19)}


def test_decoration_by_hand() -> None:
    encoder = make_encoder()
    points = torch.tensor([[10.0, -5.0, 0.0, 0.5, 0.0], [10.5, -4.5, 1.0, 0.1, 0.05]])
    ix, iy = torch.tensor([26, 26]), torch.tensor([7, 7])
    cell = ix * 24 + iy
    decorated = encoder.decorate(points, ix, iy, cell, num_cells=32 * 24)
    # Pillar mean (10.25, -4.75, 0.5); pillar centre (-16 + 26.5, -12 + 7.5) = (10.5, -4.5).
    expected = torch.tensor(
        [
            [10.0, -5.0, 0.0, 0.5, 0.0, -0.25, -0.25, -0.5, -0.5, -0.5],
            [10.5, -4.5, 1.0, 0.1, 0.05, 0.25, 0.25, 0.5, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(decorated, expected)


def test_points_outside_grid_or_z_range_are_ignored() -> None:
    encoder = make_encoder().eval()
    inside = [[1.2, 2.3, 0.0, 0.4, 0.0], [1.7, 2.9, -5.0, 0.2, 0.1]]  # z = -5 is the inclusive low end
    outside = [
        [16.0, 0.0, 0.0, 1.0, 0.0],  # x == x_max: cells are half-open
        [-16.01, 0.0, 0.0, 1.0, 0.0],
        [0.0, 12.0, 0.0, 1.0, 0.0],
        [0.0, -12.5, 0.0, 1.0, 0.0],
        [1.5, 2.5, 3.0, 1.0, 0.0],  # z == z_max, same pillar as the inside points
        [1.5, 2.5, -5.01, 1.0, 0.0],
        [1.5, 2.5, 0.0, 1.0, 0.0],  # batch_index 1 with batch_size 1
    ]
    with torch.no_grad():
        clean = encoder.pillar_map(lidar(inside, [0, 0]), batch_size=1)
        noisy = encoder.pillar_map(lidar(inside + outside, [0, 0, 0, 0, 0, 0, 0, 0, 1]), batch_size=1)
    assert occupied(clean) == {(0, 17, 14)}
    torch.testing.assert_close(noisy, clean, rtol=0, atol=0)


def test_permutation_invariance() -> None:
    encoder = make_encoder().eval()
    points = random_points(600, batch_size=2, seed=1)
    order = torch.randperm(600, generator=torch.Generator().manual_seed(2))
    shuffled = LidarInputs(points.points[order], points.batch_index[order])
    with torch.no_grad():
        torch.testing.assert_close(encoder(shuffled, 2), encoder(points, 2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            encoder.pillar_map(shuffled, 2), encoder.pillar_map(points, 2), rtol=1e-5, atol=1e-5
        )


def test_max_pool_matches_python_reference() -> None:
    encoder = make_encoder(pillar_channels=6).eval()
    generator = torch.Generator().manual_seed(3)
    batch_norm = encoder.point_net[1]
    batch_norm.running_mean.copy_(torch.randn(6, generator=generator))
    batch_norm.running_var.copy_(torch.rand(6, generator=generator) + 0.5)
    batch_norm.weight.data.copy_(torch.randn(6, generator=generator))
    batch_norm.bias.data.copy_(torch.randn(6, generator=generator))
    rows = [
        [0.1, 0.2, 0.0, 0.9, 0.0],
        [0.8, 0.6, 1.5, 0.1, 0.05],
        [0.5, 0.9, -2.0, 0.4, 0.1],  # three points in pillar (16, 12) of sample 0
        [5.5, -3.2, 0.3, 0.7, 0.0],  # alone in pillar (21, 8) of sample 0
        [0.3, 0.3, 0.7, 0.2, 0.0],
        [0.7, 0.1, -0.7, 0.5, 0.1],  # pillar (16, 12) of sample 1: same cell, other sample
    ]
    batch = [0, 0, 0, 0, 1, 1]
    with torch.no_grad():
        pillars = encoder.pillar_map(lidar(rows, batch), batch_size=2)

    groups: dict[tuple[int, int, int], list[list[float]]] = {}
    for row, b in zip(rows, batch):
        key = (b, math.floor(row[0] + 16.0), math.floor(row[1] + 12.0))
        groups.setdefault(key, []).append(row)
    weight = encoder.point_net[0].weight.detach()
    expected = torch.zeros(2, 6, 32, 24)
    for (b, ix, iy), members in groups.items():
        mean = [sum(m[axis] for m in members) / len(members) for axis in range(3)]
        centre = (-16.0 + ix + 0.5, -12.0 + iy + 0.5)
        pooled = [-math.inf] * 6
        for m in members:
            decorated = m + [m[0] - mean[0], m[1] - mean[1], m[2] - mean[2], m[0] - centre[0], m[1] - centre[1]]
            for channel in range(6):
                linear = sum(w * f for w, f in zip(weight[channel].tolist(), decorated))
                normed = (linear - batch_norm.running_mean[channel].item()) / math.sqrt(
                    batch_norm.running_var[channel].item() + batch_norm.eps
                ) * batch_norm.weight[channel].item() + batch_norm.bias[channel].item()
                pooled[channel] = max(pooled[channel], max(normed, 0.0))
        expected[b, :, ix, iy] = torch.tensor(pooled)
    assert len(groups) == 3
    torch.testing.assert_close(pillars, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("downsample, shape", [(1, (32, 24)), (2, (16, 12)), (4, (8, 6))])
def test_output_shape(downsample: int, shape: tuple[int, int]) -> None:
    encoder = make_encoder(downsample).eval()
    with torch.no_grad():
        out = encoder(random_points(300, batch_size=2, seed=4), batch_size=2)
    assert out.shape == (2, 12, *shape)
    assert encoder.out_channels == 12
    assert encoder.output_grid.shape == shape
    assert encoder.output_grid == GRID.downsample(downsample)


@pytest.mark.parametrize("downsample", [2, 4])
def test_strided_conv_sees_every_pillar_of_its_cell(downsample: int) -> None:
    encoder = make_encoder(downsample)
    first_conv = encoder.backbone[0][0]
    pillars = torch.zeros(1, 8, 32, 24, requires_grad=True)
    first_conv(pillars)[0, :, 2, 3].sum().backward()
    # Output cell (2, 3) spans input rows [2s, 3s) and columns [3s, 4s).
    footprint = pillars.grad.abs().sum(dim=1)[0, 2 * downsample : 3 * downsample, 3 * downsample : 4 * downsample]
    assert (footprint > 0).all()


def test_downsample_must_divide_grid() -> None:
    with pytest.raises(ValueError, match="divide"):
        PillarEncoder(GRID, downsample=5)


def test_wrong_feature_count_is_rejected() -> None:
    encoder = make_encoder()
    with pytest.raises(ValueError, match="5 point features"):
        encoder.pillar_map(LidarInputs(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long)), 1)


@pytest.mark.parametrize("training", [True, False])
def test_empty_point_cloud(training: bool) -> None:
    encoder = make_encoder(downsample=2).train(training)
    empty = LidarInputs(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    pillars = encoder.pillar_map(empty, batch_size=2)
    assert pillars.shape == (2, 8, 32, 24)
    assert not pillars.any()
    out = encoder(empty, batch_size=2)
    assert out.shape == (2, 12, 16, 12)
    assert torch.isfinite(out).all()
    assert torch.isfinite(encoder.point_net[1].running_mean).all()


def test_sample_without_points_is_zero() -> None:
    encoder = make_encoder().train()
    points = random_points(400, batch_size=2, seed=5)
    # Samples 0 and 2 get points; sample 1 gets none.
    points = LidarInputs(points.points, points.batch_index * 2)
    pillars = encoder.pillar_map(points, batch_size=3)
    assert not pillars[1].any()
    assert pillars[0].any() and pillars[2].any()


def test_gradient_reaches_point_linear() -> None:
    encoder = make_encoder().train()
    out = encoder(random_points(300, batch_size=2, seed=6), batch_size=2)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    grad = encoder.point_net[0].weight.grad
    assert grad is not None
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
