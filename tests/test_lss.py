"""LSS view transform: frustum geometry checked by hand, splat location, shapes and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from bridgeta.bench.bev_pool import bevfusion_c_setting
from bridgeta.rig import reference_camera_inputs
from bridgeta.geometry import BEVGrid, rotation_z
from bridgeta.models.lss import LSSViewTransform, frustum_to_ego
from bridgeta.models.types import CameraInputs

IMAGE = (64, 96)  # (H, W); stride 8 -> 8 x 12 feature map
DEPTH = (1.0, 12.0, 1.0)  # 11 bins: 1, 2, ..., 11 m
GRID = BEVGrid((-10.0, 10.0, 0.5), (-10.0, 10.0, 0.5))
# Camera axes (x right, y down, z forward) in the ego frame for a camera looking along ego +X.
FRONT_ROTATION = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def pinhole(focal: float, cx: float, cy: float) -> torch.Tensor:
    return torch.tensor([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]])


def front_camera(x: float = 1.0) -> torch.Tensor:
    """``ego_T_camera`` of a level camera at ego ``(x, 0, 1.5)`` looking forward."""
    out = torch.eye(4)
    out[:3, :3] = FRONT_ROTATION
    out[:3, 3] = torch.tensor([x, 0.0, 1.5])
    return out


def camera_inputs(batch: int, cams: int, ego_T_camera: torch.Tensor) -> CameraInputs:
    """Cameras with the test intrinsics (f = 50, centred) and no image augmentation."""
    return CameraInputs(
        images=torch.zeros(batch, cams, 3, *IMAGE),
        intrinsics=pinhole(50.0, 47.5, 31.5).expand(batch, cams, 3, 3).clone(),
        ego_T_camera=ego_T_camera.expand(batch, cams, 4, 4).clone(),
        image_aug=torch.eye(3).expand(batch, cams, 3, 3).clone(),
    )


def one(matrix: torch.Tensor) -> torch.Tensor:
    """A single camera of a single sample: ``(1, 1, ...)``."""
    return matrix.view(1, 1, *matrix.shape)


def test_frustum_point_maps_to_hand_computed_ego_point():
    lss = LSSViewTransform(4, 2, IMAGE, 8, GRID, depth=DEPTH)
    assert lss.frustum.shape == (11, 8, 12, 3)
    # Feature cell (row 4, column 2) at depth bin 5: u = 2 * 95 / 11, v = 4 * 63 / 7, d = 6.
    torch.testing.assert_close(lss.frustum[5, 4, 2], torch.tensor([190 / 11, 36.0, 6.0]))

    points = frustum_to_ego(
        lss.frustum, one(pinhole(50.0, 47.5, 31.5)), one(front_camera()), one(torch.eye(3))
    )
    assert points.shape == (1, 1, 11, 8, 12, 3)
    # Camera point (d (u - cx) / f, d (v - cy) / f, d) = (-3.627, 0.54, 6): 6 m ahead of the camera,
    # 3.627 m to its left (u < cx) and 0.54 m below it.
    expected = torch.tensor([1.0 + 6.0, 6.0 * (47.5 - 190 / 11) / 50.0, 1.5 - 0.54])
    torch.testing.assert_close(points[0, 0, 5, 4, 2], expected)


def test_image_augmentation_keeps_the_physical_ray():
    # Original image 128 x 192 (f = 100, centred); augmentation: resize 0.5, crop at (10, 4),
    # horizontal flip of the 96-pixel-wide result: u' = 95 - (u / 2 - 10), v' = v / 2 - 4.
    intrinsics = one(pinhole(100.0, 95.5, 63.5))
    resize = torch.diag(torch.tensor([0.5, 0.5, 1.0]))
    crop = torch.tensor([[1.0, 0.0, -10.0], [0.0, 1.0, -4.0], [0.0, 0.0, 1.0]])
    flip = torch.tensor([[-1.0, 0.0, 95.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    image_aug = one(flip @ crop @ resize)

    # Original pixel (60, 50) becomes augmented pixel (75, 21).
    augmented = frustum_to_ego(torch.tensor([75.0, 21.0, 6.0]), intrinsics, one(front_camera()), image_aug)
    original = frustum_to_ego(
        torch.tensor([60.0, 50.0, 6.0]), intrinsics, one(front_camera()), one(torch.eye(3))
    )
    expected = torch.tensor([7.0, -6.0 * (60.0 - 95.5) / 100.0, 1.5 - 6.0 * (50.0 - 63.5) / 100.0])
    torch.testing.assert_close(original[0, 0], expected)
    torch.testing.assert_close(augmented[0, 0], expected)


def test_bev_augmentation_rotates_the_points():
    frustum = torch.tensor([[60.0, 50.0, 6.0], [10.0, 5.0, 2.0]])
    args = (one(pinhole(100.0, 95.5, 63.5)), one(front_camera()), one(torch.eye(3)))
    plain = frustum_to_ego(frustum, *args)[0, 0]
    rotated = frustum_to_ego(frustum, *args, bev_aug=rotation_z(math.pi / 2).unsqueeze(0))[0, 0]
    # +90 degrees about +Z: (x, y, z) -> (-y, x, z).
    expected = torch.stack([-plain[:, 1], plain[:, 0], plain[:, 2]], dim=1)
    torch.testing.assert_close(rotated, expected)


@pytest.mark.parametrize(
    "depth_bin,column,expected_cell",
    [
        # d = 6, u = 17.27: ego (7.1, +3.627) -> x index floor(17.1 / 0.5), y index floor(13.627 / 0.5).
        (5, 2, (34, 27)),
        # d = 3, u = 77.73 (right of centre): ego (4.1, -1.814) -> (28, 16).
        (2, 9, (28, 16)),
    ],
)
def test_one_hot_depth_at_one_pixel_lands_in_the_expected_cell(depth_bin, column, expected_cell):
    lss = LSSViewTransform(1, 2, IMAGE, 8, GRID, depth=DEPTH)
    num_depth = lss.num_depth_bins
    with torch.no_grad():
        lss.depthnet.weight.zero_()
        lss.depthnet.bias.zero_()
        lss.depthnet.bias[depth_bin] = 1000.0  # softmax == exactly one-hot everywhere
        lss.depthnet.weight[num_depth, 0] = 1.0  # context = (feature, 2 * feature)
        lss.depthnet.weight[num_depth + 1, 0] = 2.0
    # Two samples, two cameras each; only sample 1 / camera 1 (the front camera) sees the feature.
    extrinsics = torch.stack([rotation_z(math.pi) @ front_camera(0.0), front_camera(1.1)])
    camera = camera_inputs(2, 2, extrinsics)
    features = torch.zeros(2, 2, 1, 8, 12)
    features[1, 1, 0, 4, column] = 1.0

    out = lss(features, camera)
    assert torch.count_nonzero(out.bev) == 2
    ix, iy = expected_cell
    assert out.bev[1, 0, ix, iy] == 1.0
    assert out.bev[1, 1, ix, iy] == 2.0
    assert out.depth[1, 1, depth_bin, 4, column] == 1.0


def test_small_config_shapes_with_two_z_bins_and_downsample():
    grid = BEVGrid((-10.0, 10.0, 0.5), (-10.0, 10.0, 0.5), (-2.0, 4.0, 3.0))
    lss = LSSViewTransform(8, 4, IMAGE, 8, grid, depth=DEPTH, downsample=2)
    assert lss.out_channels == 8
    assert lss.output_grid.shape == (20, 20)
    yaws = torch.stack([rotation_z(math.radians(a)) @ front_camera() for a in (0, 90, 180)])
    out = lss(torch.randn(2, 3, 8, 8, 12), camera_inputs(2, 3, yaws))
    assert out.bev.shape == (2, 8, 20, 20)
    assert out.depth.shape == (2, 3, 11, 8, 12)
    torch.testing.assert_close(out.depth.sum(dim=2), torch.ones(2, 3, 8, 12))


def test_bevfusion_c_sized_forward_shape():
    grid, image_size, stride, depth = bevfusion_c_setting()
    lss = LSSViewTransform(256, 80, image_size, stride, grid, depth=depth, downsample=2)
    assert lss.num_depth_bins == 118
    assert lss.output_grid.shape == (128, 128)
    camera = reference_camera_inputs(1, image_size)
    lss.eval()
    with torch.no_grad():
        out = lss(torch.randn(1, 6, 256, 32, 88), camera)
    assert out.bev.shape == (1, 80, 128, 128)
    assert out.depth.shape == (1, 6, 118, 32, 88)
    assert torch.isfinite(out.bev).all()


def test_gradient_reaches_depthnet_and_input_features():
    lss = LSSViewTransform(6, 3, IMAGE, 8, GRID, depth=DEPTH, downsample=2)
    yaws = torch.stack([rotation_z(math.radians(a)) @ front_camera() for a in (0, 180)])
    features = torch.randn(1, 2, 6, 8, 12, requires_grad=True)
    out = lss(features, camera_inputs(1, 2, yaws))
    # A random weighting: the plain sum would be blind to depth (probabilities sum to one).
    (out.bev * torch.randn(out.bev.shape)).sum().backward()
    num_depth = lss.num_depth_bins
    weight_grad = lss.depthnet.weight.grad
    assert weight_grad[:num_depth].abs().sum() > 0  # depth logits
    assert weight_grad[num_depth:].abs().sum() > 0  # context
    assert features.grad.abs().sum() > 0
    assert torch.isfinite(features.grad).all()


def test_feature_map_must_match_image_size_and_stride():
    lss = LSSViewTransform(4, 2, IMAGE, 8, GRID, depth=DEPTH)
    camera = camera_inputs(1, 1, front_camera())
    with pytest.raises(ValueError, match="feature_stride 8"):
        lss(torch.zeros(1, 1, 4, 16, 24), camera)
    with pytest.raises(ValueError, match="downsample"):
        LSSViewTransform(4, 2, IMAGE, 8, GRID, depth=DEPTH, downsample=4)
