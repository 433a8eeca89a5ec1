"""Image backbones for the camera branch, built by name from the config."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from bridgeta.models.backbones.resnet import ResNet, resnet18, resnet34, resnet50
from bridgeta.models.backbones.swin import SwinTransformer, swin_t

__all__ = [
    "BACKBONE_TYPES",
    "ResNet",
    "SwinTransformer",
    "build_backbone",
    "resnet18",
    "resnet34",
    "resnet50",
    "swin_t",
]

BACKBONE_TYPES = ("resnet18", "resnet34", "resnet50", "swin_t")


def build_backbone(type: str, out_indices: Sequence[int], drop_path_rate: float = 0.0) -> nn.Module:
    """Build a backbone by name.

    The result maps ``(B, 3, H, W)`` to a list of feature maps (one per ``out_indices`` entry,
    stage 0..3 = stride 4..32) and exposes ``out_channels``, ``out_strides`` and
    ``pretrained_ignore`` (checkpoint key patterns to skip when loading pretrained weights).
    ``drop_path_rate`` (stochastic depth) only exists for Swin; a non-zero rate for a ResNet is
    rejected rather than silently dropped.
    """
    if type == "swin_t":
        return swin_t(out_indices, drop_path_rate=drop_path_rate)
    resnets = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
    if type not in resnets:
        raise ValueError(f"unknown backbone type {type!r}; expected one of {BACKBONE_TYPES}")
    if drop_path_rate:
        raise ValueError(f"drop_path_rate={drop_path_rate} is only supported by swin_t, not {type}")
    return resnets[type](out_indices)
