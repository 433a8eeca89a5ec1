"""``bridgeta pretrain-backbone``: train a preset's image backbone per pixel, once per world.

BEVFusion's camera branches start from ImageNet / nuImages weights; ours started from random ones.
This is our analog: the backbone of ``model.camera`` plus a light per-pixel head
(:class:`~bridgeta.models.pixel_head.PixelModel`) learns the camera labels of the **train split
only** (classes by cross-entropy, log-depth by L1), and ``backbone.safetensors`` holds the
backbone's weights under the keys ``load_pretrained`` reads, so any camera model, student or
teacher, starts from it with ``--set model.camera.backbone.pretrained=DIR/backbone.safetensors``.

With ``pretrain.lift_depth`` the camera encoder's neck and LSS depth net train beside it on the
same images: the depth net's softmax over the depth bins learns the label depth pooled to the
feature stride, by the depth BCE BEVDepth supervises its depth with. ``camera_encoder.safetensors``
then holds backbone, neck and depth net, and a camera model started from it
(``--set model.camera.pretrained=DIR/camera_encoder.safetensors``) lifts its first features to
surfaces instead of smearing them evenly along every ray (DD3D's argument for depth pretraining).

A small loop on purpose: the BEV trainer's building blocks (AdamW parameter groups, warm-up +
cosine schedule, precision, metrics logger, output guards) are reused, while its BEV-specific
machinery (distillers, DDP, exact resume) is not needed for a run of minutes. There is no resume:
an interrupted run is started again with ``--force``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

from bridgeta.config import ExperimentConfig, PretrainConfig, to_dict, validate
from bridgeta.data.camera_label_dataset import CameraLabelDataset
from bridgeta.data.camera_labels import IGNORE_INDEX
from bridgeta.engine.logging import METRICS_FILE, TENSORBOARD_DIR, MetricsLogger, progress_bar
from bridgeta.engine.schedule import WarmupCosineSchedule
from bridgeta.engine.trainer import CONFIG_FILE, deterministic_mode, parameter_groups
from bridgeta.files import atomic_path, atomic_write_text, check_outputs, remove_paths
from bridgeta.models.backbones import build_backbone
from bridgeta.models.bev_model import CameraEncoder
from bridgeta.models.checkpoint import load_pretrained
from bridgeta.models.lss import depth_supervision_loss, lidar_depth_distribution, pool_sparse_depth
from bridgeta.models.pixel_head import PixelHead, PixelModel, PixelOutputs
from bridgeta.pixel_metrics import PixelMetrics
from bridgeta.precision import autocast_dtype, use_channels_last
from bridgeta.provenance import environment, write_json

log = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.safetensors"
CAMERA_ENCODER_FILE = "camera_encoder.safetensors"
SUMMARY_FILE = "summary.json"
PRETRAIN_OUTPUTS = (BACKBONE_FILE, CAMERA_ENCODER_FILE, SUMMARY_FILE, METRICS_FILE, TENSORBOARD_DIR, CONFIG_FILE)
TRAIN_SPLIT = "train"
BACKBONE_KIND = "backbone"
CAMERA_ENCODER_KIND = "camera_encoder"
# What a lift-depth pretraining trains of a CameraEncoder, and so what its file holds; the
# post-pool conv (vtransform.downsample) sees no gradient there and is left to the BEV run.
ENCODER_PARTS = ("backbone.", "neck.", "vtransform.depthnet.")


def pixel_losses(outputs: PixelOutputs, semantic: torch.Tensor, depth: torch.Tensor, depth_weight: float) -> dict[str, torch.Tensor]:
    """``{"semantic": CE, "depth": depth_weight * L1(log depth)}`` in float32.

    L1 on log-depth, not on metres: a 1 m error at 5 m matters as much as 10 m at 50 m (the LSS
    depth bins are uniform, but the image is not: near pixels are most of it), and the term stays
    of the order of the cross-entropy whatever the scene's depth range. Pixels without depth (0)
    and without a class (the ignore index) do not count; a batch with none gives a zero term.
    """
    logits = outputs.semantic.float()
    labelled = semantic != IGNORE_INDEX
    if labelled.any():
        ce = F.cross_entropy(logits, semantic, ignore_index=IGNORE_INDEX)
    else:
        ce = logits.sum() * 0.0
    terms = {"semantic": ce}
    if outputs.log_depth is not None:
        valid = depth > 0
        log_depth = outputs.log_depth.float()
        if valid.any():
            l1 = (log_depth[valid] - depth[valid].log()).abs().mean()
        else:
            l1 = log_depth.sum() * 0.0
        terms["depth"] = depth_weight * l1
    return terms


class LiftDepthModel(nn.Module):
    """A camera encoder's backbone under the pixel head, and its neck and LSS depth net beside it.

    ``forward`` returns the pixel head's outputs with ``depth_bins``: the depth net's softmax over
    the depth bins, ``(B, D, fH, fW)``, exactly as the LSS lift computes it. The encoder is the
    model's own :class:`CameraEncoder`, so the weights are saved under the keys it loads.
    """

    def __init__(self, encoder: CameraEncoder, num_classes: int, channels: int = 64, depth: bool = True) -> None:
        super().__init__()
        if encoder.vtransform.camera_aware:
            raise ValueError("pretrain.lift_depth trains BEVFusion's 1x1 depth net (model.camera.vtransform.depth_net "
                             "type 'conv'); the 'camera_aware' one also reads each camera's parameters, which the "
                             "per-image camera labels do not carry")
        self.encoder = encoder
        self.head = PixelHead(list(encoder.backbone.out_channels), num_classes, channels, depth)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def forward(self, images: torch.Tensor) -> PixelOutputs:
        features = self.encoder.backbone(images)
        outputs = self.head(features, tuple(images.shape[-2:]))
        level = self.encoder.neck(features)[self.encoder.neck_level]
        bins = self.encoder.vtransform.num_depth_bins
        outputs.depth_bins = self.encoder.vtransform.depthnet(level)[:, :bins].softmax(dim=1)
        return outputs


def lift_depth_loss(model: LiftDepthModel, outputs: PixelOutputs, depth: torch.Tensor) -> torch.Tensor:
    """The LSS depth BCE (:func:`~bridgeta.models.lss.depth_supervision_loss`) of ``outputs.depth_bins``
    against the label depth ``(B, H, W)``, pooled to the feature stride as the BEV run pools LiDAR."""
    vtransform = model.encoder.vtransform
    return depth_supervision_loss(outputs.depth_bins[:, None], depth[:, None], vtransform.feature_stride,
                                  vtransform.depth_bounds)


class LiftDepthMetrics:
    """Over the feature cells with a label depth in the bins: the mean depth BCE, and the AbsRel of
    the distribution's expected depth (bin ``k`` at ``min + k * step``, as the frustum places it)."""

    def __init__(self, stride: int, bounds: tuple[float, float, float]) -> None:
        self.stride, self.bounds = stride, bounds
        self.cells, self.bce, self.abs_rel = 0, 0.0, 0.0

    def update(self, depth_bins: torch.Tensor, depth: torch.Tensor) -> None:
        target = lidar_depth_distribution(depth, self.stride, self.bounds)
        valid = target.amax(dim=1) > 0
        cells = int(valid.sum())
        if not cells:
            return
        probability = depth_bins.float()
        self.bce += float(depth_supervision_loss(probability[:, None], depth[:, None], self.stride, self.bounds)) * cells
        low, _, step = self.bounds
        centres = low + step * torch.arange(probability.shape[1], dtype=torch.float32)
        expected = (probability * centres.view(1, -1, 1, 1)).sum(dim=1)
        pooled = pool_sparse_depth(depth.float(), self.stride)
        self.abs_rel += float(((expected - pooled).abs() / pooled.clamp(min=1e-6))[valid].sum())
        self.cells += cells

    def summary(self) -> dict[str, float | int]:
        cells = max(self.cells, 1)
        return {"cells": self.cells, "bce": self.bce / cells, "abs_rel": self.abs_rel / cells}


