"""Rasterise the six BEVFusion map classes of one sample with the nuScenes devkit.

Classes (``bridgeta.config.MAP_CLASSES``): ``drivable_area, ped_crossing, walkway, stop_line,
carpark_area`` are the devkit's polygon layers of the same names; ``divider`` is the union of the
line layers ``road_divider`` and ``lane_divider``.

How the devkit's map mask is laid out (``NuScenesMapExplorer``, verified against the installed
source and by ``tests/test_data_labels.py``):

* ``patch_box = (x_center, y_center, height, width)`` in global metres: ``width`` runs along global
  x and ``height`` along global y *before* rotation; the patch is rotated by ``patch_angle``
  degrees counter-clockwise about its centre. Geometry inside it is rotated by ``-patch_angle`` and
  translated to the centre, so with ``patch_angle`` = ego yaw the local frame is the ego frame
  (x forward, y left) moved to the patch centre.
* Mask ``(h, w)`` = ``canvas_size``: row ``r`` walks local **y** (increasing), column ``c`` local
  **x** (increasing); pixel coordinate = ``(local + size / 2) * canvas / size``, no flip. Our
  ``(X, Y)`` layout is therefore the transpose of the devkit's ``(h, w)``.
* Polygons: vertices are *rounded* to integer pixels and filled with ``cv2.fillPoly``, which treats
  integer ``k`` as the centre of pixel ``k``. The devkit's pixel coordinate puts integer ``k`` on a
  cell *corner*, so we move the patch centre by half a cell (+dx/2, +dy/2 in the ego frame): pixel
  ``k`` is then exactly the centre of BEVGrid cell ``k``, and a cell is labelled when its centre
  is inside the polygon (boundary included, up to the devkit's rounding of vertices to centres).
* Lines: vertices are *truncated* to integer pixels, i.e. to the index of the cell that contains
  them when the patch is centred on the grid (no half-cell shift), and drawn with
  ``cv2.polylines(..., thickness=2)``. The width is the devkit's fixed stroke, which BEVFusion's
  labels also use: in practice the cells along the line plus one on each side (3 cells across,
  1.5 m at the default 0.5 m grid; it scales with the label grid's cell size).

``NuScenesMap.get_map_mask`` is ``get_map_geom`` followed by ``map_geom_to_mask``, preceded by a
table of the four real cities' map sizes that rejects any other location; we call the two halves
directly so synthetic towns work too, and adjust two things the devkit does not handle under
shapely 2: a clip can return a MultiLineString (the devkit iterates it, which shapely 2 forbids) or
a polygon/line GeometryCollection. Multi-part results are split into parts, and the canvas is one
cell wider than the patch on every side (then cropped) so the devkit's second clip never cuts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from shapely.geometry import LineString, MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from bridgeta.config import MAP_CLASSES
from bridgeta.geometry import BEVGrid

# Each class is the union of these devkit layers.
CLASS_LAYERS: dict[str, tuple[str, ...]] = {
    "drivable_area": ("drivable_area",),
    "ped_crossing": ("ped_crossing",),
    "walkway": ("walkway",),
    "stop_line": ("stop_line",),
    "carpark_area": ("carpark_area",),
    "divider": ("road_divider", "lane_divider"),
}
LINE_LAYERS = frozenset({"road_divider", "lane_divider"})
# Canvas margin (cells) around the patch so the devkit's second (unrotated) clip never cuts.
_MARGIN = 1


def _parts(geometry: BaseGeometry) -> list[BaseGeometry]:
    """Single-part pieces of a (possibly multi-part or mixed) shapely geometry."""
    if geometry.is_empty:
        return []
    if hasattr(geometry, "geoms"):
        return [part for child in geometry.geoms for part in _parts(child)]
    return [geometry]


def _clean(layer: str, geometries: list[BaseGeometry]) -> list[BaseGeometry]:
    """The devkit's clipped geometries in the shapes its rasteriser accepts under shapely 2."""
    parts = [part for geometry in geometries for part in _parts(geometry)]
    if layer in LINE_LAYERS:
        return [part for part in parts if isinstance(part, LineString)]
    polygons = [part for part in parts if isinstance(part, Polygon)]
    return [MultiPolygon(polygons)] if polygons else []


