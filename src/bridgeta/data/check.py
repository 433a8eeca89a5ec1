"""Validate a nuScenes-format dataroot without the nuScenes devkit (``bridgeta data check``).

Why not the devkit: ``NuScenes(...)`` stops at the first bad record with a bare ``AssertionError``,
``KeyError`` or ``IndexError``, and it never opens a sensor file, so a half-finished download or a
buggy converter surfaces hours later as a crash inside a data-loader worker. This module reads the
JSON tables directly, keeps going after every problem, and reports each one as a
:class:`CheckIssue` naming the file and, inside a table, the record token and field.

Errors are what makes the data unusable (a crash or silently wrong inputs); warnings are what is
worth knowing but loads fine (a missing non-keyframe sweep, a split that names unknown scenes).
Sensor-file contents are decoded only for keyframes, and only when ``deep``: decoding every sweep of
nuScenes trainval means reading hundreds of gigabytes.

``DATAROOT/bridgeta_splits.json``, when present, maps a split name to the scene names in it
(``{"train": ["scene-0001", ...], "val": [...]}``, the shape of the devkit's
``create_splits_scenes()``); the report counts scenes and samples per split from it. A scene in two
splits or in none is an error because ``bridgeta prepare`` refuses both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import sys
from collections import Counter, defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from bridgeta.config import MAP_CLASSES
from bridgeta.data.conditions import scene_condition
from bridgeta.data.nuscenes_writer import TABLES

SPLITS_FILE = "bridgeta_splits.json"
QUATERNION_TOLERANCE = 1e-3
POINT_FEATURES = 5  # x, y, z, intensity, ring: float32 each in a nuScenes .pcd.bin

# Fields a record must have for the devkit and our loader to use it (the nuScenes schema, less the
# free-text descriptions nobody reads; scene descriptions carry the weather/lighting, so they stay).
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "category": ("token", "name"),
    "attribute": ("token", "name"),
    "visibility": ("token", "level"),
    "instance": (
        "token",
        "category_token",
        "nbr_annotations",
        "first_annotation_token",
        "last_annotation_token",
    ),
    "sensor": ("token", "channel", "modality"),
    "calibrated_sensor": ("token", "sensor_token", "translation", "rotation", "camera_intrinsic"),
    "ego_pose": ("token", "timestamp", "translation", "rotation"),
    "log": ("token", "logfile", "vehicle", "date_captured", "location"),
    "scene": (
        "token",
        "name",
        "description",
        "log_token",
        "nbr_samples",
        "first_sample_token",
        "last_sample_token",
    ),
    "sample": ("token", "timestamp", "scene_token", "prev", "next"),
    "sample_data": (
        "token",
        "sample_token",
        "ego_pose_token",
        "calibrated_sensor_token",
        "timestamp",
        "fileformat",
        "is_key_frame",
        "height",
        "width",
        "filename",
        "prev",
        "next",
    ),
    "sample_annotation": (
        "token",
        "sample_token",
        "instance_token",
        "visibility_token",
        "attribute_tokens",
        "translation",
        "size",
        "rotation",
        "prev",
        "next",
        "num_lidar_pts",
        "num_radar_pts",
    ),
    "map": ("token", "log_tokens", "category", "filename"),
}

# (table, field, referenced table). A field ending in ``_tokens`` holds a list of tokens.
REFERENCES: tuple[tuple[str, str, str], ...] = (
    ("instance", "category_token", "category"),
    ("instance", "first_annotation_token", "sample_annotation"),
    ("instance", "last_annotation_token", "sample_annotation"),
    ("calibrated_sensor", "sensor_token", "sensor"),
    ("scene", "log_token", "log"),
    ("scene", "first_sample_token", "sample"),
    ("scene", "last_sample_token", "sample"),
    ("sample", "scene_token", "scene"),
    ("sample_data", "sample_token", "sample"),
    ("sample_data", "ego_pose_token", "ego_pose"),
    ("sample_data", "calibrated_sensor_token", "calibrated_sensor"),
    ("sample_annotation", "sample_token", "sample"),
    ("sample_annotation", "instance_token", "instance"),
    ("sample_annotation", "visibility_token", "visibility"),
    ("sample_annotation", "attribute_tokens", "attribute"),
    ("map", "log_tokens", "log"),
)
CHAINED_TABLES = ("sample", "sample_data", "sample_annotation")
SENSOR_MODALITIES = ("camera", "lidar", "radar")

# Map expansion (``maps/expansion/<location>.json``), record shapes as in the devkit's map_api.py.
MAP_POLYGON_LAYERS = (
    "drivable_area",
    "road_segment",
    "road_block",
    "lane",
    "ped_crossing",
    "walkway",
    "stop_line",
    "carpark_area",
)
MAP_LINE_LAYERS = ("road_divider", "lane_divider", "traffic_light")
MAP_REQUIRED_KEYS = (
    "version",
    "canvas_edge",
    "node",
    "line",
    "polygon",
    *MAP_POLYGON_LAYERS,
    *MAP_LINE_LAYERS,
)
# Keys the devkit's NuScenesMap reads unconditionally (map version 1.3); ``bridgeta prepare`` draws
# labels through NuScenesMap, so a map without them cannot be prepared.
MAP_DEVKIT_KEYS = ("arcline_path_3", "connectivity", "lane_connector")
# Which label class each layer feeds, so a missing layer says what it breaks.
LABEL_CLASS_OF_LAYER = {
    **{name: name for name in MAP_CLASSES if name in MAP_POLYGON_LAYERS},
    "road_divider": "divider",
    "lane_divider": "divider",
}

CONDITIONS = ("day", "night", "rain")


@dataclass(frozen=True)
class CheckIssue:
    """One problem, located as precisely as possible.

    ``file`` is relative to the dataroot. Inside a table, ``table`` and ``token`` name the record
    (``#<index>`` when it has no token) and ``field`` the offending field.
    """

    file: str
    message: str
    table: str | None = None
    token: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.table is not None:
            where += f": {self.table}" + (f"[{self.token}]" if self.token else "")
            where += f".{self.field}" if self.field else ""
        elif self.field:
            where += f": {self.field}"
        return f"{where}: {self.message}"


@dataclass
class CheckReport:
    """Everything ``check_dataroot`` found; ``ok`` when there is no error (warnings allowed)."""

    dataroot: str
    version: str
    deep: bool
    errors: list[CheckIssue] = field(default_factory=list)
    warnings: list[CheckIssue] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # records per table
    # split -> {"scenes": n, "samples": m}; a single "unknown" split without bridgeta_splits.json.
    per_split: dict[str, dict[str, int]] = field(default_factory=dict)
    # "day", "night", "rain" -> {"scenes", "samples"}; each scene counts once (see bridgeta.data.conditions).
    per_condition: dict[str, dict[str, int]] = field(default_factory=dict)
    # Filled by the caller from the prepared cache (the tables alone cannot tell): split -> class ->
    # fraction of label cells set, the ``coverage`` of the cache's meta.json. None when not measured.
    label_coverage: dict[str, dict[str, float]] | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready structure for ``--json``."""
        return {
            "dataroot": self.dataroot,
            "version": self.version,
            "deep": self.deep,
            "ok": self.ok,
            "errors": [asdict(issue) for issue in self.errors],
            "warnings": [asdict(issue) for issue in self.warnings],
            "counts": self.counts,
            "per_split": self.per_split,
            "per_condition": self.per_condition,
            "label_coverage": self.label_coverage,
        }

    def format(self) -> str:
        """Human-readable report: summary first, then one line per error and per warning."""
        mode = "deep (sensor files decoded)" if self.deep else "quick (sensor files not decoded)"
        lines = [f"dataroot {self.dataroot}, version {self.version}, {mode}"]
        if self.counts:
            lines.append("tables: " + ", ".join(f"{name} {count}" for name, count in self.counts.items()))
        for title, groups in (("splits", self.per_split), ("conditions", self.per_condition)):
            if groups:
                parts = [
                    f"{name} {c['scenes']} scenes / {c['samples']} samples" for name, c in groups.items()
                ]
                lines.append(f"{title}: " + ", ".join(parts))
        for split, classes in (self.label_coverage or {}).items():
            parts = [f"{name} {fraction:.4g}" for name, fraction in classes.items()]
            lines.append(f"label coverage {split}: " + ", ".join(parts))
        lines.extend(f"error: {issue}" for issue in self.errors)
        lines.extend(f"warning: {issue}" for issue in self.warnings)
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"{verdict}: {len(self.errors)} errors, {len(self.warnings)} warnings")
        return "\n".join(lines)


