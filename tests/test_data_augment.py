"""Augmentation matrices agree with what is done to images, points and labels."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from bridgeta.data.augment import (
    AugmentConfig,
    apply_bev_aug_points,
    apply_image_aug,
    resample_labels,
    sample_bev_aug,
    sample_image_aug,
)
from bridgeta.geometry import BEVGrid
from bridgeta.models.lss import frustum_to_ego
from bridgeta.rig import NUSCENES_CAMERAS, resize_crop_matrix

ORIGINAL = (450, 800)  # (H, W): half of nuScenes
FINAL = (128, 352)  # half of BEVFusion's 256x704
GRID = BEVGrid((-50.0, 50.0, 0.5), (-50.0, 50.0, 0.5))
NO_AUG = AugmentConfig(image=False, bev=False)


def camera_at_half_resolution():
    front = NUSCENES_CAMERAS[0]
    intrinsics = front.intrinsics().double().numpy()
    intrinsics[:2] *= 0.5  # 1600x900 -> 800x450 (corner-origin pixels scale exactly)
    return intrinsics, front.ego_T_camera().double().numpy()


def project(point_ego, intrinsics, ego_T_camera):
    camera = np.linalg.inv(ego_T_camera) @ np.append(point_ego, 1.0)
    pixel = intrinsics @ camera[:3]
    return pixel[:2] / pixel[2], camera[2]


def blob_image(centre, size, sigma=3.0):
    """uint8 RGB image, black except a bright Gaussian dot at ``centre`` (corner-origin pixels)."""
    height, width = size
    v, u = np.mgrid[0:height, 0:width] + 0.5
    dot = np.exp(-((u - centre[0]) ** 2 + (v - centre[1]) ** 2) / (2 * sigma**2))
    return Image.fromarray(np.repeat((dot * 255).round().astype(np.uint8)[..., None], 3, axis=2))


def centroid(image):
    weight = np.asarray(image, dtype=np.float64)[..., 0]
    v, u = np.mgrid[0 : weight.shape[0], 0 : weight.shape[1]] + 0.5
    return np.array([(u * weight).sum(), (v * weight).sum()]) / weight.sum()


def test_test_time_image_aug_is_bevfusion_resize_crop():
    rng = np.random.default_rng(0)
    for train, config in ((False, AugmentConfig()), (True, NO_AUG)):
        matrix = sample_image_aug(rng, (900, 1600), (256, 704), config, train)
        assert np.allclose(matrix, resize_crop_matrix((900, 1600), (256, 704)).numpy())
        assert matrix[0, 0] == pytest.approx(0.48)


def test_training_image_aug_follows_bevfusion_ranges():
    rng = np.random.default_rng(1)
    config = AugmentConfig(image_flip=False, image_rotate_deg=0.0)
    scales, lefts = [], []
    for _ in range(300):
        matrix = sample_image_aug(rng, (900, 1600), (256, 704), config, True)
        scale = matrix[0, 0]
        scales.append(scale)
        assert matrix[1, 1] == scale and matrix[0, 1] == matrix[1, 0] == 0
        # Bottom kept: the last original row lands at the bottom of the crop (int() of the resize).
        assert int(900 * scale) + matrix[1, 2] == 256
        lefts.append(-matrix[0, 2])
        assert 0 <= -matrix[0, 2] <= max(0, int(1600 * scale) - 704)
    assert 0.38 - 1e-6 <= min(scales) < 0.40 and 0.53 < max(scales) <= 0.55 + 1e-6
    assert max(lefts) > 50  # the horizontal crop really moves

    flips = [sample_image_aug(rng, (900, 1600), (256, 704), AugmentConfig(), True)[0, 0] < 0
             for _ in range(200)]
    assert 60 < sum(flips) < 140


@pytest.mark.parametrize("seed", range(6))
def test_projected_point_is_where_image_aug_sends_it(seed):
    """A 3D point seen at pixel p is found at image_aug @ p in the augmented image, and the model's
    unprojection of that augmented pixel (with bev_aug) returns the augmented 3D point."""
    intrinsics, ego_T_camera = camera_at_half_resolution()
    point = np.array([18.0, -1.5, 0.4])  # ahead, slightly right, near the ground
    pixel, depth = project(point, intrinsics, ego_T_camera)
    image = blob_image(pixel, ORIGINAL)
    rng = np.random.default_rng(seed)
    config = AugmentConfig(image_resize=(0.9, 1.1))
    matrix = sample_image_aug(rng, ORIGINAL, FINAL, config, train=True)
    augmented = apply_image_aug(image, matrix, FINAL)
    assert augmented.size == (FINAL[1], FINAL[0])
    expected = (matrix @ np.append(pixel, 1.0))[:2]
    assert np.allclose(centroid(augmented), expected, atol=0.25), (centroid(augmented), expected)

    bev_aug = sample_bev_aug(rng, AugmentConfig(), train=True)
    frustum = torch.tensor([[expected[0], expected[1], depth]], dtype=torch.float32)
    ego = frustum_to_ego(
        frustum,
        torch.from_numpy(intrinsics).float()[None, None],
        torch.from_numpy(ego_T_camera).float()[None, None],
        torch.from_numpy(matrix).float()[None, None],
        torch.from_numpy(bev_aug).float()[None],
    )
    assert np.allclose(ego[0, 0, 0].numpy(), (bev_aug @ np.append(point, 1.0))[:3], atol=2e-3)


def test_flipped_and_rotated_dot_moves_as_the_matrix_says():
    """Flip and rotation both active (the seeds above may not draw a flip)."""
    pixel = np.array([300.0, 330.0])
    image = blob_image(pixel, ORIGINAL)
    base = resize_crop_matrix(ORIGINAL, FINAL).double().numpy()
    flip = np.array([[-1.0, 0.0, FINAL[1]], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    theta = math.radians(5.0)
    c, s, cx, cy = math.cos(theta), math.sin(theta), FINAL[1] / 2, FINAL[0] / 2
    rotate = np.array([[c, s, cx - c * cx - s * cy], [-s, c, cy + s * cx - c * cy], [0.0, 0.0, 1.0]])
    matrix = rotate @ flip @ base
    found = centroid(apply_image_aug(image, matrix, FINAL))
    assert np.allclose(found, (matrix @ np.append(pixel, 1.0))[:2], atol=0.25)
    assert found[0] > FINAL[1] / 2  # a dot left of the centre ends right of it


def test_identity_and_double_flip_reproduce_the_image_exactly():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(45, 80, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    same = apply_image_aug(image, np.eye(3), (45, 80))
    assert np.array_equal(np.asarray(same), pixels)
    flip = np.array([[-1.0, 0.0, 80.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    once = apply_image_aug(image, flip, (45, 80))
    assert np.array_equal(np.asarray(once), pixels[:, ::-1])
    assert np.array_equal(np.asarray(apply_image_aug(once, flip, (45, 80))), pixels)


def test_identity_bev_aug_reproduces_points_and_labels():
    rng = np.random.default_rng(4)
    assert np.array_equal(sample_bev_aug(rng, AugmentConfig(), train=False), np.eye(4))
    assert np.array_equal(sample_bev_aug(rng, NO_AUG, train=True), np.eye(4))
    labels = rng.random((6, 200, 200)) < 0.3
    assert np.array_equal(resample_labels(labels, GRID, GRID, np.eye(4)), labels)
    points = rng.normal(size=(100, 5)).astype(np.float32) * 20
    assert np.array_equal(apply_bev_aug_points(points, np.eye(4)), points)


def test_bev_flip_twice_is_identity_and_moves_cells_exactly():
    rng = np.random.default_rng(5)
    labels = rng.random((2, 200, 200)) < 0.3
    flip_y = np.diag([1.0, -1.0, 1.0, 1.0])
    once = resample_labels(labels, GRID, GRID, flip_y)
    assert np.array_equal(once, labels[:, :, ::-1])  # Y -> -Y mirrors the Y index
    assert np.array_equal(resample_labels(once, GRID, GRID, flip_y), labels)
    assert np.array_equal(flip_y @ flip_y, np.eye(4))

    # 90 deg left turn + 2 m forward: a cell centre (x, y) goes to (-y + 2, x).
    turn = np.array([[0.0, -1.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    single = np.zeros((1, 200, 200), dtype=bool)
    single[0, 130, 90] = True  # centre (15.25, -4.75)
    moved = resample_labels(single, GRID, GRID, turn)
    assert np.argwhere(moved[0]).tolist() == [[113, 130]]  # centre (6.75, 15.25)


def test_labelled_cell_moves_where_random_bev_aug_sends_it():
    rng = np.random.default_rng(6)
    for _ in range(10):
        bev_aug = sample_bev_aug(rng, AugmentConfig(), train=True)
        labels = np.zeros((1, 200, 200), dtype=bool)
        labels[0, 140:146, 80:86] = True  # 3 m block centred at (21.5, -8.5)
        moved = np.argwhere(resample_labels(labels, GRID, GRID, bev_aug)[0])
        centres = GRID.x[0] + (moved + 0.5) * 0.5
        expected = (bev_aug @ np.array([21.5, -8.5, 0.0, 1.0]))[:2]
        assert np.allclose(centres.mean(axis=0), expected, atol=0.3)
        scale = abs(np.linalg.det(bev_aug[:2, :2]))
        assert abs(len(moved) - 36 * scale) <= 12


def test_lidar_point_in_a_labelled_cell_stays_in_a_labelled_cell():
    rng = np.random.default_rng(7)
    blocks = rng.random((1, 25, 25)) < 0.4
    labels = np.kron(blocks, np.ones((8, 8), dtype=bool)).astype(bool)  # 4 m blocks on the 0.5 m grid
    interior = np.argwhere(labels[0][1:-1, 1:-1] & labels[0][:-2, 1:-1] & labels[0][2:, 1:-1]
                           & labels[0][1:-1, :-2] & labels[0][1:-1, 2:]) + 1
    cells = interior[rng.choice(len(interior), 200, replace=False)]
    points = np.zeros((200, 5), dtype=np.float32)
    points[:, :2] = GRID.x[0] + (cells + rng.uniform(0.3, 0.7, size=cells.shape)) * 0.5
    for _ in range(10):
        bev_aug = sample_bev_aug(rng, AugmentConfig(), train=True)
        moved_labels = resample_labels(labels, GRID, GRID, bev_aug)
        moved = apply_bev_aug_points(points, bev_aug)
        index = np.floor((moved[:, :2] - GRID.x[0]) / 0.5).astype(int)
        inside = ((index >= 0) & (index < 200)).all(axis=1)
        assert inside.sum() > 100
        assert moved_labels[0][index[inside, 0], index[inside, 1]].all()


def test_labels_resample_onto_a_coarser_output_grid():
    rng = np.random.default_rng(8)
    labels = rng.random((3, 200, 200)) < 0.5
    coarse = BEVGrid((-50.0, 50.0, 1.0), (-50.0, 50.0, 1.0))
    out = resample_labels(labels, GRID, coarse, np.eye(4))
    assert out.shape == (3, 100, 100)
    # The 1 m cell centred at -49.5 takes the 0.5 m cell starting there (index 1, 3, 5, ...).
    assert np.array_equal(out, labels[:, 1::2, 1::2])
    wider = BEVGrid((-60.0, 60.0, 1.0), (-50.0, 50.0, 1.0))
    out = resample_labels(np.ones((1, 200, 200), dtype=bool), GRID, wider, np.eye(4))
    assert not out[0, :10].any() and out[0, 10:110].all() and not out[0, 110:].any()


def test_augment_config_validation():
    with pytest.raises(ValueError, match="image_resize"):
        AugmentConfig(image_resize=(1.2, 0.8))
    with pytest.raises(ValueError, match="bev_translate_std"):
        AugmentConfig(bev_translate_std=-1.0)
    assert AugmentConfig().image_resize == pytest.approx((0.38 / 0.48, 0.55 / 0.48))


def _box_corners(boxes):
    """(N, 8, 3) corners of boxes (x, y, z, l, w, h, yaw, ...)."""
    import numpy as np

    signs = np.array([[sx, sy, sz] for sx in (-0.5, 0.5) for sy in (-0.5, 0.5) for sz in (-0.5, 0.5)])
    out = []
    for x, y, z, length, width, height, yaw, *_ in boxes:
        local = signs * np.array([length, width, height])
        c, s = np.cos(yaw), np.sin(yaw)
        rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        out.append(local @ rotation.T + np.array([x, y, z]))
    return np.stack(out)


def test_boxes_follow_the_bev_augmentation_like_their_corners():
    """A box moved by apply_bev_aug_boxes has the corners of the original box moved by bev_aug,
    for rotations, scales, translations and both flips; velocities turn with the frame."""
    import numpy as np

    from bridgeta.data.augment import AugmentConfig, apply_bev_aug_boxes, apply_bev_aug_points, sample_bev_aug

    boxes = np.array([[10.0, -4.0, 0.8, 4.6, 1.9, 1.6, 0.3, 5.0, 1.0],
                      [-20.0, 15.0, 1.5, 11.5, 2.6, 3.3, -2.8, 0.0, -2.0]])
    config = AugmentConfig(bev=True, bev_rotate_deg=180.0, bev_scale=(0.9, 1.1), bev_translate_std=2.0,
                           bev_flip_x=True, bev_flip_y=True)
    flips = set()
    for seed in range(24):
        bev_aug = sample_bev_aug(np.random.default_rng(seed), config, train=True)
        flips.add(bool(np.linalg.det(bev_aug[:2, :2]) < 0))
        moved = apply_bev_aug_boxes(boxes, bev_aug)
        expected = apply_bev_aug_points(_box_corners(boxes).reshape(-1, 3), bev_aug).reshape(-1, 8, 3)
        got = _box_corners(moved)
        for e, g in zip(expected, got):  # the same corner set (a flip reorders the corners)
            distances = np.linalg.norm(e[:, None] - g[None], axis=-1)
            assert distances.min(axis=1).max() < 1e-4
        np.testing.assert_allclose(moved[:, 7:9], boxes[:, 7:9] @ bev_aug[:2, :2].T, atol=1e-5)
    assert flips == {True, False}  # both handed cases were exercised
