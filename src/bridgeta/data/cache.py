"""Read the prepared cache of a dataroot (written by ``bridgeta.data.prepare``); no devkit needed.

Layout of a cache directory (default ``DATAROOT/.bridgeta_cache/<version>/``):

* ``meta.json``: ``format``, ``version``, ``dataroot`` (absolute), ``classes``, ``label_grid``
  (``{x, y, z}`` as ``[min, max, step]``), ``max_sweeps``, ``created`` (UTC), ``bridgeta_version``,
  ``num_samples``, ``counts`` (samples per split), ``coverage`` (per split, per class: fraction
  of label cells that are set), ``cameras`` (names, rig order).
* ``samples.json``: one record per keyframe sample, in the order of ``labels.npy``. Transforms are
  4x4 nested lists ``a_T_b`` (docs/conventions.md); paths are relative to the dataroot::

      {token, scene, split, condition, description, location, timestamp (us),
       global_T_ego,                              # LIDAR_TOP keyframe ego pose
       lidar: {path, ego_T_lidar},
       sweeps: [{path, time_lag (s), keyframe_ego_T_sweep_lidar}, ...],  # newest first
       cameras: [{name, path, intrinsics (3x3), ego_T_camera, width, height}, ...],
       objects: [{token, instance, name, box (x, y, z, l, w, h, yaw, vx, vy; ego frame),
                  attribute, num_lidar_pts, future: [[x, y, seconds], ...]}, ...],
       ego_future: [[x, y, yaw, seconds], ...]}  # next keyframes (3 s), this sample's ego frame

  A scene's keyframes follow each other in order, so record ``i + k`` is the ``k``-th keyframe
  after record ``i`` while it has the same scene (the loader reads future boxes there).

* ``labels.npy``: uint8 ``(N, C, X, ceil(Y / 8))``, the bool labels ``(N, C, X, Y)`` packed with
  ``np.packbits`` along the last axis (8x smaller; read memory-mapped, unpacked per sample).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bridgeta.geometry import BEVGrid

CACHE_FORMAT = 1
CACHE_FOLDER = ".bridgeta_cache"


class CacheError(ValueError):
    """The cache is missing, incomplete or does not match what the caller needs."""


def default_cache_dir(dataroot: str | Path, version: str) -> Path:
    """``DATAROOT/.bridgeta_cache/<version>``: where ``prepare_dataroot`` writes by default."""
    return Path(dataroot).expanduser().resolve() / CACHE_FOLDER / version


def grid_to_dict(grid: BEVGrid) -> dict[str, list[float]]:
    return {"x": list(grid.x), "y": list(grid.y), "z": list(grid.z)}


def grid_from_dict(data: dict[str, Sequence[float]]) -> BEVGrid:
    return BEVGrid(tuple(data["x"]), tuple(data["y"]), tuple(data["z"]))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CacheError(f"{path}: not valid JSON ({exc}); rebuild it with bridgeta data prepare --force") from None


class _PackedRecords:
    """Sample records as one uint8 buffer of JSON blobs plus offsets.

    A list of nested dicts would be copied page by page into every DataLoader worker (reference
    counts touch the pages); one numpy buffer stays shared. Decoding one record costs microseconds.
    """

    def __init__(self, records: list[dict]) -> None:
        blobs = [json.dumps(record, separators=(",", ":")).encode() for record in records]
        self.offsets = np.cumsum([0] + [len(blob) for blob in blobs], dtype=np.int64)
        self.buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict:
        start, stop = self.offsets[index], self.offsets[index + 1]
        return json.loads(self.buffer[start:stop].tobytes())


class LabelCache:
    """Metadata and labels of a prepared dataroot.

    ``labels(index)`` unpacks one sample's ``(C, X, Y)`` bool labels from the memory-mapped
    ``labels.npy``; the map is opened lazily in each process, so the object pickles cheaply into
    DataLoader workers.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir).expanduser()
        meta_path, samples_path, labels_path = (
            self.cache_dir / name for name in ("meta.json", "samples.json", "labels.npy")
        )
        if not self.cache_dir.is_dir():
            raise CacheError(
                f"no prepared cache at {self.cache_dir}: prepare the dataroot first "
                "(bridgeta data prepare --dataroot DATAROOT --version VERSION)"
            )
        for path in (meta_path, samples_path, labels_path):
            if not path.is_file():
                raise CacheError(f"cache is incomplete: {path} is missing (rebuild it with bridgeta data prepare --force)")
        self.meta: dict[str, Any] = _read_json(meta_path)
        if self.meta.get("format") != CACHE_FORMAT:
            raise CacheError(
                f"{meta_path}: cache format {self.meta.get('format')} is not {CACHE_FORMAT}; prepare again"
            )
        records = _read_json(samples_path)
        self.classes: tuple[str, ...] = tuple(self.meta["classes"])
        self.label_grid = grid_from_dict(self.meta["label_grid"])
        self.tokens: list[str] = [r["token"] for r in records]
        self.splits = np.array([r["split"] for r in records])
        self._index = {token: index for index, token in enumerate(self.tokens)}
        self._records = _PackedRecords(records)
        self._labels_path = labels_path
        self._labels: np.ndarray | None = None
        nx, ny = self.label_grid.shape
        expected = (len(records), len(self.classes), nx, (ny + 7) // 8)
        try:
            shape = tuple(np.load(labels_path, mmap_mode="r").shape)
        except (OSError, ValueError) as exc:
            raise CacheError(f"{labels_path}: not a readable .npy file ({exc}); rebuild it with bridgeta data prepare --force") from None
        if shape != expected:
            raise CacheError(
                f"{labels_path}: shape {shape} does not match samples.json and meta.json "
                f"(expected {expected}); prepare again"
            )

    def __len__(self) -> int:
        return len(self.tokens)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_labels"] = None  # each process maps the file itself
        return state

    @property
    def dataroot(self) -> Path:
        return Path(self.meta["dataroot"])

    def record(self, index: int) -> dict:
        return self._records[index]

    def index_of(self, token: str) -> int:
        try:
            return self._index[token]
        except KeyError:
            raise KeyError(f"sample token {token} is not in the cache {self.cache_dir}") from None

    def indices(self, split: str) -> np.ndarray:
        """Indices of the samples of ``split``, in cache order."""
        if split not in self.meta["counts"]:
            raise CacheError(
                f"{self.cache_dir / 'meta.json'}: no split '{split}' (has {sorted(self.meta['counts'])})"
            )
        return np.flatnonzero(self.splits == split)

    def class_indices(self, classes: Sequence[str]) -> list[int]:
        """Positions of ``classes`` in the cached class order; an error names any missing one."""
        missing = [c for c in classes if c not in self.classes]
        if missing:
            raise CacheError(
                f"{self.cache_dir / 'meta.json'}: class '{missing[0]}' was not prepared "
                f"(cached classes: {', '.join(self.classes)}); prepare again with it"
            )
        return [self.classes.index(c) for c in classes]

    def labels(self, index: int) -> np.ndarray:
        """``(C, X, Y)`` bool labels of sample ``index`` on ``label_grid``, cached class order."""
        if self._labels is None:
            self._labels = np.load(self._labels_path, mmap_mode="r")
        packed = np.asarray(self._labels[index])
        return np.unpackbits(packed, axis=-1, count=self.label_grid.shape[1]).astype(bool)
