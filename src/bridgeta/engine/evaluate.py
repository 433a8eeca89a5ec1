"""Evaluation of BEV map segmentation: the split-level IoU, broken down by condition and distance.

One pass over a split feeds several :class:`~bridgeta.metrics.MapMetric` accumulators at once:
the whole split, each driving condition (day / night / rain, read from the samples' metadata) and
each distance band around the ego origin. The result is a plain JSON-able dict (see
:func:`evaluate`), the same for ``bridgeta eval``, the trainer's periodic validation and the docs.

Distributed evaluation: every rank evaluates its own shard (:class:`ShardSampler`) and the integer
TP/FP/FN counts and sample counts are summed over ranks once, at the end. Counts sum exactly, so a
run on N processes reports the same numbers as a run on one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from bridgeta.config import ExperimentConfig
from bridgeta.data.conditions import CONDITIONS
from bridgeta.data.config import DataConfig
from bridgeta.data.dataset import BEVMapDataset, collate_bev
from bridgeta.precision import autocast_context
from bridgeta.engine.checkpoint import latest_checkpoint
from bridgeta.engine.model_file import load_model_file
from bridgeta.engine.task_metrics import MotionPlanningMetric
from bridgeta.geometry import BEVGrid
from bridgeta.metrics import MapMetric
from bridgeta.models.bev_model import BEVModel
from bridgeta.models.types import BEVInputs

# Distance bands (m from the ego origin): near, middle and far thirds of a +-50 m map.
DEFAULT_RANGES: tuple[tuple[float, float], ...] = ((0, 20), (20, 35), (35, 50))
MODEL_FILE_NAME = "model.safetensors"
DEFAULT_SPLIT = "test"

Batch = tuple[BEVInputs, torch.Tensor, list[dict[str, Any]]]


# --------------------------------------------------------------------------------------------
# Helpers shared with viz.py
# --------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under a DistributedDataParallel wrapper.

    Evaluation runs the bare module: DDP's forward may broadcast buffers, a collective per batch
    that would deadlock when ranks hold shards of different lengths.
    """
    return model.module if isinstance(model, DistributedDataParallel) else model


def resolve_model_file(checkpoint: str | Path) -> Path:
    """The model file a ``--checkpoint`` argument names.

    ``checkpoint`` is a model file, a directory holding ``model.safetensors`` (a finished run or
    one checkpoint), or a run directory without a final model, whose newest complete checkpoint
    (``checkpoints/latest``) is used.
    """
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / MODEL_FILE_NAME).is_file():
        return path / MODEL_FILE_NAME
    latest = latest_checkpoint(path)
    if latest is None or not (latest / MODEL_FILE_NAME).is_file():
        raise FileNotFoundError(f"no {MODEL_FILE_NAME} in {path}, and no complete checkpoint under it")
    return latest / MODEL_FILE_NAME


def data_config_for(
    config: ExperimentConfig, dataroot: str | Path | None = None, version: str | None = None
) -> DataConfig:
    """The config's data section with ``dataroot`` / ``version`` overrides applied.

    An override drops the embedded ``cache_dir``: that cache belongs to the data the model was
    trained on, and the default cache location follows the new dataroot and version.
    """
    if config.data is None and dataroot is None:
        raise ValueError(
            f"config '{config.name}' has no data section and no dataroot was given: "
            "pass --dataroot (and --version if it is not v1.0-trainval)"
        )
    if config.data is None:
        data = DataConfig(dataroot=str(dataroot))
        return data if version is None else replace(data, version=version)
    if dataroot is None and version is None:
        return config.data
    return replace(
        config.data,
        dataroot=str(dataroot) if dataroot is not None else config.data.dataroot,
        version=version if version is not None else config.data.version,
        cache_dir=None,
    )


def range_name(low: float, high: float) -> str:
    """``"0-20"``: the key of a distance band in the results."""
    return f"{low:g}-{high:g}"


