"""Procedural synthetic towns: a jittered street grid with its map layers, paint, objects and scenes.

``generate_town(location, seed, settings)`` builds a whole ``Town`` (see ``world_types``) from a
seed alone, so a data set can be regenerated bit-for-bit instead of being stored.

Coordinates. The town is generated directly in the positive quadrant of its ``global`` frame:
the map canvas (``Town.bounds``) starts at ``(0, 0)``, because the nuScenes devkit assumes every
map canvas does. The street network (roads and walkways) starts a little more than
``settings.margin`` (default 100 m) from the origin and ends exactly ``settings.margin`` before
``bounds[2:]``, so a ±50 m BEV patch around any ego pose stays on the canvas; buildings fill the
first ``outer_depth`` metres of that margin.

Traffic keeps right (like Boston in nuScenes): on a road with direction ``u`` and left normal
``n``, the lanes driven along ``u`` lie on the ``-n`` side of the road divider.

Lane polygons have a fixed vertex order that the map writer relies on to emit the lanes' entry
and exit edges: ``[start_right, end_right, end_left, start_left]`` in their direction of travel
(counter-clockwise).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely.geometry import LineString, MultiPoint, Polygon
from shapely.geometry.polygon import orient

from bridgeta.data.synth.world_types import (
    Agent,
    Box,
    Condition,
    EgoRoute,
    MapLayers,
    PaintMark,
    SceneScript,
    StaticObject,
    Town,
)

# Trajectories are sampled this often so that linear interpolation between samples (what
# ``Agent.box_at`` and ``EgoRoute.pose_at`` do) stays smooth at any sensor timestamp.
SAMPLE_RATE_HZ = 20.0

# Moving vehicles: nuScenes category -> (mean size (length, width, height), share of the fleet).
VEHICLE_TYPES: dict[str, tuple[tuple[float, float, float], float]] = {
    "vehicle.car": ((4.6, 1.9, 1.6), 0.75),
    "vehicle.truck": ((7.5, 2.4, 3.0), 0.15),
    "vehicle.bus.rigid": ((11.5, 2.6, 3.3), 0.10),
}
PEDESTRIAN_CATEGORY = "human.pedestrian.adult"
PARKED_CATEGORY = "vehicle.car"

# The ego footprint (for keeping other vehicles off it): its pose is the rear axle, the box
# centre is this far ahead of it.
_EGO_SIZE = (4.8, 1.9)
_EGO_REAR_AXLE_TO_CENTER = 1.3

# Compass arms of a grid node and the geometry between them.
_OPPOSITE = {"E": "W", "W": "E", "N": "S", "S": "N"}
_PERPENDICULAR = {"E": ("N", "S"), "W": ("N", "S"), "N": ("E", "W"), "S": ("E", "W")}

_STOP_LINE_DEPTH = 0.5
_DASH, _GAP = 3.0, 6.0  # lane-divider dash pattern (m)
_LANE_DIVIDER_PAINT_WIDTH = 0.15
_YELLOW_LINE_WIDTH, _YELLOW_LINE_OFFSET = 0.1, 0.1  # double yellow: two lines centred at ±offset
_ZEBRA_STRIPE, _ZEBRA_PITCH = 0.5, 1.0
_STALL_WIDTH, _STALL_DEPTH, _AISLE_DEPTH = 2.6, 5.5, 6.5
_STALL_LINE_WIDTH = 0.12
_DRIVEWAY_WIDTH = 6.0


@dataclass(frozen=True)
class TownSettings:
    """Knobs of the town generator; ``tiny()`` for tests and smoke runs, ``default()`` for data."""

    blocks_x: int = 5
    blocks_y: int = 4
    block_size: tuple[float, float] = (60.0, 110.0)  # street spacing range (m)
    node_jitter: float = 3.0  # intersections move by up to this much (m), so streets are not axis-aligned
    lanes_per_direction: tuple[int, ...] = (1, 2)  # drawn once per street
    lane_width: float = 3.5
    walkway_width: float = 3.0
    curb_height: float = 0.15
    crossing_width: float = 4.0
    intersection_pad: float = 4.0  # intersection half-size beyond the widest incident road (m)
    t_junction_probability: float = 0.15  # chance to remove an interior street segment
    carpark_probability: float = 0.35  # per block
    building_density: float = 0.8  # share of frontage slots that get a building
    building_setback: float = 2.0  # lawn between walkway and buildings (m)
    outer_depth: float = 30.0  # depth of the built-up band outside the outermost streets (m)
    trees_per_100m: float = 5.0  # along kerbs
    poles_per_100m: float = 3.0
    kerb_parking_probability: float = 0.35  # per side of a two-lane street
    parked_occupancy: float = 0.7  # share of stalls / kerb slots with a car
    vehicles_per_scene: int = 12
    pedestrians_per_scene: int = 16
    num_scenes: int = 10
    scene_duration: float = 20.0  # seconds
    condition_mix: tuple[tuple[Condition, float], ...] = (("day", 0.5), ("night", 0.25), ("rain", 0.25))
    ego_speed: tuple[float, float] = (5.0, 11.0)  # cruise speed range (m/s); slower in turns
    vehicle_speed: tuple[float, float] = (4.0, 12.0)
    pedestrian_speed: tuple[float, float] = (0.9, 1.6)
    lateral_acceleration: float = 2.5  # caps speed in turns (m/s^2)
    acceleration: float = 2.0  # caps speed changes (m/s^2)
    margin: float = 100.0  # canvas beyond the street network (m), >= 60 so BEV patches stay inside

    def __post_init__(self) -> None:
        widest = max(self.lanes_per_direction) * self.lane_width
        approach = widest + self.intersection_pad + self.crossing_width + 1.0 + _STOP_LINE_DEPTH
        shortest = self.block_size[0] - 2 * self.node_jitter
        if shortest < 2 * approach + 10.0:
            raise ValueError(f"block_size {self.block_size} too small for intersections of {approach:.1f} m")
        if self.margin < 60.0:
            raise ValueError("margin must be >= 60 m so that a ±50 m patch around the ego stays on the map")
        if not set(self.lanes_per_direction) <= {1, 2}:
            raise ValueError("lanes_per_direction choices must be 1 or 2")

    @classmethod
    def tiny(cls) -> TownSettings:
        """A 3x3-block town with few objects and two 20 s scenes, for tests and smoke runs."""
        return cls(
            blocks_x=3,
            blocks_y=3,
            block_size=(55.0, 75.0),
            trees_per_100m=3.0,
            poles_per_100m=2.0,
            vehicles_per_scene=4,
            pedestrians_per_scene=6,
            num_scenes=2,
        )

    @classmethod
    def default(cls) -> TownSettings:
        return cls()


# ----------------------------------------------------------------------------------------------
# Street network


@dataclass
class _Edge:
    """A street segment between two grid nodes; ``start``/``end`` are its centreline mouths."""

    a: int
    b: int
    lanes: int
    half_width: float
    start: np.ndarray = field(default_factory=lambda: np.zeros(2))
    end: np.ndarray = field(default_factory=lambda: np.zeros(2))
    # Kerb parking in the outer lane, per direction of travel (+1 along a->b, -1 along b->a).
    kerb_parked: dict[int, bool] = field(default_factory=lambda: {1: False, -1: False})

    @property
    def length(self) -> float:
        return float(np.linalg.norm(self.end - self.start))

    @property
    def u(self) -> np.ndarray:
        return (self.end - self.start) / self.length

    def frame(self, sign: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Start mouth, unit direction and left normal for travel along ``sign``."""
        u = self.u * sign
        return (self.start if sign > 0 else self.end), u, np.array([-u[1], u[0]])


