"""Data and augmentation settings: plain dataclasses, part of the experiment config.

Kept free of heavy imports so :mod:`bridgeta.config` can include them in the schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# BEVFusion's test-time resize of 900x1600 nuScenes images for its 256x704 input.
_BEVFUSION_TEST_SCALE = 0.48
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How often a training sample's augmentation is drawn (AugmentConfig.draws).
AUGMENT_DRAWS = ("every_epoch", "once")


@dataclass
class AugmentConfig:
    """Training augmentation (``train=False`` always gives the test-time transform).

    Defaults are BEVFusion's map-segmentation settings (``configs/nuscenes/seg/default.yaml``).

    image / bev:       switch the image / BEV augmentation on (they only ever act in training).
    image_resize:      scale factor range relative to the test-time scale.
    image_bottom_crop: fraction of the resized height left out below the crop (BEVFusion's
                       ``bot_pct_lim``; ``(0, 0)`` keeps the bottom of the image, the road).
    image_flip:        mirror left-right with probability 1/2.
    image_rotate_deg:  rotation about the crop centre, uniform in ``[-r, r]`` degrees.
    bev_rotate_deg:    rotation about ego Z, uniform in ``[-r, r]`` degrees (BEVFusion: pi/4).
    bev_scale:         uniform scale range.
    bev_translate_std: standard deviation (m) of the translation along X, Y and Z.
    bev_flip_x / bev_flip_y: negate ego X / ego Y, each with probability 1/2.
    draws:             ``every_epoch``: a sample's augmentation is drawn anew each epoch (keyed by
                       seed, epoch and sample, so a resumed run draws what the run it continues
                       would have); ``once``: drawn once, as epoch 0's, and reused every epoch (a
                       fixed augmented copy of the data). The cpu benchmarks' recorded runs
                       trained with ``once`` (docs/results.md).
    """

    image: bool = True
    image_resize: tuple[float, float] = (0.38 / _BEVFUSION_TEST_SCALE, 0.55 / _BEVFUSION_TEST_SCALE)
    image_bottom_crop: tuple[float, float] = (0.0, 0.0)
    image_flip: bool = True
    image_rotate_deg: float = 5.4
    bev: bool = True
    bev_rotate_deg: float = 45.0
    bev_scale: tuple[float, float] = (0.9, 1.1)
    bev_translate_std: float = 0.5
    bev_flip_x: bool = True
    bev_flip_y: bool = True
    draws: Literal["every_epoch", "once"] = "every_epoch"

    def __post_init__(self) -> None:
        if self.draws not in AUGMENT_DRAWS:
            raise ValueError(f"augment.draws must be one of {', '.join(AUGMENT_DRAWS)}, got {self.draws!r}")
        for name in ("image_resize", "image_bottom_crop", "bev_scale"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"augment.{name}: need 0 <= low <= high, got {(low, high)}")
        if self.image_resize[0] <= 0 or self.bev_scale[0] <= 0:
            raise ValueError("augment.image_resize and augment.bev_scale must be > 0")
        if self.image_bottom_crop[1] >= 1:
            raise ValueError(f"augment.image_bottom_crop must be < 1, got {self.image_bottom_crop}")
        for name in ("image_rotate_deg", "bev_rotate_deg", "bev_translate_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class DataConfig:
    """Where the data is and how it is read.

    max_sweeps / max_sweep_lag: previous LiDAR sweeps added to the keyframe: at most
        ``max_sweeps`` and none older than ``max_sweep_lag`` seconds. BEVFusion uses 9 sweeps of
        20 Hz nuScenes (0.45 s); the lag cap gives the same time window on the 10 Hz synthetic world.
    load_interval: use every n-th sample of the split (BEVFusion's ``load_interval``).
    num_workers: DataLoader worker processes (for whoever builds the DataLoader).
    mean / std: image normalisation of ``[0, 1]`` RGB (ImageNet, as the pretrained backbones).
    """

    dataroot: str
    version: str = "v1.0-trainval"
    cache_dir: str | None = None
    split: str = "train"
    max_sweeps: int = 9
    max_sweep_lag: float = 0.5
    load_interval: int = 1
    num_workers: int = 4
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.dataroot, (str, Path)) or not str(self.dataroot):
            raise ValueError(f"data.dataroot must be a path, got {self.dataroot!r}")
        for name, low in (("max_sweeps", 0), ("load_interval", 1), ("num_workers", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"data.{name} must be an integer >= {low}, got {value!r}")
        if not self.max_sweep_lag >= 0:
            raise ValueError(f"data.max_sweep_lag must be >= 0, got {self.max_sweep_lag}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"data.mean / data.std must be 3 values, std > 0; got {self.mean}, {self.std}")
        if not isinstance(self.augment, AugmentConfig):
            raise ValueError(f"data.augment must be an AugmentConfig, got {type(self.augment).__name__}")

    def resolved_cache_dir(self) -> Path:
        from bridgeta.data.cache import default_cache_dir  # numpy-backed; keep this module light

        return Path(self.cache_dir) if self.cache_dir else default_cache_dir(self.dataroot, self.version)