def distance_band_masks(
    grid: BEVGrid, ranges: Sequence[tuple[float, float]], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """``{"low-high": (X, Y) bool}``: cells whose centre lies ``low <= d < high`` m from the ego.

    ``d`` is the Euclidean distance in the ego XY plane from the ego origin to the cell centre.
    """
    for low, high in ranges:
        if not 0 <= low < high:
            raise ValueError(f"distance range ({low}, {high}) must satisfy 0 <= low < high")
    x = grid.cell_centers("x", dtype=torch.float64)
    y = grid.cell_centers("y", dtype=torch.float64)
    distance = torch.hypot(x[:, None], y[None, :])
    return {
        range_name(low, high): ((distance >= low) & (distance < high)).to(device)
        for low, high in ranges
    }


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...``: each sample on exactly one rank, none repeated.

    ``DistributedSampler`` pads the last round with repeated samples so that every rank gets as
    many batches (which DDP training needs); evaluation has no per-batch collective, so shards may
    differ in length, and padding would count samples twice.
    """

    def __init__(self, length: int, world_size: int | None = None, rank: int | None = None) -> None:
        self.length = length
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.rank = dist.get_rank() if rank is None else rank
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def build_eval_loader(
    config: ExperimentConfig,
    model: nn.Module,
    split: str,
    batch_size: int,
    num_workers: int,
    distributed: bool,
) -> DataLoader:
    """A loader over ``split`` of ``config.data`` with the test-time transform, for ``model``.

    Grid, classes and modalities come from the model, so the labels match its logits and only the
    sensor files it reads are opened. ``distributed``: this rank's shard (:class:`ShardSampler`).
    """
    if config.data is None:
        raise ValueError(f"config '{config.name}' has no data section: set data.dataroot")
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
    network = unwrap_model(model)
    dataset = BEVMapDataset.for_model(config.data, network, split, seed=config.train.seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=ShardSampler(len(dataset)) if distributed else None,
        num_workers=num_workers,
        collate_fn=collate_bev,
    )


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _summary(metric: MapMetric) -> dict[str, Any]:
    result = metric.compute()
    return {"miou": result["miou"], "iou": result["iou"], "miou_at_0.5": result["miou_at_0.5"]}


def _empty_summary() -> dict[str, Any]:
    return {"miou": None, "iou": None, "miou_at_0.5": None}


@torch.inference_mode()  # the counts were made under inference mode; only there may they change
def _all_reduce(metrics: list[MapMetric], samples: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum every metric's counts and the sample counts over ranks, in one collective."""
    counts = torch.stack([m.counts().to(device) for m in metrics])
    flat = torch.cat([counts.flatten(), samples.to(device)])
    dist.all_reduce(flat)
    reduced = flat[: counts.numel()].view_as(counts)
    for metric, summed in zip(metrics, reduced):
        metric.reset()
        metric.add_counts(summed)
    return flat[counts.numel() :].cpu()


def _gather_splits(splits: set[str]) -> set[str]:
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(splits))
    return {name for names in gathered if names for name in names}


