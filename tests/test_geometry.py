import math

import pytest
import torch

from bridgeta.geometry import BEVGrid, invert_3x3, make_transform, rotation_z, transform_points


def test_grid_shape_and_centres():
    grid = BEVGrid((-50, 50, 0.5), (-30, 30, 0.5))
    assert grid.shape == (200, 120)
    centres = grid.cell_centers("x")
    assert centres[0].item() == pytest.approx(-49.75) and centres[-1].item() == pytest.approx(49.75)
    assert torch.all(centres[1:] > centres[:-1])  # index increases with the coordinate
    assert BEVGrid((-51.2, 51.2, 0.4), (-51.2, 51.2, 0.4)).shape == (256, 256)  # float noise ok


def test_point_to_cell_axes():
    grid = BEVGrid((-50, 50, 0.5), (-50, 50, 0.5))
    # 10 m forward, 5 m to the right (negative Y): X index above the middle, Y index below it.
    cell = grid.point_to_cell(torch.tensor([[10.0, -5.0, 0.0]]))[0]
    assert cell.tolist() == [120, 90, 0]
    assert grid.in_bounds(cell).item()
    assert not grid.in_bounds(grid.point_to_cell(torch.tensor([60.0, 0.0, 0.0]))).item()
    assert not grid.in_bounds(grid.point_to_cell(torch.tensor([0.0, 0.0, 11.0]))).item()


def test_downsample_and_contains():
    grid = BEVGrid((-51.2, 51.2, 0.4), (-51.2, 51.2, 0.4))
    assert grid.downsample(2).shape == (128, 128)
    assert grid.contains(BEVGrid((-50, 50, 0.5), (-50, 50, 0.5)))
    assert not BEVGrid((-50, 50, 0.5), (-50, 50, 0.5)).contains(grid)


@pytest.mark.parametrize("bounds", [(-50, 50, 0.0), (50, -50, 0.5), (-50, 50, 0.7)])
def test_bad_bounds_are_errors(bounds):
    with pytest.raises(ValueError, match="BEV grid x"):
        BEVGrid(bounds, (-50, 50, 0.5))


def test_transform_composition_convention():
    # a_T_b maps b -> a, so a_T_c = a_T_b @ b_T_c.
    ego_T_lidar = make_transform(rotation_z(-math.pi / 2)[:3, :3], [0.94, 0.0, 1.84])
    point_lidar = torch.tensor([[0.0, 10.0, 0.0]])  # nuScenes LiDAR: +y is forward
    point_ego = transform_points(ego_T_lidar, point_lidar)
    assert torch.allclose(point_ego, torch.tensor([[10.94, 0.0, 1.84]]), atol=1e-5)
    lidar_T_ego = torch.linalg.inv(ego_T_lidar)
    assert torch.allclose(transform_points(lidar_T_ego, point_ego), point_lidar, atol=1e-5)


def test_closed_form_3x3_inverse_matches_linalg_inv():
    """The camera matrices are inverted in closed form (ONNX has no inverse): same as LU."""
    from bridgeta.rig import reference_camera_inputs

    camera = reference_camera_inputs(1, (256, 704))
    generator = torch.Generator().manual_seed(0)
    general = torch.randn(4, 5, 3, 3, generator=generator, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
    for matrices, rtol in ((general, 1e-12), (camera.intrinsics, 1e-6), (camera.image_aug, 1e-6)):
        expected = torch.linalg.inv(matrices)
        assert torch.allclose(invert_3x3(matrices), expected, rtol=rtol, atol=rtol * expected.abs().max())
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 3\)"):
        invert_3x3(torch.eye(4))
