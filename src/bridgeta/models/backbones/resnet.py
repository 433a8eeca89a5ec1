"""ResNet-18/34/50 image backbones, state-dict compatible with torchvision.

Parameter and buffer names follow ``torchvision.models.resnet`` exactly so that a torchvision
ImageNet checkpoint loads with :func:`bridgeta.models.checkpoint.load_pretrained`; only the
classifier (``fc``) is left out, since a backbone returns feature maps, not logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bridgeta.models.layers import init_conv_bn_

STAGE_STRIDES = (4, 8, 16, 32)
STAGE_PLANES = (64, 128, 256, 512)


def validate_out_indices(out_indices: Sequence[int], num_stages: int) -> list[int]:
    """Return ``out_indices`` as a list after checking they are increasing stage indices.

    Increasing order is required so that the returned feature list goes from fine to coarse, which
    is what the FPN necks expect.
    """
    indices = [int(index) for index in out_indices]
    if not indices:
        raise ValueError("out_indices must name at least one stage")
    if any(index < 0 or index >= num_stages for index in indices):
        raise ValueError(f"out_indices {indices} must be stage indices in 0..{num_stages - 1}")
    if any(later <= earlier for earlier, later in zip(indices, indices[1:])):
        raise ValueError(f"out_indices {indices} must be strictly increasing")
    return indices


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut; ResNet-18/34."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = projection_shortcut(in_channels, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand; ResNet-50.

    The stride sits on the 3x3 convolution ("ResNet v1.5"), as in torchvision, so torchvision
    weights reproduce torchvision's features.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection_shortcut(in_channels, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """The torchvision ``downsample`` branch (keys ``downsample.0`` conv, ``downsample.1`` BN)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class ResNet(nn.Module):
    """ResNet feature extractor returning the stage outputs named by ``out_indices``.

    Stage ``k`` (0..3) is torchvision's ``layer{k+1}`` at stride ``4 * 2**k``. Stages after the
    last requested one are not built, so every parameter receives a gradient (DDP needs no
    ``find_unused_parameters``); their checkpoint keys are then ignored on loading.
    """

    #: Checkpoint keys a torchvision classification checkpoint has but a backbone does not use.
    pretrained_ignore: tuple[str, ...] = ("fc.*",)

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks_per_stage: Sequence[int],
        out_indices: Sequence[int] = (0, 1, 2, 3),
    ) -> None:
        super().__init__()
        self.out_indices = validate_out_indices(out_indices, len(blocks_per_stage))
        num_stages = self.out_indices[-1] + 1

        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_channels = 64
        stage_channels = []
        for stage in range(num_stages):
            stride = 1 if stage == 0 else 2
            layer = [block(in_channels, STAGE_PLANES[stage], stride)]
            in_channels = STAGE_PLANES[stage] * block.expansion
            layer += [block(in_channels, STAGE_PLANES[stage]) for _ in range(1, blocks_per_stage[stage])]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layer))
            stage_channels.append(in_channels)

        self.out_channels = [stage_channels[index] for index in self.out_indices]
        self.out_strides = [STAGE_STRIDES[index] for index in self.out_indices]
        self.pretrained_ignore = type(self).pretrained_ignore + tuple(
            f"layer{stage + 1}.*" for stage in range(num_stages, len(blocks_per_stage))
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation: He-normal (fan-out) convolutions, unit BatchNorm."""
        init_conv_bn_(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` -> one ``(B, C_k, H / s_k, W / s_k)`` map per entry of ``out_indices``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs = []
        for stage in range(self.out_indices[-1] + 1):
            x = getattr(self, f"layer{stage + 1}")(x)
            if stage in self.out_indices:
                outputs.append(x)
        return outputs


def resnet18(out_indices: Sequence[int] = (0, 1, 2, 3)) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), out_indices)


def resnet34(out_indices: Sequence[int] = (0, 1, 2, 3)) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), out_indices)


def resnet50(out_indices: Sequence[int] = (0, 1, 2, 3)) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), out_indices)
