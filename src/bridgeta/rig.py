"""A nuScenes-like sensor rig and dummy inputs built from it.

The six cameras follow the published nuScenes layout (CAM_FRONT ... CAM_BACK_RIGHT): positions in
the ego frame in metres, yaw of the optical axis about ego +Z (0 = forward, +90 deg = left), and
pinhole intrinsics at the native 1600x900 resolution (front ~1266 px focal length, back ~809 px).
The values are rounded from one nuScenes sample's calibrated_sensor records. Used for model cost
measurement (``bridgeta info``), benchmarks and tests; the data pipeline reads real calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bridgeta.geometry import make_transform
from bridgeta.models.types import BEVInputs, CameraInputs, LidarInputs

NATIVE_IMAGE_SIZE = (900, 1600)  # (H, W) of nuScenes camera images


@dataclass(frozen=True)
class CameraSpec:
    name: str
    position: tuple[float, float, float]  # ego frame, metres
    yaw_deg: float  # optical axis direction about ego +Z
    focal: float  # pixels at NATIVE_IMAGE_SIZE
    principal_point: tuple[float, float] = (800.0, 450.0)

    def intrinsics(self) -> torch.Tensor:
        return torch.tensor(
            [
                [self.focal, 0.0, self.principal_point[0]],
                [0.0, self.focal, self.principal_point[1]],
                [0.0, 0.0, 1.0],
            ]
        )

    def ego_T_camera(self) -> torch.Tensor:
        return ego_T_camera_from_yaw(math.radians(self.yaw_deg), self.position)


NUSCENES_CAMERAS: tuple[CameraSpec, ...] = (
    CameraSpec("CAM_FRONT", (1.70, 0.02, 1.51), 0.0, 1266.4, (816.3, 491.5)),
    CameraSpec("CAM_FRONT_RIGHT", (1.55, -0.49, 1.50), -55.0, 1260.8, (807.9, 495.3)),
    CameraSpec("CAM_FRONT_LEFT", (1.52, 0.49, 1.51), 55.0, 1272.6, (826.6, 479.8)),
    CameraSpec("CAM_BACK", (0.03, 0.00, 1.58), 180.0, 809.2, (829.2, 481.8)),
    CameraSpec("CAM_BACK_LEFT", (1.04, 0.81, 1.59), 110.0, 1256.7, (817.8, 451.9)),
    CameraSpec("CAM_BACK_RIGHT", (1.03, -0.81, 1.46), -110.0, 1259.5, (807.3, 501.2)),
)


def ego_T_camera_from_yaw(yaw: float, position: tuple[float, float, float]) -> torch.Tensor:
    """Camera (OpenCV: x right, y down, z forward) -> ego for a level camera looking at ``yaw``."""
    c, s = math.cos(yaw), math.sin(yaw)
    # Columns: the camera's x, y, z axes expressed in the ego frame.
    rotation = torch.tensor([[s, 0.0, c], [-c, 0.0, s], [0.0, -1.0, 0.0]])
    return make_transform(rotation, list(position))


def resize_crop_matrix(
    original_size: tuple[int, int], final_size: tuple[int, int], scale: float | None = None
) -> torch.Tensor:
    """BEVFusion's test-time image transform: resize by ``scale``, crop the bottom-centre window.

    With ``scale=None`` the scale is the one BEVFusion uses for 256x704 inputs from 900x1600
    images (0.48), generalised as ``final_w / original_w * 1.1`` rounded to 0.01, raised if
    needed so that the crop fits.
    """
    (height, width), (final_h, final_w) = original_size, final_size
    if scale is None:
        scale = max(round(final_w / width * 1.1, 2), final_h / height, final_w / width)
    new_h, new_w = int(height * scale), int(width * scale)
    if new_h < final_h or new_w < final_w:
        raise ValueError(f"scale {scale} makes {new_h}x{new_w}, smaller than the crop {final_size}")
    crop_top = new_h - final_h  # keep the bottom of the image (the road), as BEVFusion does
    crop_left = (new_w - final_w) // 2
    return torch.tensor(
        [[scale, 0.0, -float(crop_left)], [0.0, scale, -float(crop_top)], [0.0, 0.0, 1.0]]
    )


def reference_camera_inputs(
    batch_size: int, image_size: tuple[int, int], num_cameras: int = 6, seed: int = 0
) -> CameraInputs:
    """Random images with the nuScenes rig geometry at ``image_size`` (H, W)."""
    if not 1 <= num_cameras <= len(NUSCENES_CAMERAS):
        raise ValueError(f"num_cameras must be in 1..{len(NUSCENES_CAMERAS)}, got {num_cameras}")
    cams = NUSCENES_CAMERAS[:num_cameras]
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, num_cameras, 3, *image_size, generator=generator)
    intrinsics = torch.stack([c.intrinsics() for c in cams])
    extrinsics = torch.stack([c.ego_T_camera() for c in cams])
    aug = resize_crop_matrix(NATIVE_IMAGE_SIZE, image_size).expand(num_cameras, 3, 3)
    expand = lambda t: t.unsqueeze(0).expand(batch_size, *t.shape).clone()  # noqa: E731
    return CameraInputs(images, expand(intrinsics), expand(extrinsics), expand(aug))


def reference_lidar_inputs(
    batch_size: int, points_per_sample: int = 34_000 * 10, seed: int = 0
) -> LidarInputs:
    """Uniform random points in +-50 m (10 nuScenes-sized sweeps by default) with a time channel."""
    generator = torch.Generator().manual_seed(seed)
    count = batch_size * points_per_sample
    xy = (torch.rand(count, 2, generator=generator) * 2 - 1) * 50
    z = torch.rand(count, 1, generator=generator) * 4 - 2
    intensity = torch.rand(count, 1, generator=generator)
    time_lag = torch.randint(0, 10, (count, 1), generator=generator).float() * 0.05
    points = torch.cat([xy, z, intensity, time_lag], dim=1)
    batch_index = torch.arange(batch_size).repeat_interleave(points_per_sample)
    return LidarInputs(points, batch_index)


def reference_inputs(
    batch_size: int,
    image_size: tuple[int, int] | None,
    num_cameras: int = 6,
    with_lidar: bool = False,
    points_per_sample: int = 34_000 * 10,
) -> BEVInputs:
    camera = reference_camera_inputs(batch_size, image_size, num_cameras) if image_size else None
    lidar = reference_lidar_inputs(batch_size, points_per_sample) if with_lidar else None
    return BEVInputs(batch_size=batch_size, camera=camera, lidar=lidar)
