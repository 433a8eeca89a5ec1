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
table of the four real cities' map sizes that rejects any other location; we call the second half
directly (and the first for line layers) so synthetic towns work too. The canvas is one cell wider
than the patch on every side (then cropped) so the devkit's second clip never cuts.

Polygon layers do not go through ``get_map_geom``, because real maps break it in three ways:

* a layer's polygons overlap or touch (two ``drivable_area`` records over one junction); merged
  into one ``MultiPolygon`` they are invalid and GEOS raises ``TopologyException`` on the clip;
* some rings are slightly invalid (a ring touching itself at a vertex); the devkit silently drops
  invalid polygons of every layer but ``drivable_area``, and clips ``drivable_area`` ones anyway,
  which can raise;
* ``mask_for_polygons`` fills all exteriors of a geometry and then clears all holes, so a hole of
  one polygon erases any other polygon drawn into the same mask (an island inside a courtyard).

So each polygon is repaired once per map with ``shapely.make_valid`` (kept in a per-map STRtree,
which also avoids clipping every record of a city for every sample), clipped and moved into the
patch frame exactly as the devkit does, and drawn **one part at a time**: parts without holes
share a mask (filling is a union), each part with holes gets its own, and the masks are OR-ed. A
cell is then set when its centre is in any polygon of the layer and not in a hole of that same
polygon. Unioning the parts first (``shapely.union_all``) is faster but not the same labels: the
union's new vertices at edge crossings are rounded to cells like any vertex, which moves boundary
cells (measured in ``docs/data.md`` with ``scripts/label_geometry_speed.py``); each polygon keeps
its own vertices here, as the devkit draws them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import shapely
from shapely import affinity
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


def _lines(geometries: list[BaseGeometry]) -> list[BaseGeometry]:
    """The devkit's clipped line geometries as single LineStrings (shapely 2 cannot iterate multi-parts)."""
    return [part for geometry in geometries for part in _parts(geometry) if isinstance(part, LineString)]


class _LayerIndex:
    """The repaired polygons of one polygon layer and an STRtree over them (built once per map)."""

    def __init__(self, nusc_map: Any, layer: str) -> None:
        polygons = []
        for record in getattr(nusc_map, layer):
            tokens = record["polygon_tokens"] if layer == "drivable_area" else [record["polygon_token"]]
            for token in tokens:
                polygon = nusc_map.extract_polygon(token)
                if not polygon.is_valid:  # e.g. a self-touching ring: keep its area, not drop it
                    polygon = shapely.make_valid(polygon)
                polygons += [p for p in _parts(polygon) if isinstance(p, Polygon)]
        self.polygons = polygons
        self.tree = shapely.STRtree(polygons)


def _layer_index(nusc_map: Any, layer: str) -> _LayerIndex:
    cache = nusc_map.__dict__.setdefault("_bridgeta_layer_index", {})
    if layer not in cache:
        cache[layer] = _LayerIndex(nusc_map, layer)
    return cache[layer]


def layer_polygons(nusc_map: Any, layer: str, box: tuple[float, ...], angle: float) -> list[Polygon]:
    """Valid single polygons of ``layer`` clipped to the patch, in the patch frame (as ``get_map_geom``)."""
    index = _layer_index(nusc_map, layer)
    patch = nusc_map.explorer.get_patch_coord(box, angle)
    x, y = box[0], box[1]
    parts: list[Polygon] = []
    for i in index.tree.query(patch, predicate="intersects"):
        clipped = index.polygons[int(i)].intersection(patch)
        if clipped.is_empty:
            continue
        clipped = affinity.rotate(clipped, -angle, origin=(x, y), use_radians=False)
        clipped = affinity.affine_transform(clipped, [1.0, 0.0, 0.0, 1.0, -x, -y])
        parts += [p for p in _parts(clipped) if isinstance(p, Polygon)]
    return parts


def polygon_draw_groups(parts: list[Polygon]) -> list[list[BaseGeometry]]:
    """Parts grouped so that drawing each group into its own mask and OR-ing them is exact.

    ``mask_for_polygons`` clears holes after filling every exterior of its input, so a part with
    holes must be alone in its mask; parts without holes can share one (filling is a union).
    """
    plain = [MultiPolygon([p]) for p in parts if not p.interiors]
    groups = [plain] if plain else []
    return groups + [[MultiPolygon([p])] for p in parts if p.interiors]


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
    entries: list[tuple[str, list[BaseGeometry]]] = []  # (layer, geometries), one mask each
    owners: list[str] = []
    for layer in layers:
        if layer in LINE_LAYERS:
            groups = [_lines(shapes) for _, shapes in explorer.get_map_geom(box, angle, [layer])]
        else:
            groups = polygon_draw_groups(layer_polygons(nusc_map, layer, box, angle))
        for group in groups or [[]]:
            entries.append((layer, group))
            owners.append(layer)
    nx, ny = grid.shape
    height = box[2] + 2 * _MARGIN * grid.y[2]
    width = box[3] + 2 * _MARGIN * grid.x[2]
    canvas = (ny + 2 * _MARGIN, nx + 2 * _MARGIN)
    masks = explorer.map_geom_to_mask(entries, (0.0, 0.0, height, width), canvas)
    inner = masks[:, _MARGIN:-_MARGIN, _MARGIN:-_MARGIN].astype(bool)
    out = {layer: np.zeros(grid.shape, dtype=bool) for layer in layers}
    for k, layer in enumerate(owners):
        out[layer] |= inner[k].T
    return out


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