def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    device: torch.device | str,
    classes: Sequence[str],
    ranges: Sequence[tuple[float, float]] = DEFAULT_RANGES,
    precision: str = "fp32",
) -> dict[str, Any]:
    """IoU of ``model`` over every batch of ``loader``: overall, per condition, per distance band.

    ``model`` returns outputs with ``.logits`` ``(B, K, X, Y)`` and has ``output_grid`` (the
    :class:`BEVGrid` of its logits, which places the distance bands); ``loader`` yields
    ``collate_bev`` batches. The model is put in eval mode for the pass and given back in the mode
    it came in (the trainer validates mid-training).

    Returns (JSON-able)::

        {"miou": float,            # mean over classes of IoU at each class's best threshold
         "iou": {class: float},
         "miou_at_0.5": float, "iou_at_0.5": {class: float},
         "by_condition": {"day" | "night" | "rain":
                          {"miou", "iou", "miou_at_0.5", "samples"}},
         "by_range": {"0-20" | ...: {"miou", "iou", "miou_at_0.5"}},
         "samples": int,           # over all ranks
         "split": str}             # from the samples' metadata; "+"-joined if several

    A condition with no samples has ``None`` (JSON ``null``) for ``miou``, ``iou`` and
    ``miou_at_0.5`` and ``samples: 0``, rather than a misleading IoU of 0; so has a distance band
    that no cell of the grid falls in. Thresholds and the IoU protocol are :class:`MapMetric`'s.

    With an initialised ``torch.distributed`` process group, each rank passes its own shard and
    every rank returns the result over all shards.
    """
    device = torch.device(device)
    network = unwrap_model(model)
    classes = tuple(classes)
    masks = distance_band_masks(network.output_grid, ranges, device)
    overall = MapMetric(classes)
    by_condition = {name: MapMetric(classes) for name in CONDITIONS}
    by_range = {name: MapMetric(classes) for name in masks}
    condition_samples = torch.zeros(len(CONDITIONS), dtype=torch.int64)
    splits: set[str] = set()

    objects = getattr(network, "object_head", None) is not None
    tasks = MotionPlanningMetric(network)  # the motion and planning heads' figures, when present
    predictions: dict[str, list[dict]] = {}
    every_peak: dict[str, list[dict]] = {}
    conditions: dict[str, str] = {}
    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode():
            for inputs, labels, metas in loader:
                with autocast_context(device, precision):
                    outputs = network(inputs.to(device))
                logits = outputs.logits
                if objects:
                    _collect_detections(network, outputs, metas, predictions, conditions, every_peak)
                tasks.update(outputs, metas, device)
                probabilities = logits.float().sigmoid()
                labels = labels.to(device, non_blocking=True)
                overall.update(probabilities, labels)
                for name, mask in masks.items():
                    by_range[name].update(probabilities, labels, mask.expand(len(labels), *mask.shape))
                rows: dict[str, list[int]] = {}
                for i, meta in enumerate(metas):
                    rows.setdefault(meta["condition"], []).append(i)
                unknown = sorted(set(rows) - set(CONDITIONS))
                if unknown:
                    raise ValueError(f"unknown condition {unknown} in the metadata; known: {CONDITIONS}")
                for k, name in enumerate(CONDITIONS):
                    if name in rows:
                        index = torch.tensor(rows[name], device=device)
                        by_condition[name].update(probabilities[index], labels[index])
                        condition_samples[k] += len(rows[name])
                splits.update(meta["split"] for meta in metas)
    finally:
        network.train(was_training)

    metrics = [overall, *by_condition.values(), *by_range.values()]
    if dist.is_available() and dist.is_initialized():
        condition_samples = _all_reduce(metrics, condition_samples, device)
        splits = _gather_splits(splits)
    samples = int(condition_samples.sum())
    if samples == 0:
        raise ValueError("the loader yielded no samples: nothing to evaluate")

    result = overall.compute()
    detection = None
    if objects and predictions:
        detection = _detection_metrics(loader, network, predictions, conditions, every_peak)
    conditions_out: dict[str, Any] = {}
    for k, name in enumerate(CONDITIONS):
        count = int(condition_samples[k])
        summary = _summary(by_condition[name]) if count else _empty_summary()
        conditions_out[name] = {**summary, "samples": count}
    return {
        "miou": result["miou"],
        "iou": result["iou"],
        "miou_at_0.5": result["miou_at_0.5"],
        "iou_at_0.5": result["iou_at_0.5"],
        "by_condition": conditions_out,
        "by_range": {
            name: _summary(by_range[name]) if bool(masks[name].any()) else _empty_summary()
            for name in masks
        },
        "samples": samples,
        "split": "+".join(sorted(splits)),
        **({"detection": detection} if detection is not None else {}),
        # Motion and planning: one process only (each rank would score its own shard).
        **(tasks.compute() if tasks.active and not (dist.is_available() and dist.is_initialized()) else {}),
    }


def _collect_detections(network: nn.Module, outputs: Any, metas: list[dict], predictions: dict, conditions: dict,
                        every_peak: dict | None = None) -> None:
    """Decode a batch's object maps into submission boxes (global frame), per sample token:
    ``predictions`` at the head's score threshold (what ``predict`` writes and the official
    figures score), ``every_peak`` (when given) with every top-K peak (score threshold 0), for
    the unclipped mAP: a threshold cuts the precision-recall curve where a weak detector's scores
    stop."""
    from bridgeta.detection_metrics import ego_boxes_to_submission
    from bridgeta.models.object_head import decode_with

    settings = network.config.heads.object
    targets = ((predictions, None),) if every_peak is None else ((predictions, None), (every_peak, 0.0))
    for target, threshold in targets:
        decoded = decode_with(settings, outputs.objects, network.feature_grid, score_threshold=threshold)
        for meta, sample in zip(metas, decoded):
            target[meta["token"]] = ego_boxes_to_submission(
                meta["token"], meta["global_T_ego"], sample["boxes"].cpu().numpy(), sample["scores"].cpu().numpy(),
                sample["labels"].cpu().numpy(), network.object_classes,
            )
    for meta in metas:
        conditions[meta["token"]] = meta["condition"]


