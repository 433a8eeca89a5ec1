"""Plain-YAML configs validated against dataclasses.

A config file is parsed with ``yaml.safe_load`` (no tags, no code) and converted field by field
into the dataclasses below. An unknown or mistyped key is an error that names the file and the
dotted key; so is a value of the wrong type. A file may start from a preset or another file with
``base: NAME_OR_PATH``; its keys then override the base's, recursively.

Presets live in ``bridgeta/configs/<name>.yaml`` and are addressable by name everywhere a config is
accepted (``bridgeta info --config bevfusion-c``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from bridgeta.data.config import DataConfig
from bridgeta.geometry import BEVGrid

PRESET_DIR = Path(__file__).parent / "configs"

MAP_CLASSES = (
    "drivable_area",
    "ped_crossing",
    "walkway",
    "stop_line",
    "carpark_area",
    "divider",
)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and key."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass
class GridConfig:
    """``(min, max, step)`` per axis, metres, ego frame (see docs/conventions.md)."""

    x: tuple[float, float, float]
    y: tuple[float, float, float]
    z: tuple[float, float, float] = (-10.0, 10.0, 20.0)

    def build(self) -> BEVGrid:
        return BEVGrid(self.x, self.y, self.z)


@dataclass
class BackboneConfig:
    type: Literal["resnet18", "resnet34", "resnet50", "swin_t"]
    # Stage indices whose outputs feed the neck (0 = stride 4 ... 3 = stride 32).
    out_indices: list[int] = field(default_factory=lambda: [1, 2, 3])
    drop_path_rate: float = 0.0
    # Local checkpoint file (torchvision ResNet or official Swin-T); nothing is ever downloaded.
    pretrained: str | None = None


@dataclass
class NeckConfig:
    """GeneralizedLSSFPN (BEVFusion): top-down concat + 1x1 + 3x3 convs."""

    out_channels: int = 256


@dataclass
class DepthNetConfig:
    """What predicts each feature cell's depth bins and context features before the lift.

    ``conv``: BEVFusion's single 1x1 conv on the neck features. ``camera_aware``: BEVDepth's
    DepthNet (models/depth_net.py): a 3x3 reduction, then the 27 camera parameters BEVDepth
    feeds (intrinsics, image and BEV augmentation, camera-to-ego) gate the context and depth
    features through SE layers, and the depth branch adds ``blocks`` residual blocks, an
    optional ASPP and an optional deformable conv before its 1x1 output. A 1x1 conv sees nothing
    of the camera a feature came from (intrinsics, pose, augmentation); BEVDepth gives it that.
    An override replaces the whole mapping: set one key with a dotted path
    (``model.camera.vtransform.depth_net.blocks=2``).
    """

    type: Literal["conv", "camera_aware"] = "conv"
    mid_channels: int = 64
    blocks: int = 3
    aspp: bool = True
    deform: bool = True


@dataclass
class ViewTransformConfig:
    """LSS lift-splat: depth distribution x context features, pooled on ``model.grid``."""

    out_channels: int = 80
    depth: tuple[float, float, float] = (1.0, 60.0, 0.5)
    # Stride of the neck level used for lifting (BEVFusion uses the stride-8 FPN output).
    feature_stride: int = 8
    # 1 or 2: BEVFusion's three-conv block that halves the pooled BEV resolution.
    downsample: int = 1
    # With downsample 1: one conv3x3-BN-ReLU after pooling, so that F_cam is a normalised
    # feature (as BEVFusion-C's downsample block makes it) and not a raw sum of lifted features;
    # distillation compares F_cam with BN-ReLU fuser outputs (METHOD.md §1, comparable levels).
    normalize: bool = False
    # "predicted": the softmax of the depth logits (LSS). "lidar": a one-hot distribution at the
    # projected LiDAR depth (CameraInputs.depth, the "depth" modality), MonoTAKD's teaching
    # assistant: the same network, lifted where the LiDAR says the surface is.
    depth_source: Literal["predicted", "lidar"] = "predicted"
    # BEVDepth's explicit depth supervision: > 0 adds ``depth/bce``, this weight times the binary
    # cross-entropy between the predicted depth distribution and the one-hot projected LiDAR depth
    # (summed over bins, averaged over the feature cells with a return; BEVDepth uses 3.0). It
    # trains the depth net; the deployed network is unchanged and reads no LiDAR.
    depth_loss_weight: float = 0.0
    depth_net: DepthNetConfig = field(default_factory=DepthNetConfig)


@dataclass
class CameraEncoderConfig:
    image_size: tuple[int, int]  # (H, W) of the network input
    backbone: BackboneConfig
    num_cameras: int = 6
    neck: NeckConfig = field(default_factory=NeckConfig)
    vtransform: ViewTransformConfig = field(default_factory=ViewTransformConfig)
    # A camera-encoder file (``camera_encoder.safetensors`` of ``bridgeta pretrain-backbone`` with
    # ``pretrain.lift_depth``): backbone, neck and LSS depth net start from it. Set this or
    # ``backbone.pretrained``, not both.
    pretrained: str | None = None


@dataclass
class LidarEncoderConfig:
    """Dynamic pillars on ``model.grid`` (x/y), scattered to BEV, then a small conv backbone."""

    point_features: int = 5  # x, y, z, intensity, time_lag
    z_range: tuple[float, float] = (-5.0, 3.0)
    pillar_channels: int = 64
    # Conv BEV backbone after the scatter; stride 2 in the first block when downsample == 2.
    channels: list[int] = field(default_factory=lambda: [128, 256])
    out_channels: int = 256
    downsample: int = 1


@dataclass
class FuserConfig:
    """ConvFuser: concat(camera, lidar) -> conv3x3 -> BN -> ReLU."""

    out_channels: int = 80


@dataclass
class DecoderConfig:
    """GeneralizedResNet stages then LSSFPN (BEVFusion's map-segmentation decoder)."""

    # One [num_blocks, channels, stride] per residual stage.
    blocks: list[tuple[int, int, int]] = field(
        default_factory=lambda: [(2, 160, 2), (2, 320, 2), (2, 640, 1)]
    )
    # LSSFPN: the deep stage is upsampled to the shallow one, concatenated, fused.
    in_indices: tuple[int, int] = (-1, 0)
    out_channels: int = 256
    scale_factor: int = 2


@dataclass
class HeadConfig:
    """The map-segmentation head (BEVFusion's); ``weight`` scales its loss in a multi-head model."""

    output_grid: GridConfig
    classes: tuple[str, ...] = MAP_CLASSES
    weight: float = 1.0


# The nuScenes detection classes (nuscenes.eval.detection.constants.DETECTION_NAMES).
DETECTION_NAMES = ("car", "truck", "bus", "trailer", "construction_vehicle", "pedestrian", "motorcycle",
                   "bicycle", "traffic_cone", "barrier")


@dataclass
class ObjectLossWeights:
    """Weights of the object head's terms: the heatmap focal loss and each L1 regression group."""

    heatmap: float = 1.0
    offset: float = 1.0
    height: float = 1.0
    size: float = 1.0
    rotation: float = 1.0
    velocity: float = 0.2  # CenterPoint's code weight for velocity


@dataclass
class ObjectHeadConfig:
    """A CenterPoint-style 3D object head on the decoded BEV (bridgeta/models/object_head.py).

    ``classes``: nuScenes detection classes (our towns have car, truck, bus, pedestrian);
    ``nms_radius``: circle-NMS radius in metres per class, 0 for none: CenterPoint's nuScenes
    values, whose ``min_radius`` (4, 12, 10, 0.175 for car, truck, bus, pedestrian) are thresholds
    on the *squared* centre distance, so the metres are their square roots; ``weight`` scales the
    head's loss against the map head's.
    """

    classes: tuple[str, ...] = ("car", "truck", "bus", "pedestrian")
    head_channels: int = 64
    max_objects: int = 500  # CenterPoint's: a box past the cap gets no Gaussian (trained as background)
    min_radius: int = 2
    weight: float = 1.0
    losses: ObjectLossWeights = field(default_factory=ObjectLossWeights)
    top_k: int = 100
    score_threshold: float = 0.1
    nms_radius: tuple[float, ...] = (2.0, 3.46, 3.16, 0.42)
    # Per-class Platt scaling of the heatmap logits, ``[a, b]`` per class: the score is
    # ``sigmoid(a * logit + b)``, so that scores of different classes mean the same precision.
    # ``bridgeta calibrate-detections`` fits it on validation; empty: the raw sigmoid.
    score_calibration: tuple[tuple[float, float], ...] = ()


@dataclass
class MotionHeadConfig:
    """Motion forecasting (bridgeta/models/motion_head.py): ``modes`` trajectories of ``steps``
    keyframes (2 Hz) per agent, read at the object head's centre cells, so it needs
    ``model.heads.object``. ``weight`` scales the trajectory L1, ``mode_weight`` the cross-entropy
    of the mode logits."""

    modes: int = 6
    steps: int = 6
    head_channels: int = 32
    weight: float = 1.0
    mode_weight: float = 0.5


@dataclass
class PlanningHeadConfig:
    """Command-conditioned ego planning (bridgeta/models/motion_head.py): ``steps`` keyframes
    (2 Hz) per command from the pooled BEV; ``weight`` scales its L1."""

    steps: int = 6
    head_channels: int = 32
    hidden: int = 128
    weight: float = 1.0


@dataclass
class ResidualConfig:
    """MonoTAKD's student modules (bridgeta/models/residual.py): a residual branch on the camera
    BEV (conv1x1, then SAM unless ``sam: false``) and, with ``ffm``, the fusion of the camera BEV
    with it before the decoder. Camera-only models; with ``ffm`` they run at inference, without
    it the branch is a training-only module (CMRD's regressor) and exports leave it out."""

    sam: bool = True
    ffm: bool = True


@dataclass
class OccupancyHeadConfig:
    """Future occupancy of agents (bridgeta/models/occupancy_head.py): per BEV cell and future
    keyframe (2 Hz, ``steps``), whether an agent's box covers it; rasterised from the annotated
    boxes and tracks, so it needs ``model.heads.object``. ``weight`` scales its focal loss."""

    steps: int = 6
    head_channels: int = 32
    weight: float = 1.0


@dataclass
class HeadsConfig:
    """The model's heads, by name, all on the decoded BEV: ``map`` (map segmentation, always),
    ``object`` (3D objects, CenterPoint-style), ``motion`` (the agents' futures), ``occupancy``
    (where agents will be) and ``plan`` (the ego's path); the last three need ``object``. A
    map-only model names ``map`` alone. Each head's loss terms are named by head (``seg/...``,
    ``object/...``, ``motion/...``, ``occupancy/...``, ``plan/...``) and weighted by its
    ``weight``."""

    map: HeadConfig
    object: ObjectHeadConfig | None = None
    motion: MotionHeadConfig | None = None
    occupancy: OccupancyHeadConfig | None = None
    plan: PlanningHeadConfig | None = None


@dataclass
class ModelConfig:
    # The BEV pooling grid; encoders with ``downsample: 2`` produce features on grid.downsample(2).
    grid: GridConfig
    heads: HeadsConfig
    camera: CameraEncoderConfig | None = None
    lidar: LidarEncoderConfig | None = None
    fuser: FuserConfig | None = None
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    residual: ResidualConfig | None = None


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr`` (per optimiser step)."""

    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 50
    min_lr_ratio: float = 1e-3
    # Global gradient-norm clip (BEVFusion: 35); null disables it.
    grad_clip: float | None = 35.0


@dataclass
class TrainConfig:
    """How a model is trained. Global batch = batch_size x grad_accumulation x processes."""

    epochs: int = 20
    batch_size: int = 2  # per process
    grad_accumulation: int = 1
    # "auto": bf16 autocast on a CUDA device that supports it or a CPU with native bf16
    # (AVX512-BF16 / AMX), fp32 elsewhere (bridgeta.precision).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # "auto": channels-last on a CPU that trains in bf16 (faster oneDNN kernels), else contiguous.
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    seed: int = 0
    # Deterministic algorithms and seeded workers: bit-exact resume on CPU.
    deterministic: bool = False
    num_workers: int = 2
    log_every: int = 10  # optimiser steps between log lines
    eval_every: int = 1  # epochs between validation runs; 0 = only at the end
    # Optimiser steps between validation runs, in addition to ``eval_every`` (0: none), so that
    # a short schedule still draws a validation curve.
    eval_every_steps: int = 0
    checkpoint_every: int = 0  # optimiser steps between checkpoints; 0 = at the end of each epoch
    max_steps: int | None = None  # stop after this many optimiser steps (quick runs)
    # Start the data stream (sample order and augmentation) where a run of this many optimiser
    # steps, with the same seed, batch size and accumulation, left it: a staged recipe's later
    # stage goes on to the samples its previous stage had not reached instead of replaying the
    # same ones. The step count and learning-rate schedule still start at 0.
    data_start_step: int = 0
    eval_split: str = "val"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class PretrainOptimizerConfig(OptimizerConfig):
    """The BEV optimiser's settings with the pretraining's defaults (its own class, so that
    overriding one key, e.g. ``pretrain.optimizer.warmup_steps``, keeps these for the others)."""

    lr: float = 1e-3
    warmup_steps: int = 20


@dataclass
class PretrainConfig:
    """``bridgeta pretrain-backbone``: the camera backbone trained per pixel on the camera labels.

    A light head on the backbone's feature maps predicts the class of every pixel (cross-entropy)
    and, with ``depth``, its log-depth (L1 on the pixels that have a depth, weighted by
    ``depth_weight``). Only the train split is trained on; the summary is measured on
    ``train.eval_split``. Precision, seed and loader workers come from ``train``. ``batch_size``
    counts images (a BEV sample holds six).
    """

    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 16
    head_channels: int = 64
    depth: bool = True
    depth_weight: float = 1.0
    # Also train the neck and the LSS depth net of ``model.camera`` on the depth bins of the label
    # depth (BEVDepth's depth BCE, weighted by ``lift_depth_weight``) and write
    # ``camera_encoder.safetensors`` next to the backbone: a camera model then starts with a depth
    # distribution that already points at surfaces (``model.camera.pretrained``).
    lift_depth: bool = False
    lift_depth_weight: float = 1.0
    log_every: int = 10
    optimizer: PretrainOptimizerConfig = field(default_factory=PretrainOptimizerConfig)


@dataclass
class LevelWeights:
    """lambda_1..3 of the feature, decoded and logit levels, and the CrossKD term's own weight.

    The levels differ in size by orders of magnitude (channels x cells), so each has its own
    weight; ``lld_aux`` weighs the CrossKD-style KL inside L_LLD (its share is logged too).
    """

    fld: float = 1.0
    dld: float = 1.0
    lld: float = 1.0
    lld_aux: float = 1.0


@dataclass
class MonoTAKDConfig:
    """MonoTAKD (METHOD.md §3; docs/methods/monotakd.md): ``L = L_seg + imd L_IMD + cmrd L_CMRD +
    logit L_logit``.

    assistant: the camera teaching assistant's model file or run (``bridgeta train-assistant``:
    the student's camera network lifting with projected LiDAR depth); required to train.
    ta_source: where the TA's BEV comes from during distillation: ``frozen``, the trained TA
    (frozen, eval mode) on its own image features; ``shared``, the image features of the
    student's own forward in the step, detached and lifted again with the LiDAR depth (the public
    code's forward, without its TA block and SAM).
    threshold: CMRD keeps residual entries of at least ``threshold`` x the sample's largest.
    init_from_assistant: the student starts from the TA's weights (the public code's stage 2).
    assistant_imitation: read by ``train-assistant`` (not by the distillation run): the weight of
    the TA's CMKD-style imitation of the teacher's fused BEV (the ``feature_kd`` loss on the TA
    network), which puts the TA's channels in the teacher's feature space so that CMRD's
    channel-wise residual compares like with like; 0 trains the TA on the map labels alone.
    """

    assistant: str | None = None
    imd: float = 1.0
    cmrd: float = 0.2
    logit: float = 1.0
    threshold: float = 0.6
    ta_source: Literal["frozen", "shared"] = "frozen"
    init_from_assistant: bool = True
    assistant_imitation: float = 1.0


@dataclass
class TinyBEVHeadWeights:
    """Weights of TinyBEV's output terms per head (each times ``TinyBEVConfig.output``)."""

    map: float = 1.0
    heatmap: float = 1.0
    box: float = 1.0
    motion: float = 1.0
    occupancy: float = 1.0
    plan: float = 1.0


