"""A light per-pixel head on an image backbone, for pretraining the backbone on camera labels.

The head is deliberately small (an FPN-style sum, one 3x3 conv, two 1x1 outputs) so that what the
labels teach ends up in the backbone, which is what the BEV models keep; the head is thrown away.
Every backbone level is projected to ``channels`` by a 1x1 conv-BN-ReLU, upsampled to the finest
level (stride 8 for the presets' ``out_indices: [1, 2, 3]``) and summed; a 3x3 conv-BN-ReLU fuses
them; 1x1 convs give class logits and, optionally, log-depth, bilinearly upsampled to the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bridgeta.models.layers import conv_bn_relu, init_conv_bn_


@dataclass
class PixelOutputs:
    """``semantic``: ``(B, K, H, W)`` class logits; ``log_depth``: ``(B, H, W)`` log metres or None;
    ``depth_bins``: ``(B, D, fH, fW)`` the LSS depth distribution of a lift-depth pretraining, or None."""

    semantic: torch.Tensor
    log_depth: torch.Tensor | None
    depth_bins: torch.Tensor | None = None


class PixelHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 64, depth: bool = True) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels)
        self.fuse = conv_bn_relu(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.depth = nn.Conv2d(channels, 1, 1) if depth else None
        init_conv_bn_(self)
        for conv in (self.classifier, self.depth):
            if conv is not None:
                nn.init.normal_(conv.weight, std=0.01)
                nn.init.zeros_(conv.bias)
        if self.depth is not None:
            # Start from a plausible street-scene depth (e ** 2.5 = 12 m), not from 1 m.
            nn.init.constant_(self.depth.bias, 2.5)

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> PixelOutputs:
        finest = features[0].shape[-2:]
        x = self.lateral[0](features[0])
        for lateral, feature in zip(self.lateral[1:], features[1:]):
            x = x + F.interpolate(lateral(feature), size=finest, mode="bilinear", align_corners=False)
        x = self.fuse(x)
        semantic = F.interpolate(self.classifier(x), size=size, mode="bilinear", align_corners=False)
        log_depth = None
        if self.depth is not None:
            log_depth = F.interpolate(self.depth(x), size=size, mode="bilinear", align_corners=False)[:, 0]
        return PixelOutputs(semantic, log_depth)


class PixelModel(nn.Module):
    """``backbone`` (any of ``models.backbones``) plus a :class:`PixelHead` on all its outputs."""

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 64, depth: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = PixelHead(list(backbone.out_channels), num_classes, channels, depth)

    def forward(self, images: torch.Tensor) -> PixelOutputs:
        return self.head(self.backbone(images), tuple(images.shape[-2:]))
