"""Typed inputs and intermediates of BEV models.

Models take and return these small structures instead of positional tuples, so a distiller can
read any level (camera BEV, LiDAR BEV, fused, decoded, logits) without the model knowing about
distillation. Frames and layouts follow docs/conventions.md.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch


@dataclass
class CameraInputs:
    """Multi-view camera batch.

    images:       ``(B, N, 3, H, W)`` float, already normalised, after image augmentation.
    intrinsics:   ``(B, N, 3, 3)`` pinhole intrinsics of the *original* (un-augmented) image.
    ego_T_camera: ``(B, N, 4, 4)`` camera frame -> ego frame.
    image_aug:    ``(B, N, 3, 3)`` homogeneous 2D affine taking original pixels to augmented
                  pixels (resize, crop, flip, rotate); identity when there is no augmentation.
    depth:        ``(B, N, H, W)`` projected LiDAR depth (m) per augmented pixel, 0 where no
                  point falls (:func:`bridgeta.geometry.project_depth`); only with the ``depth``
                  modality (e.g. MonoTAKD's teaching assistant), else ``None``.
    """

    images: torch.Tensor
    intrinsics: torch.Tensor
    ego_T_camera: torch.Tensor
    image_aug: torch.Tensor
    depth: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dim() != 5:
            raise ValueError(f"CameraInputs.images must be (B, N, 3, H, W), got {tuple(self.images.shape)}")
        batch, cams = self.images.shape[:2]
        expected = {
            "intrinsics": (batch, cams, 3, 3),
            "ego_T_camera": (batch, cams, 4, 4),
            "image_aug": (batch, cams, 3, 3),
        }
        if self.depth is not None:
            expected["depth"] = (batch, cams, *self.images.shape[-2:])
        for name, shape in expected.items():
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise ValueError(f"CameraInputs.{name} must have shape {shape}, got {actual}")


@dataclass
class LidarInputs:
    """LiDAR points of a batch, concatenated.

    points:      ``(P, F)`` float; columns ``x, y, z, intensity, time_lag`` (seconds, >= 0, 0 for
                 the keyframe sweep) in the *augmented* ego frame (the loader applies the BEV
                 augmentation to points; cameras receive it as ``bev_aug``).
    batch_index: ``(P,)`` long, the sample each point belongs to.
    """

    points: torch.Tensor
    batch_index: torch.Tensor

    def __post_init__(self) -> None:
        if self.points.dim() != 2:
            raise ValueError(f"LidarInputs.points must be (P, F), got {tuple(self.points.shape)}")
        if self.batch_index.shape != self.points.shape[:1]:
            raise ValueError(
                f"LidarInputs.batch_index must have shape ({self.points.shape[0]},), "
                f"got {tuple(self.batch_index.shape)}"
            )


@dataclass
class BEVInputs:
    """Everything a BEV model may consume. Absent modalities are ``None``.

    bev_aug: ``(B, 4, 4)`` augmented_ego_T_ego, applied to camera geometry so that camera BEV
             features line up with the (already augmented) points and labels. ``None`` = identity.
    ego_motion: ``(B, 3)`` the ego's status, read by the planning head only: velocity (vx, vy,
             m/s, in the (augmented) ego frame) and 1, or zeros where it is unknown
             (bridgeta/data/dataset.py ``ego_motion``). ``None`` = unknown for every sample.
    """

    batch_size: int
    camera: CameraInputs | None = None
    lidar: LidarInputs | None = None
    bev_aug: torch.Tensor | None = None
    ego_motion: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "BEVInputs":
        def move(value):
            if value is None:
                return None
            if isinstance(value, torch.Tensor):
                return value.to(device, non_blocking=True)
            return replace(value, **{f.name: move(getattr(value, f.name)) for f in fields(value)})

        return BEVInputs(
            batch_size=self.batch_size,
            camera=move(self.camera),
            lidar=move(self.lidar),
            bev_aug=move(self.bev_aug),
            ego_motion=move(self.ego_motion),
        )

    def select(self, samples: list[int]) -> "BEVInputs":
        """The sub-batch of ``samples`` (indices into this batch, in that order): every per-sample
        tensor indexed along its batch dimension, the LiDAR points of those samples renumbered to
        their new positions."""
        index = torch.as_tensor(samples, dtype=torch.long)
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= self.batch_size:
            raise IndexError(f"samples {samples} are not in a batch of {self.batch_size}")

        def rows(value):
            return None if value is None else value[index.to(value.device)]

        camera = None
        if self.camera is not None:
            camera = replace(self.camera, **{f.name: rows(getattr(self.camera, f.name)) for f in fields(self.camera)})
        lidar = None
        if self.lidar is not None:
            points, batch_index = [], []
            for position, sample in enumerate(samples):
                keep = self.lidar.batch_index == sample
                points.append(self.lidar.points[keep])
                batch_index.append(torch.full((int(keep.sum()),), position, dtype=self.lidar.batch_index.dtype,
                                              device=self.lidar.batch_index.device))
            lidar = LidarInputs(torch.cat(points), torch.cat(batch_index))
        return BEVInputs(batch_size=len(samples), camera=camera, lidar=lidar,
                         bev_aug=rows(self.bev_aug), ego_motion=rows(self.ego_motion))


@dataclass
class BEVOutputs:
    """Intermediates of one forward pass, all ``(B, C, X, Y)`` in the ego frame.

    camera_bev:  camera branch BEV feature (``F_cam``), or ``None`` without cameras.
    lidar_bev:   LiDAR branch BEV feature (``F_lid``), or ``None`` without LiDAR.
    fused_bev:   input of the decoder: the fuser output, or the single modality's BEV.
    decoded_bev: decoder output (``F_dec``).
    logits:      segmentation logits on the output grid (``L``), one channel per class.
    depth:       camera depth distribution ``(B, N, D, fH, fW)``, or ``None``.
    camera_context: the image features ``(B, N, fH, fW, C)`` the camera lift spread along each ray
                 (``LSSOutput.context``), or ``None``; MonoTAKD's shared TA lifts them again with
                 LiDAR depth.
    residual_bev: MonoTAKD's residual branch output (``model.residual``), or ``None``; with FFM
                 on, ``fused_bev`` is the fusion of ``camera_bev`` with it. Without FFM the
                 branch runs in training only (CMRD reads it), so in eval mode it is ``None``.
    objects:     the object head's output (``ObjectOutputs``: heatmap logits and box regressions on
                 the decoded BEV's grid) with ``model.heads.object``, else ``None``.
    motion:      the motion head's ``MotionOutputs`` (per-cell trajectories and mode logits) with
                 ``model.heads.motion``, else ``None``.
    occupancy:   the occupancy head's ``(B, T, X, Y)`` logits per future step with
                 ``model.heads.occupancy``, else ``None``.
    plan:        the planning head's ``(B, 3, T, 2)`` ego displacements per command with
                 ``model.heads.plan``, else ``None``.

    ``heads`` gives each head's typed output by name (``map``: the logits, ``object``, ``motion``,
    ``occupancy``, ``plan``).
    """

    camera_bev: torch.Tensor | None
    lidar_bev: torch.Tensor | None
    fused_bev: torch.Tensor
    decoded_bev: torch.Tensor
    logits: torch.Tensor
    depth: torch.Tensor | None = None
    camera_context: torch.Tensor | None = None
    residual_bev: torch.Tensor | None = None
    objects: Any = None
    motion: Any = None
    occupancy: torch.Tensor | None = None
    plan: torch.Tensor | None = None

    @property
    def heads(self) -> dict[str, Any]:
        out: dict[str, Any] = {"map": self.logits}
        for name, value in (("object", self.objects), ("motion", self.motion), ("occupancy", self.occupancy),
                            ("plan", self.plan)):
            if value is not None:
                out[name] = value
        return out