def prepared_label_coverage(dataroot: str | Path, version: str) -> dict[str, dict[str, float]] | None:
    """Per-split, per-class label coverage from the default prepared cache, if there is one.

    Labels come from the map through the devkit; the checker itself never rasterises, so it
    reports what ``bridgeta data prepare`` measured.
    """
    from bridgeta.data.cache import default_cache_dir

    meta = default_cache_dir(dataroot, version) / "meta.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("coverage")
    except json.JSONDecodeError:
        return None


def check_dataroot(
    dataroot: str | Path, version: str, *, deep: bool = True, progress: bool = False
) -> CheckReport:
    """Check tables, references, calibration, sensor files and maps of ``dataroot/version``.

    ``deep`` decodes keyframe JPEGs and reads keyframe point clouds; without it sensor files are
    only checked for existence and size. ``progress`` shows a tqdm bar over the sensor files.
    """
    checker = _Checker(Path(dataroot), version, deep=deep, progress=progress)
    checker.run()
    return checker.report


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _numbers(value: Any, length: int) -> list[float] | None:
    """``value`` as floats when it is a list of ``length`` finite numbers, else None."""
    if not isinstance(value, list) or len(value) != length:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    return [float(v) for v in value]


def _text(value: Any) -> str | None:
    """``value`` when it is a string, else None: record values become dict keys only through this."""
    return value if isinstance(value, str) else None


def _record_id(record: dict, index: int) -> str:
    token = record.get("token")
    return token if isinstance(token, str) and token else f"#{index}"


