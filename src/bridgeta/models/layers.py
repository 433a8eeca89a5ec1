"""Small building blocks shared by the backbones, necks, encoders and decoder."""

from __future__ import annotations

from torch import nn


def conv_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int | None = None,
) -> nn.Sequential:
    """mmcv's ``ConvModule`` with BN + ReLU; the conv has no bias because BN supplies it.

    ``padding`` defaults to ``kernel_size // 2`` ("same" size at stride 1).
    """
    if padding is None:
        padding = kernel_size // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def init_conv_bn_(module: nn.Module) -> None:
    """He-normal (fan-out) convolutions and unit BatchNorm, as torchvision and mmcv initialise."""
    for child in module.modules():
        if isinstance(child, nn.Conv2d):
            nn.init.kaiming_normal_(child.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(child, nn.BatchNorm2d):
            nn.init.ones_(child.weight)
            nn.init.zeros_(child.bias)
