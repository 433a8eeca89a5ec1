"""Image and BEV augmentation as matrices, and their application to images, points and labels.

Every augmentation is one matrix (docs/conventions.md) so the model can undo it geometrically:

* ``image_aug`` (3x3): original pixels -> augmented pixels. Pixel coordinates have their origin at
  the top-left *corner* of the image (pixel ``k`` spans ``[k, k + 1)``), the convention of PIL's
  resize and affine transform, so a resize by ``s`` is exactly ``p -> s * p``.
* ``bev_aug`` (4x4): ``augmented_ego_T_ego`` (rotation about Z, uniform scale, translation, flips).

Sampling follows BEVFusion's map-segmentation recipe (``ImageAug3D``, ``GlobalRotScaleTrans``,
``RandomFlip3D``); at test time the image transform is BEVFusion's resize + bottom-centre crop
(``bridgeta.rig.resize_crop_matrix``) and the BEV transform is the identity.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from bridgeta.data.config import AugmentConfig
from bridgeta.geometry import BEVGrid
from bridgeta.rig import resize_crop_matrix

# BEVFusion trains 256x704 inputs from 900x1600 images at scales [0.38, 0.55] and tests at 0.48;
# the range is stored relative to the test-time scale so it carries over to other image sizes.
# Bilinear sampling at scales down to this aliases little; below it, resize with antialiasing first.
ANTIALIAS_BELOW = 0.75





def _rotation_about(angle_deg: float, centre: tuple[float, float]) -> np.ndarray:
    """3x3 pixel rotation by ``angle_deg`` about ``centre``, counter-clockwise as seen on screen."""
    theta = math.radians(angle_deg)
    c, s = math.cos(theta), math.sin(theta)
    rotation = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    to_centre = np.array([[1.0, 0.0, centre[0]], [0.0, 1.0, centre[1]], [0.0, 0.0, 1.0]])
    from_centre = np.array([[1.0, 0.0, -centre[0]], [0.0, 1.0, -centre[1]], [0.0, 0.0, 1.0]])
    return to_centre @ rotation @ from_centre


def sample_image_aug(
    rng: np.random.Generator,
    original_size: tuple[int, int],
    final_size: tuple[int, int],
    config: AugmentConfig,
    train: bool,
) -> np.ndarray:
    """3x3 ``image_aug`` for an ``original_size`` (H, W) image and a ``final_size`` (H, W) input.

    Training (BEVFusion ``ImageAug3D``): resize by the test-time scale times a factor from
    ``image_resize``; crop ``final_size`` at a random horizontal offset with the bottom kept
    (``image_bottom_crop``), padding with black where the resized image is smaller; flip; rotate
    about the crop centre. Otherwise: the test-time resize + bottom-centre crop.
    """
    test = resize_crop_matrix(original_size, final_size).double().numpy()
    if not (train and config.image):
        return test
    (height, width), (final_h, final_w) = original_size, final_size
    scale = test[0, 0] * rng.uniform(*config.image_resize)
    new_h, new_w = int(height * scale), int(width * scale)
    crop_top = int((1 - rng.uniform(*config.image_bottom_crop)) * new_h) - final_h
    crop_left = int(rng.uniform(0, max(0, new_w - final_w)))
    matrix = np.array([[scale, 0.0, -crop_left], [0.0, scale, -crop_top], [0.0, 0.0, 1.0]])
    if config.image_flip and rng.random() < 0.5:
        matrix = np.array([[-1.0, 0.0, final_w], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ matrix
    if config.image_rotate_deg > 0:
        angle = rng.uniform(-config.image_rotate_deg, config.image_rotate_deg)
        matrix = _rotation_about(angle, (final_w / 2, final_h / 2)) @ matrix
    return matrix


def image_aug_scale(matrix: np.ndarray) -> float:
    """Linear scale factor of a (similarity) ``image_aug``: sqrt of the area ratio."""
    (a, b), (c, d) = np.asarray(matrix)[:2, :2]
    return math.sqrt(abs(a * d - b * c))


def _invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 3x3 2D affine, in closed form (LAPACK calls on tiny matrices are slow in
    loader workers whose BLAS threads compete)."""
    (a, b, tx), (c, d, ty) = matrix[:2]
    det = a * d - b * c
    return np.array(
        [
            [d / det, -b / det, (b * ty - d * tx) / det],
            [-c / det, a / det, (c * tx - a * ty) / det],
            [0.0, 0.0, 1.0],
        ]
    )


