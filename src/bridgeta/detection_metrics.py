"""The nuScenes detection metric (mAP, ATE, ASE, AOE, AVE, AAE, NDS), computed by the devkit.

Nothing here re-implements the metric. Matching, AP and the TP errors are
``nuscenes.eval.detection``'s own (``DetectionEval.evaluate``); this module only chooses what it
runs on:

* **Official nuScenes** (a predefined split such as ``val`` on ``v1.0-trainval``): the split's
  scenes from the devkit's ``create_splits_scenes`` and the official config
  (``detection_cvpr_2019``, all ten classes).
* **Our towns** (a dataroot with ``bridgeta_splits.json``, whose ``train``/``val``/``test`` are
  *not* nuScenes' predefined scenes): our split's samples, and the official config restricted to
  the classes the world contains. The mean over classes is then a mean over those classes; with
  all ten official classes it would count the absent ones as AP 0.

Both load boxes with the devkit's own ``load_gt_of_sample_tokens`` /
``load_prediction_of_sample_tokens`` (its custom-split path), add centre distances and filter
them with its ``add_center_dist`` / ``filter_eval_boxes``, and score them with
``DetectionEval.evaluate``.

Predictions are the nuScenes submission JSON (``{"meta": {...}, "results": {sample_token:
[box, ...]}}``, boxes in the global frame); :func:`write_submission` writes it and
:func:`check_submission` rejects a malformed file with the file and key named, before any
evaluation starts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bridgeta.files import atomic_write_text

SPLITS_FILE = "bridgeta_splits.json"
# The nuScenes detection classes our synthetic towns contain (docs/data.md).
SYNTH_DETECTION_CLASSES = ("car", "truck", "bus", "pedestrian")
BOX_KEYS = ("sample_token", "translation", "size", "rotation", "velocity", "detection_name", "detection_score",
            "attribute_name")
DEFAULT_META = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False}


class SubmissionError(ValueError):
    """A detection results file that is not a valid nuScenes submission (names the file and key)."""


def detection_config(class_names: Sequence[str] | None = None):
    """The official ``detection_cvpr_2019`` config, restricted to ``class_names`` if given."""
    from nuscenes.eval.common.config import config_factory

    config = config_factory("detection_cvpr_2019")
    if class_names is None:
        return config
    unknown = sorted(set(class_names) - set(config.class_range))
    if unknown:
        raise ValueError(f"unknown detection classes {unknown}; nuScenes has {sorted(config.class_range)}")
    # DetectionConfig insists on all ten ranges; the metric loops (and its means) run over
    # ``class_names``, so restricting that list is what restricts the mean.
    config.class_names = [name for name in config.class_range if name in set(class_names)]
    return config


def split_sample_tokens(nusc, dataroot: str | Path, split: str) -> list[str]:
    """Sample tokens of ``split``: our towns' split when the dataroot has ``bridgeta_splits.json``."""
    splits_path = Path(dataroot) / SPLITS_FILE
    if not splits_path.is_file():
        raise FileNotFoundError(f"{splits_path} is missing: not a bridgeta world (official splits go through "
                                "the official evaluation)")
    splits = json.loads(splits_path.read_text())
    if split not in splits:
        raise ValueError(f"{splits_path} has no split '{split}' (it has {sorted(splits)})")
    scenes = set(splits[split])
    return [s["token"] for s in nusc.sample if nusc.get("scene", s["scene_token"])["name"] in scenes]


