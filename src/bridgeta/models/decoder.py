"""BEVFusion's map-segmentation BEV decoder: residual stages (GeneralizedResNet) + LSSFPN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bridgeta.models.backbones.resnet import BasicBlock
from bridgeta.models.layers import conv_bn_relu


class GeneralizedResNet(nn.ModuleList):
    """Stages of basic blocks given as ``[(num_blocks, channels, stride), ...]``; returns every stage."""

    def __init__(self, in_channels: int, blocks: list[tuple[int, int, int]]) -> None:
        super().__init__()
        for num_blocks, channels, stride in blocks:
            layers = [BasicBlock(in_channels, channels, stride)]
            layers += [BasicBlock(channels, channels) for _ in range(num_blocks - 1)]
            self.append(nn.Sequential(*layers))
            in_channels = channels
        self.out_channels = [channels for _, channels, _ in blocks]
        self.out_strides = []
        total = 1
        for _, _, stride in blocks:
            total *= stride
            self.out_strides.append(total)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        outputs = []
        for stage in self:
            x = stage(x)
            outputs.append(x)
        return outputs


class LSSFPN(nn.Module):
    """Upsample the deep stage to the shallow one, concatenate, fuse (1x1 + 3x3), upsample."""

    def __init__(
        self,
        in_indices: tuple[int, int],
        in_channels: tuple[int, int],
        out_channels: int,
        scale_factor: int = 1,
    ) -> None:
        super().__init__()
        self.in_indices = tuple(in_indices)
        self.fuse = nn.Sequential(
            conv_bn_relu(in_channels[0] + in_channels[1], out_channels, 1),
            conv_bn_relu(out_channels, out_channels, 3),
        )
        self.scale_factor = scale_factor
        self.upsample: nn.Module | None = None
        if scale_factor != 1:
            self.upsample = nn.Sequential(
                nn.Upsample(scale_factor=scale_factor, mode="bilinear", align_corners=True),
                conv_bn_relu(out_channels, out_channels, 3),
            )
        self.out_channels = out_channels

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        deep = features[self.in_indices[0]]
        shallow = features[self.in_indices[1]]
        deep = F.interpolate(deep, size=shallow.shape[-2:], mode="bilinear", align_corners=True)
        x = self.fuse(torch.cat([deep, shallow], dim=1))
        return x if self.upsample is None else self.upsample(x)


class BEVDecoder(nn.Module):
    """The decoder shared by teacher, TA and student: ``F_fus -> F_dec``."""

    def __init__(
        self,
        in_channels: int,
        blocks: list[tuple[int, int, int]],
        in_indices: tuple[int, int] = (-1, 0),
        out_channels: int = 256,
        scale_factor: int = 2,
    ) -> None:
        super().__init__()
        self.backbone = GeneralizedResNet(in_channels, blocks)
        chosen = [self.backbone.out_channels[i] for i in in_indices]
        self.neck = LSSFPN(in_indices, (chosen[0], chosen[1]), out_channels, scale_factor)
        self.out_channels = out_channels
        # Resolution of F_dec relative to F_fus (1.0 for BEVFusion: stride 2 then x2 upsample).
        shallow_stride = self.backbone.out_strides[in_indices[1]]
        self.output_scale = scale_factor / shallow_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))