def apply_image_aug(image: Image.Image, matrix: np.ndarray, final_size: tuple[int, int]) -> Image.Image:
    """The ``final_size`` (H, W) image seen through ``matrix`` (original px -> augmented px).

    PIL's affine transform samples bilinearly without antialiasing, so a strong downscale (below
    ``ANTIALIAS_BELOW``) is first done by PIL's antialiased resize to whole pixel sizes; the affine
    then applies what remains of ``matrix``, so the result follows ``matrix`` exactly. Outside the
    source image is black.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    scale = image_aug_scale(matrix)
    if scale < ANTIALIAS_BELOW:
        width, height = image.size
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.BILINEAR)
        matrix = matrix @ np.diag([width / size[0], height / size[1], 1.0])
    inverse = _invert_affine(matrix)
    final_h, final_w = final_size
    return image.transform(
        (final_w, final_h), Image.AFFINE, tuple(inverse[:2].ravel()), resample=Image.BILINEAR, fillcolor=0
    )


def apply_image_aug_nearest(
    labels: Image.Image, matrix: np.ndarray, final_size: tuple[int, int], fill: float
) -> Image.Image:
    """A per-pixel label map (class ids, depth) seen through ``matrix``, like :func:`apply_image_aug`.

    Nearest-neighbour, never interpolated: a blend of two class ids is a third class, and a blend
    of a near and a far depth is a depth nothing has. ``fill`` marks pixels outside the source
    (the ignore index, or 0 = no depth).
    """
    inverse = _invert_affine(np.asarray(matrix, dtype=np.float64))
    final_h, final_w = final_size
    return labels.transform(
        (final_w, final_h), Image.AFFINE, tuple(inverse[:2].ravel()), resample=Image.NEAREST, fillcolor=fill
    )


def sample_bev_aug(rng: np.random.Generator, config: AugmentConfig, train: bool) -> np.ndarray:
    """4x4 ``augmented_ego_T_ego``: flip @ translate @ scale @ rotate (BEVFusion's order).

    Identity unless ``train`` and ``config.bev``.
    """
    if not (train and config.bev):
        return np.eye(4)
    angle = math.radians(rng.uniform(-config.bev_rotate_deg, config.bev_rotate_deg))
    scale = rng.uniform(*config.bev_scale)
    translation = rng.normal(0.0, config.bev_translate_std, size=3)
    flip_x = config.bev_flip_x and rng.random() < 0.5
    flip_y = config.bev_flip_y and rng.random() < 0.5
    rotate = np.eye(4)
    rotate[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    translate = np.eye(4)
    translate[:3, 3] = translation
    flip = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, 1.0, 1.0])
    return flip @ translate @ np.diag([scale, scale, scale, 1.0]) @ rotate


def apply_bev_aug_points(points: np.ndarray, bev_aug: np.ndarray) -> np.ndarray:
    """Points ``(P, F)`` with their ``x, y, z`` columns moved by ``bev_aug``; other columns kept."""
    out = np.array(points, copy=True)
    rotation, translation = bev_aug[:3, :3].astype(points.dtype), bev_aug[:3, 3].astype(points.dtype)
    out[:, :3] = points[:, :3] @ rotation.T + translation
    return out


def apply_bev_aug_boxes(boxes: np.ndarray, bev_aug: np.ndarray) -> np.ndarray:
    """3D boxes ``(N, 9)`` (x, y, z, length, width, height, yaw, vx, vy; ego frame) seen in the
    augmented frame: the centre moved by ``bev_aug``, the heading and the velocity turned (and
    mirrored by a flip) by its linear part, sizes and velocity scaled by its scale. Exact for any
    ``bev_aug`` that :func:`sample_bev_aug` draws (a similarity in x, y, with z scaled alike)."""
    out = np.array(boxes, dtype=np.float64, copy=True)
    if len(out) == 0:
        return out.astype(np.float32)
    linear, translation = bev_aug[:3, :3], bev_aug[:3, 3]
    out[:, :3] = boxes[:, :3] @ linear.T + translation
    planar = linear[:2, :2]
    scale = math.sqrt(abs(np.linalg.det(planar)))
    heading = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6])], axis=1) @ planar.T
    out[:, 6] = np.arctan2(heading[:, 1], heading[:, 0])
    out[:, 3:6] = boxes[:, 3:6] * scale
    out[:, 7:9] = boxes[:, 7:9] @ planar.T
    return out.astype(np.float32)


def resample_labels(
    labels: np.ndarray, source_grid: BEVGrid, output_grid: BEVGrid, bev_aug: np.ndarray
) -> np.ndarray:
    """Labels ``(C, X, Y)`` on ``source_grid`` seen on ``output_grid`` in the augmented ego frame.

    Each output cell centre (augmented frame, z = 0) is mapped back through ``bev_aug``'s inverse
    and takes the source cell it falls in (nearest neighbour, so identity on the same grid is
    exact); centres that land outside ``source_grid`` are 0. Handles any output grid, e.g. the
    1 m grid of the tiny presets from the cached 0.5 m labels.
    """
    bev_aug = np.asarray(bev_aug, dtype=np.float64)
    # bev_aug keeps Z apart (rotation about Z, flips, scale), so the BEV part inverts as a 2D affine.
    (a, b), (c, d) = bev_aug[:2, :2]
    det = a * d - b * c
    xs = output_grid.cell_centers("x", dtype=torch.float64).numpy()[:, None] - bev_aug[0, 3]
    ys = output_grid.cell_centers("y", dtype=torch.float64).numpy()[None, :] - bev_aug[1, 3]
    back_x = (d * xs - b * ys) / det
    back_y = (a * ys - c * xs) / det
    ix = np.floor((back_x - source_grid.x[0]) / source_grid.x[2]).astype(np.int64)
    iy = np.floor((back_y - source_grid.y[0]) / source_grid.y[2]).astype(np.int64)
    nx, ny = source_grid.shape
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    out = np.zeros((labels.shape[0], *output_grid.shape), dtype=bool)
    out[:, inside] = labels[:, ix[inside], iy[inside]]
    return out