def build_pixel_model(config: ExperimentConfig, num_classes: int) -> PixelModel | LiftDepthModel:
    """The backbone ``model.camera.backbone`` describes (from its ``pretrained`` file if set) and a
    head; with ``pretrain.lift_depth``, the whole camera encoder (:class:`LiftDepthModel`)."""
    camera = config.model.camera
    if camera is None:
        raise ValueError("the config has no camera branch (model.camera): there is no image backbone to pretrain")
    settings = config.pretrain or PretrainConfig()
    if settings.lift_depth:
        # CameraEncoder loads model.camera.backbone.pretrained / model.camera.pretrained itself.
        encoder = CameraEncoder(camera, config.model.grid.build())
        return LiftDepthModel(encoder, num_classes, settings.head_channels, settings.depth)
    spec = camera.backbone
    backbone = build_backbone(spec.type, spec.out_indices, spec.drop_path_rate)
    if spec.pretrained:  # e.g. continue from ImageNet weights
        report = load_pretrained(backbone, spec.pretrained)
        log.info("starting from %s: %s", spec.pretrained, report.summary())
    return PixelModel(backbone, num_classes, settings.head_channels, settings.depth)


def backbone_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's tensors that ``load_pretrained`` loads (its own ignore patterns left out)."""
    patterns = tuple(getattr(backbone, "pretrained_ignore", ()))
    return {
        name: tensor.detach().cpu().contiguous().clone()
        for name, tensor in backbone.state_dict().items()
        if not any(fnmatchcase(name, pattern) for pattern in patterns)
    }


