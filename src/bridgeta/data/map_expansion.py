"""Write ``MapLayers`` as a nuScenes map expansion (``maps/expansion/<location>.json``, version 1.3).

The record shapes follow what the official devkit's ``nuscenes.map_expansion.map_api.NuScenesMap``
reads, so synthetic towns load, rasterise and render through the same code as the real cities:

* geometry tables ``node`` (token, x, y), ``line`` (token, node_tokens) and ``polygon`` (token,
  exterior_node_tokens, holes: [{node_tokens}]); nodes are shared between records that meet at the
  same point (to 0.1 mm), as in the real maps;
* polygon layers point at polygons (``drivable_area`` at several, one per connected part), line
  layers at lines; multi-part shapes (from unions or differences) become one record per part and
  polygon holes are kept;
* ``canvas_edge`` is ``[x_max, y_max]``: the devkit assumes every canvas starts at ``(0, 0)``, so
  maps with negative coordinates are refused rather than silently cropped;
* version 1.3 also needs ``arcline_path_3``, ``connectivity`` and ``lane_connector``, written
  empty: synthetic lanes have no arcline paths.

Tokens are the md5 of ``"<location>/<table>/<index>"``: deterministic, and distinct across towns.

Lane polygons are expected in the order ``[start_right, end_right, end_left, start_left]`` along
their direction of travel (how ``bridgeta.data.synth.world`` builds them): ``from_edge_line``
joins ``start_left`` to ``start_right`` and ``to_edge_line`` ``end_right`` to ``end_left``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import LineString, Polygon

from bridgeta.data.synth.world_types import MapLayers
from bridgeta.files import atomic_write_text

MAP_VERSION = "1.3"
LANE_DIVIDER_SEGMENT_TYPE = "DOUBLE_DASHED_WHITE"  # nuScenes' type of ordinary dashed lane lines
_NODE_DECIMALS = 4  # nodes closer than 0.1 mm are one node
_STOP_LINE_CROSSING_DISTANCE = 1.0  # a stop line this close to a crossing is its PED_CROSSING cue (m)

Bounds = tuple[float, float, float, float]


def _polygons(geometry: shapely.Geometry) -> list[Polygon]:
    """The polygon parts of a polygon, multipolygon or collection (unions often return these)."""
    return [p for p in shapely.get_parts(geometry) if isinstance(p, Polygon) and not p.is_empty]


def _lines(geometry: shapely.Geometry) -> list[LineString]:
    return [g for g in shapely.get_parts(geometry) if isinstance(g, LineString) and not g.is_empty]


class _MapBuilder:
    """Accumulates the tables of one map; every ``add_*`` returns the new record's token."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self._nodes: dict[tuple[float, float], str] = {}

    def token(self, table: str, index: int) -> str:
        return hashlib.md5(f"{self.location}/{table}/{index}".encode()).hexdigest()

    def add(self, table: str, **fields: Any) -> str:
        records = self.tables.setdefault(table, [])
        token = self.token(table, len(records))
        records.append({"token": token, **fields})
        return token

    def nodes(self, coords: np.ndarray) -> list[str]:
        """Node tokens of a coordinate sequence, reusing existing nodes; repeated points collapse."""
        tokens: list[str] = []
        for x, y in np.round(np.asarray(coords)[:, :2], _NODE_DECIMALS).tolist():
            token = self._nodes.get((x, y))
            if token is None:
                token = self._nodes[(x, y)] = self.add("node", x=x, y=y)
            if not tokens or tokens[-1] != token:
                tokens.append(token)
        return tokens

    def ring(self, coords: np.ndarray) -> list[str]:
        """Node tokens of a closed ring, without repeating the first node at the end."""
        tokens = self.nodes(np.asarray(coords)[:-1])
        return tokens[:-1] if len(tokens) > 1 and tokens[0] == tokens[-1] else tokens

    def polygon(self, polygon: Polygon) -> str:
        holes = [{"node_tokens": self.ring(np.asarray(interior.coords))} for interior in polygon.interiors]
        return self.add("polygon", exterior_node_tokens=self.ring(np.asarray(polygon.exterior.coords)), holes=holes)

    def line(self, coords: np.ndarray) -> str:
        return self.add("line", node_tokens=self.nodes(coords))


class _Lookup:
    """Which record of a polygon layer a shape lies in (for the cross-references between layers)."""

    def __init__(self, shapes: list[Polygon], tokens: list[str]) -> None:
        self.tree = shapely.STRtree(shapes)
        self.tokens = tokens

    def containing(self, shape: shapely.Geometry) -> str:
        """The first record containing a point inside ``shape``, or "" (the devkit's "none")."""
        hits = self.tree.query(shape.point_on_surface(), predicate="intersects")
        return self.tokens[int(min(hits))] if len(hits) else ""

    def near(self, shape: shapely.Geometry, distance: float) -> list[str]:
        return [self.tokens[int(i)] for i in sorted(self.tree.query(shape, predicate="dwithin", distance=distance))]