@dataclass
class _Network:
    """The street graph and everything derived from it that later stages need."""

    nodes: np.ndarray  # (N, 2)
    edges: list[_Edge]
    arms: list[dict[str, tuple[int, int]]]  # per node: compass -> (edge index, sign away from node)
    size: np.ndarray  # (N,) mouth distance from the node centre
    zone: np.ndarray  # (N,) crossing + stop line clearance from the mouth (0 without crossings)
    roads: Polygon  # road segments and intersections (no driveways)
    blocks: list[Polygon]  # kerb outlines of the city blocks
    walk_rings: list[LineString]  # centre lines of the walkways (pedestrian paths)
    crossings: list[tuple[int, str]]  # (node, compass arm) of each ped crossing


def _quad(origin: np.ndarray, u: np.ndarray, n: np.ndarray, s0: float, s1: float, o0: float, o1: float) -> Polygon:
    """Rectangle ``origin + s*u + o*n`` for s in [s0, s1], o in [o0, o1], counter-clockwise if o0 < o1."""
    corners = [origin + s * u + o * n for s, o in ((s0, o0), (s1, o0), (s1, o1), (s0, o1))]
    return Polygon(corners)


def _arm(net: _Network, node: int, compass: str) -> tuple[_Edge, np.ndarray, np.ndarray, np.ndarray]:
    """Edge, mouth point, outward direction and its left normal of one arm of a node."""
    index, sign = net.arms[node][compass]
    edge = net.edges[index]
    return (edge, *edge.frame(sign))


