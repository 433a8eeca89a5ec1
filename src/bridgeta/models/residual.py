"""MonoTAKD's student-side BEV modules: the residual branch, SAM and FFM (METHOD.md §3).

The student of MonoTAKD is not the baseline network: a **residual branch** reads its camera BEV
and learns the "3D spatial cues" that the LiDAR teacher has and the camera TA lacks (CMRD's
target), and a **feature fusion module** (FFM) adds that branch back into the BEV the decoder
reads, so both run at inference. The branch ends in a **spatial alignment module** (SAM): a
channel-gated ASPP (context at several dilations) plus a deformable 3x3 convolution (spatial
alignment), summed and refined by two conv-ReLU layers.

Readings of the public code (hoiliu-0801/MonoTAKD), where it is ambiguous or broken, are listed in
docs/methods/monotakd.md; in short: the SE-style gate multiplies the ASPP output (the public code
computes it and throws it away), FFM is on (the public code's feeding line is commented out) and
has its own BatchNorm per convolution (the public code reuses one), and the deformable
convolution is written here with ``grid_sample`` (no torchvision), key-compatible with
``torchvision.ops.DeformConv2d`` (``weight``, ``bias``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bridgeta.models.layers import conv_bn_relu


def deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: int = 0,
    dilation: int = 1,
) -> torch.Tensor:
    """Deformable convolution v1 (stride 1, one offset group), as ``torchvision.ops.deform_conv2d``.

    ``offset`` is ``(B, 2 * kh * kw, H_out, W_out)`` with, for kernel tap ``k`` (row-major), the
    row offset at channel ``2k`` and the column offset at ``2k + 1``. Every tap samples ``x``
    bilinearly at its shifted position (``grid_sample`` with ``align_corners=True``, so integer
    positions are pixel centres; corners outside the map count as 0), and the taps are reduced with
    ``weight`` ``(C_out, C_in, kh, kw)`` in one einsum.
    """
    batch, channels, height, width = x.shape
    out_channels, in_channels, kernel_h, kernel_w = weight.shape
    if in_channels != channels:
        raise ValueError(f"weight expects {in_channels} input channels, x has {channels}")
    taps = kernel_h * kernel_w
    out_h = height + 2 * padding - dilation * (kernel_h - 1)
    out_w = width + 2 * padding - dilation * (kernel_w - 1)
    if offset.shape != (batch, 2 * taps, out_h, out_w):
        raise ValueError(f"offset must be {(batch, 2 * taps, out_h, out_w)}, got {tuple(offset.shape)}")
    # The sampling positions are geometry: in fp32 whatever autocast runs the layers in. In bf16
    # (8 significant bits) a position near 100 px is only known to 0.5 px, so the normalised grid
    # would blur each column differently and learned sub-pixel offsets would round away; the
    # tap reduction below (the matmul) still runs in autocast's precision.
    with torch.autocast(x.device.type, enabled=False):
        device, dtype = x.device, torch.promote_types(x.dtype, torch.float32)  # fp64 stays fp64
        tap_y, tap_x = torch.meshgrid(
            torch.arange(kernel_h, device=device, dtype=dtype) * dilation,
            torch.arange(kernel_w, device=device, dtype=dtype) * dilation,
            indexing="ij",
        )
        rows = torch.arange(out_h, device=device, dtype=dtype) - padding
        cols = torch.arange(out_w, device=device, dtype=dtype) - padding
        base_y = rows.view(1, 1, out_h, 1) + tap_y.reshape(1, taps, 1, 1)
        base_x = cols.view(1, 1, 1, out_w) + tap_x.reshape(1, taps, 1, 1)
        shifts = offset.to(dtype).view(batch, taps, 2, out_h, out_w)
        sample_y = base_y + shifts[:, :, 0]  # (B, K, H_out, W_out) in input pixels
        sample_x = base_x + shifts[:, :, 1]
        grid = torch.stack(
            (2 * sample_x / max(width - 1, 1) - 1, 2 * sample_y / max(height - 1, 1) - 1), dim=-1
        ).view(batch, taps * out_h, out_w, 2)
        sampled = F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    sampled = sampled.view(batch, channels, taps, out_h, out_w)
    out = torch.einsum("bckhw,ock->bohw", sampled, weight.reshape(out_channels, channels, taps))
    return out if bias is None else out + bias.view(1, -1, 1, 1)


class DeformConv2d(nn.Module):
    """A 3x3-style deformable convolution whose offsets a plain convolution predicts from the input.

    The offset convolution starts at zero, so the layer starts as an ordinary convolution (the
    usual DCN initialisation); its parameters are ``offset.*``, the deformable weights ``weight``
    and ``bias`` as in ``torchvision.ops.DeformConv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1,
                 dilation: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.padding, self.dilation = padding, dilation
        self.offset = nn.Conv2d(in_channels, 2 * kernel_size * kernel_size, kernel_size,
                                padding=padding, dilation=dilation)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Conv2d's default
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return deform_conv2d(x, self.offset(x), self.weight, self.bias, self.padding, self.dilation)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, 3x3 at dilations 6 and 12, and image pooling, each
    conv-BN-ReLU to ``branch_channels``, concatenated and reduced 1x1 to ``out_channels``."""

    def __init__(self, channels: int, out_channels: int, branch_channels: int, dilations: tuple[int, ...] = (6, 12)) -> None:
        super().__init__()
        self.branches = nn.ModuleList([nn.Sequential(*conv_bn_relu(channels, branch_channels, 1, 1))])
        for dilation in dilations:
            self.branches.append(nn.Sequential(
                nn.Conv2d(channels, branch_channels, 3, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(branch_channels), nn.ReLU(inplace=True),
            ))
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, branch_channels, 1, bias=False), nn.ReLU(inplace=True)
        )
        self.project = nn.Sequential(*conv_bn_relu(branch_channels * (len(dilations) + 2), out_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class SpatialAlignment(nn.Module):
    """SAM: ``refine(SE(ASPP(x)) + DeformConv(x))``, ``refine`` = conv3x3-ReLU to 2C, conv3x3-ReLU to C."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.aspp = ASPP(channels, channels, max(channels // 2, 8))
        hidden = max(channels // reduction, 4)
        self.gate = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), nn.Sigmoid())
        self.deform = DeformConv2d(channels, channels)
        self.refine = nn.Sequential(
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * channels, channels, 3, padding=1), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        context = self.aspp(x)
        gate = self.gate(context.mean(dim=(2, 3)))[:, :, None, None]
        return self.refine(context * gate + self.deform(x))


