"""Per-pixel metrics of the image pretraining: a confusion matrix over a whole split.

Accumulated over every pixel of the split, then reduced (as the BEV metric accumulates TP/FP/FN),
so small images and rare classes weigh by their pixels, not by their batch. The mean IoU is over
the classes that occur in the labels of the split; a class never labelled has no IoU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PixelMetrics:
    def __init__(self, classes: Sequence[str], ignore_index: int) -> None:
        self.classes = tuple(classes)
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(len(self.classes), len(self.classes), dtype=torch.int64)
        self.depth_abs_rel = 0.0
        self.depth_pixels = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor, log_depth: torch.Tensor | None, depth: torch.Tensor) -> None:
        """``logits`` ``(B, K, H, W)``, ``labels`` ``(B, H, W)``; depth in metres, 0 = unknown."""
        k = len(self.classes)
        predicted = logits.argmax(dim=1).flatten().cpu()
        target = labels.flatten().cpu()
        keep = target != self.ignore_index
        self.confusion += torch.bincount(target[keep] * k + predicted[keep], minlength=k * k).view(k, k)
        if log_depth is not None:
            valid = depth > 0
            if valid.any():
                error = (log_depth.float()[valid].exp() - depth[valid]).abs() / depth[valid]
                self.depth_abs_rel += float(error.sum())
                self.depth_pixels += int(valid.sum())

    def summary(self) -> dict:
        """Pixel accuracy, per-class IoU (None for a class absent from the labels), mIoU, depth AbsRel."""
        confusion = self.confusion.double()
        true = confusion.diag()
        labelled, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
        union = labelled + predicted - true
        iou = {
            name: (float(true[i] / union[i]) if labelled[i] > 0 else None) for i, name in enumerate(self.classes)
        }
        present = [value for value in iou.values() if value is not None]
        total = float(confusion.sum())
        return {
            "pixels": int(total),
            "pixel_accuracy": float(true.sum()) / total if total else None,
            "miou": sum(present) / len(present) if present else None,
            "iou": iou,
            "depth_abs_rel": self.depth_abs_rel / self.depth_pixels if self.depth_pixels else None,
        }