def _build_network(rng: np.random.Generator, s: TownSettings) -> _Network:
    """Jittered grid of nodes joined by streets, minus a few interior segments (T-junctions).

    Streets keep one lane count along their whole row or column, so lane counts only change at
    intersections; every node gets a square-ish intersection sized by its widest street.
    """
    nx, ny = s.blocks_x, s.blocks_y
    pad = max(s.lanes_per_direction) * s.lane_width + s.walkway_width + s.node_jitter + 1.0
    xs = s.margin + pad + np.concatenate([[0.0], np.cumsum(rng.uniform(*s.block_size, nx))])
    ys = s.margin + pad + np.concatenate([[0.0], np.cumsum(rng.uniform(*s.block_size, ny))])
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    nodes = np.stack([gx, gy], -1).reshape(-1, 2) + rng.uniform(-s.node_jitter, s.node_jitter, ((nx + 1) * (ny + 1), 2))
    lanes_x = rng.choice(s.lanes_per_direction, nx + 1)  # streets running north-south, per column
    lanes_y = rng.choice(s.lanes_per_direction, ny + 1)  # streets running east-west, per row

    def node_id(i: int, j: int) -> int:
        return i * (ny + 1) + j

    candidates: list[tuple[int, int, int, bool]] = []  # (a, b, lanes, interior)
    for i in range(nx + 1):
        for j in range(ny + 1):
            if i < nx:
                candidates.append((node_id(i, j), node_id(i + 1, j), int(lanes_y[j]), 0 < j < ny))
            if j < ny:
                candidates.append((node_id(i, j), node_id(i, j + 1), int(lanes_x[i]), 0 < i < nx))
    degree = np.zeros(len(nodes), int)
    for a, b, _, _ in candidates:
        degree[a] += 1
        degree[b] += 1
    # T-junctions: drop interior segments whose ends both keep three arms (no dead ends).
    keep = np.ones(len(candidates), bool)
    for k in rng.permutation(len(candidates)):
        a, b, _, interior = candidates[k]
        if interior and degree[a] == 4 and degree[b] == 4 and rng.random() < s.t_junction_probability:
            keep[k] = False
            degree[a] -= 1
            degree[b] -= 1

    edges: list[_Edge] = []
    arms: list[dict[str, tuple[int, int]]] = [{} for _ in nodes]
    for k in np.flatnonzero(keep):
        a, b, lanes, _ = candidates[k]
        east = b - a == ny + 1
        arms[a]["E" if east else "N"] = (len(edges), 1)
        arms[b]["W" if east else "S"] = (len(edges), -1)
        edges.append(_Edge(a, b, lanes, lanes * s.lane_width))

    size = np.array([max(edges[e].half_width for e, _ in arm.values()) + s.intersection_pad for arm in arms])
    zone = np.array([s.crossing_width + 1.0 + _STOP_LINE_DEPTH if len(arm) >= 3 else 0.0 for arm in arms])
    for edge in edges:
        u = (nodes[edge.b] - nodes[edge.a]) / np.linalg.norm(nodes[edge.b] - nodes[edge.a])
        edge.start = nodes[edge.a] + u * size[edge.a]
        edge.end = nodes[edge.b] - u * size[edge.b]

    pieces = [_quad(*e.frame(1), 0.0, e.length, -e.half_width, e.half_width) for e in edges]
    net = _Network(nodes, edges, arms, size, zone, Polygon(), [], [], [])
    pieces += [_intersection_polygon(net, node) for node in range(len(nodes))]
    roads = shapely.union_all(pieces)
    if not isinstance(roads, Polygon):
        raise RuntimeError("street network is not connected")
    net.roads = roads
    net.blocks = sorted((Polygon(ring) for ring in roads.interiors), key=lambda p: (p.centroid.x, p.centroid.y))
    half = s.walkway_width / 2
    net.walk_rings = [LineString(block.buffer(-half, join_style="mitre").exterior.coords) for block in net.blocks]
    net.walk_rings.append(LineString(Polygon(roads.exterior).buffer(half, join_style="mitre").exterior.coords))
    net.crossings = [(node, c) for node, arm in enumerate(arms) if len(arm) >= 3 for c in sorted(arm)]
    return net


def _intersection_polygon(net: _Network, node: int) -> Polygon:
    """Convex hull of the arms' mouths, plus virtual mouths where an arm is missing.

    A missing arm gets a mouth on the kerb line of the crossing street, so T-junctions and
    bends stay square on the closed side while the hull rounds (chamfers) the open corners.
    """
    points = []
    for compass in net.arms[node]:
        edge, mouth, _, n = _arm(net, node, compass)
        points += [mouth + n * edge.half_width, mouth - n * edge.half_width]
    for compass in _OPPOSITE:
        if compass in net.arms[node]:
            continue
        edge, _, u, n = _arm(net, node, _OPPOSITE[compass])
        reach = max(_arm(net, node, c)[0].half_width for c in _PERPENDICULAR[compass] if c in net.arms[node])
        centre = net.nodes[node] - u * reach
        points += [centre + n * edge.half_width, centre - n * edge.half_width]
    return MultiPoint(points).convex_hull


# ----------------------------------------------------------------------------------------------
# Map layers and paint


