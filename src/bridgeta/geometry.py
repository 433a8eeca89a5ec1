"""Geometry conventions, written once (see docs/conventions.md).

Frames: ``global`` (map), ``ego`` (nuScenes ego_pose: rear-axle centre, X forward, Y left, Z up),
``lidar`` (LIDAR_TOP), ``camera`` (X right, Y down, Z forward, OpenCV) and ``image`` (pixels, u right,
v down). A 4x4 rigid transform named ``a_T_b`` maps homogeneous points from frame ``b`` into frame
``a``: ``p_a = a_T_b @ p_b``, so ``a_T_c = a_T_b @ b_T_c``.

Every BEV grid in the project is a :class:`BEVGrid`. BEV tensors are ``(B, C, X, Y)``: dimension 2
walks the ego X axis (forward), dimension 3 the ego Y axis (left), and the index increases with the
coordinate. Cell ``(i, j)`` covers ``[x_min + i*dx, x_min + (i+1)*dx) x [y_min + j*dy, ...)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Bounds = tuple[float, float, float]  # (min, max, step) in metres


def _count(bounds: Bounds, axis: str) -> int:
    low, high, step = bounds
    if not step > 0:
        raise ValueError(f"BEV grid {axis}: step must be > 0, got {step}")
    if not high > low:
        raise ValueError(f"BEV grid {axis}: max ({high}) must exceed min ({low})")
    count = (high - low) / step
    rounded = round(count)
    # Float bounds such as (-51.2, 51.2, 0.4) give 255.99999...; anything farther from an integer
    # is a configuration mistake, not rounding noise.
    if abs(count - rounded) > 1e-4:
        raise ValueError(
            f"BEV grid {axis}: (max - min) / step = {count:.6f} is not a whole number of cells"
        )
    return int(rounded)


@dataclass(frozen=True)
class BEVGrid:
    """A regular grid in the ego frame: the one source of truth for every BEV shape.

    ``x`` and ``y`` are ``(min, max, step)`` in metres; ``z`` is the vertical extent that camera
    frustum points are kept in, with ``step`` the height of one vertical bin.
    """

    x: Bounds
    y: Bounds
    z: Bounds = (-10.0, 10.0, 20.0)

    def __post_init__(self) -> None:
        for name in ("x", "y", "z"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"BEV grid {name}: expected (min, max, step), got {value}")
            object.__setattr__(self, name, value)
        self.shape  # validates the bounds
        _count(self.z, "z")

    @property
    def shape(self) -> tuple[int, int]:
        """``(X, Y)``: number of cells along ego X (forward) and ego Y (left)."""
        return _count(self.x, "x"), _count(self.y, "y")

    @property
    def num_z(self) -> int:
        return _count(self.z, "z")

    @property
    def resolution(self) -> tuple[float, float, float]:
        return self.x[2], self.y[2], self.z[2]

    @property
    def lower(self) -> tuple[float, float, float]:
        return self.x[0], self.y[0], self.z[0]

    def cell_centers(
        self, axis: str, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Metric coordinates of the cell centres along ``"x"`` or ``"y"`` (increasing)."""
        low, _, step = getattr(self, axis)
        count = self.shape[0] if axis == "x" else self.shape[1]
        index = torch.arange(count, device=device, dtype=torch.float64)
        return (low + (index + 0.5) * step).to(dtype)

    def point_to_cell(self, points: torch.Tensor) -> torch.Tensor:
        """Integer ``(ix, iy, iz)`` of ego-frame points ``(..., 3)``; no bounds check."""
        lower = points.new_tensor(self.lower)
        step = points.new_tensor(self.resolution)
        return torch.floor((points[..., :3] - lower) / step).long()

    def in_bounds(self, cells: torch.Tensor) -> torch.Tensor:
        """Mask of integer cells ``(..., 3)`` that fall inside the grid."""
        nx, ny = self.shape
        return (
            (cells[..., 0] >= 0)
            & (cells[..., 0] < nx)
            & (cells[..., 1] >= 0)
            & (cells[..., 1] < ny)
            & (cells[..., 2] >= 0)
            & (cells[..., 2] < self.num_z)
        )

    def downsample(self, factor: int) -> "BEVGrid":
        """The same extent with cells ``factor`` times larger in X and Y."""
        if factor < 1:
            raise ValueError(f"downsample factor must be >= 1, got {factor}")
        return BEVGrid(
            (self.x[0], self.x[1], self.x[2] * factor),
            (self.y[0], self.y[1], self.y[2] * factor),
            self.z,
        )

    def contains(self, other: "BEVGrid") -> bool:
        return (
            self.x[0] <= other.x[0] + 1e-9
            and self.x[1] >= other.x[1] - 1e-9
            and self.y[0] <= other.y[0] + 1e-9
            and self.y[1] >= other.y[1] - 1e-9
        )