def _intrinsic_problem(value: Any, modality: str) -> str | None:
    """Why ``camera_intrinsic`` is wrong for a sensor of ``modality``, or None."""
    if modality != "camera":
        return (
            None if value == [] else f"a {modality} sensor must have camera_intrinsic [], got {_short(value)}"
        )
    rows = [_numbers(row, 3) for row in value] if isinstance(value, list) and len(value) == 3 else [None]
    if any(row is None for row in rows):
        return f"camera intrinsic must be a 3x3 matrix of finite numbers, got {_short(value)}"
    fx, fy = rows[0][0], rows[1][1]
    if fx <= 0 or fy <= 0:
        return f"camera focal lengths must be positive, got fx={fx:g}, fy={fy:g}"
    if rows[2] != [0.0, 0.0, 1.0]:
        return f"camera intrinsic last row must be [0, 0, 1], got {value[2]}"
    return None


@dataclass(frozen=True)
class _SensorFile:
    """What a worker thread needs to check one sample_data file (records stay in the main thread)."""

    token: str
    filename: str
    is_key_frame: bool
    width: Any
    height: Any


def _check_sensor_file(root: Path, item: _SensorFile, decode: bool) -> tuple[bool, list[str]]:
    """``(exists, problems)`` of one sensor file; ``decode`` reads its contents (thread-safe)."""
    path = root / item.filename
    try:
        info = path.stat()
    except FileNotFoundError:
        return False, []
    except OSError as exc:
        return True, [f"cannot be read: {exc}"]
    if not stat.S_ISREG(info.st_mode):
        return True, ["is not a regular file"]
    if info.st_size == 0:
        return True, ["file is empty"]
    problems = []
    name = item.filename.lower()
    if name.endswith(".pcd.bin"):
        point_bytes = 4 * POINT_FEATURES
        if info.st_size % point_bytes:
            problems.append(
                f"size {info.st_size} bytes is not a multiple of {point_bytes} "
                f"(points of {POINT_FEATURES} float32)"
            )
        if decode:
            values = np.fromfile(path, dtype=np.float32)
            bad = ~np.isfinite(values)
            if bad.any():
                first = int(np.argmax(bad)) // POINT_FEATURES
                problems.append(f"{int(bad.sum())} NaN/Inf values in the point cloud, first in point {first}")
    elif name.endswith((".jpg", ".jpeg")) and decode:
        from PIL import Image

        try:
            with Image.open(path) as image:
                image.load()  # decodes every byte: the only way to catch a truncated JPEG
                width, height = image.size
        except Exception as exc:  # any failure to decode is the finding itself (OSError, bombs, ...)
            problems.append(f"JPEG does not decode fully ({type(exc).__name__}: {exc})")
        else:
            if (width, height) != (item.width, item.height):
                problems.append(
                    f"image is {width}x{height} (width x height) but the record says "
                    f"{item.width}x{item.height}"
                )
    return True, problems