def _patch(global_T_ego: np.ndarray, grid: BEVGrid, shift: bool) -> tuple[tuple[float, ...], float]:
    """``(patch_box, patch_angle_deg)`` covering ``grid`` in the ego frame of ``global_T_ego``.

    Labels are 2D: the ego frame is reduced to its heading (yaw of the ego x axis), as BEVFusion
    does; roll and pitch are ignored.
    """
    (x_min, x_max, dx), (y_min, y_max, dy) = grid.x[:3], grid.y[:3]
    centre = np.array([(x_min + x_max) / 2, (y_min + y_max) / 2])
    if shift:
        centre += [dx / 2, dy / 2]
    yaw = math.atan2(global_T_ego[1, 0], global_T_ego[0, 0])
    rotation = np.array([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
    centre_global = global_T_ego[:2, 3] + rotation @ centre
    box = (float(centre_global[0]), float(centre_global[1]), y_max - y_min, x_max - x_min)
    return box, math.degrees(yaw)


def _rasterise_layers(
    nusc_map: Any, global_T_ego: np.ndarray, grid: BEVGrid, layers: Sequence[str], shift: bool
) -> dict[str, np.ndarray]:
    """Devkit masks of ``layers``, each ``(X, Y)`` bool in our layout."""
    if not layers:
        return {}
    explorer = nusc_map.explorer
    box, angle = _patch(global_T_ego, grid, shift)
    geometry = explorer.get_map_geom(box, angle, list(layers))
    geometry = [(name, _clean(name, shapes)) for name, shapes in geometry]
    nx, ny = grid.shape
    height = box[2] + 2 * _MARGIN * grid.y[2]
    width = box[3] + 2 * _MARGIN * grid.x[2]
    canvas = (ny + 2 * _MARGIN, nx + 2 * _MARGIN)
    masks = explorer.map_geom_to_mask(geometry, (0.0, 0.0, height, width), canvas)
    inner = masks[:, _MARGIN:-_MARGIN, _MARGIN:-_MARGIN]
    return {name: inner[k].T.astype(bool) for k, (name, _) in enumerate(geometry)}


def rasterise_map_labels(
    nusc_map: Any,
    global_T_ego: np.ndarray,
    grid: BEVGrid,
    classes: Sequence[str] = MAP_CLASSES,
) -> np.ndarray:
    """Binary map labels ``(C, X, Y)`` of the ego pose ``global_T_ego`` (4x4) on ``grid``.

    ``nusc_map`` is a devkit ``NuScenesMap`` (see ``bridgeta.data.devkit.load_map``); the pose is
    the LIDAR_TOP keyframe's ``ego_pose``. Dimension 1 walks ego X (forward), dimension 2 ego Y
    (left), both increasing with the coordinate, cells as in :class:`BEVGrid`.
    """
    unknown = [c for c in classes if c not in CLASS_LAYERS]
    if unknown:
        raise ValueError(f"unknown map class '{unknown[0]}' (known: {', '.join(CLASS_LAYERS)})")
    global_T_ego = np.asarray(global_T_ego, dtype=np.float64)
    needed = {layer for c in classes for layer in CLASS_LAYERS[c]}
    masks = _rasterise_layers(
        nusc_map, global_T_ego, grid, sorted(needed - LINE_LAYERS), shift=True
    ) | _rasterise_layers(nusc_map, global_T_ego, grid, sorted(needed & LINE_LAYERS), shift=False)
    labels = np.zeros((len(classes), *grid.shape), dtype=bool)
    for index, name in enumerate(classes):
        for layer in CLASS_LAYERS[name]:
            labels[index] |= masks[layer]
    return labels