def _check_canvas(layers: MapLayers, bounds: Bounds) -> None:
    geometries = [
        *layers.drivable_area, *(shape for shape, _ in layers.road_segment), *layers.lane, *layers.ped_crossing,
        *layers.walkway, *layers.stop_line, *layers.carpark_area, *layers.road_divider, *layers.lane_divider,
    ]
    x_min, y_min, x_max, y_max = bounds
    if x_min < 0 or y_min < 0 or x_max <= 0 or y_max <= 0:
        raise ValueError(f"map bounds {bounds} must be positive: the devkit's canvas starts at (0, 0)")
    if geometries:
        gx_min, gy_min, gx_max, gy_max = shapely.total_bounds(geometries)
        if gx_min < 0 or gy_min < 0 or gx_max > x_max or gy_max > y_max:
            spans = (gx_min, gy_min, gx_max, gy_max)
            raise ValueError(f"map geometry spans {spans}, outside the canvas (0, 0, {x_max}, {y_max})")


def map_expansion_json(layers: MapLayers, bounds: Bounds, location: str = "synth") -> dict[str, Any]:
    """The map-expansion JSON object of ``layers`` on the canvas ``bounds`` (see the module docstring)."""
    _check_canvas(layers, bounds)
    build = _MapBuilder(location)
    for table in ("node", "line", "polygon", "drivable_area", "road_segment", "lane", "ped_crossing", "walkway",
                  "stop_line", "carpark_area", "road_divider", "lane_divider"):
        build.tables[table] = []

    drivable_shapes, drivable_tokens = [], []
    for area in layers.drivable_area:
        parts = _polygons(area)
        token = build.add("drivable_area", polygon_tokens=[build.polygon(p) for p in parts])
        drivable_shapes += parts
        drivable_tokens += [token] * len(parts)
    drivable = _Lookup(drivable_shapes, drivable_tokens)

    segment_shapes, segment_tokens = [], []
    for shape, is_intersection in layers.road_segment:
        for part in _polygons(shape):
            segment_tokens.append(build.add(
                "road_segment", polygon_token=build.polygon(part), is_intersection=bool(is_intersection),
                drivable_area_token=drivable.containing(part),
            ))
            segment_shapes.append(part)
    segments = _Lookup(segment_shapes, segment_tokens)

    for lane in layers.lane:
        for part in _polygons(lane):
            corners = np.asarray(part.exterior.coords)[:-1]
            half = len(corners) // 2
            build.add(
                "lane", polygon_token=build.polygon(part), lane_type="CAR",
                from_edge_line_token=build.line(corners[[-1, 0]]),
                to_edge_line_token=build.line(corners[[half - 1, half]]),
                left_lane_divider_segments=[], right_lane_divider_segments=[],
            )

    crossing_shapes, crossing_tokens = [], []
    for crossing in layers.ped_crossing:
        for part in _polygons(crossing):
            crossing_tokens.append(build.add(
                "ped_crossing", polygon_token=build.polygon(part), road_segment_token=segments.containing(part)
            ))
            crossing_shapes.append(part)
    crossings = _Lookup(crossing_shapes, crossing_tokens)

    for walkway in layers.walkway:
        for part in _polygons(walkway):
            build.add("walkway", polygon_token=build.polygon(part))

    for stop_line in layers.stop_line:
        for part in _polygons(stop_line):
            cues = crossings.near(part, _STOP_LINE_CROSSING_DISTANCE)
            build.add(
                "stop_line", polygon_token=build.polygon(part), stop_line_type="PED_CROSSING" if cues else "STOP_SIGN",
                ped_crossing_tokens=cues, traffic_light_tokens=[], road_block_token="",
            )

    for carpark in layers.carpark_area:
        for part in _polygons(carpark):
            corners = np.asarray(part.minimum_rotated_rectangle.exterior.coords)
            sides = np.diff(corners[:3], axis=0)
            long = sides[int(np.argmax(np.linalg.norm(sides, axis=1)))]
            build.add(
                "carpark_area", polygon_token=build.polygon(part), orientation=math.atan2(long[1], long[0]),
                road_block_token="",
            )

    for divider in layers.road_divider:
        for part in _lines(divider):
            build.add(
                "road_divider", line_token=build.line(np.asarray(part.coords)),
                road_segment_token=segments.containing(part.interpolate(0.5, normalized=True)),
            )

    for divider in layers.lane_divider:
        for part in _lines(divider):
            coords = np.asarray(part.coords)
            line_token = build.line(coords)
            node_tokens = build.tables["line"][-1]["node_tokens"]
            segments_of_line = [{"node_token": t, "segment_type": LANE_DIVIDER_SEGMENT_TYPE} for t in node_tokens]
            build.add("lane_divider", line_token=line_token, lane_divider_segments=segments_of_line)

    return {
        "version": MAP_VERSION,
        "canvas_edge": [float(bounds[2]), float(bounds[3])],
        **build.tables,
        "road_block": [],
        "traffic_light": [],
        "lane_connector": [],
        "arcline_path_3": {},
        "connectivity": {},
    }


def write_map_expansion(dataroot: str | Path, location: str, layers: MapLayers, bounds: Bounds) -> Path:
    """Write ``DATAROOT/maps/expansion/<location>.json`` and return its path."""
    path = Path(dataroot) / "maps" / "expansion" / f"{location}.json"
    atomic_write_text(path, json.dumps(map_expansion_json(layers, bounds, location), separators=(",", ":")))
    return path