@dataclass
class TinyBEVConfig:
    """TinyBEV (METHOD.md §4; docs/methods/tinybev.md): ``L = L_tasks + feature L_feat + output
    L_out``, each distillation term weighted per cell by the region weights when ``region`` is on.

    feature: weight of the BEV feature MSE through the learned adapters (``levels``: ``fld`` the
    student's camera BEV to the teacher's fused BEV, ``dld`` decoded to decoded).
    output: weight of the output terms; ``heads`` scales each head's (map KL, object heatmap KL,
    box regression, motion, occupancy KL, planning).
    confidence: the teacher's detections above this score are the cells where boxes and
    trajectories are distilled.
    region: the adaptive region-aware weights (S3). ``region_floor`` is the weight every cell keeps
    before normalisation, so background still counts.
    init_from: the previous stage's run or model file; the student starts from it (S2 from S1,
    S3 from S2), and the adapters from the previous stage's where its file has them.
    """

    feature: float = 1.0
    output: float = 1.0
    levels: tuple[Literal["fld", "dld"], ...] = ("fld", "dld")
    heads: TinyBEVHeadWeights = field(default_factory=TinyBEVHeadWeights)
    confidence: float = 0.3
    region: bool = False
    region_floor: float = 0.1
    init_from: str | None = None