class ResidualBranch(nn.Module):
    """The student's CMRD branch: conv1x1-BN-ReLU, then SAM (or nothing, the ``sam: false`` ablation)."""

    def __init__(self, channels: int, sam: bool = True) -> None:
        super().__init__()
        self.reduce = nn.Sequential(*conv_bn_relu(channels, channels, 1, 1))
        self.sam = SpatialAlignment(channels) if sam else nn.Identity()

    def forward(self, camera_bev: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.sam(self.reduce(camera_bev))


class FeatureFusion(nn.Module):
    """FFM: the student BEV plus the residual branch's, through conv3x3-BN-ReLU, conv1x1-BN-ReLU to
    2C and conv3x3-BN back to C (MonoTAKD's fusion block, with its own BatchNorm per conv), added
    to the student BEV.

    The skip and the last BatchNorm's zero scale make FFM the identity at initialisation. The
    student starts from the TA's encoder, decoder and head (``init_from_assistant``). A randomly
    initialised block between that encoder and decoder would throw away what they learned together,
    and a short run may not recover it. The fused BEV ``camera + body(camera + residual)`` still
    reads the residual branch from the first step: the gradient reaches the zero scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn_relu(channels, channels, 3, 1),
            *conv_bn_relu(channels, 2 * channels, 1, 1),
            *conv_bn_relu(2 * channels, channels, 3, 1)[:2],  # no ReLU: the sum may go either way
        )
        nn.init.zeros_(self.body[-1].weight)

    def forward(self, camera_bev: torch.Tensor, residual_bev: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return camera_bev + self.body(camera_bev + residual_bev)