def rotation_z(yaw: float) -> torch.Tensor:
    """4x4 homogeneous rotation about +Z by ``yaw`` radians (counter-clockwise seen from above)."""
    c, s = math.cos(yaw), math.sin(yaw)
    out = torch.eye(4)
    out[0, 0], out[0, 1], out[1, 0], out[1, 1] = c, -s, s, c
    return out


def make_transform(rotation: torch.Tensor, translation: torch.Tensor | list[float]) -> torch.Tensor:
    """4x4 homogeneous transform from a 3x3 rotation and a translation."""
    out = torch.eye(4, dtype=rotation.dtype)
    out[:3, :3] = rotation
    out[:3, 3] = torch.as_tensor(translation, dtype=rotation.dtype)
    return out


def transform_points(a_T_b: torch.Tensor, points_b: torch.Tensor) -> torch.Tensor:
    """Apply ``a_T_b`` (``(..., 4, 4)``) to points ``(..., P, 3)``, broadcasting leading dims."""
    rotation = a_T_b[..., :3, :3]
    translation = a_T_b[..., :3, 3]
    return points_b @ rotation.transpose(-1, -2) + translation.unsqueeze(-2)


def invert_3x3(matrices: torch.Tensor) -> torch.Tensor:
    """Inverse of ``(..., 3, 3)`` matrices in closed form (adjugate over determinant).

    Used instead of ``torch.linalg.inv`` for the camera matrices because ONNX has no inverse op:
    with one formula made of products and sums, the PyTorch model and its exported graph place
    every frustum point in the same cell. Intrinsics and image-augmentation matrices are small and
    well conditioned, so the closed form is as accurate as an LU solve here. No singularity check
    (a singular matrix gives inf/nan, like a degenerate camera would anyway).
    """
    if matrices.shape[-2:] != (3, 3):
        raise ValueError(f"invert_3x3 expects (..., 3, 3) matrices, got {tuple(matrices.shape)}")
    (a, b, c), (d, e, f), (g, h, i) = (row.unbind(-1) for row in matrices.unbind(-2))
    # Cofactors of the first column give the determinant; the adjugate is the cofactor transpose.
    co_a, co_d, co_g = e * i - f * h, c * h - b * i, b * f - c * e
    adjugate = torch.stack(
        [
            torch.stack([co_a, co_d, co_g], dim=-1),
            torch.stack([f * g - d * i, a * i - c * g, c * d - a * f], dim=-1),
            torch.stack([d * h - e * g, b * g - a * h, a * e - b * d], dim=-1),
        ],
        dim=-2,
    )
    determinant = a * co_a + d * co_d + g * co_g
    return adjugate / determinant[..., None, None]


def project_depth(
    points_ego: torch.Tensor,
    intrinsics: torch.Tensor,
    ego_T_camera: torch.Tensor,
    image_aug: torch.Tensor,
    image_size: tuple[int, int],
    min_depth: float = 0.1,
) -> torch.Tensor:
    """Sparse depth maps ``(N, H, W)`` of points ``(P, 3)`` (ego frame) seen by ``N`` cameras.

    Each pixel of each *augmented* image (``image_aug`` after ``intrinsics``; pixel ``k`` covers
    ``[k, k + 1)``, docs/conventions.md) holds the camera-z depth of the nearest point that
    projects into it, 0 where none does or the point is closer than ``min_depth``. This is the
    "projected LiDAR depth" of depth-supervised camera models (MonoTAKD's teaching assistant,
    BEVDepth): the same frames and augmentation as the images, so it lines up pixel for pixel.
    """
    height, width = image_size
    cams = intrinsics.shape[0]
    rotation, translation = ego_T_camera[:, :3, :3], ego_T_camera[:, :3, 3]
    camera = (points_ego[None] - translation[:, None]) @ rotation  # R^T (p - t), (N, P, 3)
    pixels = camera @ (image_aug @ intrinsics).transpose(-1, -2)  # (N, P, 3), homogeneous
    depth = camera[..., 2]
    in_front = depth > min_depth
    u = torch.floor(pixels[..., 0] / pixels[..., 2].clamp(min=1e-6))
    v = torch.floor(pixels[..., 1] / pixels[..., 2].clamp(min=1e-6))
    valid = in_front & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    index = (torch.arange(cams, device=points_ego.device)[:, None] * height + v) * width + u
    out = torch.full((cams * height * width,), float("inf"), dtype=depth.dtype, device=depth.device)
    out.scatter_reduce_(0, index[valid].long(), depth[valid], reduce="amin")
    out[torch.isinf(out)] = 0.0
    return out.view(cams, height, width)