def save_backbone(path: Path, backbone: nn.Module, config: ExperimentConfig, classes: tuple[str, ...]) -> Path:
    """``backbone.safetensors``: plain tensors (never unpickled), what trained it in the metadata."""
    spec = config.model.camera.backbone
    metadata = {
        "bridgeta_kind": BACKBONE_KIND,
        "backbone_type": spec.type,
        "out_indices": json.dumps(list(spec.out_indices)),
        "classes": json.dumps(list(classes)),
        "bridgeta_config": yaml.safe_dump(to_dict(config), sort_keys=False),
    }
    with atomic_path(path) as temporary:
        save_file(backbone_state(backbone), str(temporary), metadata=metadata)
    return path


def camera_encoder_state(encoder: CameraEncoder) -> dict[str, torch.Tensor]:
    """The tensors of ``ENCODER_PARTS`` under the encoder's own keys (the backbone's ignore patterns out)."""
    backbone = {f"backbone.{name}": tensor for name, tensor in backbone_state(encoder.backbone).items()}
    rest = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in encoder.state_dict().items()
            if name.startswith(ENCODER_PARTS[1:])}
    return {**backbone, **rest}


def save_camera_encoder(path: Path, encoder: CameraEncoder, config: ExperimentConfig, classes: tuple[str, ...]) -> Path:
    """``camera_encoder.safetensors``: what ``model.camera.pretrained`` loads."""
    metadata = {
        "bridgeta_kind": CAMERA_ENCODER_KIND,
        "parts": json.dumps(list(ENCODER_PARTS)),
        "classes": json.dumps(list(classes)),
        "bridgeta_config": yaml.safe_dump(to_dict(config), sort_keys=False),
    }
    with atomic_path(path) as temporary:
        save_file(camera_encoder_state(encoder), str(temporary), metadata=metadata)
    return path


