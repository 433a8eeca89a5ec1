"""Single camera images with their per-pixel labels, for pretraining the image backbone.

Which images belong to a split comes from the prepared cache (``LabelCache``, the split machinery
every BEV run uses), not from the label index: a label file can never move an image into another
split, and an image of the validation towns is never in the train set. Images are prepared
exactly as :class:`~bridgeta.data.dataset.BEVMapDataset` prepares them for the model (same resize
and crop to the model's input, same normalisation, the same image augmentation in training), so
the backbone is pretrained on the inputs it will see; labels follow the same matrix, nearest
neighbour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bridgeta.data.augment import apply_image_aug_nearest, sample_image_aug
from bridgeta.data.cache import LabelCache
from bridgeta.data.camera_labels import IGNORE_INDEX, CameraLabelError, read_index
from bridgeta.data.config import DataConfig
from bridgeta.data.dataset import DataFileError, load_image
from bridgeta.data.epoch import EpochStreams, SharedEpoch


class CameraLabelDataset(EpochStreams, Dataset):
    """The labelled camera images of ``split``: ``{"image", "semantic", "depth"}`` per item.

    ``image``: ``(3, H, W)`` float, normalised; ``semantic``: ``(H, W)`` int64 class index
    (``IGNORE_INDEX`` where unlabelled or outside the source image); ``depth``: ``(H, W)`` float32
    metres, 0 where unknown. ``H, W`` is ``image_size``, the camera model's input.
    """

    def __init__(
        self, config: DataConfig, image_size: tuple[int, int], split: str, train: bool = False, seed: int = 0
    ) -> None:
        self.config = config
        self.image_size = tuple(image_size)
        self.split = split
        self.train = train
        self.seed = seed
        self._epoch = SharedEpoch()  # read by the loader workers (data/epoch.py)
        self.dataroot = Path(config.dataroot).expanduser()
        self.cache = LabelCache(config.resolved_cache_dir())
        self.index = read_index(self.dataroot)
        self.classes = self.index.classes
        items, locations = [], set()
        for cache_index in self.cache.indices(split)[:: config.load_interval]:
            record = self.cache.record(int(cache_index))
            # The cache's split, checked per record: training on a validation town must be impossible.
            if record["split"] != split:
                raise AssertionError(f"sample {record['token']} is in split {record['split']}, not {split}")
            for camera_index, camera in enumerate(record["cameras"]):
                if camera["path"] in self.index.rows:
                    items.append((int(cache_index), camera_index))
                    locations.add(record["location"])
        self.items = np.array(items, dtype=np.int64).reshape(-1, 2)
        self.locations = tuple(sorted(locations))
        mean, std = torch.tensor(config.mean).view(3, 1, 1), torch.tensor(config.std).view(3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), mean / std

    def __len__(self) -> int:
        return len(self.items)

    def image_path(self, index: int) -> str:
        """The image (relative to the dataroot) of item ``index``."""
        cache_index, camera_index = self.items[index]
        return self.cache.record(int(cache_index))["cameras"][int(camera_index)]["path"]

    def missing_files(self) -> list[Path]:
        """Every image and label file this dataset would read that does not exist."""
        missing = []
        for index in range(len(self)):
            image = self.image_path(index)
            row = self.index.rows[image]
            paths = [image, row.semantic] + ([row.depth] if row.depth is not None else [])
            missing += [self.dataroot / path for path in paths if not (self.dataroot / path).is_file()]
        return missing

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        cache_index, camera_index = (int(v) for v in self.items[index])
        camera = self.cache.record(cache_index)["cameras"][camera_index]
        row = self.index.rows[camera["path"]]
        original_size = (camera["height"], camera["width"])
        rng = np.random.default_rng([self.seed, self.augment_epoch, cache_index, camera_index])
        matrix = sample_image_aug(rng, original_size, self.image_size, self.config.augment, self.train)
        try:
            image = load_image(self.dataroot / camera["path"], matrix, original_size, self.image_size)
        except DataFileError as exc:
            raise DataFileError(f"camera label item {camera['path']}: {exc}") from None
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()
        semantic = self.index.semantic(row)
        depth = self.index.depth(row)
        for name, labels in (("semantic", semantic), ("depth", depth)):
            if labels is not None and labels.shape != original_size:
                raise CameraLabelError(
                    f"{self.dataroot / getattr(row, name)}: {labels.shape[0]}x{labels.shape[1]}, "
                    f"the image is {original_size[0]}x{original_size[1]}"
                )
        unknown = (semantic >= len(self.classes)) & (semantic != IGNORE_INDEX)
        if unknown.any():
            raise CameraLabelError(
                f"{self.dataroot / row.semantic}: class id {int(semantic[unknown][0])} is not one of the "
                f"{len(self.classes)} classes of the index (nor the ignore value {IGNORE_INDEX})"
            )
        semantic = apply_image_aug_nearest(Image.fromarray(semantic), matrix, self.image_size, IGNORE_INDEX)
        if depth is None:
            depth_out = np.zeros(self.image_size, dtype=np.float32)
        else:
            warped = apply_image_aug_nearest(Image.fromarray(depth), matrix, self.image_size, 0.0)
            depth_out = np.array(warped, dtype=np.float32)
        return {
            "image": pixels.mul_(self._scale).sub_(self._shift),
            "semantic": torch.from_numpy(np.array(semantic, dtype=np.int64)),
            "depth": torch.from_numpy(depth_out),
        }