def _detection_metrics(loader: Iterable[Batch], network: nn.Module, predictions: dict, conditions: dict,
                       every_peak: dict) -> dict | None:
    """The devkit's detection metric of the collected predictions, overall and per condition;
    the unclipped mAP (overall and per class) from every top-K peak (``every_peak``).

    Needs the loader's dataset (for the dataroot and split) and one process: under DDP each rank
    holds a shard of the predictions, so the detection figures are left to ``bridgeta
    eval-detections`` on a gathered file."""
    import tempfile

    from bridgeta.detection_metrics import NoTrueBoxes, evaluate_detections, write_submission

    dataset = getattr(loader, "dataset", None)
    if dataset is None or (dist.is_available() and dist.is_initialized()):
        return None
    from nuscenes import NuScenes

    nusc = NuScenes(version=dataset.config.version, dataroot=str(dataset.dataroot), verbose=False)
    with tempfile.TemporaryDirectory() as scratch:
        path = write_submission(Path(scratch) / "results.json", predictions,
                                {"use_camera": "camera" in dataset.modalities, "use_lidar": "lidar" in dataset.modalities})
        try:
            overall = evaluate_detections(dataset.dataroot, dataset.config.version, dataset.split, path, nusc=nusc,
                                          sample_tokens=list(predictions))
        except NoTrueBoxes:  # no annotated box in these samples: no detection figure at all
            return None
        peaks = write_submission(Path(scratch) / "every_peak.json", every_peak,
                                 {"use_camera": "camera" in dataset.modalities, "use_lidar": "lidar" in dataset.modalities})
        unclipped = evaluate_detections(dataset.dataroot, dataset.config.version, dataset.split, peaks, nusc=nusc,
                                        sample_tokens=list(every_peak))
        overall["mAP_unclipped"] = unclipped["mAP_unclipped"]
        overall["unclipped_from"] = "every top-K peak (score threshold 0)"
        for name, row in overall["per_class"].items():
            row["AP_unclipped"] = unclipped["per_class"][name]["AP_unclipped"]

        def brief(**options) -> dict | None:
            try:
                result = evaluate_detections(dataset.dataroot, dataset.config.version, dataset.split, path,
                                             nusc=nusc, **options)
            except ValueError:  # e.g. a subset the split does not hold
                return None
            if not result["classes"]:  # no true box there: no figure rather than a mean over nothing
                return None
            return {k: v for k, v in result.items() if k in ("mAP", "NDS", "samples", "classes")}

        by_condition = {}
        for name in CONDITIONS:
            tokens = [t for t, c in conditions.items() if c == name]
            by_condition[name] = brief(sample_tokens=tokens) if tokens else None
        by_range = {range_name(low, high): brief(sample_tokens=list(predictions), distance_band=(low, high))
                    for low, high in DEFAULT_RANGES}
    return {**overall, "by_condition": by_condition, "by_range": by_range}


def evaluate_checkpoint_model(model: nn.Module, config: ExperimentConfig, split: str) -> dict[str, Any]:
    """:func:`evaluate` on ``split`` of ``config.data`` with the training settings (trainer use).

    Batch size, workers and precision are ``config.train``'s: periodic validation should cost what
    a training step costs, not more. Under ``torch.distributed`` each rank evaluates its shard.
    """
    distributed = dist.is_available() and dist.is_initialized()
    loader = build_eval_loader(
        config, model, split, config.train.batch_size, config.train.num_workers, distributed
    )
    device = next(unwrap_model(model).parameters()).device
    classes = unwrap_model(model).classes
    return evaluate(model, loader, device, classes, precision=config.train.precision)


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataroot: str | Path | None = None,
    version: str | None = None,
    split: str | None = None,
    batch_size: int = 2,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """``bridgeta eval``: load a model file and evaluate it on a split (default ``test``).

    ``checkpoint`` is a model file, or a checkpoint / run directory holding one (see
    :func:`resolve_model_file`). Data settings come from the config embedded in the model file;
    ``dataroot``, ``version`` and ``split`` override them. The split defaults to ``test`` rather
    than the embedded ``data.split``, which is the split the model was trained on. Runs in fp32
    unless ``precision`` says otherwise: reported numbers should not depend on the machine's
    mixed-precision support (``bench precision`` evaluates a frozen teacher in bf16 on purpose).
    """
    distributed = dist.is_available() and dist.is_initialized()
    model, loader, device = _model_and_loader(checkpoint, dataroot, version, split, batch_size, num_workers,
                                              device, distributed)
    return evaluate(model, loader, device, model.classes, precision=precision)


