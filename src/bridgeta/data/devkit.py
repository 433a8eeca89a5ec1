"""Lazy access to the official nuScenes devkit.

The devkit pins old dependencies and is only needed once, to prepare labels and metadata
(``bridgeta.data.prepare``); training reads the cache and must work without it. Nothing here
imports ``nuscenes`` at module import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

INSTALL_HINT = "pip install 'bridgeta[nuscenes]'"


DETECTION_PURPOSE = ("to score 3D detections: the devkit's DetectionEval is the metric (there is no "
                     "fallback), also for the validation of a model with an object head during training")


def require_devkit(purpose: str = "to prepare a dataroot (not to train a map-only model)") -> ModuleType:
    """The ``nuscenes`` package, or an ImportError that says what it is needed for
    (``purpose``) and how to install it."""
    try:
        import nuscenes
    except ImportError as exc:
        raise ImportError(f"the nuScenes devkit is needed {purpose}: {INSTALL_HINT}") from exc
    return nuscenes


def _broken_table(tables: Path) -> str | None:
    """The first table of ``tables`` that is not readable JSON, as "file: reason", or None."""
    for path in sorted(tables.glob("*.json")):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return f"{path}: not valid JSON ({exc})"
    return None


def load_nuscenes(dataroot: str | Path, version: str) -> Any:
    """``nuscenes.NuScenes`` for ``version`` in ``dataroot``, without its console chatter.

    The devkit's own errors on a broken dataroot are bare (a JSON error with no file name, an
    assertion, a KeyError of a token); they become a ValueError naming the table, or at least the
    table folder, and the command that checks it.
    """
    require_devkit()
    from nuscenes.nuscenes import NuScenes

    tables = Path(dataroot) / version
    if not tables.is_dir():
        raise FileNotFoundError(f"no nuScenes tables for {version}: {tables} is missing (--version?)")
    try:
        return NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    except Exception as exc:  # noqa: BLE001 - the devkit raises anything from assert to KeyError
        broken = _broken_table(tables)
        check = f"bridgeta data check --dataroot {dataroot} --version {version}"
        if broken is not None:
            raise ValueError(f"{broken}; {check} lists every problem") from None
        raise ValueError(
            f"the devkit cannot load the tables in {tables} ({type(exc).__name__}: {exc}); {check} lists every problem"
        ) from None


def load_map(dataroot: str | Path, location: str) -> Any:
    """``NuScenesMap`` of ``location`` from ``DATAROOT/maps/expansion/<location>.json``.

    The devkit asserts that the location is one of the four nuScenes cities. Synthetic towns
    (``synth-train-0`` ...) are written in the same format, so their names are added to the
    devkit's list of known locations before loading; nothing else about the devkit changes.
    """
    require_devkit()
    import matplotlib

    # map_api calls plt.style.use(...) on import; keep the process's matplotlib style unchanged.
    with matplotlib.rc_context():
        from nuscenes.map_expansion import map_api

    path = Path(dataroot) / "maps" / "expansion" / f"{location}.json"
    if not path.is_file():
        raise FileNotFoundError(f"map expansion of location '{location}' not found: {path}")
    if location not in map_api.locations:
        map_api.locations.append(location)
    try:
        return map_api.NuScenesMap(dataroot=str(dataroot), map_name=location)
    except Exception as exc:  # noqa: BLE001 - a JSON error, a KeyError of a missing table or token
        raise ValueError(f"{path}: not a readable map expansion ({type(exc).__name__}: {exc})") from None


def scene_splits(version: str) -> dict[str, list[str]]:
    """Official scene names per split for ``version`` (mini: its mini_train / mini_val)."""
    require_devkit()
    from nuscenes.utils.splits import create_splits_scenes

    official = create_splits_scenes()
    if version == "v1.0-mini":
        return {"train": official["mini_train"], "val": official["mini_val"]}
    return {name: official[name] for name in ("train", "val", "test")}
