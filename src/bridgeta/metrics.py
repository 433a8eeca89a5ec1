"""BEV map segmentation IoU, accumulated over a whole split (BEVFusion's ``evaluate_map`` protocol).

Protocol (mit-han-lab/bevfusion, ``mmdet3d/datasets/nuscenes_dataset.py::evaluate_map``): for
every class and every threshold in ``(0.35, 0.40, ..., 0.65)`` a cell is predicted positive when
``probability >= threshold``; TP/FP/FN are summed over *all* cells of *all* samples of the split
(not averaged per sample); ``IoU = TP / (TP + FP + FN)``; a class's score is its maximum IoU over
the thresholds (``iou@max``) and the reported mIoU is the mean of those maxima.

Differences from that code, all deliberate:

* counts are int64 (BEVFusion sums float32 tensors, which stop counting exactly past 2**24 cells,
  i.e. after a few hundred 200x200 samples);
* IoU is ``TP / max(TP + FP + FN, 1)`` instead of ``TP / (TP + FP + FN + 1e-7)``: the same 0 for a
  class with no ground truth and no prediction at a threshold, without the epsilon's bias elsewhere;
* an optional ``valid_mask`` excludes cells from all counts.

Thresholds are kept as a float32 tensor, as in BEVFusion, so a probability that equals the float32
value of a threshold counts as positive at that threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bridgeta.losses import expand_valid_mask

DEFAULT_THRESHOLDS = (0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65)


class MapMetric:
    """Per-class, per-threshold TP/FP/FN counts of BEV map predictions, summed over updates.

    For distributed evaluation, all-reduce the counts and load them back::

        counts = metric.counts()
        torch.distributed.all_reduce(counts)
        metric.reset()
        metric.add_counts(counts)

    The counts live on the device of the latest :meth:`update`, so no host transfer happens until
    :meth:`compute`.
    """

    def __init__(self, classes: Sequence[str], thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> None:
        if len(classes) == 0 or len(thresholds) == 0:
            raise ValueError("MapMetric needs at least one class and one threshold")
        if len(set(thresholds)) != len(thresholds):
            raise ValueError(f"thresholds must be distinct, got {tuple(thresholds)}")
        self.classes = tuple(classes)
        self.thresholds = tuple(float(t) for t in thresholds)
        self._threshold_tensor = torch.tensor(self.thresholds, dtype=torch.float32)
        self._counts = torch.zeros(3, len(self.classes), len(self.thresholds), dtype=torch.int64)

    def reset(self) -> None:
        """Forget every update (the counts stay on their current device)."""
        self._counts.zero_()

    @torch.no_grad()
    def update(
        self,
        probabilities: torch.Tensor,
        targets: torch.Tensor,
        valid_mask: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: ``probabilities`` in ``[0, 1]`` and boolean ``targets``, both ``(B, K, X, Y)``.

        ``valid_mask`` (bool, ``(B, X, Y)``, ``(B, 1, X, Y)`` or ``(B, K, X, Y)``; true = counted)
        drops cells from every count.
        """
        if probabilities.dim() != 4 or probabilities.shape[1] != len(self.classes):
            raise ValueError(
                f"probabilities must be (B, {len(self.classes)}, X, Y), got {tuple(probabilities.shape)}"
            )
        if targets.shape != probabilities.shape:
            raise ValueError(f"targets {tuple(targets.shape)} differ from {tuple(probabilities.shape)}")
        num_classes = len(self.classes)
        # (K, N): one row per class, every cell of every sample in the batch.
        probs = probabilities.detach().transpose(0, 1).reshape(num_classes, -1)
        labels = targets.detach().bool().transpose(0, 1).reshape(num_classes, -1)
        thresholds = self._threshold_tensor.to(probs.device)
        predicted = probs.unsqueeze(-1) >= thresholds  # (K, N, T)
        if valid_mask is not None:
            valid = expand_valid_mask(valid_mask.bool(), probabilities.shape)
            valid = valid.transpose(0, 1).reshape(num_classes, -1)
            predicted &= valid.unsqueeze(-1)
            labels = labels & valid
        labels = labels.unsqueeze(-1)
        tp = (predicted & labels).sum(dim=1)
        fp = predicted.sum(dim=1) - tp
        fn = labels.sum(dim=1) - tp
        self._counts = self._counts.to(probs.device) + torch.stack([tp, fp, fn])

    def counts(self) -> torch.Tensor:
        """A copy of the int64 counts ``(3, K, T)``: TP, FP, FN per class and threshold."""
        return self._counts.clone()

    def add_counts(self, counts: torch.Tensor) -> None:
        """Add counts from :meth:`counts` of a metric with the same classes and thresholds."""
        if counts.shape != self._counts.shape:
            raise ValueError(f"counts must have shape {tuple(self._counts.shape)}, got {tuple(counts.shape)}")
        self._counts = self._counts + counts.to(device=self._counts.device, dtype=torch.int64)

    def merge(self, other: "MapMetric") -> "MapMetric":
        """Add ``other``'s counts into this metric (same classes and thresholds); returns ``self``."""
        if other.classes != self.classes or other.thresholds != self.thresholds:
            raise ValueError("cannot merge MapMetric objects with different classes or thresholds")
        self.add_counts(other._counts)
        return self

    def compute(self) -> dict:
        """IoU summary of everything accumulated since the last :meth:`reset`.

        Keys:

        * ``iou``: ``{class: max over thresholds of IoU}`` (BEVFusion's ``iou@max``);
        * ``miou``: mean of ``iou`` over classes;
        * ``best_threshold``: ``{class: threshold reaching iou}``; ties go to the lowest threshold
          (so a class that is empty at every threshold reports the lowest one);
        * ``iou_at_0.5`` / ``miou_at_0.5``: the same at the 0.5 threshold, present only when 0.5 is
          one of the thresholds;
        * ``iou_per_threshold``: float64 ``(K, T)``; ``thresholds``: the thresholds in order;
        * ``tp``, ``fp``, ``fn``: int64 ``(K, T)`` on the CPU.

        A class with ``TP + FP + FN == 0`` at a threshold (no ground truth, no prediction) has IoU 0
        there, as in BEVFusion, so it lowers the mIoU rather than being skipped.
        """
        tp, fp, fn = self._counts.cpu()
        iou = tp.double() / (tp + fp + fn).clamp_min(1).double()
        best_iou, best_index = iou.max(dim=1)
        result: dict = {
            "iou": {name: best_iou[k].item() for k, name in enumerate(self.classes)},
            "miou": best_iou.mean().item(),
            "best_threshold": {
                name: self.thresholds[best_index[k].item()] for k, name in enumerate(self.classes)
            },
            "iou_per_threshold": iou,
            "thresholds": self.thresholds,
            "tp": tp,
            "fp": fp,
            "fn": fn,
        }
        if 0.5 in self.thresholds:
            at_half = iou[:, self.thresholds.index(0.5)]
            result["iou_at_0.5"] = {name: at_half[k].item() for k, name in enumerate(self.classes)}
            result["miou_at_0.5"] = at_half.mean().item()
        return result