def _model_and_loader(
    checkpoint: str | Path, dataroot: str | Path | None, version: str | None, split: str | None,
    batch_size: int, num_workers: int, device: str | torch.device | None, distributed: bool,
) -> tuple[BEVModel, DataLoader, torch.device]:
    """A model file's model on ``device`` and a test-time loader over ``split`` (default ``test``)
    of its embedded data, ``dataroot`` and ``version`` overriding it; errors name the file."""
    path = resolve_model_file(checkpoint)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config = load_model_file(path, map_location=device)
    try:
        data = data_config_for(config, dataroot, version)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    config = replace(config, data=data)
    loader = build_eval_loader(config, model, split or DEFAULT_SPLIT, batch_size, num_workers, distributed)
    if len(loader.dataset) == 0:
        raise ValueError(f"split '{split or DEFAULT_SPLIT}' of {data.dataroot} has no samples")
    return model, loader, device


def evaluate_assistant(
    model_file: str | Path, split: str = "val", batch_size: int = 2, device: str | torch.device | None = None
) -> dict[str, Any]:
    """The teacher assistant of a BridgeTA run (its distiller model file) evaluated on ``split``.

    The TA reads the teacher's LiDAR BEV, so the teacher named by the run's ``distill.teacher``
    must still be there. In fp32, like :func:`evaluate_checkpoint`.
    """
    from bridgeta.distill import build_distiller
    from bridgeta.distill.bridgeta import AssistantView, BridgeTADistiller
    from bridgeta.engine.model_file import DISTILLER_KIND, read_model_file, without_pretrained
    from bridgeta.engine.trainer import load_teacher
    from bridgeta.models.bev_model import build_model

    path = resolve_model_file(model_file)
    config, state, kind = read_model_file(path)
    if kind != DISTILLER_KIND or config.distill is None or config.distill.method != "bridgeta":
        raise ValueError(f"{path}: not a BridgeTA distillation run, so it has no teacher assistant")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = without_pretrained(config)
    distiller = build_distiller(config, build_model(config), load_teacher(config))
    assert isinstance(distiller, BridgeTADistiller)
    distiller.load_state_dict(state)
    view = AssistantView(distiller).to(device)
    loader = build_eval_loader(config, view, split, batch_size, 0, distributed=False)
    if len(loader.dataset) == 0:
        raise ValueError(f"split '{split}' of {config.data.dataroot} has no samples")
    return evaluate(view, loader, device, view.classes)


def predict_detections(
    checkpoint: str | Path, out: str | Path, split: str | None = None, dataroot: str | Path | None = None,
    version: str | None = None, batch_size: int = 2, device: str | torch.device | None = None,
) -> tuple[Path, int]:
    """Decode a model's object head over ``split`` and write the nuScenes submission JSON
    (global frame, every sample listed); returns the file and the number of boxes. The file is
    what ``bridgeta eval-detections`` (or the official devkit) scores."""
    from bridgeta.detection_metrics import write_submission

    model, loader, device = _model_and_loader(checkpoint, dataroot, version, split, batch_size, 0, device, False)
    if model.object_head is None:
        raise ValueError(f"{resolve_model_file(checkpoint)}: the model has no object head (model.heads.object): "
                         "nothing to detect")
    predictions: dict[str, list[dict]] = {}
    model.eval()
    with torch.inference_mode():
        for inputs, _, metas in loader:
            _collect_detections(model, model(inputs.to(device)), metas, predictions, {})
    meta = {"use_camera": "camera" in model.modalities, "use_lidar": "lidar" in model.modalities}
    written = write_submission(out, predictions, meta)
    return written, sum(len(boxes) for boxes in predictions.values())
