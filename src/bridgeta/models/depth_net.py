"""BEVDepth's camera-aware DepthNet: depth bins and context features from neck features and the
camera's parameters (``vtransform.depth_net.type: camera_aware``).

BEVFusion predicts both with one 1x1 convolution, which sees a feature vector and nothing of the
camera it came from: its intrinsics, its pose, or how augmentation resized and cropped the image.
BEVDepth (Li et al., AAAI 2023) feeds those camera parameters through an MLP into
squeeze-and-excitation gates on the context and depth branches (one gate per camera, the same at
each of its pixels), and deepens the depth branch (residual blocks, ASPP, a deformable
convolution), whose 3x3 layers see where a pixel sits relative to its neighbours.

The camera parameters are batch-normalised as in BEVDepth, so the running statistics are those of
the training rig: a parameter that never varies in training (a camera's roll, say) has a running
variance near zero, and a rig that differs there is scaled far outside what the net has seen.
Fine-tune on a new rig rather than deploy across rigs.

The layout follows BEVDepth's ``DepthNet`` (``reduce_conv``, ``bn``, ``context_mlp``,
``context_se``, ``context_conv``, ``depth_mlp``, ``depth_se``, ``depth_conv``) and its 27
camera inputs (:func:`camera_parameters`). Differences, each for plain PyTorch on small maps:
our ASPP (models/residual.py) has no dropout, and the deformable convolution is ungrouped.
"""

from __future__ import annotations

import torch
from torch import nn

from bridgeta.models.backbones.resnet import BasicBlock
from bridgeta.models.layers import conv_bn_relu
from bridgeta.models.residual import ASPP, DeformConv2d

NUM_CAMERA_PARAMETERS = 27


def camera_parameters(intrinsics: torch.Tensor, image_aug: torch.Tensor, ego_T_camera: torch.Tensor,
                      bev_aug: torch.Tensor | None) -> torch.Tensor:
    """``(B, N, 27)``: BEVDepth's ``mlp_input`` per camera, in its order.

    fx, fy, cx, cy; the image augmentation's 2x3 affine part (row-major); the BEV augmentation's
    xy block and z scale (identity without one); the camera-to-ego transform's top 3x4 rows.
    """
    batch, cams = intrinsics.shape[:2]
    if bev_aug is None:
        bev_aug = torch.eye(4, dtype=intrinsics.dtype, device=intrinsics.device).expand(batch, 4, 4)
    bev = bev_aug[:, None].expand(batch, cams, 4, 4)
    columns = [
        intrinsics[..., 0, 0], intrinsics[..., 1, 1], intrinsics[..., 0, 2], intrinsics[..., 1, 2],
        image_aug[..., 0, 0], image_aug[..., 0, 1], image_aug[..., 0, 2],
        image_aug[..., 1, 0], image_aug[..., 1, 1], image_aug[..., 1, 2],
        bev[..., 0, 0], bev[..., 0, 1], bev[..., 1, 0], bev[..., 1, 1], bev[..., 2, 2],
    ]
    return torch.cat([torch.stack(columns, dim=-1), ego_T_camera[..., :3, :].reshape(batch, cams, 12)], dim=-1).float()


class SqueezeExcite(nn.Module):
    """``x * sigmoid(expand(relu(reduce(gate_input))))``: BEVDepth's SELayer, the gate computed
    from the camera embedding rather than from ``x``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, channels, 1)
        self.conv_expand = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, gate_input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x * self.conv_expand(self.conv_reduce(gate_input).relu()).sigmoid()


def _mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features))


class CameraAwareDepthNet(nn.Module):
    """``(M, C_in, fH, fW)`` features and ``(M, 27)`` camera parameters -> ``(M, D + C, fH, fW)``
    logits: ``D`` depth bins, then ``C`` context channels (the 1x1 conv's layout)."""

    def __init__(self, in_channels: int, mid_channels: int, depth_bins: int, context_channels: int,
                 blocks: int = 3, aspp: bool = True, deform: bool = True) -> None:
        super().__init__()
        self.reduce_conv = nn.Sequential(*conv_bn_relu(in_channels, mid_channels, 3, 1))
        self.bn = nn.BatchNorm1d(NUM_CAMERA_PARAMETERS)  # focal lengths in pixels beside metres
        self.context_mlp = _mlp(NUM_CAMERA_PARAMETERS, mid_channels, mid_channels)
        self.context_se = SqueezeExcite(mid_channels)
        self.context_conv = nn.Conv2d(mid_channels, context_channels, 1)
        self.depth_mlp = _mlp(NUM_CAMERA_PARAMETERS, mid_channels, mid_channels)
        self.depth_se = SqueezeExcite(mid_channels)
        layers: list[nn.Module] = [BasicBlock(mid_channels, mid_channels) for _ in range(blocks)]
        if aspp:
            layers.append(ASPP(mid_channels, mid_channels, mid_channels, dilations=(6, 12, 18)))
        if deform:
            layers += [DeformConv2d(mid_channels, mid_channels), nn.BatchNorm2d(mid_channels), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(mid_channels, depth_bins, 1))
        self.depth_conv = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if camera.shape != (features.shape[0], NUM_CAMERA_PARAMETERS):
            raise ValueError(f"camera parameters must be ({features.shape[0]}, {NUM_CAMERA_PARAMETERS}), "
                             f"got {tuple(camera.shape)}")
        # Normalised in float32 with autocast off: in bf16, focal lengths of a few hundred pixels
        # and crop offsets would be rounded by up to a pixel before BatchNorm sees them.
        with torch.autocast(device_type=features.device.type, enabled=False):
            embedding = self.bn(camera.float())
        x = self.reduce_conv(features)
        context = self.context_conv(self.context_se(x, self.context_mlp(embedding)[..., None, None]))
        depth = self.depth_conv(self.depth_se(x, self.depth_mlp(embedding)[..., None, None]))
        return torch.cat([depth, context], dim=1)