def _bounded_map(
    pool: ThreadPoolExecutor, function: Callable[[Any], Any], items: list, window: int
) -> Iterator[Any]:
    """``pool.map`` in order, with at most ``window`` tasks in flight (trainval has millions of files)."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# --------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------


class _Checker:
    """Runs the checks in order; each tolerates records that earlier checks reported as broken."""

    def __init__(self, root: Path, version: str, deep: bool, progress: bool) -> None:
        self.root = root
        self.version = version
        self.deep = deep
        self.progress = progress
        self.report = CheckReport(dataroot=str(root), version=version, deep=deep)
        self.tables: dict[str, list[dict]] = {}  # tables that loaded, object records only
        self.index: dict[str, dict[str, dict]] = {}  # table -> token -> record

    # -- reporting --------------------------------------------------------------------------

    def error(
        self,
        file: str,
        message: str,
        table: str | None = None,
        token: str | None = None,
        field: str | None = None,
    ) -> None:
        self.report.errors.append(CheckIssue(file, message, table, token, field))

    def warn(
        self,
        file: str,
        message: str,
        table: str | None = None,
        token: str | None = None,
        field: str | None = None,
    ) -> None:
        self.report.warnings.append(CheckIssue(file, message, table, token, field))

    def table_file(self, table: str) -> str:
        return f"{self.version}/{table}.json"

    def record_error(self, table: str, record: dict, index: int, field: str | None, message: str) -> None:
        self.error(self.table_file(table), message, table, _record_id(record, index), field)

    def lookup(self, table: str, token: Any) -> dict | None:
        """The record ``token`` names in ``table``; None when missing or not a token at all."""
        return self.index.get(table, {}).get(token) if isinstance(token, str) else None

    def sensor_of(self, sample_data: dict) -> dict | None:
        calibrated = self.lookup("calibrated_sensor", sample_data.get("calibrated_sensor_token"))
        return self.lookup("sensor", calibrated.get("sensor_token")) if calibrated else None

    def load_json(self, relative: str) -> tuple[bool, Any]:
        """``(ok, data)`` of a JSON file; a parse error is reported with its position."""
        try:
            return True, json.loads((self.root / relative).read_bytes())
        except json.JSONDecodeError as exc:
            self.error(
                relative,
                f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno} (char {exc.pos})",
            )
        except (OSError, UnicodeDecodeError) as exc:
            self.error(relative, f"cannot be read as JSON text: {exc}")
        return False, None

    # -- the checks -------------------------------------------------------------------------

    def run(self) -> None:
        if not self.root.is_dir():
            self.error(str(self.root), "dataroot does not exist or is not a folder")
            return
        if not (self.root / self.version).is_dir():
            found = sorted(p.name for p in self.root.iterdir() if (p / "scene.json").is_file())
            self.error(
                self.version,
                f"version folder missing from the dataroot "
                f"(versions found: {', '.join(found) or 'none'})",
            )
            return
        self.load_tables()
        self.check_required_fields()
        self.check_references()
        self.check_chains()
        self.check_scene_chains()
        self.check_keyframes()
        self.check_shapes()
        self.check_maps()
        self.check_sensor_files()
        self.count_splits_and_conditions()

    def load_tables(self) -> None:
        for table in TABLES:
            relative = self.table_file(table)
            if not (self.root / relative).is_file():
                self.error(relative, "required table file missing", table)
                continue
            ok, data = self.load_json(relative)
            if not ok:
                continue
            if not isinstance(data, list):
                self.error(
                    relative, f"table must be a JSON list of records, got {type(data).__name__}", table
                )
                continue
            self.report.counts[table] = len(data)
            records, index = [], {}
            for position, record in enumerate(data):
                if not isinstance(record, dict):
                    self.error(
                        relative, f"record #{position} is a {type(record).__name__}, not an object", table
                    )
                    continue
                records.append(record)
                token = record.get("token")
                if isinstance(token, str) and token:
                    if token in index:
                        self.error(relative, "duplicate token", table, token)
                    index[token] = record
            self.tables[table] = records
            self.index[table] = index

    def check_required_fields(self) -> None:
        for table, records in self.tables.items():
            required = REQUIRED_FIELDS[table]
            for i, record in enumerate(records):
                for name in required:
                    if name not in record:
                        self.record_error(table, record, i, name, f"missing required field '{name}'")
                token = record.get("token")
                if "token" in record and not (isinstance(token, str) and token):
                    self.record_error(
                        table,
                        record,
                        i,
                        "token",
                        f"token must be a non-empty string, got {_short(token)}",
                    )

    def check_references(self) -> None:
        for table, name, target in REFERENCES:
            if table not in self.tables or target not in self.index:
                continue  # a missing table is reported once, not once per reference into it
            targets = self.index[target]
            is_list = name.endswith("_tokens")
            for i, record in enumerate(self.tables[table]):
                if name not in record:
                    continue
                value = record[name]
                if is_list and not isinstance(value, list):
                    self.record_error(
                        table, record, i, name, f"expected a list of {target} tokens, got {_short(value)}"
                    )
                    continue
                for token in value if is_list else [value]:
                    if not isinstance(token, str):
                        self.record_error(
                            table, record, i, name, f"expected a {target} token, got {_short(token)}"
                        )
                    elif token not in targets:
                        self.record_error(table, record, i, name, f"points at no {target} record ('{token}')")

    def chain_group(self, table: str, record: dict) -> Any:
        """What consecutive records of a prev/next chain share (None when it cannot be resolved)."""
        if table == "sample":
            return record.get("scene_token")
        if table == "sample_annotation":
            return record.get("instance_token")
        sensor = self.sensor_of(record)
        sample = self.lookup("sample", record.get("sample_token"))
        return (sample.get("scene_token"), sensor.get("channel")) if sensor and sample else None

    def check_chains(self) -> None:
        """prev/next links exist, point back, stay in one scene/channel/instance and move forward in time."""
        for table in CHAINED_TABLES:
            if table not in self.tables:
                continue
            index = self.index[table]
            for i, record in enumerate(self.tables[table]):
                token = record.get("token")
                for name, back in (("next", "prev"), ("prev", "next")):
                    if name not in record:
                        continue
                    linked_token = record[name]
                    if not isinstance(linked_token, str):
                        self.record_error(
                            table, record, i, name, f"expected a token or '', got {_short(linked_token)}"
                        )
                        continue
                    if not linked_token:
                        continue
                    linked = index.get(linked_token)
                    if linked is None:
                        self.record_error(
                            table, record, i, name, f"points at no {table} record ('{linked_token}')"
                        )
                        continue
                    if linked.get(back) != token:
                        self.record_error(
                            table,
                            record,
                            i,
                            name,
                            f"{name} record {linked_token} has {back} "
                            f"{_short(linked.get(back))}, not this record",
                        )
                    if name != "next":
                        continue
                    group, linked_group = self.chain_group(table, record), self.chain_group(table, linked)
                    if group is not None and linked_group is not None and group != linked_group:
                        self.record_error(
                            table,
                            record,
                            i,
                            name,
                            f"next record {linked_token} belongs to "
                            f"{_short(linked_group)}, this one to {_short(group)}",
                        )
                    time, linked_time = record.get("timestamp"), linked.get("timestamp")
                    if isinstance(time, int) and isinstance(linked_time, int) and linked_time <= time:
                        self.record_error(
                            table,
                            record,
                            i,
                            name,
                            f"next record {linked_token} has timestamp {linked_time}, not after {time}",
                        )

    def check_scene_chains(self) -> None:
        """Following ``next`` from a scene's first sample visits nbr_samples samples and ends at its last."""
        if "scene" not in self.tables or "sample" not in self.tables:
            return
        samples = self.index["sample"]
        reached: set[str] = set()
        complete: set[str] = set()
        for i, scene in enumerate(self.tables["scene"]):
            if self.lookup("sample", scene.get("first_sample_token")) is None:
                continue  # reported as a dangling reference
            token = scene.get("token")
            chain, seen, current = [], set(), scene["first_sample_token"]
            while current:
                if current in seen:
                    self.record_error(
                        "scene",
                        scene,
                        i,
                        "first_sample_token",
                        f"following next from the first sample loops back to sample {current}",
                    )
                    break
                if current not in samples:
                    break  # dangling next: reported by check_chains
                chain.append(current)
                seen.add(current)
                following = samples[current].get("next")
                current = following if isinstance(following, str) else ""
            else:
                problems = []
                first_prev = samples[chain[0]].get("prev")
                if first_prev != "":
                    problems.append(
                        (
                            "first_sample_token",
                            f"first sample {chain[0]} has prev {_short(first_prev)}, not ''",
                        )
                    )
                foreign = [s for s in chain if samples[s].get("scene_token") != token]
                if foreign:
                    problems.append(
                        (
                            "first_sample_token",
                            f"the chain reaches sample {foreign[0]} of scene "
                            f"{_short(samples[foreign[0]].get('scene_token'))}",
                        )
                    )
                if "last_sample_token" in scene and scene["last_sample_token"] != chain[-1]:
                    problems.append(
                        ("last_sample_token", f"the chain from first_sample_token ends at {chain[-1]}")
                    )
                if "nbr_samples" in scene and scene["nbr_samples"] != len(chain):
                    problems.append(
                        (
                            "nbr_samples",
                            f"is {_short(scene['nbr_samples'])} but the chain from "
                            f"first_sample_token has {len(chain)} samples",
                        )
                    )
                for name, message in problems:
                    self.record_error("scene", scene, i, name, message)
                if not problems and isinstance(token, str):
                    complete.add(token)
                    reached.update(chain)
        for i, sample in enumerate(self.tables["sample"]):
            if _text(sample.get("scene_token")) in complete and sample.get("token") not in reached:
                self.record_error(
                    "sample",
                    sample,
                    i,
                    "scene_token",
                    "not reachable by following next from its scene's first_sample_token",
                )

    def check_keyframes(self) -> None:
        """Every sample has exactly one keyframe per channel that keyframes exist for anywhere."""
        if "sample" not in self.tables or "sample_data" not in self.tables:
            return
        per_sample: dict[str, Counter] = defaultdict(Counter)
        for record in self.tables["sample_data"]:
            sensor = self.sensor_of(record)
            channel = _text(sensor.get("channel")) if sensor else None
            if (
                record.get("is_key_frame") is True
                and channel
                and self.lookup("sample", record.get("sample_token"))
            ):
                per_sample[record["sample_token"]][channel] += 1
        channels = set().union(*per_sample.values()) if per_sample else set()
        for i, sample in enumerate(self.tables["sample"]):
            found = per_sample.get(_text(sample.get("token")), Counter())
            missing = sorted(channels - set(found))
            if missing:
                self.record_error(
                    "sample", sample, i, None, f"no keyframe sample_data for {', '.join(missing)}"
                )
            doubled = sorted(c for c, n in found.items() if n > 1)
            if doubled:
                self.record_error(
                    "sample", sample, i, None, f"more than one keyframe for {', '.join(doubled)}"
                )

    def check_pose(self, table: str, record: dict, index: int) -> None:
        if "translation" in record and _numbers(record["translation"], 3) is None:
            self.record_error(
                table,
                record,
                index,
                "translation",
                f"expected 3 finite numbers, got {_short(record['translation'])}",
            )
        if "rotation" not in record:
            return
        quaternion = _numbers(record["rotation"], 4)
        if quaternion is None:
            self.record_error(
                table,
                record,
                index,
                "rotation",
                f"expected a quaternion [w, x, y, z] of 4 finite numbers, got {_short(record['rotation'])}",
            )
            return
        norm = math.sqrt(sum(v * v for v in quaternion))
        if abs(norm - 1.0) >= QUATERNION_TOLERANCE:
            self.record_error(
                table,
                record,
                index,
                "rotation",
                f"quaternion {quaternion} has norm {norm:.6f}, not 1 (tolerance {QUATERNION_TOLERANCE})",
            )

    def check_shapes(self) -> None:
        """Calibration and pose shapes: what silently corrupts geometry rather than crashing."""
        for i, sensor in enumerate(self.tables.get("sensor", [])):
            if "modality" in sensor and sensor["modality"] not in SENSOR_MODALITIES:
                self.record_error(
                    "sensor",
                    sensor,
                    i,
                    "modality",
                    f"must be one of {', '.join(SENSOR_MODALITIES)}, got {_short(sensor['modality'])}",
                )
        for i, record in enumerate(self.tables.get("calibrated_sensor", [])):
            self.check_pose("calibrated_sensor", record, i)
            sensor = self.lookup("sensor", record.get("sensor_token"))
            modality = sensor.get("modality") if sensor else None
            if "camera_intrinsic" in record and modality in SENSOR_MODALITIES:
                problem = _intrinsic_problem(record["camera_intrinsic"], modality)
                if problem:
                    self.record_error("calibrated_sensor", record, i, "camera_intrinsic", problem)
        for i, record in enumerate(self.tables.get("ego_pose", [])):
            self.check_pose("ego_pose", record, i)
        for i, record in enumerate(self.tables.get("sample_annotation", [])):
            self.check_pose("sample_annotation", record, i)
            size = _numbers(record.get("size"), 3)
            if "size" in record and (size is None or min(size) <= 0):
                self.record_error(
                    "sample_annotation",
                    record,
                    i,
                    "size",
                    f"expected 3 positive numbers (width, length, height), got {_short(record['size'])}",
                )
        for i, record in enumerate(self.tables.get("sample_data", [])):
            sensor = self.sensor_of(record)
            if sensor and sensor.get("modality") == "camera":
                for name in ("width", "height"):
                    value = record.get(name)
                    if name in record and (
                        isinstance(value, bool) or not isinstance(value, int) or value <= 0
                    ):
                        self.record_error(
                            "sample_data",
                            record,
                            i,
                            name,
                            f"a camera image needs a positive integer {name}, got {_short(value)}",
                        )

    # -- maps -------------------------------------------------------------------------------

    def check_maps(self) -> None:
        logs = self.tables.get("log")
        if logs is not None:
            self.check_map_locations(logs)
        maps = self.tables.get("map")
        if maps is None:
            return
        for i, record in enumerate(maps):
            filename = record.get("filename")
            if isinstance(filename, str) and filename and not (self.root / filename).is_file():
                self.error(
                    filename,
                    "map raster missing (the devkit's NuScenes() asserts it exists)",
                    "map",
                    _record_id(record, i),
                    "filename",
                )
        if logs is None:
            return
        covered = {
            t
            for record in maps
            if isinstance(record.get("log_tokens"), list)
            for t in record["log_tokens"]
            if isinstance(t, str)
        }
        for i, log in enumerate(logs):
            if isinstance(log.get("token"), str) and log["token"] not in covered:
                self.record_error(
                    "log",
                    log,
                    i,
                    None,
                    "no map record lists this log in its log_tokens "
                    "(the devkit's NuScenes() fails with KeyError)",
                )

    def check_map_locations(self, logs: list[dict]) -> None:
        by_location: dict[str, list[str]] = defaultdict(list)
        for i, log in enumerate(logs):
            location = log.get("location")
            if "location" not in log:
                continue
            if not isinstance(location, str) or not location or "/" in location:
                self.record_error("log", log, i, "location", f"not a map location name: {_short(location)}")
                continue
            by_location[location].append(_record_id(log, i))
        expansion = self.root / "maps" / "expansion"
        available = sorted(p.stem for p in expansion.glob("*.json")) if expansion.is_dir() else []
        for location, log_tokens in by_location.items():
            relative = f"maps/expansion/{location}.json"
            if not (self.root / relative).is_file():
                for token in log_tokens:
                    self.error(
                        relative,
                        f"unknown map location '{location}': {relative} does not exist "
                        f"(maps here: {', '.join(available) or 'none'})",
                        "log",
                        token,
                        "location",
                    )
                continue
            ok, data = self.load_json(relative)
            if ok:
                self.check_map_expansion(relative, data)

    def check_map_expansion(self, relative: str, data: Any) -> None:
        if not isinstance(data, dict):
            self.error(relative, f"map expansion must be a JSON object, got {type(data).__name__}")
            return
        for key in MAP_REQUIRED_KEYS:
            if key not in data:
                label = LABEL_CLASS_OF_LAYER.get(key)
                needed = f" (the '{label}' label class is drawn from it)" if label else ""
                self.error(relative, f"required key '{key}' missing{needed}", field=key)
        if "canvas_edge" in data:
            edge = _numbers(data["canvas_edge"], 2)
            if edge is None or min(edge) <= 0:
                self.error(
                    relative,
                    f"expected [width, height] in metres, got {_short(data['canvas_edge'])}",
                    field="canvas_edge",
                )
        for key in MAP_DEVKIT_KEYS:
            if key not in data:
                self.error(
                    relative,
                    f"required key '{key}' missing (bridgeta prepare reads maps with the devkit's "
                    "NuScenesMap, which needs it)",
                    field=key,
                )
        version = data.get("version")
        # The devkit compares version strings the same way and refuses anything older than 1.3.
        if "version" in data and (not isinstance(version, str) or version < "1.3"):
            self.error(
                relative,
                f"map version {_short(version)} is older than 1.3, which the devkit's NuScenesMap refuses",
                field="version",
            )

        layers: dict[str, list[dict]] = {}
        for key in ("node", "line", "polygon", *MAP_POLYGON_LAYERS, *MAP_LINE_LAYERS, "lane_connector"):
            value = data.get(key)
            if value is None:
                continue
            if not isinstance(value, list):
                self.error(relative, f"layer must be a list of records, got {type(value).__name__}", key)
                continue
            layers[key] = [r for r in value if isinstance(r, dict) and isinstance(r.get("token"), str)]
            if len(layers[key]) != len(value):
                self.error(
                    relative, f"{len(value) - len(layers[key])} records are not objects with a token", key
                )
        tokens = {key: {r["token"] for r in records} for key, records in layers.items()}

        def token_list(name: str) -> Callable[[dict], list | None]:
            def get(record: dict) -> list | None:
                value = record.get(name)
                if name.endswith("_tokens"):
                    return value if isinstance(value, list) else None
                return [value] if isinstance(value, str) else None

            return get

        def segment_nodes(name: str) -> Callable[[dict], list | None]:
            def get(record: dict) -> list | None:
                segments = record.get(name)
                if not isinstance(segments, list) or not all(isinstance(s, dict) for s in segments):
                    return None
                return [s.get("node_token") for s in segments]

            return get

        def stop_line_cues(name: str, stop_line_types: tuple[str, ...]) -> Callable[[dict], list | None]:
            """The devkit follows a stop line's cue tokens only for the stop line types that have them."""

            def get(record: dict) -> list | None:
                return token_list(name)(record) if record.get("stop_line_type") in stop_line_types else []

            return get

        def hole_nodes(record: dict) -> list | None:
            holes = record.get("holes")
            if not isinstance(holes, list) or not all(
                isinstance(h, dict) and isinstance(h.get("node_tokens"), list) for h in holes
            ):
                return None
            return [t for hole in holes for t in hole["node_tokens"]]

        references: list[tuple[str, str, str, Callable[[dict], list | None]]] = [
            ("polygon", "exterior_node_tokens", "node", token_list("exterior_node_tokens")),
            ("polygon", "holes", "node", hole_nodes),
            ("line", "node_tokens", "node", token_list("node_tokens")),
            ("drivable_area", "polygon_tokens", "polygon", token_list("polygon_tokens")),
            *[
                (layer, "polygon_token", "polygon", token_list("polygon_token"))
                for layer in (*MAP_POLYGON_LAYERS[1:], "lane_connector")
            ],
            *[(layer, "line_token", "line", token_list("line_token")) for layer in MAP_LINE_LAYERS],
            ("lane", "left_lane_divider_segments", "node", segment_nodes("left_lane_divider_segments")),
            ("lane", "right_lane_divider_segments", "node", segment_nodes("right_lane_divider_segments")),
            # A stop line without a type is a KeyError in the devkit; the empty list names no target.
            ("stop_line", "stop_line_type", "ped_crossing", lambda r: [] if "stop_line_type" in r else None),
            (
                "stop_line",
                "ped_crossing_tokens",
                "ped_crossing",
                stop_line_cues("ped_crossing_tokens", ("PED_CROSSING", "TURN_STOP")),
            ),
            (
                "stop_line",
                "traffic_light_tokens",
                "traffic_light",
                stop_line_cues("traffic_light_tokens", ("TRAFFIC_LIGHT",)),
            ),
        ]
        for layer, name, target, get in references:
            if layer in layers and target in tokens:
                self.check_map_references(relative, layers[layer], layer, name, target, tokens[target], get)
        bad_nodes = [
            r["token"] for r in layers.get("node", []) if _numbers([r.get("x"), r.get("y")], 2) is None
        ]
        if bad_nodes:
            self.error(relative, f"{len(bad_nodes)} nodes lack finite numeric x and y", "node", bad_nodes[0])

    def check_map_references(
        self,
        relative: str,
        records: list[dict],
        layer: str,
        name: str,
        target: str,
        targets: set[str],
        get: Callable[[dict], list | None],
    ) -> None:
        """One aggregated error per layer and field: a broken map has thousands of identical faults."""
        malformed, dangling = [], []
        for record in records:
            referenced = get(record)
            if referenced is None:
                malformed.append(record["token"])
                continue
            missing = next((t for t in referenced if _text(t) not in targets), None)
            if missing is not None:
                dangling.append((record["token"], missing))
        if malformed:
            self.error(
                relative, f"{len(malformed)} {layer} records lack a valid '{name}'", layer, malformed[0], name
            )
        if dangling:
            first, missing = dangling[0]
            self.error(
                relative,
                f"{len(dangling)} {layer} records reference missing {target} records "
                f"(first: {target} {_short(missing)})",
                layer,
                first,
                name,
            )

    # -- sensor files -----------------------------------------------------------------------

    def check_sensor_files(self) -> None:
        items = []
        for i, record in enumerate(self.tables.get("sample_data", [])):
            filename = record.get("filename")
            if "filename" not in record:
                continue
            if not isinstance(filename, str) or not filename or PurePosixPath(filename).is_absolute():
                self.record_error(
                    "sample_data",
                    record,
                    i,
                    "filename",
                    f"expected a path relative to the dataroot, got {_short(filename)}",
                )
                continue
            items.append(
                _SensorFile(
                    _record_id(record, i),
                    filename,
                    record.get("is_key_frame") is True,
                    record.get("width"),
                    record.get("height"),
                )
            )
        sweeps_missing: dict[str, list[str]] = defaultdict(list)
        sweeps_total: Counter = Counter()
        workers = min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:

            def check(item: _SensorFile) -> tuple[bool, list[str]]:
                return _check_sensor_file(self.root, item, self.deep and item.is_key_frame)

            results = _bounded_map(pool, check, items, window=64 * workers)
            bar = tqdm(
                zip(items, results),
                total=len(items),
                desc="sensor files",
                unit="file",
                disable=not self.progress,
            )
            for item, (exists, problems) in bar:
                folder = str(PurePosixPath(item.filename).parent)
                if not item.is_key_frame:
                    sweeps_total[folder] += 1
                if not exists and item.is_key_frame:
                    self.error(item.filename, "keyframe file missing", "sample_data", item.token)
                elif not exists:
                    sweeps_missing[folder].append(item.filename)
                for problem in problems:
                    self.error(item.filename, problem, "sample_data", item.token)
        for folder, missing in sweeps_missing.items():
            self.warn(
                folder,
                f"{len(missing)} of {sweeps_total[folder]} non-keyframe files missing "
                f"(first: {missing[0]}); multi-sweep inputs will lack them",
            )

    # -- summaries --------------------------------------------------------------------------

    def count_splits_and_conditions(self) -> None:
        scenes = self.tables.get("scene")
        if scenes is None:
            return
        samples_per_scene = Counter(
            t for s in self.tables.get("sample", []) if (t := _text(s.get("scene_token")))
        )

        def tally(group: list[dict]) -> dict[str, int]:
            return {
                "scenes": len(group),
                "samples": sum(samples_per_scene[_text(s.get("token"))] for s in group),
            }

        conditions: dict[str, list[dict]] = {name: [] for name in CONDITIONS}
        for scene in scenes:
            description = scene.get("description")
            conditions[scene_condition(description if isinstance(description, str) else "")].append(scene)
        self.report.per_condition = {name: tally(group) for name, group in conditions.items()}

        if not (self.root / SPLITS_FILE).is_file():
            self.report.per_split = {"unknown": tally(scenes)}
            return
        ok, splits = self.load_json(SPLITS_FILE)
        if not ok:
            return
        if not isinstance(splits, dict) or not all(
            isinstance(names, list) and all(isinstance(n, str) for n in names) for names in splits.values()
        ):
            self.error(SPLITS_FILE, 'expected {"<split>": ["<scene name>", ...], ...}')
            return
        by_name = {_text(s.get("name")): s for s in scenes}
        split_of: dict[str, str] = {}
        for split, names in splits.items():
            for name in names:
                if name in split_of:  # bridgeta prepare refuses this: a sample would be in two splits
                    self.error(SPLITS_FILE, f"scene {name} is in both '{split_of[name]}' and '{split}'")
                split_of.setdefault(name, split)
            unknown = [n for n in names if n not in by_name]
            if unknown:
                self.warn(
                    SPLITS_FILE,
                    f"split '{split}' names {len(unknown)} scenes not in {self.table_file('scene')} "
                    f"(first: {unknown[0]})",
                )
            self.report.per_split[split] = tally([by_name[n] for n in names if n in by_name])
        unassigned = [s for s in scenes if _text(s.get("name")) not in split_of]
        if unassigned:
            # bridgeta prepare refuses a scene that is in no split.
            self.error(
                SPLITS_FILE,
                f"{len(unassigned)} scenes of {self.table_file('scene')} are in no split "
                f"(first: {_short(unassigned[0].get('name'))})",
            )
            self.report.per_split["unassigned"] = tally(unassigned)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``bridgeta data check``: print the report; exit 0 when there is no error, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="bridgeta data check",
        description="Validate a nuScenes-format dataroot: tables, references, calibration, files, maps.",
    )
    parser.add_argument(
        "--dataroot", required=True, type=Path, help="folder holding the version folder and maps/"
    )
    parser.add_argument("--version", default="v1.0-trainval", help="table folder, e.g. v1.0-mini")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="check sensor files for existence and size only, without decoding them",
    )
    args = parser.parse_args(argv)
    report = check_dataroot(args.dataroot, args.version, deep=not args.quick, progress=sys.stderr.isatty())
    report.label_coverage = prepared_label_coverage(args.dataroot, args.version)
    if report.label_coverage is None and not args.json:
        print("label coverage: not prepared yet (run `bridgeta data prepare` to rasterise labels)")
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1
