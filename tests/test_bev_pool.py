"""BEV pooling: the fast path, the LSS cumsum reference and the dense reference must agree."""

from __future__ import annotations

import pytest
import torch

from bridgeta.geometry import BEVGrid
from bridgeta.models.bev_pool import (
    bev_pool,
    bev_pool_cumsum_reference,
    bev_pool_naive_reference,
    compute_pool_plan,
)

# 5 x 4 cells of 1 m, two vertical bins: small enough that random points collide a lot.
GRID = BEVGrid((0.0, 5.0, 1.0), (-2.0, 2.0, 1.0), (0.0, 2.0, 1.0))


def random_cells(points: int, batch_size: int, generator: torch.Generator):
    """Integer cells spilling one or two cells past every face of GRID, and sample indices."""
    size_x, size_y = GRID.shape
    cells = torch.stack(
        [
            torch.randint(-2, size_x + 2, (points,), generator=generator),
            torch.randint(-1, size_y + 1, (points,), generator=generator),
            torch.randint(-1, GRID.num_z + 1, (points,), generator=generator),
        ],
        dim=1,
    )
    batch_index = torch.randint(0, batch_size, (points,), generator=generator)
    return cells, batch_index


@pytest.mark.parametrize("batch_size,points,channels", [(1, 50, 3), (3, 400, 5), (2, 2000, 8)])
def test_fast_cumsum_and_naive_agree_in_value_and_gradient(batch_size, points, channels):
    generator = torch.Generator().manual_seed(points)
    cells, batch_index = random_cells(points, batch_size, generator)
    features = torch.randn(points, channels, generator=generator)
    plan = compute_pool_plan(cells, batch_index, GRID, batch_size)

    # The random cells must really exercise dropping and duplicates, or the test proves little.
    kept = plan.kept
    assert 0 < int(kept.sum()) < points
    assert torch.unique(plan.point_rank[kept]).numel() < int(kept.sum())

    results = {}
    for name, pool in {
        "fast": lambda f: bev_pool(f, plan),
        "cumsum": lambda f: bev_pool_cumsum_reference(f, plan),
        "naive": lambda f: bev_pool_naive_reference(f, cells, batch_index, GRID, batch_size),
    }.items():
        leaf = features.clone().requires_grad_(True)
        out = pool(leaf)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * weights).sum().backward()
        results[name] = (out.detach(), leaf.grad)

    expected_shape = (batch_size, channels * GRID.num_z, *GRID.shape)
    naive_out, naive_grad = results["naive"]
    assert naive_out.shape == expected_shape
    assert naive_out.abs().sum() > 0
    for name in ("fast", "cumsum"):
        out, grad = results[name]
        assert out.shape == expected_shape
        torch.testing.assert_close(out, naive_out, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(grad, naive_grad, atol=1e-5, rtol=1e-5, msg=name)
    # Dropped points get exactly zero gradient, kept points the weight of their cell.
    assert torch.all(results["fast"][1][~kept] == 0)


def test_single_point_lands_in_its_cell_and_z_bins_are_channel_blocks():
    # One point in sample 1, cell (ix=3, iy=1, iz=1); BEVFusion's order puts z=1 at channels C..2C-1.
    cells = torch.tensor([[3, 1, 1], [3, 1, 1], [0, 0, 5]])
    batch_index = torch.tensor([1, 1, 1])
    features = torch.tensor([[1.0, 2.0], [10.0, 20.0], [100.0, 100.0]])
    out = bev_pool(features, compute_pool_plan(cells, batch_index, GRID, batch_size=2))

    expected = torch.zeros(2, 4, *GRID.shape)
    expected[1, 2, 3, 1] = 11.0
    expected[1, 3, 3, 1] = 22.0
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_all_points_out_of_grid_give_zeros_and_zero_gradient():
    cells = torch.tensor([[-1, 0, 0], [5, 0, 0], [0, 4, 0], [0, 0, 2], [2, 1, 1], [2, 1, 1]])
    # The last two are inside the grid but their samples are not in the batch.
    batch_index = torch.tensor([0, 0, 0, 0, 2, -1])
    plan = compute_pool_plan(cells, batch_index, GRID, batch_size=2)
    assert not plan.kept.any()
    for pool in (bev_pool, bev_pool_cumsum_reference):
        features = torch.randn(6, 4, requires_grad=True)
        out = pool(features, plan)
        assert out.shape == (2, 4 * GRID.num_z, *GRID.shape)
        assert torch.count_nonzero(out) == 0
        out.sum().backward()
        assert torch.count_nonzero(features.grad) == 0


def test_plan_segments_are_sorted_runs_of_kept_points():
    generator = torch.Generator().manual_seed(7)
    cells, batch_index = random_cells(300, 2, generator)
    plan = compute_pool_plan(cells, batch_index, GRID, batch_size=2)
    segments = plan.segments
    assert plan.segments is segments  # cached: the sort is paid once per plan
    assert torch.equal(segments.rank, plan.point_rank[segments.order])
    assert torch.all(segments.rank[1:] >= segments.rank[:-1])
    assert torch.equal(torch.sort(segments.order).values, torch.nonzero(plan.kept).squeeze(1))
    occupied = torch.unique(plan.point_rank[plan.kept])
    assert torch.equal(segments.rank[segments.is_last], occupied)


def test_frustum_shaped_cells_with_broadcast_batch_index():
    # (B, N, D, 3) cells with a (B, 1, 1) batch index: point order is row-major over (B, N, D).
    generator = torch.Generator().manual_seed(3)
    cells, _ = random_cells(2 * 3 * 4, 1, generator)
    cells = cells.view(2, 3, 4, 3)
    batch_index = torch.arange(2).view(2, 1, 1)
    features = torch.randn(2 * 3 * 4, 6, generator=generator)
    out = bev_pool(features, compute_pool_plan(cells, batch_index, GRID, batch_size=2))
    flat_batch = batch_index.expand(2, 3, 4).reshape(-1)
    expected = bev_pool_naive_reference(features, cells, flat_batch, GRID, batch_size=2)
    torch.testing.assert_close(out, expected)


def test_feature_count_must_match_the_plan():
    plan = compute_pool_plan(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4), GRID, 1)
    with pytest.raises(ValueError, match="P = 4"):
        bev_pool(torch.zeros(5, 2), plan)
    with pytest.raises(ValueError, match="integer"):
        compute_pool_plan(torch.zeros(4, 3), torch.zeros(4), GRID, 1)


def test_single_z_bin_output_is_plain_nchw_and_a_narrow_strided_conv_backpropagates():
    """Regression: a channels-last (B, 8, X, Y) BEV crashed oneDNN's stride-2 1x1 conv backward."""
    grid = BEVGrid((-4.0, 4.0, 0.5), (-4.0, 4.0, 0.5), (-1.0, 1.0, 2.0))
    generator = torch.Generator().manual_seed(0)
    cells = torch.randint(0, 16, (500, 3), generator=generator)
    cells[:, 2] = 0
    plan = compute_pool_plan(cells, torch.zeros(500, dtype=torch.long), grid, batch_size=1)
    features = torch.randn(500, 8, generator=generator).requires_grad_(True)
    bev = bev_pool(features, plan)
    assert bev.shape == (1, 8, 16, 16) and bev.is_contiguous()
    conv = torch.nn.Conv2d(8, 16, 1, stride=2, bias=False)
    conv(bev).sum().backward()
    assert features.grad is not None and conv.weight.grad.abs().sum() > 0