def _road_layers(net: _Network, s: TownSettings, layers: MapLayers, paint: list[PaintMark]) -> None:
    """Road segments, lanes, dividers, crossings and stop lines, with the paint that marks them."""
    for edge in net.edges:
        start, u, n = edge.frame(1)
        layers.road_segment.append((_quad(start, u, n, 0.0, edge.length, -edge.half_width, edge.half_width), False))
        for sign in (1, -1):
            origin, ut, nt = edge.frame(sign)
            for k in range(edge.lanes):
                right, left = -(k + 1) * s.lane_width, -k * s.lane_width
                layers.lane.append(_quad(origin, ut, nt, 0.0, edge.length, right, left))
        s0, s1 = net.zone[edge.a], edge.length - net.zone[edge.b]
        layers.road_divider.append(LineString([start + s0 * u, start + s1 * u]))
        for offset in (-_YELLOW_LINE_OFFSET, _YELLOW_LINE_OFFSET):
            line = _quad(start, u, n, s0, s1, offset - _YELLOW_LINE_WIDTH / 2, offset + _YELLOW_LINE_WIDTH / 2)
            paint.append(PaintMark(line, "paint_yellow"))
        if edge.lanes == 2:
            for offset in (-s.lane_width, s.lane_width):
                layers.lane_divider.append(LineString([start + s0 * u + offset * n, start + s1 * u + offset * n]))
                for d0 in np.arange(s0, s1 - 0.5, _DASH + _GAP):
                    half = _LANE_DIVIDER_PAINT_WIDTH / 2
                    dash = _quad(start, u, n, d0, min(d0 + _DASH, s1), offset - half, offset + half)
                    paint.append(PaintMark(dash, "paint_white"))
    for node in range(len(net.nodes)):
        layers.road_segment.append((_intersection_polygon(net, node), True))

    cw = s.crossing_width
    for node, compass in net.crossings:
        edge, mouth, u, n = _arm(net, node, compass)
        w = edge.half_width
        layers.ped_crossing.append(_quad(mouth, u, n, 0.5, 0.5 + cw, -w, w))
        for o in np.arange(-w + 0.3, w - 0.3 - _ZEBRA_STRIPE + 1e-6, _ZEBRA_PITCH):
            paint.append(PaintMark(_quad(mouth, u, n, 0.5, 0.5 + cw, o, o + _ZEBRA_STRIPE), "paint_white"))
        # Traffic towards the node drives along -u, on its right: the +n side of this arm.
        stop = _quad(mouth, u, n, 1.0 + cw, 1.0 + cw + _STOP_LINE_DEPTH, 0.3, w)
        layers.stop_line.append(stop)
        paint.append(PaintMark(stop, "paint_white"))


@dataclass
class _Carpark:
    area: Polygon
    driveway: Polygon
    stall_lines: list[Polygon]
    stalls: list[tuple[np.ndarray, float]]  # stall centre, yaw of a car parked nose-in


