"""Map-segmentation head: resample the decoded BEV onto the output grid, then classify cells."""

from __future__ import annotations

import torch
from torch import nn

from bridgeta.geometry import BEVGrid


class BEVGridTransform(nn.Module):
    """Bilinearly resample a BEV map from ``input_grid`` onto the cell centres of ``output_grid``.

    BEVFusion maps its 128x128 decoder output at 0.8 m (+-51.2 m) onto the 200x200 label grid at
    0.5 m (+-50 m) with ``grid_sample`` (bilinear, zero padding, ``align_corners=False``). The
    sampling positions lie on an axis-aligned lattice, so that bilinear map is separable: each
    output row interpolates two input rows, then each output column two input columns. Computed
    that way (two gathers and weighted sums per axis, weights fixed at construction), it gives
    ``grid_sample``'s values and gradients (tested) at a fraction of its CPU cost: its backward was
    the single most expensive non-convolution op of a BridgeTA step, which runs five heads.
    """

    def __init__(self, input_grid: BEVGrid, output_grid: BEVGrid) -> None:
        super().__init__()
        self.input_grid = input_grid
        self.output_grid = output_grid
        for axis, size in zip(("x", "y"), input_grid.shape):
            low, high, _ = getattr(input_grid, axis)
            centres = output_grid.cell_centers(axis, dtype=torch.float64)
            # grid_sample's unnormalisation with align_corners=False: input pixel i spans
            # [i, i + 1) in units where the map spans [0, size), its centre at i + 0.5.
            position = (centres - low) / (high - low) * size - 0.5
            first = position.floor()
            upper = position - first
            index = torch.stack([first, first + 1]).long()
            weight = torch.stack([1 - upper, upper])
            # Zero padding: a neighbour outside the map contributes nothing (weight 0, any index).
            outside = (index < 0) | (index >= size)
            weight[outside] = 0.0
            self.register_buffer(f"{axis}_index", index.clamp(0, size - 1), persistent=False)
            self.register_buffer(f"{axis}_weight", weight.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.input_grid.shape:
            raise ValueError(
                f"BEVGridTransform expects a {self.input_grid.shape} map, got {tuple(x.shape[-2:])}"
            )
        wx = self.x_weight.to(x.dtype)[:, :, None]  # (2, X_out, 1): along dim 2
        x = x.index_select(2, self.x_index[0]) * wx[0] + x.index_select(2, self.x_index[1]) * wx[1]
        wy = self.y_weight.to(x.dtype)  # (2, Y_out): along dim 3
        return x.index_select(3, self.y_index[0]) * wy[0] + x.index_select(3, self.y_index[1]) * wy[1]


class MapSegmentationHead(nn.Module):
    """BEVFusion's BEVSegmentationHead: grid transform, (conv3x3-BN-ReLU) x2, conv1x1 to classes.

    ``transform`` and ``classifier`` are separate so a distiller can run the classifier of one
    model on another model's resampled features (CrossKD-style terms).
    """

    def __init__(
        self, in_channels: int, input_grid: BEVGrid, output_grid: BEVGrid, num_classes: int
    ) -> None:
        super().__init__()
        self.transform = BEVGridTransform(input_grid, output_grid)
        self.classifier = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, num_classes, 1),
        )
        self.num_classes = num_classes

    def forward(self, decoded_bev: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, X_out, Y_out)``; apply ``sigmoid`` for per-class probabilities."""
        return self.classifier(self.transform(decoded_bev))
