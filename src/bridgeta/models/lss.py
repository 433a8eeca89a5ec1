"""LSS view transform (lift-splat), faithful to BEVFusion's ``LSSTransform``.

Reference: ``mmdet3d/models/vtransforms/lss.py`` and ``base.py`` of BEVFusion (MIT HAN Lab). A 1x1
conv predicts, per feature cell, a softmax over ``D`` depth bins and ``C`` context channels; their
outer product is "lifted" onto the camera frustum, every frustum point is placed in the ego frame
from the camera calibration, and the features are summed into BEV cells (:mod:`bev_pool`).

Differences from BEVFusion, all deliberate:

* Geometry uses the project's frames (``ego_T_camera``, 3x3 ``image_aug``, 4x4 ``bev_aug``) instead
  of ``camera2lidar`` / ``post_rots`` / ``extra_rots``; the maths is the same.
* Points are quantised with ``floor`` (:meth:`BEVGrid.point_to_cell`); BEVFusion's ``.long()``
  truncates toward zero and so also pulls points up to one cell outside the lower x/y/z edges into
  the first cell.
* With more than one vertical bin the optional downsample block runs on all ``C * Z`` channels
  (BEVFusion only ever uses ``Z = 1``, where the two agree).
* ``depth_net`` may replace the 1x1 conv with BEVDepth's camera-aware DepthNet
  (:mod:`bridgeta.models.depth_net`), which reads the camera parameters too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bridgeta.geometry import BEVGrid, invert_3x3
from bridgeta.models.bev_pool import bev_pool, compute_pool_plan
from bridgeta.models.depth_net import CameraAwareDepthNet, camera_parameters
from bridgeta.models.layers import conv_bn_relu
from bridgeta.models.types import CameraInputs


@dataclass
class LSSOutput:
    """bev: ``(B, out_channels, X', Y')`` on ``output_grid``; depth: ``(B, N, D, fH, fW)`` probabilities;
    context: ``(B, N, fH, fW, C)``, the per-pixel features the lift spreads along each ray (the depth
    net's context half), which :meth:`LSSViewTransform.lift_with_lidar_depth` lifts again."""

    bev: torch.Tensor
    depth: torch.Tensor
    context: torch.Tensor | None = None


def create_frustum(
    image_size: tuple[int, int], feature_size: tuple[int, int], depth: tuple[float, float, float]
) -> torch.Tensor:
    """``(D, fH, fW, 3)`` frustum of ``(u, v, d)``: pixel in the augmented input image, depth in metres.

    Like BEVFusion, feature cell ``j`` of ``fW`` sits at ``u = linspace(0, W - 1, fW)[j]`` (first and
    last cells on the first and last pixel), not at the centre of its stride-sized patch; keeping the
    convention keeps BEVFusion checkpoints and numbers comparable. Depth bins are
    ``arange(min, max, step)``, the near edge of each bin (118 bins for ``(1, 60, 0.5)``).
    """
    height, width = image_size
    feature_h, feature_w = feature_size
    depths = torch.arange(*depth, dtype=torch.float32)
    if depths.numel() == 0:
        raise ValueError(f"depth bounds {depth} give no depth bins")
    num_depth = depths.numel()
    shape = (num_depth, feature_h, feature_w)
    us = torch.linspace(0, width - 1, feature_w).view(1, 1, feature_w).expand(shape)
    vs = torch.linspace(0, height - 1, feature_h).view(1, feature_h, 1).expand(shape)
    return torch.stack((us, vs, depths.view(-1, 1, 1).expand(shape)), dim=-1)


def frustum_to_ego(
    frustum: torch.Tensor,
    intrinsics: torch.Tensor,
    ego_T_camera: torch.Tensor,
    image_aug: torch.Tensor,
    bev_aug: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ego-frame points ``(B, N, *F, 3)`` of frustum points ``(*F, 3)`` = ``(u, v, d)``.

    ``(u, v)`` are pixels of the augmented image: ``image_aug`` (``(B, N, 3, 3)`` affine) is undone
    first, then the original-image pixel is unprojected with ``intrinsics`` at camera depth ``d``
    (camera Z), moved to the ego frame by ``ego_T_camera`` and, if given, to the augmented ego frame
    by ``bev_aug`` (``(B, 4, 4)``). All linear steps are folded into one 3x3 "pixel to ray" matrix
    per camera, valid because an affine ``image_aug`` keeps the homogeneous coordinate at 1. Runs in
    float32 with autocast off: half-precision geometry would misplace far points by whole cells.
    The inverses are closed-form (:func:`~bridgeta.geometry.invert_3x3`) so that the same maths
    exports to ONNX.
    """
    with torch.autocast(device_type=frustum.device.type, enabled=False):
        frustum = frustum.float()
        ego_T_camera = ego_T_camera.float()
        if bev_aug is not None:
            ego_T_camera = bev_aug.float()[:, None] @ ego_T_camera
        pixel_to_ray = (
            ego_T_camera[..., :3, :3]
            @ invert_3x3(intrinsics.float())
            @ invert_3x3(image_aug.float())
        )
        batch, cams = pixel_to_ray.shape[:2]
        points = frustum.reshape(-1, 3)
        homogeneous = torch.cat([points[:, :2], torch.ones_like(points[:, :1])], dim=1)
        rays = homogeneous @ pixel_to_ray.transpose(-1, -2)  # (B, N, F, 3)
        ego = ego_T_camera[..., None, :3, 3] + points[:, 2:] * rays
        return ego.view(batch, cams, *frustum.shape[:-1], 3)


class LSSViewTransform(nn.Module):
    """Lift image features to a depth frustum and splat them onto ``grid`` (BEVFusion ``LSSTransform``).

    ``out_channels`` is the BEV channel count after concatenating the ``grid.num_z`` vertical bins
    (``context channels * Z``); ``output_grid`` is ``grid`` after the optional 2x downsample.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: tuple[int, int],
        feature_stride: int,
        grid: BEVGrid,
        depth: tuple[float, float, float] = (1.0, 60.0, 0.5),
        downsample: int = 1,
        normalize: bool = False,
        depth_source: str = "predicted",
        depth_net: dict | None = None,
    ) -> None:
        """``depth_net``: None for BEVFusion's 1x1 conv, else the keyword arguments of
        :class:`~bridgeta.models.depth_net.CameraAwareDepthNet` beyond its channel counts
        (``mid_channels``, ``blocks``, ``aspp``, ``deform``)."""
        super().__init__()
        if downsample not in (1, 2):
            raise ValueError(f"LSS downsample must be 1 or 2 (BEVFusion's block), got {downsample}")
        height, width = (int(v) for v in image_size)
        if feature_stride < 1 or height < feature_stride or width < feature_stride:
            raise ValueError(f"feature_stride {feature_stride} does not fit image_size {image_size}")
        if depth_source not in ("predicted", "lidar"):
            raise ValueError(f"depth_source must be 'predicted' or 'lidar', got {depth_source!r}")
        self.depth_source = depth_source
        self.depth_bounds = tuple(float(v) for v in depth)
        self.image_size = (height, width)
        self.feature_size = (height // feature_stride, width // feature_stride)
        self.feature_stride = feature_stride
        self.grid = grid
        self.output_grid = grid.downsample(downsample)
        self.register_buffer(
            "frustum", create_frustum(self.image_size, self.feature_size, depth), persistent=False
        )
        self.num_depth_bins = self.frustum.shape[0]
        self.context_channels = out_channels
        self.out_channels = out_channels * grid.num_z
        self.camera_aware = depth_net is not None
        if self.camera_aware:
            self.depthnet = CameraAwareDepthNet(in_channels, depth_bins=self.num_depth_bins,
                                                context_channels=out_channels, **depth_net)
        else:
            self.depthnet = nn.Conv2d(in_channels, self.num_depth_bins + out_channels, 1)
        if downsample == 2:
            self.downsample = _downsample_block(self.out_channels)
        elif normalize:
            # A raw bev_pool sum has no fixed scale; one conv-BN-ReLU gives F_cam the form of a
            # fuser output, so that feature-level distillation compares like with like.
            self.downsample = nn.Sequential(*conv_bn_relu(self.out_channels, self.out_channels, 3, 1))
        else:
            self.downsample = nn.Identity()

    def forward(
        self, features: torch.Tensor, camera: CameraInputs, bev_aug: torch.Tensor | None = None,
        depth_source: str | None = None,
    ) -> LSSOutput:
        """``features``: ``(B, N, C_in, fH, fW)`` with ``(fH, fW) == image_size // feature_stride``;
        ``depth_source`` overrides the module's for this call (MonoTAKD's shared TA lift)."""
        depth_source = depth_source or self.depth_source
        if features.dim() != 5:
            raise ValueError(f"LSS features must be (B, N, C, fH, fW), got {tuple(features.shape)}")
        batch, cams, channels, feature_h, feature_w = features.shape
        if (feature_h, feature_w) != self.feature_size:
            raise ValueError(
                f"LSS feature map is {feature_h}x{feature_w} but image_size {self.image_size} // "
                f"feature_stride {self.feature_stride} = {self.feature_size[0]}x{self.feature_size[1]}"
            )
        if tuple(camera.images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"camera images are {tuple(camera.images.shape[-2:])}, the frustum was built for "
                f"{self.image_size}"
            )
        if tuple(camera.intrinsics.shape[:2]) != (batch, cams):
            raise ValueError(
                f"features have (B, N) = {(batch, cams)}, cameras {tuple(camera.intrinsics.shape[:2])}"
            )

        plan = self._pool_plan(camera, bev_aug, batch)
        num_depth = self.num_depth_bins
        flat = features.reshape(batch * cams, channels, feature_h, feature_w)
        if self.camera_aware:
            parameters = camera_parameters(camera.intrinsics, camera.image_aug, camera.ego_T_camera, bev_aug)
            logits = self.depthnet(flat, parameters.reshape(batch * cams, -1))
        else:
            logits = self.depthnet(flat)
        if depth_source == "lidar":
            depth = self._lidar_depth(camera, batch * cams).to(logits.dtype)
        else:
            depth = logits[:, :num_depth].softmax(dim=1)  # (B*N, D, fH, fW)
        context = logits[:, num_depth:].permute(0, 2, 3, 1)  # (B*N, fH, fW, C)
        return LSSOutput(
            bev=self.downsample(self._splat(depth, context, plan)),
            depth=depth.view(batch, cams, num_depth, feature_h, feature_w),
            context=context.unflatten(0, (batch, cams)),
        )

    def lift_with_lidar_depth(
        self, context: torch.Tensor, camera: CameraInputs, bev_aug: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The BEV that ``context`` ``(B, N, fH, fW, C)`` (an :class:`LSSOutput`'s, usually of this
        very step) gives when lifted with the projected LiDAR depth instead of the predicted one:
        MonoTAKD's TA lift from the student's own image features (``ta_source: shared``).

        A constant, computed without gradient. The post-pool block (``downsample``) normalises it
        with this batch's statistics, as it does the model's own lift in training, and its running
        statistics are left as they were: they keep describing the predicted-depth lift that
        inference runs.
        """
        batch, cams, feature_h, feature_w, channels = context.shape
        if (feature_h, feature_w) != self.feature_size or channels != self.context_channels:
            raise ValueError(f"context must be (B, N, {self.feature_size[0]}, {self.feature_size[1]}, "
                             f"{self.context_channels}), got {tuple(context.shape)}")
        with torch.no_grad():
            plan = self._pool_plan(camera, bev_aug, batch)
            depth = self._lidar_depth(camera, batch * cams).to(context.dtype)
            bev = self._splat(depth, context.reshape(batch * cams, feature_h, feature_w, channels), plan)
            # On copies of the buffers: the real ones may not change even in place and back, the
            # model's own forward saved them for its backward (autograd's version check).
            copies = {name: buffer.clone() for name, buffer in self.downsample.named_buffers()}
            return torch.func.functional_call(self.downsample, copies, (bev,))

    def _pool_plan(self, camera: CameraInputs, bev_aug: torch.Tensor | None, batch: int):
        """Where each frustum point of each camera falls in the BEV grid (geometry: no gradient)."""
        with torch.no_grad():  # geometry is data, not a function of the weights
            points = frustum_to_ego(
                self.frustum, camera.intrinsics, camera.ego_T_camera, camera.image_aug, bev_aug
            )
            batch_index = torch.arange(batch, device=points.device).view(batch, 1, 1, 1, 1)
            return compute_pool_plan(self.grid.point_to_cell(points), batch_index, self.grid, batch)

    def _lidar_depth(self, camera: CameraInputs, images: int) -> torch.Tensor:
        """One-hot depth ``(B*N, D, fH, fW)`` from the batch's projected LiDAR depth."""
        if camera.depth is None:
            raise ValueError("depth_source 'lidar' lifts with projected LiDAR depth: the batch has no "
                             "CameraInputs.depth (load the 'depth' modality)")
        return lidar_depth_distribution(
            camera.depth.reshape(images, *self.image_size), self.feature_stride, self.depth_bounds
        )

    def _splat(self, depth: torch.Tensor, context: torch.Tensor, plan) -> torch.Tensor:
        """Lift: the outer product of depth ``(B*N, D, fH, fW)`` and context ``(B*N, fH, fW, C)``,
        summed into the BEV cells of ``plan``."""
        # (B*N, D, fH, fW, C), contiguous in the frustum point order the plan uses.
        lifted = depth.unsqueeze(-1) * context.unsqueeze(1)
        return bev_pool(lifted.reshape(-1, self.context_channels), plan)


def pool_sparse_depth(depth: torch.Tensor, stride: int) -> torch.Tensor:
    """``(M, H, W)`` sparse depth (0 = none) to ``(M, H // stride, W // stride)``: the mean over
    each ``stride`` x ``stride`` block of the pixels that have a depth, 0 for a block with none
    (MonoTAKD's and CaDDN's sparse average pooling)."""
    pooled = torch.nn.functional.avg_pool2d(depth[:, None], stride, stride)
    share = torch.nn.functional.avg_pool2d((depth[:, None] > 0).to(depth.dtype), stride, stride)
    return torch.where(share > 0, pooled / share.clamp(min=1e-12), torch.zeros_like(pooled))[:, 0]


def lidar_depth_distribution(
    depth: torch.Tensor, stride: int, bounds: tuple[float, float, float]
) -> torch.Tensor:
    """One-hot depth distributions ``(M, D, fH, fW)`` from sparse depth maps ``(M, H, W)``.

    The depth is pooled to the feature stride (:func:`pool_sparse_depth`) and put in the frustum
    bin nearest to it, ``round((d - min) / step)`` over ``arange(min, max, step)``. The frustum puts
    bin ``k`` at depth ``min + k * step`` (its near edge, :func:`create_frustum`), so the nearest
    bin lands the feature within half a step of the measured depth; ``floor`` would put it on
    average half a step too close to the camera. A cell without depth, or with a depth more than
    half a step outside the bins, gets no weight at all: it lifts nothing (no softmax).
    """
    low, high, step = bounds
    num_bins = torch.arange(low, high, step).numel()
    with torch.no_grad():
        pooled = pool_sparse_depth(depth.float(), stride)
        index = torch.round((pooled - low) / step)
        valid = (pooled > 0) & (index >= 0) & (index < num_bins)
        one_hot = torch.nn.functional.one_hot(index.clamp(0, num_bins - 1).long(), num_bins)
        return (one_hot * valid[..., None]).permute(0, 3, 1, 2).float()


def depth_supervision_loss(
    depth: torch.Tensor, lidar_depth: torch.Tensor, stride: int, bounds: tuple[float, float, float]
) -> torch.Tensor:
    """BEVDepth's depth loss: the binary cross-entropy between the predicted depth distributions
    ``depth`` ``(B, N, D, fH, fW)`` (softmax outputs) and the one-hot distributions of the sparse
    projected LiDAR depth ``lidar_depth`` ``(B, N, H, W)`` (:func:`lidar_depth_distribution`: pooled
    to the feature stride, nearest bin), summed over the ``D`` bins and averaged over the feature
    cells that have a LiDAR depth within the bins. 0 (with a graph) when no cell has one."""
    batch, cams, bins, feature_h, feature_w = depth.shape
    target = lidar_depth_distribution(lidar_depth.reshape(batch * cams, *lidar_depth.shape[-2:]), stride, bounds)
    if target.shape[1:] != (bins, feature_h, feature_w):
        raise ValueError(f"LiDAR depth gives distributions {tuple(target.shape[1:])}, the model predicts "
                         f"{(bins, feature_h, feature_w)}: depth bounds or feature stride differ")
    valid = target.amax(dim=1) > 0  # (B*N, fH, fW)
    cells = valid.sum()
    # In float32 and by hand: BCE is not autocast-safe, and bf16 logs of probabilities near 0 or
    # 1 are too coarse; the clamps bound each term as torch's BCE does (log >= -100 there).
    probability = depth.reshape(batch * cams, bins, feature_h, feature_w).float().permute(0, 2, 3, 1)[valid]
    labels = target.permute(0, 2, 3, 1)[valid]
    eps = 1e-7
    bce = -(labels * probability.clamp_min(eps).log() + (1 - labels) * (1 - probability).clamp_min(eps).log())
    return bce.sum() / cells.clamp(min=1)


def _downsample_block(channels: int) -> nn.Sequential:
    """BEVFusion's LSS downsample: conv3x3-BN-ReLU, strided conv3x3-BN-ReLU, conv3x3-BN-ReLU."""

    # Flat (not nested) so the keys read like BEVFusion's: downsample.0 ... downsample.8.
    layers = [conv_bn_relu(channels, channels, 3, stride) for stride in (1, 2, 1)]
    return nn.Sequential(*(module for layer in layers for module in layer))