@torch.no_grad()
def evaluate_pixels(model: PixelModel | LiftDepthModel, dataset: CameraLabelDataset, batch_size: int,
                    device: torch.device, precision: str, num_workers: int = 0) -> dict[str, Any]:
    """Pixel accuracy, IoU per class, mIoU and depth AbsRel over every image of ``dataset``; with a
    :class:`LiftDepthModel`, ``lift_depth``: its depth bins' :class:`LiftDepthMetrics` too."""
    was_training = model.training
    model.eval()
    metrics = PixelMetrics(dataset.classes, IGNORE_INDEX)
    lift = None
    if isinstance(model, LiftDepthModel):
        lift = LiftDepthMetrics(model.encoder.vtransform.feature_stride, model.encoder.vtransform.depth_bounds)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    dtype = autocast_dtype(precision, device)
    for batch in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outputs = model(batch["image"].to(device))
        metrics.update(outputs.semantic.float(), batch["semantic"], None if outputs.log_depth is None
                       else outputs.log_depth.float().cpu(), batch["depth"])
        if lift is not None:
            lift.update(outputs.depth_bins.float().cpu(), batch["depth"])
    model.train(was_training)
    summary = {"split": dataset.split, "images": len(dataset), **metrics.summary()}
    if lift is not None:
        summary["lift_depth"] = lift.summary()
    return summary


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pretrain_backbone(config: ExperimentConfig, out_dir: str | Path, force: bool = False) -> dict[str, Any]:
    """Pretrain ``config``'s image backbone into ``out_dir``; returns the summary it writes.

    Writes ``backbone.safetensors``, ``metrics.jsonl`` (+ ``tb/``), ``config.yaml`` and
    ``summary.json`` (steps, seconds, and the metrics on ``train.eval_split``). An ``out_dir``
    holding any of them is refused unless ``force``. Inputs are checked before anything is written.
    """
    validate(config, "the run's config")
    if config.data is None:
        raise ValueError("the config has no 'data' section: set data.dataroot (or --dataroot)")
    if config.model.camera is None:
        raise ValueError("the config has no camera branch (model.camera): there is no image backbone to pretrain")
    settings = config.pretrain or PretrainConfig()
    config = replace(config, pretrain=settings)  # config.yaml and the file record what ran
    out_dir = Path(out_dir)
    replaced = check_outputs(out_dir, PRETRAIN_OUTPUTS, force)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    with deterministic_mode(config.train.deterministic, device):
        return _run(config, settings, out_dir, replaced, device)