def _carpark(rng: np.random.Generator, block: Polygon, s: TownSettings) -> _Carpark | None:
    """A one-row car park along one side of a block, reached by a driveway across the walkway."""
    inner = orient(block.buffer(-s.walkway_width, join_style="mitre").simplify(0.2), 1.0)
    coords = np.asarray(inner.exterior.coords)
    sides = [(p, q) for p, q in zip(coords[:-1], coords[1:]) if np.linalg.norm(q - p) >= 30.0]
    if not sides:
        return None
    p, q = sides[rng.integers(len(sides))]
    side = float(np.linalg.norm(q - p))
    t = (q - p) / side
    m = np.array([-t[1], t[0]])  # into the block (the exterior runs counter-clockwise)
    length = min(side - 8.0, rng.uniform(22.0, 50.0))
    a0 = rng.uniform(4.0, side - 4.0 - length)
    depth = _AISLE_DEPTH + _STALL_DEPTH
    area = _quad(p, t, m, a0, a0 + length, 0.0, depth)
    if not inner.buffer(0.01).contains(area):
        return None
    entry = rng.uniform(a0 + 1.0, a0 + length - 1.0 - _DRIVEWAY_WIDTH)
    # Overlapping road and car park a little, so the walkway is cut cleanly (no float sliver).
    driveway = _quad(p, t, m, entry, entry + _DRIVEWAY_WIDTH, -s.walkway_width - 0.2, 0.3)
    count = int((length - 1.0) // _STALL_WIDTH)
    first = a0 + 0.5
    half = _STALL_LINE_WIDTH / 2
    bounds = first + _STALL_WIDTH * np.arange(count + 1)
    lines = [_quad(p, t, m, b - half, b + half, _AISLE_DEPTH, depth) for b in bounds]
    yaw = math.atan2(m[1], m[0])
    stalls = [(p + t * (first + (i + 0.5) * _STALL_WIDTH) + m * (depth - _STALL_DEPTH / 2), yaw) for i in range(count)]
    return _Carpark(area, driveway, lines, stalls)


def _parts(geometry: shapely.Geometry) -> list[Polygon]:
    """The non-degenerate polygons of a (multi)polygon, e.g. of a union or a difference."""
    polygons = [g for g in shapely.get_parts(geometry) if isinstance(g, Polygon)]
    return [p for p in polygons if p.area > 0.01]


# ----------------------------------------------------------------------------------------------
# Static objects


def _parked_car(rng: np.random.Generator, centre: np.ndarray, yaw: float) -> StaticObject:
    size = float(rng.uniform(4.2, 4.9)), float(rng.uniform(1.75, 1.95)), float(rng.uniform(1.45, 1.7))
    box = Box((float(centre[0]), float(centre[1]), size[2] / 2), size, yaw)
    return StaticObject("parked_vehicle", box, PARKED_CATEGORY)


def _footprint(box: Box) -> Polygon:
    """Ground outline of a box (for overlap tests against driveways)."""
    c, s = math.cos(box.yaw), math.sin(box.yaw)
    u, n = np.array([c, s]), np.array([-s, c])
    length, width = box.size[:2]
    return _quad(np.asarray(box.center[:2]), u, n, -length / 2, length / 2, -width / 2, width / 2)


def _buildings(rng: np.random.Generator, zone: Polygon, rings: list[np.ndarray], s: TownSettings) -> list[StaticObject]:
    """Buildings fronting the given rings of ``zone`` (oriented so the zone is on their left).

    Walking along each straight side, slots of random frontage get a building of random depth
    and height with probability ``building_density``; a building must fit in the zone and not
    touch the ones before it, which keeps them off walkways, car parks and each other.
    """
    shapely.prepare(zone)
    placed: list[Polygon] = []
    objects = []
    for coords in rings:
        for p, q in zip(coords[:-1], coords[1:]):
            side = float(np.linalg.norm(q - p))
            if side < 8.0:
                continue
            t = (q - p) / side
            m = np.array([-t[1], t[0]])
            cursor = rng.uniform(0.0, 3.0)
            while cursor < side - 6.0:
                front = min(rng.uniform(10.0, 28.0), side - cursor)
                depth = rng.uniform(10.0, 22.0)
                height = rng.uniform(4.0, 16.0) if rng.random() < 0.85 else rng.uniform(16.0, 40.0)
                if rng.random() < s.building_density:
                    for d in (depth, depth / 2):
                        rect = _quad(p, t, m, cursor, cursor + front, 0.05, 0.05 + d)
                        if zone.contains(rect) and not any(rect.intersects(other) for other in placed):
                            placed.append(rect)
                            centre = p + t * (cursor + front / 2) + m * (0.05 + d / 2)
                            size = (front, d, height)
                            box = Box((float(centre[0]), float(centre[1]), height / 2), size, math.atan2(t[1], t[0]))
                            objects.append(StaticObject("building", box))
                            break
                cursor += front + rng.uniform(1.5, 6.0)
    return objects


def _kerb_objects(
    rng: np.random.Generator, net: _Network, walkway: shapely.Geometry, keepout: shapely.Geometry, s: TownSettings
) -> list[StaticObject]:
    """Trees and poles on the walkways just behind the kerb, where they occlude the road."""
    outer = Polygon(net.roads.exterior).buffer(0.8, join_style="mitre").exterior
    rings = [LineString(b.buffer(-0.8, join_style="mitre").exterior.coords) for b in net.blocks]
    rings.append(LineString(outer.coords))
    shapely.prepare(walkway)
    shapely.prepare(keepout)
    objects = []
    for ring in rings:
        n_trees = rng.poisson(ring.length * s.trees_per_100m / 100)
        n_poles = rng.poisson(ring.length * s.poles_per_100m / 100)
        where = np.concatenate([rng.uniform(0, ring.length, n_trees), rng.uniform(0, ring.length, n_poles)])
        is_tree = np.arange(len(where)) < n_trees
        order = np.argsort(where, kind="stable")
        where, is_tree = where[order], is_tree[order]
        xy = shapely.get_coordinates(shapely.line_interpolate_point(ring, where))
        ok = shapely.contains_xy(walkway, xy[:, 0], xy[:, 1]) & ~shapely.contains_xy(keepout, xy[:, 0], xy[:, 1])
        last = -np.inf
        for at, tree, (x, y), good in zip(where, is_tree, xy, ok):
            if not good or at - last < 5.0:
                continue
            last = at
            if tree:
                crown, height = rng.uniform(2.5, 5.0), rng.uniform(5.0, 10.0)
                box = Box((float(x), float(y), height / 2), (crown, crown, height), float(rng.uniform(0, math.pi / 2)))
                objects.append(StaticObject("tree", box))
            else:
                height = rng.uniform(6.0, 9.0)
                objects.append(StaticObject("pole", Box((float(x), float(y), height / 2), (0.3, 0.3, height), 0.0)))
    return objects


def _kerb_parking(
    rng: np.random.Generator, net: _Network, driveways: shapely.Geometry, s: TownSettings
) -> list[StaticObject]:
    """Cars parked in the outer lane of some sides of two-lane streets; routes then avoid that lane."""
    shapely.prepare(driveways)
    objects = []
    for edge in net.edges:
        if edge.lanes != 2:
            continue
        for sign in (1, -1):
            if rng.random() >= s.kerb_parking_probability:
                continue
            edge.kerb_parked[sign] = True
            origin, u, n = edge.frame(sign)
            first, last = (edge.a, edge.b) if sign > 0 else (edge.b, edge.a)
            cursor, stop = net.zone[first] + 2.0, edge.length - net.zone[last] - 2.0
            while cursor + 6.5 <= stop:
                if rng.random() < s.parked_occupancy:
                    centre = origin + u * (cursor + 3.25) - n * (edge.half_width - 1.3)  # 0.3 m off the kerb
                    car = _parked_car(rng, centre, math.atan2(u[1], u[0]))
                    if not driveways.intersects(_footprint(car.box)):
                        objects.append(car)
                cursor += 6.5
    return objects


# ----------------------------------------------------------------------------------------------
# Trajectories


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average with edge padding (keeps the length and the end values)."""
    padded = np.pad(values, window // 2, mode="edge")
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def _bezier(p0: np.ndarray, h0: np.ndarray, p3: np.ndarray, h1: np.ndarray, count: int = 48) -> np.ndarray:
    """Cubic from ``p0`` heading ``h0`` to ``p3`` heading ``h1``: tangent-continuous joins, so yaw stays smooth.

    Control points sit on the headings (0.39 chord for turns, close to a circular arc; a third
    for straight crossings); inside a near-rectangular intersection they stay in its hull.
    """
    chord = float(np.linalg.norm(p3 - p0))
    reach = chord / 3 if float(h0 @ h1) > 0.7 else 0.39 * chord
    p1, p2 = p0 + h0 * reach, p3 - h1 * reach
    t = np.linspace(0.0, 1.0, count)[:, None]
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def _pick_lane(rng: np.random.Generator, edge: _Edge, sign: int, previous: int | None) -> int:
    """A lane index (0 next to the divider); the outer lane is skipped where cars park at the kerb."""
    options = [k for k in range(edge.lanes) if not (k == 1 and edge.kerb_parked[sign])]
    if previous in options and rng.random() < 0.7:
        return int(previous)
    return int(rng.choice(options))


def _drive_path(rng: np.random.Generator, net: _Network, s: TownSettings, length: float) -> np.ndarray:
    """A polyline along lane centres, turning at random at intersections (straight on twice as often)."""

    def lane_line(edge: _Edge, sign: int, lane: int, s_from: float) -> tuple[np.ndarray, np.ndarray]:
        origin, u, n = edge.frame(sign)
        base = origin - n * (lane + 0.5) * s.lane_width
        return np.stack([base + u * s_from, base + u * edge.length]), u

    index, sign = int(rng.integers(len(net.edges))), int(rng.choice((1, -1)))
    edge = net.edges[index]
    lane = _pick_lane(rng, edge, sign, None)
    points, heading = lane_line(edge, sign, lane, rng.uniform(0.0, 0.6 * edge.length))
    pieces = [points]
    total = float(np.linalg.norm(points[1] - points[0]))
    while total < length:
        node = edge.b if sign > 0 else edge.a
        arms = net.arms[node]
        arrived = next(c for c, arm in arms.items() if arm == (index, -sign))
        options = sorted((c, arm) for c, arm in arms.items() if arm[0] != index)
        weights = np.array([2.0 if c == _OPPOSITE[arrived] else 1.0 for c, _ in options])
        _, (index, sign) = options[rng.choice(len(options), p=weights / weights.sum())]
        edge = net.edges[index]
        lane = _pick_lane(rng, edge, sign, lane)
        points, next_heading = lane_line(edge, sign, lane, 0.0)
        curve = _bezier(pieces[-1][-1], heading, points[0], next_heading)
        pieces += [curve[1:-1], points]
        total += float(np.linalg.norm(np.diff(curve, axis=0), axis=1).sum()) + edge.length
        heading = next_heading
    return np.concatenate(pieces)


def _arc_length(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points without zero-length steps, and the cumulative distance along them."""
    steps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    keep = np.concatenate([[True], steps > 1e-6])
    return points[keep], np.concatenate([[0.0], np.cumsum(steps[steps > 1e-6])])


def _drive_trajectory(points: np.ndarray, cruise: float, times: np.ndarray, s: TownSettings) -> np.ndarray:
    """Poses ``(T, 3)`` driving ``points`` at ``cruise``, slowing for curves with bounded acceleration."""
    points, arc = _arc_length(points)
    ds = 0.25
    grid = np.arange(0.0, arc[-1], ds)
    x, y = np.interp(grid, arc, points[:, 0]), np.interp(grid, arc, points[:, 1])
    yaw = _smooth(np.unwrap(np.arctan2(np.gradient(y), np.gradient(x))), 5)
    curvature = _smooth(np.abs(np.gradient(yaw)) / ds, 9)
    limit = np.minimum(cruise, np.sqrt(s.lateral_acceleration / np.maximum(curvature, 1e-6)))
    # v_i^2 <= v_{i-1}^2 + 2 a ds forwards and backwards, as running minima of v^2 - i * 2 a ds.
    ramp = 2 * s.acceleration * ds * np.arange(len(grid))
    v2 = np.minimum.accumulate(limit**2 - ramp) + ramp
    v2 = (np.minimum.accumulate(v2[::-1] - ramp) + ramp)[::-1]
    speed = np.sqrt(v2)
    clock = np.concatenate([[0.0], np.cumsum(2 * ds / (speed[:-1] + speed[1:]))])
    at = np.interp(times, clock, grid)
    return np.stack([np.interp(at, grid, x), np.interp(at, grid, y), np.interp(at, grid, yaw)], axis=1)


def _walk_trajectory(rng: np.random.Generator, points: np.ndarray, speed: float, times: np.ndarray) -> np.ndarray:
    """Poses ``(T, 3)`` walking ``points`` at constant speed, facing along the current leg."""
    points, arc = _arc_length(points)
    at = np.minimum(speed * times, arc[-1])
    x, y = np.interp(at, arc, points[:, 0]), np.interp(at, arc, points[:, 1])
    legs = np.diff(points, axis=0)
    if speed <= 0.0 or len(legs) == 0:
        return np.stack([x, y, np.full_like(x, rng.uniform(-math.pi, math.pi))], axis=1)
    leg_yaw = np.arctan2(legs[:, 1], legs[:, 0])
    leg = np.clip(np.searchsorted(arc, at, side="right") - 1, 0, len(legs) - 1)
    return np.stack([x, y, leg_yaw[leg]], axis=1)


def _ring_walk(ring: LineString, start: float, direction: int, length: float) -> np.ndarray:
    """Points every 0.5 m along a closed walkway centre line, wrapping around."""
    where = (start + direction * np.arange(0.0, length + 0.5, 0.5)) % ring.length
    return shapely.get_coordinates(shapely.line_interpolate_point(ring, where))


def _footprints(poses: np.ndarray, length: float, width: float, ahead: float, inflate: float) -> np.ndarray:
    """Box outlines (array of polygons) of a trajectory, ``ahead`` metres forward of the poses."""
    c, s = np.cos(poses[:, 2]), np.sin(poses[:, 2])
    cx, cy = poses[:, 0] + ahead * c, poses[:, 1] + ahead * s
    half_l, half_w = length / 2 + inflate, width / 2 + inflate
    local = np.array([[half_l, half_w], [-half_l, half_w], [-half_l, -half_w], [half_l, -half_w]])
    x = cx[:, None] + local[:, 0] * c[:, None] - local[:, 1] * s[:, None]
    y = cy[:, None] + local[:, 0] * s[:, None] + local[:, 1] * c[:, None]
    return shapely.polygons(np.stack([x, y], axis=-1))


def _pedestrian_path(rng: np.random.Generator, net: _Network, length: float, s: TownSettings) -> np.ndarray:
    """A walk along a walkway, or (a quarter of the time) one that crosses a street at a zebra."""
    rings = net.walk_rings
    if not net.crossings or rng.random() < 0.75:
        lengths = np.array([r.length for r in rings])
        ring = rings[rng.choice(len(rings), p=lengths / lengths.sum())]
        return _ring_walk(ring, rng.uniform(0, ring.length), int(rng.choice((1, -1))), length)
    node, compass = net.crossings[rng.integers(len(net.crossings))]
    edge, mouth, u, n = _arm(net, node, compass)
    centre = mouth + u * (0.5 + s.crossing_width / 2)
    reach = edge.half_width + s.walkway_width / 2
    side = float(rng.choice((1.0, -1.0)))
    here, there = centre - side * n * reach, centre + side * n * reach
    ring_a = rings[int(np.argmin(shapely.distance(rings, shapely.points(here))))]
    ring_b = rings[int(np.argmin(shapely.distance(rings, shapely.points(there))))]
    before = rng.uniform(0.0, 0.5) * length
    after = max(length - before - 2 * reach, 0.0) + 1.0
    way_a, way_b = int(rng.choice((1, -1))), int(rng.choice((1, -1)))
    approach = _ring_walk(ring_a, ring_a.project(shapely.points(here)) - way_a * before, way_a, before)
    leave = _ring_walk(ring_b, ring_b.project(shapely.points(there)), way_b, after)
    return np.concatenate([approach, leave])


def _scene(rng: np.random.Generator, name: str, net: _Network, s: TownSettings) -> SceneScript:
    """Ego route, vehicles that never overlap the ego or each other (checked every 0.5 s), pedestrians."""
    times = np.arange(math.ceil(s.scene_duration * SAMPLE_RATE_HZ - 1e-9) + 1) / SAMPLE_RATE_HZ
    names = [c for c, _ in s.condition_mix]
    weights = np.array([w for _, w in s.condition_mix], float)
    condition = names[rng.choice(len(names), p=weights / weights.sum())]

    cruise = rng.uniform(*s.ego_speed)
    ego = _drive_trajectory(_drive_path(rng, net, s, cruise * s.scene_duration + 20.0), cruise, times, s)
    check = slice(None, None, int(SAMPLE_RATE_HZ // 2))  # collisions are checked every 0.5 s
    occupied = [_footprints(ego[check], *_EGO_SIZE, _EGO_REAR_AXLE_TO_CENTER, 0.5)]

    categories = list(VEHICLE_TYPES)
    shares = np.array([share for _, share in VEHICLE_TYPES.values()])
    agents = []
    for _ in range(8 * s.vehicles_per_scene):
        if len(agents) == s.vehicles_per_scene:
            break
        category = categories[rng.choice(len(categories), p=shares / shares.sum())]
        size = tuple(float(v) for v in np.asarray(VEHICLE_TYPES[category][0]) * rng.uniform(0.92, 1.08, 3))
        speed = rng.uniform(*s.vehicle_speed)
        poses = _drive_trajectory(_drive_path(rng, net, s, speed * s.scene_duration + 20.0), speed, times, s)
        outline = _footprints(poses[check], size[0], size[1], 0.0, 0.5)
        if any(shapely.intersects(outline, other).any() for other in occupied):
            continue  # would drive through the ego or another vehicle
        occupied.append(outline)
        agents.append(Agent(category, size, times.copy(), poses))

    for _ in range(s.pedestrians_per_scene):
        speed = 0.0 if rng.random() < 0.1 else rng.uniform(*s.pedestrian_speed)
        path = _pedestrian_path(rng, net, speed * s.scene_duration + 1.0, s)
        size = (float(rng.uniform(0.5, 0.8)), float(rng.uniform(0.5, 0.7)), float(rng.uniform(1.55, 1.9)))
        agents.append(Agent(PEDESTRIAN_CATEGORY, size, times.copy(), _walk_trajectory(rng, path, speed, times)))
    return SceneScript(name, condition, s.scene_duration, EgoRoute(times.copy(), ego), agents)


# ----------------------------------------------------------------------------------------------


def generate_town(location: str, seed: int, settings: TownSettings | None = None) -> Town:
    """Build the town ``location`` from ``seed``: same inputs, identical town.

    Stages: street graph and intersections; road layers and their paint; car parks with
    driveways; walkways (the kerb-side band of every block, minus driveways); buildings,
    kerb-side trees and poles, parked cars; then the scenes driven in it.
    """
    s = settings or TownSettings.default()
    rng = np.random.default_rng([seed, zlib.crc32(location.encode())])
    net = _build_network(rng, s)
    layers, paint = MapLayers(), []
    _road_layers(net, s, layers, paint)

    carparks: dict[int, _Carpark] = {}
    for k, block in enumerate(net.blocks):
        if rng.random() < s.carpark_probability and (carpark := _carpark(rng, block, s)) is not None:
            carparks[k] = carpark
    driveways = shapely.union_all([c.driveway for c in carparks.values()])
    layers.drivable_area = _parts(shapely.union_all([net.roads, driveways]))
    layers.carpark_area = [c.area for c in carparks.values()]
    paint += [PaintMark(line, "paint_white") for c in carparks.values() for line in c.stall_lines]

    ww = s.walkway_width
    outer = Polygon(net.roads.exterior)
    bands = [b.difference(b.buffer(-ww, join_style="mitre")) for b in net.blocks]
    bands.append(outer.buffer(ww, join_style="mitre").difference(outer))
    layers.walkway = [p for band in bands for p in _parts(band.difference(driveways))]

    statics: list[StaticObject] = []
    for k, block in enumerate(net.blocks):
        zone = block.buffer(-ww - s.building_setback, join_style="mitre")
        if k in carparks:
            zone = zone.difference(carparks[k].area.buffer(2.0, join_style="mitre"))
        for part in _parts(zone):
            part = orient(part.simplify(0.2), 1.0)
            statics += _buildings(rng, part, [np.asarray(part.exterior.coords)], s)
    frontage = outer.buffer(ww + s.building_setback, join_style="mitre")
    outskirts = orient(frontage.buffer(s.outer_depth, join_style="mitre").difference(frontage), 1.0)
    statics += _buildings(rng, outskirts, [np.asarray(r.coords) for r in outskirts.interiors], s)
    keepout = shapely.union_all(layers.ped_crossing + [p for p, inter in layers.road_segment if inter] + [driveways])
    statics += _kerb_objects(rng, net, shapely.union_all(layers.walkway), keepout.buffer(2.0), s)
    statics += _kerb_parking(rng, net, driveways, s)
    for carpark in carparks.values():
        for centre, yaw in carpark.stalls:
            if rng.random() < s.parked_occupancy:
                statics.append(_parked_car(rng, centre, yaw + math.pi * (rng.random() < 0.5)))  # nose in or out

    scenes = [_scene(rng, f"{location}-scene-{k:03d}", net, s) for k in range(s.num_scenes)]
    extent = outer.buffer(ww, join_style="mitre").bounds
    bounds = (0.0, 0.0, extent[2] + s.margin, extent[3] + s.margin)
    return Town(location, bounds, layers, paint, statics, scenes, s.curb_height)
