"""``bridgeta calibrate-detections``: per-class Platt scaling of the object head's scores.

A CenterPoint heatmap gives each class its own sigmoid, trained with a focal loss on that class's
Gaussians, so a score of 0.4 on a car and on a pedestrian need not mean the same chance of being
right. Calibration fits, per class, ``score = sigmoid(a * logit + b)`` on a split the model did
not train on (validation): the detections the decoder returns at inference (its top-K, score
threshold and NMS, all on raw scores) are matched greedily by score to the unmatched true box of
their class nearest their centre, within ``MATCH_DISTANCE`` m (the middle of nuScenes' 0.5/1/2/4 m
thresholds), and ``(a, b)`` minimise the binary cross-entropy of those matches against Platt's
smoothed targets (``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``), which keeps a separable class
finite; ``a`` stays within ``A_RANGE``. Decoding selects boxes on raw scores and only reports the
calibrated ones, so which boxes come out and each class's AP do not change: what changes is what a
score means, the same across classes, for a user's cut-off or a tracker.

The result is a new model file: the same weights, with ``model.heads.object.score_calibration``
set, which ``decode`` (eval, predict, viz) then applies. The report gives, per class, the fitted
pair, the number of detections and of true matches, and the expected calibration error (10 bins)
before and after; the latter on the detections it was fitted on (in sample).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

MATCH_DISTANCE = 2.0
BINS = 10
A_RANGE = (1e-2, 1e2)


def match_peaks(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, true_boxes: torch.Tensor,
                true_labels: torch.Tensor, distance: float = MATCH_DISTANCE) -> torch.Tensor:
    """Whether each detection is a true positive (:func:`~bridgeta.models.object_head.match_detections`)."""
    from bridgeta.models.object_head import match_detections

    return match_detections(boxes, scores, labels, true_boxes, true_labels, distance) >= 0


def fit_platt(logits: torch.Tensor, hits: torch.Tensor, steps: int = 200) -> tuple[float, float] | None:
    """``(a, b)`` minimising the BCE of ``sigmoid(a * logit + b)`` against ``hits``, or None when
    the class has only hits or only misses (nothing to fit: its scores stay raw)."""
    if len(hits) == 0 or bool(hits.all()) or not bool(hits.any()):
        return None
    z = logits.double()
    positives, negatives = int(hits.sum()), int((~hits).sum())
    y = torch.where(hits, (positives + 1) / (positives + 2), 1 / (negatives + 2)).double()  # Platt's targets
    low, high = (torch.tensor(v, dtype=torch.float64).log() for v in A_RANGE)
    log_a = torch.zeros((), dtype=torch.float64, requires_grad=True)  # a = exp(log_a) > 0
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_a, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(log_a.clamp(low, high).exp() * z + b, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_a.detach().clamp(low, high).exp()), float(b.detach())


def calibration_error(scores: torch.Tensor, hits: torch.Tensor, bins: int = BINS) -> float | None:
    """Expected calibration error: over equal-width score bins, the sample-weighted mean gap
    between the mean score and the share of hits."""
    if len(scores) == 0:
        return None
    index = (scores * bins).long().clamp(0, bins - 1)
    error = 0.0
    for k in range(bins):
        members = index == k
        if members.any():
            error += float(members.float().mean()) * abs(float(scores[members].mean()) - float(hits[members].float().mean()))
    return error


def collect_peaks(model, loader, device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per class: the heatmap logit of every detection the decoder returns at inference (raw
    scores: the calibration is being fitted), and whether it matches a true box."""
    from bridgeta.models.object_head import decode_with

    settings = replace(model.config.heads.object, score_calibration=())
    logits: dict[int, list[torch.Tensor]] = {k: [] for k in range(len(model.object_classes))}
    hits: dict[int, list[torch.Tensor]] = {k: [] for k in range(len(model.object_classes))}
    model.eval()
    with torch.inference_mode():
        for inputs, _, metas in loader:
            outputs = model(inputs.to(device))
            for meta, sample in zip(metas, decode_with(settings, outputs.objects, model.feature_grid)):
                truth = meta["objects"]
                matched = match_peaks(sample["boxes"], sample["scores"], sample["labels"], truth["boxes"].float(),
                                      truth["labels"])
                raw = sample["logits"].double().cpu()
                for k in logits:
                    members = (sample["labels"] == k).cpu()
                    logits[k].append(raw[members])
                    hits[k].append(matched[members])
    return {k: (torch.cat(logits[k]), torch.cat(hits[k])) for k in logits}


def calibrate_detections(checkpoint: str | Path, out: str | Path, split: str = "val", dataroot: str | Path | None = None,
                         version: str | None = None, batch_size: int = 2,
                         device: str | torch.device | None = None) -> dict[str, Any]:
    """Fit the per-class scaling on ``split`` and write the calibrated model file ``out``; returns
    the report (per class: ``a``, ``b``, ``detections``, ``matches``, ``ece_before``,
    ``ece_after_in_sample``)."""
    from bridgeta.engine.evaluate import _model_and_loader, resolve_model_file
    from bridgeta.engine.model_file import read_model_file, save_model_file

    source = resolve_model_file(checkpoint)
    model, loader, device = _model_and_loader(source, dataroot, version, split, batch_size, 0, device, False)
    if model.object_head is None:
        raise ValueError(f"{source}: the model has no object head (model.heads.object): nothing to calibrate")
    if loader.dataset.split == "train":
        raise ValueError("calibrate on a split the model did not train on (val), not 'train'")
    peaks = collect_peaks(model, loader, device)
    table, report = [], {}
    for k, name in enumerate(model.object_classes):
        z, y = peaks[k]
        fitted = fit_platt(z, y)
        a, b = fitted if fitted is not None else (1.0, 0.0)
        table.append([a, b])
        report[name] = {
            "a": a, "b": b, "fitted": fitted is not None, "detections": int(len(z)), "matches": int(y.sum()),
            "ece_before": calibration_error(torch.sigmoid(z), y),
            "ece_after_in_sample": calibration_error(torch.sigmoid(a * z + b), y),
        }
    # The file's own config (it keeps the backbone-pretraining record the loaded model drops).
    experiment, _, _ = read_model_file(source)
    heads = experiment.model.heads
    heads = replace(heads, object=replace(heads.object, score_calibration=tuple(map(tuple, table))))
    experiment = replace(experiment, model=replace(experiment.model, heads=heads))
    path = save_model_file(out, model.cpu(), experiment, kind="model")
    return {"source": str(source), "out": str(path), "split": loader.dataset.split, "classes": report}