@dataclass
class DistillConfig:
    """Knowledge distillation of ``model`` (the student) from a frozen teacher.

    method: a name in ``bridgeta.distill.DISTILLERS`` (bridgeta, direct, feature_kd, logit_kd, monotakd,
    tinybev).
    teacher: the teacher's model file (self-describing safetensors); required to train.
    Levels (BridgeTA, METHOD.md §1): FLD (fused/camera BEV), DLD (decoded BEV), LLD (logits;
    ``lld_aux`` adds the CrossKD-style KL through the teacher's and TA's heads). ``weights`` are
    lambda_1..3 of L = L_seg + l1 L_FLD + l2 L_DLD + l3 L_LLD.
    epsilon: "optimal" uses eps* = sqrt(L_t2ta / L_ta2s) per batch and level, detached and
    clamped to ``epsilon_range``; "fixed" uses ``epsilon_fixed`` (the paper's Figure 5 ablation).
    """

    method: str = "bridgeta"
    teacher: str | None = None
    levels: tuple[Literal["fld", "dld", "lld"], ...] = ("fld", "dld", "lld")
    weights: LevelWeights = field(default_factory=LevelWeights)
    lld_aux: bool = True
    temperature: float = 1.0
    epsilon: Literal["optimal", "fixed"] = "optimal"
    epsilon_fixed: float = 1.0
    epsilon_range: tuple[float, float] = (0.01, 100.0)
    # TA losses send gradients into the student's camera BEV ("adapts its own camera features").
    ta_grad_to_student: bool = True
    # False (the spec): L_ta2s trains the student only, the TA side is a detached target. True:
    # the mutual ablation, where L_ta2s also pulls the TA toward the student.
    ta_mutual: bool = False
    # The TA's fuser, decoder and head: fresh ("scratch") or copied from the teacher's ("teacher").
    ta_init: Literal["scratch", "teacher"] = "scratch"
    # The CrossKD probe through the TA head: "eval" (running BatchNorm statistics, as a fixed
    # probe) or "train" (the student's batch statistics; the earlier behaviour, an ablation).
    ta_probe_mode: Literal["eval", "train"] = "eval"
    # Weight of the TA's own segmentation loss (it is trained jointly with the student).
    ta_seg_weight: float = 1.0
    # Optional relational term (pairwise BEV-cell affinity), our reading of the paper's intro.
    relational_weight: float = 0.0
    # The frozen teacher's forward precision (it runs without autograd): "auto" is bf16 autocast
    # where the device computes bf16 natively (docs/distill.md gives the measured tolerance).
    teacher_precision: Literal["auto", "fp32", "bf16"] = "auto"
    # MonoTAKD's settings (method: monotakd); absent for the other methods.
    monotakd: MonoTAKDConfig | None = None
    # TinyBEV's settings (method: tinybev).
    tinybev: TinyBEVConfig | None = None