def check_submission(path: str | Path, sample_tokens: Sequence[str], max_boxes: int = 500) -> None:
    """Raise :class:`SubmissionError` naming ``path`` and the offending key unless the file is a
    submission with a box list for every sample of the split and only well-formed boxes."""
    from nuscenes.eval.detection.constants import ATTRIBUTE_NAMES, DETECTION_NAMES

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SubmissionError(f"{path}: no such results file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SubmissionError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or not isinstance(data.get("meta"), dict):
        raise SubmissionError(f"{path}: a submission is {{'meta': {{...}}, 'results': {{sample_token: [boxes]}}}}")
    results = data["results"]
    missing = [token for token in sample_tokens if token not in results]
    if missing:
        raise SubmissionError(f"{path}: results has no entry for {len(missing)} samples of the split "
                              f"(first: {missing[0]}); give every sample a list, empty if it has no box")
    for token in sample_tokens:
        boxes = results[token]
        if not isinstance(boxes, list) or len(boxes) > max_boxes:
            raise SubmissionError(f"{path}: results[{token!r}] must be a list of at most {max_boxes} boxes")
        for i, box in enumerate(boxes):
            where = f"{path}: results[{token!r}][{i}]"
            absent = [k for k in BOX_KEYS if not isinstance(box, dict) or k not in box]
            if absent:
                raise SubmissionError(f"{where} lacks {absent}")
            if box["sample_token"] != token:
                raise SubmissionError(f"{where}.sample_token is {box['sample_token']!r}, listed under {token!r}")
            for key, size in (("translation", 3), ("size", 3), ("rotation", 4), ("velocity", 2)):
                value = box[key]
                if not (isinstance(value, list) and len(value) == size and all(_finite(v) for v in value)):
                    raise SubmissionError(f"{where}.{key} must be {size} finite numbers, got {value!r}")
            if box["detection_name"] not in DETECTION_NAMES:
                raise SubmissionError(f"{where}.detection_name {box['detection_name']!r} is not a nuScenes class")
            if box["attribute_name"] not in ("", *ATTRIBUTE_NAMES):
                raise SubmissionError(f"{where}.attribute_name {box['attribute_name']!r} is not a nuScenes attribute")
            if not _finite(box["detection_score"]):
                raise SubmissionError(f"{where}.detection_score must be a finite number")


def _within(boxes, band: tuple[float, float]):
    """The EvalBoxes whose centre's ego distance lies in ``[near, far)`` (every sample kept)."""
    near, far = band
    for token in boxes.sample_tokens:
        boxes.boxes[token] = [box for box in boxes[token] if near <= box.ego_dist < far]
    return boxes


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Speed (m/s) above which a predicted box is given the moving attribute (CenterPoint's rule).
MOVING_ATTRIBUTE_SPEED = 0.2
_DEFAULT_ATTRIBUTE = {
    "car": ("vehicle.moving", "vehicle.parked"), "truck": ("vehicle.moving", "vehicle.parked"),
    "bus": ("vehicle.moving", "vehicle.stopped"), "trailer": ("vehicle.moving", "vehicle.parked"),
    "construction_vehicle": ("vehicle.moving", "vehicle.parked"),
    "pedestrian": ("pedestrian.moving", "pedestrian.standing"),
    "motorcycle": ("cycle.with_rider", "cycle.without_rider"), "bicycle": ("cycle.with_rider", "cycle.without_rider"),
    "traffic_cone": ("", ""), "barrier": ("", ""),
}


def ego_boxes_to_submission(sample_token: str, global_T_ego, boxes, scores, labels, class_names: Sequence[str]) -> list[dict]:
    """Decoded boxes of one sample (``(N, 9)`` x, y, z, length, width, height, yaw, vx, vy in its
    keyframe ego frame, as numpy or torch) as submission boxes in the global frame; the attribute
    follows the predicted speed (moving above ``MOVING_ATTRIBUTE_SPEED``)."""
    import numpy as np

    from bridgeta.data.nuscenes_writer import yaw_to_quaternion

    matrix = np.asarray(global_T_ego, dtype=np.float64)
    rotation, translation = matrix[:3, :3], matrix[:3, 3]
    ego_yaw = math.atan2(rotation[1, 0], rotation[0, 0])
    out = []
    for box, score, label in zip(np.asarray(boxes, dtype=np.float64), np.asarray(scores), np.asarray(labels)):
        x, y, z, length, width, height, yaw, vx, vy = box
        centre = rotation @ np.array([x, y, z]) + translation
        velocity = rotation[:2, :2] @ np.array([vx, vy])
        name = class_names[int(label)]
        moving, still = _DEFAULT_ATTRIBUTE[name]
        out.append({
            "sample_token": sample_token,
            "translation": [float(v) for v in centre],
            "size": [float(width), float(length), float(height)],
            "rotation": yaw_to_quaternion(yaw + ego_yaw),
            "velocity": [float(v) for v in velocity],
            "detection_name": name,
            "detection_score": float(score),
            "attribute_name": moving if math.hypot(*velocity) > MOVING_ATTRIBUTE_SPEED else still,
        })
    return out


def write_submission(path: str | Path, results: Mapping[str, list[dict]], meta: Mapping[str, bool] | None = None) -> Path:
    """Write ``{sample_token: [box dicts with BOX_KEYS]}`` as a nuScenes submission JSON."""
    payload = {"meta": {**DEFAULT_META, **(meta or {})},
               "results": {token: [{k: box[k] for k in BOX_KEYS} for box in boxes] for token, boxes in results.items()}}
    atomic_write_text(Path(path), json.dumps(payload))
    return Path(path)


def ground_truth_submission(nusc, sample_tokens: Sequence[str]) -> dict[str, list[dict]]:
    """The split's own annotations as predictions (score 1): the metric's upper bound, and a test."""
    from nuscenes.eval.common.loaders import load_gt_of_sample_tokens
    from nuscenes.eval.detection.data_classes import DetectionBox

    boxes = load_gt_of_sample_tokens(nusc, list(sample_tokens), DetectionBox)
    out = {}
    for token in sample_tokens:
        out[token] = []
        for box in boxes[token]:
            if box.num_pts == 0:  # not evaluated (filter_eval_boxes drops it): it would be a false positive
                continue
            record = box.serialize()
            # The devkit's velocity of a one-annotation track is NaN; a submission needs numbers.
            velocity = [float(v) if math.isfinite(float(v)) else 0.0 for v in record["velocity"]]
            out[token].append({**record, "translation": [float(v) for v in record["translation"]],
                               "size": [float(v) for v in record["size"]],
                               "rotation": [float(v) for v in record["rotation"]],
                               "velocity": velocity, "detection_score": 1.0})
    return out


def unclipped_ap(metric_data, config) -> dict[str, float]:
    """Per class, the mean over the distance thresholds of the devkit's ``calc_ap`` with its
    floors set to 0 (``min_recall``, ``min_precision``; the official config's are 0.1).

    The official AP counts only the precision above 10 % at recalls above 10 %, so a weak
    detector, one whose precision never reaches 10 %, scores exactly 0 whatever it finds. The
    unclipped AP is the area under the same precision curve without those floors: a diagnostic
    that still orders weak detectors (a short CPU schedule's camera students), never a figure to
    set beside published mAP."""
    from nuscenes.eval.detection.algo import calc_ap

    return {name: sum(calc_ap(metric_data[(name, threshold)], 0.0, 0.0) for threshold in config.dist_ths)
            / len(config.dist_ths) for name in config.class_names}


class NoTrueBoxes(ValueError):
    """The samples evaluated hold no annotated box: there is no detection figure to give."""


def evaluate_detections(dataroot: str | Path, version: str, split: str, results: str | Path,
                        class_names: Sequence[str] | None = None, nusc=None,
                        sample_tokens: Sequence[str] | None = None,
                        distance_band: tuple[float, float] | None = None) -> dict[str, Any]:
    """mAP, NDS and per-class AP and TP errors of a submission file on ``split``.

    ``class_names``: the classes to average over (default: on a bridgeta world, those of our
    towns' classes that the split has boxes of; all ten on official nuScenes). ``sample_tokens``
    evaluates a subset of the split (the results file still lists every sample);
    ``distance_band`` ``(near, far)`` m keeps, after the devkit's filters, only the boxes (true and
    predicted) whose centre lies that far from the ego, for figures per distance band. Returns ``{"mAP", "NDS",
    "mAP_unclipped", "tp_errors": {ATE...}, "per_class": {class: {"AP", "AP_unclipped", "ATE", "ASE", "AOE",
    "AVE", "AAE"}}, "samples", "split"}`` (``*_unclipped``: :func:`unclipped_ap`).
    """
    from bridgeta.data.devkit import DETECTION_PURPOSE, require_devkit

    require_devkit(DETECTION_PURPOSE)
    from nuscenes import NuScenes
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes, load_gt_of_sample_tokens
    from nuscenes.eval.common.loaders import load_prediction_of_sample_tokens
    from nuscenes.eval.detection.data_classes import DetectionBox
    from nuscenes.eval.detection.evaluate import DetectionEval

    dataroot = Path(dataroot)
    nusc = nusc or NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    ours = (dataroot / SPLITS_FILE).is_file()
    if ours:
        tokens = split_sample_tokens(nusc, dataroot, split)
        classes = tuple(class_names) if class_names else None
    else:
        from nuscenes.utils.splits import create_splits_scenes

        classes = tuple(class_names) if class_names else None
        scenes = set(create_splits_scenes().get(split, []))
        if not scenes:
            raise ValueError(f"'{split}' is not a nuScenes split (and {dataroot} has no {SPLITS_FILE})")
        tokens = [s["token"] for s in nusc.sample if nusc.get("scene", s["scene_token"])["name"] in scenes]
    if sample_tokens is not None:  # a subset of the split (one condition, say)
        unknown = sorted(set(sample_tokens) - set(tokens))
        if unknown:
            raise ValueError(f"sample {unknown[0]} is not in split '{split}' of {dataroot}")
        tokens = list(sample_tokens)
    if not tokens:
        raise ValueError(f"split '{split}' of {dataroot} has no samples")
    config = detection_config(classes)
    check_submission(results, tokens, config.max_boxes_per_sample)
    gt = load_gt_of_sample_tokens(nusc, tokens, DetectionBox)
    if not any(len(boxes) for boxes in gt.boxes.values()):
        raise NoTrueBoxes(f"split '{split}' of {dataroot} has no annotated box to detect")
    gt = filter_eval_boxes(nusc, add_center_dist(nusc, gt), config.class_range)
    if distance_band is not None:
        gt = _within(gt, distance_band)
    if ours and classes is None:
        # Our towns' classes that this split has boxes of: a class absent from a small synthetic
        # split would enter the mean as AP 0 whatever the predictions.
        seen = {box.detection_name for box in gt.all}
        if not seen:  # every box fell to the devkit's filters (no LiDAR point, past the range)
            raise NoTrueBoxes(f"split '{split}' of {dataroot} has no box left to detect after the "
                              "devkit's filters (points in the box, class range)")
        config = detection_config([name for name in SYNTH_DETECTION_CLASSES if name in seen])

    # The official class, with its loading done through the devkit's own per-sample-token loaders.
    evaluator = DetectionEval.__new__(DetectionEval)
    evaluator.nusc, evaluator.cfg, evaluator.verbose, evaluator.result_path = nusc, config, False, str(results)
    pred, evaluator.meta = load_prediction_of_sample_tokens(str(results), config.max_boxes_per_sample, DetectionBox,
                                                            sample_tokens=tokens)
    # The devkit's filter reads the class field off the first box, so it fails on a submission
    # without any box (an untrained or very unsure model): nothing to filter then, every AP is 0.
    has_boxes = any(len(boxes) for boxes in pred.boxes.values())
    evaluator.pred_boxes = filter_eval_boxes(nusc, add_center_dist(nusc, pred), config.class_range) if has_boxes else pred
    if distance_band is not None:
        evaluator.pred_boxes = _within(evaluator.pred_boxes, distance_band)
    evaluator.gt_boxes = gt
    evaluator.sample_tokens = evaluator.gt_boxes.sample_tokens
    metrics, metric_data = evaluator.evaluate()
    summary = metrics.serialize()
    unclipped = unclipped_ap(metric_data, config)
    names = {"trans_err": "ATE", "scale_err": "ASE", "orient_err": "AOE", "vel_err": "AVE", "attr_err": "AAE"}
    per_class = {
        name: {"AP": summary["mean_dist_aps"][name], "AP_unclipped": unclipped[name],
               **{short: summary["label_tp_errors"][name][long] for long, short in names.items()}}
        for name in config.class_names
    }
    return {
        "mAP": summary["mean_ap"],
        "NDS": summary["nd_score"],
        "mAP_unclipped": sum(unclipped.values()) / len(unclipped),  # classes: never empty (NoTrueBoxes)
        "tp_errors": {short: summary["tp_errors"][long] for long, short in names.items()},
        "per_class": per_class,
        "classes": list(config.class_names),
        "samples": len(tokens),
        "split": split,
    }
