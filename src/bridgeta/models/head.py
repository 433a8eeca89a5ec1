"""Map-segmentation head: resample the decoded BEV onto the output grid, then classify cells."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bridgeta.geometry import BEVGrid


class BEVGridTransform(nn.Module):
    """Bilinearly resample a BEV map from ``input_grid`` onto the cell centres of ``output_grid``.

    BEVFusion maps its 128x128 decoder output at 0.8 m (+-51.2 m) onto the 200x200 label grid at
    0.5 m (+-50 m) this way. The sampling positions depend only on the two grids, so they are
    computed once here, not per forward.
    """

    def __init__(self, input_grid: BEVGrid, output_grid: BEVGrid) -> None:
        super().__init__()
        self.input_grid = input_grid
        self.output_grid = output_grid

        def normalised(axis: str) -> torch.Tensor:
            low, high, _ = getattr(input_grid, axis)
            centres = output_grid.cell_centers(axis, dtype=torch.float64)
            # grid_sample with align_corners=False: -1 and +1 are the outer edges of the map.
            return (centres - low) / (high - low) * 2 - 1

        gx, gy = torch.meshgrid(normalised("x"), normalised("y"), indexing="ij")
        # grid_sample's last dim is (w, h) = (index into dim 3 = Y, index into dim 2 = X).
        sample_grid = torch.stack([gy, gx], dim=-1)[None].float()
        self.register_buffer("sample_grid", sample_grid, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.input_grid.shape:
            raise ValueError(
                f"BEVGridTransform expects a {self.input_grid.shape} map, got {tuple(x.shape[-2:])}"
            )
        grid = self.sample_grid.to(dtype=x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", align_corners=False)


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
