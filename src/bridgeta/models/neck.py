"""GeneralizedLSSFPN: BEVFusion's camera neck (``mmdet3d/models/necks/generalized_lss.py``).

Unlike a classic FPN (lateral 1x1 then *add* the upsampled coarser map), every level is built by
*concatenating* the upsampled coarser result with the backbone feature and fusing them with a
1x1 then a 3x3 conv. The coarsest input is only used as context, so ``n`` inputs give ``n - 1``
outputs (for Swin-T stages 1..3: stride 8 and 16).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bridgeta.models.layers import conv_bn_relu, init_conv_bn_


class GeneralizedLSSFPN(nn.Module):
    """Top-down concat-FPN over ``len(in_channels)`` levels ordered fine to coarse.

    For ``i = n-2 .. 0``: upsample the running result (level ``i+1``; the raw input for
    ``i = n-2``) bilinearly to level ``i``'s size, concat ``[level_i, upsampled]``, then
    ``fpn_convs[i](lateral_convs[i](.))``. ``align_corners=False`` is the BEVFusion camera
    config's ``upsample_cfg`` (the class default in BEVFusion is ``True``, but the configs override
    it).
    """

    def __init__(
        self, in_channels: Sequence[int], out_channels: int, align_corners: bool = False
    ) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(
                f"GeneralizedLSSFPN needs at least two input levels, got {list(in_channels)}"
            )
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.align_corners = align_corners
        coarsest_fused = len(in_channels) - 2
        self.lateral_convs = nn.ModuleList(
            conv_bn_relu(
                in_channels[level]
                + (in_channels[level + 1] if level == coarsest_fused else out_channels),
                out_channels,
                kernel_size=1,
            )
            for level in range(len(in_channels) - 1)
        )
        self.fpn_convs = nn.ModuleList(
            conv_bn_relu(out_channels, out_channels, kernel_size=3) for _ in range(len(in_channels) - 1)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv ``ConvModule`` initialisation: He-normal (fan-out) convs, unit BatchNorm."""
        init_conv_bn_(self)

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``n`` maps ``(B, in_channels[i], H_i, W_i)``, fine to coarse -> the ``n - 1`` finest
        levels as ``(B, out_channels, H_i, W_i)``."""
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} input levels, got {len(inputs)}")
        levels = list(inputs)
        for level in range(len(levels) - 2, -1, -1):
            coarser = F.interpolate(
                levels[level + 1],
                size=levels[level].shape[2:],
                mode="bilinear",
                align_corners=self.align_corners,
            )
            fused = torch.cat([levels[level], coarser], dim=1)
            levels[level] = self.fpn_convs[level](self.lateral_convs[level](fused))
        return levels[:-1]