@dataclass
class ExperimentConfig:
    model: ModelConfig
    name: str = "unnamed"
    description: str = ""
    # Where the data is; presets leave it out (set it with --dataroot or data.dataroot=...).
    data: DataConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    # Present when this experiment distils ``model`` from a teacher.
    distill: DistillConfig | None = None
    # Settings of ``bridgeta pretrain-backbone`` (defaults when absent); training ignores them.
    pretrain: PretrainConfig | None = None


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: no type matched: {errors}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build_dataclass(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_type = args[0] if args else Any
        items = [_convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 (PyYAML) reads "1e-3" as a string; accept scientific notation for float fields.
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")  # pragma: no cover


def _build_dataclass(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}' (valid keys here: {', '.join(sorted(known))})"
        )
    kwargs = {}
    for name, spec in known.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{key}'")
    return cls(**kwargs)


def to_dict(config: Any) -> Any:
    """Plain YAML-able structure of a config (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return config


def list_presets() -> list[str]:
    """Model presets (one architecture and training recipe each)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def list_distill_presets() -> list[str]:
    """Distillation recipes, named ``distill/<name>``: a student preset plus a ``distill`` section."""
    return sorted(f"distill/{p.stem}" for p in (PRESET_DIR / "distill").glob("*.yaml"))


def _resolve_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    candidate = Path(name_or_path)
    if relative_to is not None and not candidate.is_absolute():
        sibling = relative_to.parent / candidate
        if sibling.is_file():
            return sibling
    if candidate.is_file():
        return candidate
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(
        f"config '{name_or_path}' is neither a file nor a preset "
        f"(presets: {', '.join(list_presets())})"
    )


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# The keys that named the heads before ``model.heads`` (files, presets and runs of earlier
# versions): each is read as its head under ``model.heads``.
LEGACY_HEAD_KEYS = {"head": "map", "object_head": "object", "motion_head": "motion", "planning_head": "plan"}


def migrate_legacy_heads(data: dict, where: str) -> dict:
    """``data`` (a raw config mapping) with a ``model`` section's legacy head keys moved under
    ``model.heads``; naming one head both ways is an error."""
    model = data.get("model")
    if not isinstance(model, dict) or not any(key in model for key in LEGACY_HEAD_KEYS):
        return data
    model = dict(model)
    if not isinstance(model.get("heads") or {}, dict):
        raise ConfigError(f"{where}: 'model.heads' must be a mapping of heads, got {model['heads']!r}")
    heads = dict(model.get("heads") or {})
    for old, new in LEGACY_HEAD_KEYS.items():
        if old in model:
            if new in heads:
                raise ConfigError(f"{where}: 'model.{old}' and 'model.heads.{new}' name the same head; keep one")
            heads[new] = model.pop(old)
    model["heads"] = heads
    return {**data, "model": model}


def load_raw(name_or_path: str | Path, _chain: tuple[Path, ...] = ()) -> tuple[dict, Path]:
    """Read a config (following ``base:``) into a plain dict; returns it and its file."""
    path = _resolve_path(name_or_path, _chain[-1] if _chain else None).resolve()
    if path in _chain:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    data = migrate_legacy_heads(data, str(path))
    base = data.pop("base", None)
    if base is not None:
        base_data, _ = load_raw(base, _chain + (path,))
        data = _deep_merge(base_data, data)
    return data, path


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, value = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML: {exc}") from exc
    keys = key.strip().split(".")
    if len(keys) >= 2 and keys[0] == "model" and keys[1] in LEGACY_HEAD_KEYS:  # an earlier version's name
        keys = ["model", "heads", LEGACY_HEAD_KEYS[keys[1]], *keys[2:]]
    return keys, parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = _deep_merge({}, data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            if node.get(key) is None:
                node[key] = {}
            if not isinstance(node[key], dict):
                raise ConfigError(f"override '{text}': '{key}' is not a mapping")
            node = node[key]
        node[keys[-1]] = value
    return data


def parse_config(data: dict, source: str = "<dict>") -> ExperimentConfig:
    data = migrate_legacy_heads(data, source)
    try:
        return _build_dataclass(ExperimentConfig, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except ValueError as exc:  # e.g. a BEV grid that is not a whole number of cells
        raise ConfigError(f"{source}: {exc}") from None


def matches_stored(path: str | Path, config: ExperimentConfig) -> bool:
    """Whether the config file ``path`` (a run's ``config.yaml``), read by this version, is
    ``config``: parsed, so keys an earlier version did not write compare at their defaults and
    legacy keys migrate. Raises ConfigError or yaml.YAMLError for a file that does not parse."""
    path = Path(path)
    stored = _as_trained(yaml.safe_load(path.read_text()), config)
    return to_dict(parse_config(stored, str(path))) == to_dict(config)


def _as_trained(stored: Any, config: ExperimentConfig) -> Any:
    """A run's stored config with the settings it trained under that its version did not write.

    ``data.augment.draws``: before it existed, the loader's persistent workers kept the epoch the
    run started in (data/epoch.py), so a run with workers drew its first epoch's augmentation in
    every epoch, which is ``once`` for a run started at step 0; without workers the loader read
    every epoch's. A run of one epoch drew the same stream either way, so it reads as ``config``
    says. (A run with workers started mid-stream, ``train.data_start_step`` past its first epoch,
    drew that epoch's stream, which neither value names; no recorded run did.)
    """
    if not isinstance(stored, dict) or not isinstance(stored.get("data"), dict):
        return stored
    augment = stored["data"].get("augment")
    if isinstance(augment, dict) and "draws" not in augment:
        train = stored.get("train") if isinstance(stored.get("train"), dict) else {}
        workers = train.get("num_workers", TrainConfig.num_workers)
        one_epoch = train.get("epochs", TrainConfig.epochs) == 1 and not train.get("data_start_step")
        if one_epoch and config.data is not None:
            draws = config.data.augment.draws
        else:
            draws = "once" if isinstance(workers, int) and workers > 0 else "every_epoch"
        stored = {**stored, "data": {**stored["data"], "augment": {**augment, "draws": draws}}}
    return stored


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a preset name or YAML file, apply ``key=value`` overrides, validate."""
    data, path = load_raw(name_or_path)
    if overrides:
        data = apply_overrides(data, overrides)
    config = parse_config(data, str(path))
    validate(config, str(path))
    return config


def validate(config: ExperimentConfig, source: str = "<config>") -> None:
    """Cross-field checks that a per-field type check cannot express."""
    model = config.model

    def fail(message: str) -> None:
        raise ConfigError(f"{source}: {message}")

    try:
        grid = model.grid.build()
        output = model.heads.map.output_grid.build()
    except ValueError as exc:
        fail(str(exc))
    if model.camera is None and model.lidar is None:
        fail("model needs at least one of 'model.camera' and 'model.lidar'")
    if model.camera is not None and model.lidar is not None and model.fuser is None:
        fail("a camera + lidar model needs 'model.fuser'")
    if model.fuser is not None and (model.camera is None or model.lidar is None):
        fail("'model.fuser' needs both 'model.camera' and 'model.lidar'")
    if model.residual is not None and (model.camera is None or model.lidar is not None):
        fail("'model.residual' (MonoTAKD's student branch) needs a camera-only model")
    heads = model.heads
    if heads.object is not None:
        objects = heads.object
        unknown = [c for c in objects.classes if c not in DETECTION_NAMES]
        if unknown or not objects.classes:
            fail(f"model.heads.object.classes: unknown class '{unknown[0] if unknown else ''}' "
                 f"(nuScenes detection classes: {', '.join(DETECTION_NAMES)})")
        if len(objects.nms_radius) != len(objects.classes):
            fail(f"model.heads.object.nms_radius must give one radius per class ({len(objects.classes)}), "
                 f"got {len(objects.nms_radius)}")
        if objects.score_calibration and (len(objects.score_calibration) != len(objects.classes) or any(
                not (math.isfinite(a) and math.isfinite(b) and a > 0) for a, b in objects.score_calibration)):
            fail(f"model.heads.object.score_calibration must give one finite [a, b] with a > 0 per class "
                 f"({len(objects.classes)}), got {list(objects.score_calibration)}")
    if heads.motion is not None and heads.object is None:
        fail("'model.heads.motion' reads the agents at the object head's centres: it needs 'model.heads.object'")
    if heads.occupancy is not None and heads.object is None:
        fail("'model.heads.occupancy' is rasterised from the annotated agents: it needs 'model.heads.object'")
    if heads.plan is not None and heads.object is None:
        fail("'model.heads.plan' is scored against the annotated agents (collisions): it needs 'model.heads.object'")
    downsamples = []
    if model.camera is not None:
        vt = model.camera.vtransform
        if vt.downsample not in (1, 2):
            fail(f"model.camera.vtransform.downsample must be 1 or 2, got {vt.downsample}")
        if vt.normalize and vt.downsample != 1:
            fail("model.camera.vtransform.normalize is for downsample 1 (downsample 2 already normalises)")
        if vt.depth_loss_weight > 0 and vt.depth_source == "lidar":
            fail("model.camera.vtransform.depth_loss_weight supervises the predicted depth; with depth_source "
                 "'lidar' the lift uses the LiDAR depth itself and predicts none")
        net = vt.depth_net
        if net.type == "camera_aware":
            if net.mid_channels < 1 or net.blocks < 0:
                fail(f"model.camera.vtransform.depth_net: mid_channels must be >= 1 and blocks >= 0, got "
                     f"{net.mid_channels} and {net.blocks}")
            if vt.depth_source == "lidar":
                # Its depth branch would get no gradient (the LiDAR depth replaces it), which
                # DistributedDataParallel refuses, and it would run for nothing.
                fail("model.camera.vtransform.depth_net 'camera_aware' predicts depth; with depth_source 'lidar' "
                     "nothing uses it: keep type 'conv' for a LiDAR-depth lift (e.g. MonoTAKD's assistant)")
            if model.camera.num_cameras < 2:
                fail("model.camera.vtransform.depth_net 'camera_aware' batch-normalises the camera parameters over "
                     f"the cameras of a batch: it needs num_cameras >= 2, got {model.camera.num_cameras}")
        downsamples.append(vt.downsample)
        height, width = model.camera.image_size
        if height % vt.feature_stride or width % vt.feature_stride:
            fail(
                f"model.camera.image_size {model.camera.image_size} must be divisible by "
                f"vtransform.feature_stride {vt.feature_stride}"
            )
        for index in model.camera.backbone.out_indices:
            if not 0 <= index <= 3:
                fail(f"model.camera.backbone.out_indices: {index} is not a stage index 0..3")
        if model.camera.pretrained and model.camera.backbone.pretrained:
            # The encoder file holds a backbone too: which one the model starts from must not
            # depend on the order the two are loaded in.
            fail("set model.camera.pretrained (a camera-encoder file: backbone, neck, depth net) or "
                 "model.camera.backbone.pretrained (a backbone file), not both")
    if model.lidar is not None:
        if model.lidar.downsample not in (1, 2):
            fail(f"model.lidar.downsample must be 1 or 2, got {model.lidar.downsample}")
        downsamples.append(model.lidar.downsample)
    if len(set(downsamples)) > 1:
        fail("camera and lidar encoders must produce the same BEV grid (equal downsample)")
    unknown = [c for c in model.heads.map.classes if c not in MAP_CLASSES]
    if unknown:
        fail(f"model.heads.map.classes: unknown class '{unknown[0]}' (known: {', '.join(MAP_CLASSES)})")
    if not grid.contains(output):
        fail("model.heads.map.output_grid must lie inside model.grid")
    for key, message in _range_errors(config):
        fail(f"{key} {message}")


def _optimizer_checks(key: str, opt: OptimizerConfig) -> list[tuple[str, Any, bool, str]]:
    return [
        (f"{key}.lr", opt.lr, math.isfinite(opt.lr) and opt.lr > 0, "> 0"),
        (f"{key}.weight_decay", opt.weight_decay, math.isfinite(opt.weight_decay) and opt.weight_decay >= 0,
         ">= 0"),
        (f"{key}.betas", opt.betas, all(0 <= b < 1 for b in opt.betas), "two values in [0, 1)"),
        (f"{key}.warmup_steps", opt.warmup_steps, opt.warmup_steps >= 0, ">= 0"),
        (f"{key}.min_lr_ratio", opt.min_lr_ratio, 0 <= opt.min_lr_ratio <= 1, "in [0, 1]"),
        (f"{key}.grad_clip", opt.grad_clip, opt.grad_clip is None or opt.grad_clip > 0, "> 0 or null"),
    ]


def _range_errors(config: ExperimentConfig) -> list[tuple[str, str]]:
    """``(dotted key, what is wrong)`` for every numeric setting outside its range.

    Checked here, where the key is known, rather than left to PyTorch (whose messages name no key)
    or to the loop (a negative interval silently checkpoints every step).
    """
    train, opt = config.train, config.train.optimizer
    checks: list[tuple[str, Any, bool, str]] = [  # key, value, valid, what it must be
        ("train.epochs", train.epochs, train.epochs >= 1, ">= 1"),
        ("train.batch_size", train.batch_size, train.batch_size >= 1, ">= 1"),
        ("train.grad_accumulation", train.grad_accumulation, train.grad_accumulation >= 1, ">= 1"),
        ("train.num_workers", train.num_workers, train.num_workers >= 0, ">= 0"),
        ("train.log_every", train.log_every, train.log_every >= 1, ">= 1"),
        ("train.eval_every", train.eval_every, train.eval_every >= 0, ">= 0 (0: only at the end)"),
        ("train.eval_every_steps", train.eval_every_steps, train.eval_every_steps >= 0, ">= 0 (0: off)"),
        ("train.checkpoint_every", train.checkpoint_every, train.checkpoint_every >= 0,
         ">= 0 (0: at the end of each epoch)"),
        ("train.max_steps", train.max_steps, train.max_steps is None or train.max_steps >= 1, ">= 1 or null"),
        ("train.seed", train.seed, train.seed >= 0, ">= 0"),
        ("train.data_start_step", train.data_start_step, train.data_start_step >= 0, ">= 0"),
        ("train.eval_split", train.eval_split, bool(train.eval_split.strip()), "a split name"),
    ] + _optimizer_checks("train.optimizer", opt)
    if config.pretrain is not None:
        p, popt = config.pretrain, config.pretrain.optimizer
        checks += [
            ("pretrain.epochs", p.epochs, p.epochs >= 1, ">= 1"),
            ("pretrain.max_steps", p.max_steps, p.max_steps is None or p.max_steps >= 1, ">= 1 or null"),
            ("pretrain.batch_size", p.batch_size, p.batch_size >= 1, ">= 1"),
            ("pretrain.head_channels", p.head_channels, p.head_channels >= 1, ">= 1"),
            ("pretrain.depth_weight", p.depth_weight, math.isfinite(p.depth_weight) and p.depth_weight >= 0, ">= 0"),
            ("pretrain.log_every", p.log_every, p.log_every >= 1, ">= 1"),
        ] + _optimizer_checks("pretrain.optimizer", popt)
    if config.distill is not None:
        d = config.distill
        low, high = d.epsilon_range
        checks += [
            ("distill.temperature", d.temperature, d.temperature > 0, "> 0"),
            ("distill.epsilon_fixed", d.epsilon_fixed, d.epsilon_fixed > 0, "> 0"),
            ("distill.epsilon_range", d.epsilon_range, 0 < low <= high, "(low, high) with 0 < low <= high"),
            ("distill.ta_seg_weight", d.ta_seg_weight, d.ta_seg_weight >= 0, ">= 0"),
            ("distill.relational_weight", d.relational_weight, d.relational_weight >= 0, ">= 0"),
        ] + [
            (f"distill.weights.{f.name}", getattr(d.weights, f.name), getattr(d.weights, f.name) >= 0, ">= 0")
            for f in dataclasses.fields(d.weights)
        ]
    objects = config.model.heads.object
    if objects is not None:
        checks += [
            ("model.heads.object.head_channels", objects.head_channels, objects.head_channels >= 1, ">= 1"),
            ("model.heads.object.max_objects", objects.max_objects, objects.max_objects >= 1, ">= 1"),
            ("model.heads.object.min_radius", objects.min_radius, objects.min_radius >= 0, ">= 0"),
            ("model.heads.object.weight", objects.weight, objects.weight >= 0, ">= 0"),
            ("model.heads.object.top_k", objects.top_k, objects.top_k >= 1, ">= 1"),
            ("model.heads.object.score_threshold", objects.score_threshold, 0 <= objects.score_threshold <= 1, "in [0, 1]"),
        ] + [(f"model.heads.object.losses.{f.name}", getattr(objects.losses, f.name), getattr(objects.losses, f.name) >= 0, ">= 0")
             for f in dataclasses.fields(objects.losses)]
    extra_sizes = {"motion": ("modes",), "occupancy": (), "plan": ("hidden",)}
    for name in ("motion", "occupancy", "plan"):
        head = getattr(config.model.heads, name)
        if head is not None:
            checks += [(f"model.heads.{name}.{key}", getattr(head, key), getattr(head, key) >= 1, ">= 1")
                       for key in ("steps", "head_channels", *extra_sizes[name])]
            checks += [(f"model.heads.{name}.{key}", getattr(head, key), getattr(head, key) >= 0, ">= 0")
                       for key in ("weight", *(("mode_weight",) if name == "motion" else ()))]
    weight = config.model.heads.map.weight
    checks.append(("model.heads.map.weight", weight, weight >= 0, ">= 0"))
    if config.model.camera is not None:
        depth_weight = config.model.camera.vtransform.depth_loss_weight
        checks.append(("model.camera.vtransform.depth_loss_weight", depth_weight,
                       math.isfinite(depth_weight) and depth_weight >= 0, ">= 0"))
    if config.pretrain is not None:
        lift = config.pretrain.lift_depth_weight
        checks.append(("pretrain.lift_depth_weight", lift, math.isfinite(lift) and lift >= 0, ">= 0"))
    if config.distill is not None:
        d = config.distill
        if d.monotakd is not None:
            m = d.monotakd
            checks += [(f"distill.monotakd.{k}", getattr(m, k), getattr(m, k) >= 0, ">= 0") for k in ("imd", "cmrd", "logit", "assistant_imitation")]
            checks.append(("distill.monotakd.threshold", m.threshold, 0 <= m.threshold < 1, "in [0, 1)"))
        if d.tinybev is not None:
            t = d.tinybev
            checks += [(f"distill.tinybev.{k}", getattr(t, k), getattr(t, k) >= 0, ">= 0")
                       for k in ("feature", "output", "region_floor")]
            checks += [(f"distill.tinybev.heads.{f.name}", getattr(t.heads, f.name), getattr(t.heads, f.name) >= 0, ">= 0")
                       for f in dataclasses.fields(t.heads)]
            checks.append(("distill.tinybev.confidence", t.confidence, 0 <= t.confidence < 1, "in [0, 1)"))
            if t.region and t.region_floor <= 0:
                checks.append(("distill.tinybev.region_floor", t.region_floor, False, "> 0 with region on"))
    return [(key, f"must be {what}, got {value!r}") for key, value, valid, what in checks if not valid]
