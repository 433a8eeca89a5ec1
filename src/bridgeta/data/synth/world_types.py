"""The description of a synthetic town, shared by the world generator, the sensors and the writer.

Everything is in the town's ``global`` frame (metres, z up, ground at z = 0), like a nuScenes map.
Map layers are shapely geometries so they can be written as nuScenes map-expansion JSON and
rasterised exactly; painted markings and 3D objects are what the sensors see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from shapely.geometry import LineString, Polygon

# Ground materials. The sensors shade and give LiDAR intensity by material; every surface
# of the scene (ground raster cells and mesh faces) carries one of these ids.
MATERIALS = (
    "grass",  # 0: default ground outside roads
    "asphalt",  # 1: drivable area, car parks
    "concrete",  # 2: walkways (raised by a curb)
    "paint_white",  # 3: lane dividers, crossings, stop lines, parking stalls
    "paint_yellow",  # 4: road dividers
    "building",  # 5
    "vehicle",  # 6
    "pedestrian",  # 7
    "pole",  # 8
    "tree_trunk",  # 9
    "foliage",  # 10
    "curb",  # 11: the vertical face of a raised walkway
)
MATERIAL_ID = {name: index for index, name in enumerate(MATERIALS)}

Condition = Literal["day", "night", "rain"]


@dataclass
class MapLayers:
    """Semantic map of a town (what labels are made from), nuScenes map-expansion layers."""

    drivable_area: list[Polygon] = field(default_factory=list)
    road_segment: list[tuple[Polygon, bool]] = field(default_factory=list)  # (shape, is_intersection)
    lane: list[Polygon] = field(default_factory=list)
    ped_crossing: list[Polygon] = field(default_factory=list)
    walkway: list[Polygon] = field(default_factory=list)
    stop_line: list[Polygon] = field(default_factory=list)
    carpark_area: list[Polygon] = field(default_factory=list)
    road_divider: list[LineString] = field(default_factory=list)
    lane_divider: list[LineString] = field(default_factory=list)


@dataclass
class PaintMark:
    """A painted polygon on the ground (one dash, one zebra stripe, a stop bar, a stall line)."""

    polygon: Polygon
    material: Literal["paint_white", "paint_yellow"]


@dataclass
class Box:
    """An oriented 3D box: centre (x, y, z), size (length along heading, width, height), yaw (rad)."""

    center: tuple[float, float, float]
    size: tuple[float, float, float]
    yaw: float


@dataclass
class StaticObject:
    kind: Literal["building", "tree", "pole", "parked_vehicle"]
    box: Box
    # nuScenes category for annotated objects (parked vehicles), else None.
    category: str | None = None


@dataclass
class Agent:
    """A moving (or waiting) road user with a sampled trajectory.

    ``times`` (s, increasing, covering the whole scene) and ``poses`` ``(T, 3)`` of
    ``(x, y, yaw)``; the box centre height and size are constant.
    """

    category: str  # nuScenes category, e.g. "vehicle.car", "human.pedestrian.adult"
    size: tuple[float, float, float]  # length, width, height
    times: np.ndarray
    poses: np.ndarray

    def speed_at(self, time: float, half_window: float = 0.25) -> float:
        """Ground speed (m/s) at ``time``: the centre's displacement over ``±half_window`` s."""
        a, b = max(time - half_window, float(self.times[0])), min(time + half_window, float(self.times[-1]))
        if b <= a:
            return 0.0
        start, end = self.box_at(a).center, self.box_at(b).center
        return float(np.hypot(end[0] - start[0], end[1] - start[1]) / (b - a))

    def box_at(self, time: float) -> Box:
        x = float(np.interp(time, self.times, self.poses[:, 0]))
        y = float(np.interp(time, self.times, self.poses[:, 1]))
        yaw = float(np.interp(time, self.times, np.unwrap(self.poses[:, 2])))
        return Box((x, y, self.size[2] / 2), self.size, yaw)


@dataclass
class EgoRoute:
    """The ego vehicle's rear-axle pose over the scene: ``times`` (s) and ``poses`` ``(T, 3)``."""

    times: np.ndarray
    poses: np.ndarray

    def pose_at(self, time: float) -> tuple[float, float, float]:
        x = float(np.interp(time, self.times, self.poses[:, 0]))
        y = float(np.interp(time, self.times, self.poses[:, 1]))
        yaw = float(np.interp(time, self.times, np.unwrap(self.poses[:, 2])))
        return x, y, yaw


@dataclass
class SceneScript:
    """One scene in a town: the ego's route, the moving agents and the weather/lighting."""

    name: str
    condition: Condition
    duration: float  # seconds
    ego: EgoRoute
    agents: list[Agent]


@dataclass
class Town:
    """A whole procedural town: map, paint, static objects, and the scenes driven in it."""

    location: str  # nuScenes map location name, e.g. "synth-train-0"
    bounds: tuple[float, float, float, float]  # (x_min, y_min, x_max, y_max) of the map canvas
    layers: MapLayers
    paint: list[PaintMark]
    statics: list[StaticObject]
    scenes: list[SceneScript]
    # Height of raised walkways above the road (the curb LiDAR sees and cameras barely do).
    curb_height: float = 0.15