def _run(config: ExperimentConfig, settings: PretrainConfig, out_dir: Path, replaced: list[Path],
         device: torch.device) -> dict[str, Any]:
    started = time.perf_counter()
    train_cfg = config.train
    _seed_everything(train_cfg.seed)
    image_size = tuple(config.model.camera.image_size)
    train_set = CameraLabelDataset(config.data, image_size, TRAIN_SPLIT, train=True, seed=train_cfg.seed)
    if len(train_set) == 0:
        raise ValueError(f"split '{TRAIN_SPLIT}' of {config.data.dataroot} has no labelled camera images")
    eval_set = CameraLabelDataset(config.data, image_size, train_cfg.eval_split, train=False)
    if eval_set.split == TRAIN_SPLIT:
        raise ValueError("train.eval_split is 'train': the summary must be measured on images not trained on")
    # Every file exists and one item of each decodes: a broken dataroot stops the run before it writes.
    for dataset in (train_set, eval_set):
        missing = dataset.missing_files()
        if missing:
            more = f" and {len(missing) - 1} more files" if len(missing) > 1 else ""
            raise FileNotFoundError(f"{missing[0]} is missing{more} (camera labels of split '{dataset.split}')")
        if len(dataset):
            dataset[0]

    model = build_pixel_model(config, len(train_set.classes)).to(device).train()
    if use_channels_last(train_cfg.memory_format, train_cfg.precision, device):
        model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(train_cfg.seed)
    loader = DataLoader(
        train_set, batch_size=settings.batch_size, shuffle=True, generator=generator,
        num_workers=train_cfg.num_workers, persistent_workers=train_cfg.num_workers > 0,
        pin_memory=device.type == "cuda",
    )
    steps_per_epoch = len(loader)
    total_steps = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    opt = settings.optimizer
    optimizer = torch.optim.AdamW(parameter_groups(model, opt.weight_decay), lr=opt.lr, betas=opt.betas)
    scheduler = WarmupCosineSchedule(optimizer, opt.warmup_steps, total_steps, opt.min_lr_ratio)
    dtype = autocast_dtype(train_cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=train_cfg.precision == "fp16")

    remove_paths(replaced)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / CONFIG_FILE, yaml.safe_dump(to_dict(config), sort_keys=False))
    logger = MetricsLogger(out_dir, True, resume_step=0)
    log.info("pretraining %s on %d images of split %s (%s), %d steps",
             config.model.camera.backbone.type, len(train_set), TRAIN_SPLIT, ", ".join(train_set.locations), total_steps)
    step, window, first_loss, last_loss = 0, {}, None, math.nan
    window_steps, window_images, window_seconds = 0, 0, 0.0
    try:
        with logging_redirect_tqdm(), progress_bar(total_steps, 0, True, desc="pretrain") as bar:
            for epoch in range(settings.epochs):
                if step >= total_steps:
                    break
                train_set.set_epoch(epoch)
                for batch in loader:
                    if step >= total_steps:
                        break
                    tick = time.perf_counter()
                    images = batch["image"].to(device, non_blocking=True)
                    semantic = batch["semantic"].to(device, non_blocking=True)
                    depth = batch["depth"].to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        outputs = model(images)
                    terms = pixel_losses(outputs, semantic, depth, settings.depth_weight)
                    if settings.lift_depth:
                        terms["lift_depth"] = settings.lift_depth_weight * lift_depth_loss(model, outputs, depth)
                    loss = sum(terms.values())
                    values = {name: float(value.detach()) for name, value in terms.items()}
                    if not math.isfinite(sum(values.values())):
                        shown = ", ".join(f"{k}={v}" for k, v in values.items())
                        raise FloatingPointError(f"non-finite pretraining loss at step {step + 1}: {shown}; nothing was saved")
                    scaler.scale(loss).backward()
                    grad_norm = None
                    if opt.grad_clip is not None:
                        scaler.unscale_(optimizer)
                        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip))
                    lr = optimizer.param_groups[0]["lr"]
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    last_loss = sum(values.values())
                    first_loss = last_loss if first_loss is None else first_loss
                    for name, value in values.items():
                        window[name] = window.get(name, 0.0) + value
                    if grad_norm is not None:
                        window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm
                    window_steps += 1
                    window_images += len(images)
                    window_seconds += time.perf_counter() - tick
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                    bar.update(1)
                    if step % settings.log_every == 0 or step == total_steps:
                        row = {name: value / window_steps for name, value in window.items()}
                        row["loss"] = sum(v for k, v in row.items() if k in terms)
                        logger.log(step, {"epoch": epoch, "lr": lr, **row,
                                          "images_per_s": window_images / window_seconds if window_seconds else 0.0})
                        window, window_steps, window_images, window_seconds = {}, 0, 0, 0.0
        evaluation = None
        if len(eval_set):
            evaluation = evaluate_pixels(model, eval_set, settings.batch_size, device, train_cfg.precision)
            logger.log(step, {"eval": evaluation})
        else:
            log.warning("split %s has no labelled camera images: no evaluation", eval_set.split)
    finally:
        logger.close()
    save_backbone(out_dir / BACKBONE_FILE, model.backbone, config, train_set.classes)
    if settings.lift_depth:
        save_camera_encoder(out_dir / CAMERA_ENCODER_FILE, model.encoder, config, train_set.classes)
    summary = {
        "backbone": config.model.camera.backbone.type,
        "config": config.name,
        "dataroot": str(config.data.dataroot),
        "train_split": TRAIN_SPLIT,
        "train_locations": list(train_set.locations),
        "train_images": len(train_set),
        "classes": list(train_set.classes),
        "depth": settings.depth,
        "steps": step,
        "epochs": step / steps_per_epoch,
        "first_loss": first_loss,
        "final_loss": last_loss,
        "seconds": time.perf_counter() - started,
        "eval": evaluation,
        "backbone_file": str(out_dir / BACKBONE_FILE),
        "camera_encoder_file": str(out_dir / CAMERA_ENCODER_FILE) if settings.lift_depth else None,
        "environment": environment(),
    }
    write_json(out_dir / SUMMARY_FILE, summary)
    return summary
