"""BEVFusion's ConvFuser: concatenate modality BEV maps, then conv3x3-BN-ReLU."""

from __future__ import annotations

import torch
from torch import nn


class ConvFuser(nn.Sequential):
    """Fuses BEV maps of equal spatial size by channel concatenation (order = input order)."""

    def __init__(self, in_channels: list[int], out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(sum(in_channels), out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.in_channels = list(in_channels)
        self.out_channels = out_channels

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"ConvFuser expects {len(self.in_channels)} inputs, got {len(inputs)}")
        for index, (tensor, channels) in enumerate(zip(inputs, self.in_channels)):
            if tensor.shape[1] != channels:
                raise ValueError(
                    f"ConvFuser input {index} has {tensor.shape[1]} channels, expected {channels}"
                )
        return super().forward(torch.cat(inputs, dim=1))
