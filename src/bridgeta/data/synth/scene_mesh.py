"""Triangle meshes of a synthetic town, and its ground material raster, for Embree ray casting.

The sensors (``sensors.py``) see the town only through this module: every surface a ray can hit
is a triangle with a material id (``world_types.MATERIALS``) and an object id. What a camera
struggles with is real geometry here: walkways are extruded to ``town.curb_height`` with vertical
``curb`` faces, so a LiDAR beam measures the step.

The ground is two huge triangles; its appearance (grass, asphalt, concrete, paint) comes from a
:class:`GroundRaster` looked up at the hit point, because paint lines are centimetres wide and would
otherwise need millions of triangles. The static part of the town is triangulated once
(:meth:`StaticScene.build`); :func:`scene_at` appends the agents of one instant and builds the
Embree BVH of the whole scene. For a generated town (~700 objects, 31k triangles) that takes
~45 ms, against ~600 ms to render the sample, so one intersector per instant is simpler than a
two-level scene and costs little.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
import trimesh
from PIL import Image, ImageDraw
from shapely.geometry import Polygon
from trimesh.ray.ray_pyembree import RayMeshIntersector

from bridgeta.data.synth.world_types import MATERIAL_ID, Box, Town

# ``face_material`` of the ground plane: the material comes from the GroundRaster at the hit point.
GROUND = -1
# ``face_object`` of surfaces that belong to no object (ground, walkways).
NO_OBJECT = -1
# How far the ground plane extends beyond the town canvas, so that the horizon is ground, not sky.
GROUND_MARGIN = 1000.0

_PAINT = (MATERIAL_ID["paint_white"], MATERIAL_ID["paint_yellow"])


@dataclass
class GroundRaster:
    """The town's ground materials on a fine grid, plus a paint-coverage pyramid for cameras.

    ``material[r, c]`` is the material id of the cell ``x in [x0 + c*res, x0 + (c+1)*res)``,
    ``y in [y0 + r*res, ...)``. LiDAR point-samples it (a beam footprint is a few centimetres).
    A camera pixel far away covers metres of road, so point sampling would alias thin paint into
    random dashes; ``paint[k]`` holds the fraction of white and yellow paint per cell of size
    ``res * 2**(k+1)`` (uint8, 0..255), which the camera reads at the level matching its pixel
    footprint, the way a real lens averages a distant line into a faint grey one.
    """

    material: np.ndarray
    paint: list[np.ndarray]
    origin: tuple[float, float]
    resolution: float

    @classmethod
    def build(cls, town: Town, resolution: float = 0.05, levels: int = 6) -> GroundRaster:
        """Rasterise grass < asphalt (drivable area, car parks) < concrete (walkways) < paint."""
        x_min, y_min, x_max, y_max = town.bounds
        # Whole multiples of the coarsest cell, so every pyramid level halves exactly.
        block = 2**levels
        rows = block * math.ceil((y_max - y_min) / resolution / block)
        cols = block * math.ceil((x_max - x_min) / resolution / block)
        shape = (rows, cols)
        origin = (float(x_min), float(y_min))
        material = np.full(shape, MATERIAL_ID["grass"], dtype=np.uint8)
        layers = [
            ("asphalt", town.layers.drivable_area + town.layers.carpark_area),
            ("concrete", town.layers.walkway),
            ("paint_white", [m.polygon for m in town.paint if m.material == "paint_white"]),
            ("paint_yellow", [m.polygon for m in town.paint if m.material == "paint_yellow"]),
        ]
        for name, polygons in layers:
            if polygons:
                material[_rasterize(polygons, origin, resolution, shape)] = MATERIAL_ID[name]
        paint = [np.zeros((rows >> k, cols >> k, 2), np.uint8) for k in range(1, levels + 1)]
        for channel, paint_id in enumerate(_PAINT):
            coverage = _halve(material == paint_id) * 255 // 4  # fractions in 0..255 from here on
            paint[0][..., channel] = coverage
            for level in paint[1:]:
                coverage = (_halve(coverage) + 2) // 4
                level[..., channel] = coverage
        return cls(material, paint, origin, float(resolution))

    def _cells(
        self, x: np.ndarray, y: np.ndarray, level: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        size = self.resolution * 2**level
        grid = self.material if level == 0 else self.paint[level - 1]
        col = np.floor((x - self.origin[0]) / size).astype(np.int64)
        row = np.floor((y - self.origin[1]) / size).astype(np.int64)
        inside = (col >= 0) & (row >= 0) & (col < grid.shape[1]) & (row < grid.shape[0])
        return row, col, inside

    def materials_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Material id at points (grass outside the canvas)."""
        row, col, inside = self._cells(x, y, 0)
        out = np.full(x.shape, MATERIAL_ID["grass"], dtype=np.int64)
        out[inside] = self.material[row[inside], col[inside]]
        return out

    def paint_coverage(self, x: np.ndarray, y: np.ndarray, footprint: np.ndarray) -> np.ndarray:
        """``(N, 2)`` white and yellow paint fractions averaged over a ``footprint``-metre cell."""
        level = np.floor(np.log2(np.maximum(footprint, 1e-6) / self.resolution))
        level = np.clip(level, 0, len(self.paint)).astype(np.int64)
        out = np.zeros((len(x), 2), np.float32)
        for k in np.unique(level):
            sel = np.flatnonzero(level == k)
            row, col, inside = self._cells(x[sel], y[sel], int(k))
            sel, row, col = sel[inside], row[inside], col[inside]
            if k == 0:
                values = self.material[row, col]
                out[sel] = np.stack([values == m for m in _PAINT], axis=-1)
            else:
                out[sel] = self.paint[k - 1][row, col] / 255.0
        return out


def _halve(grid: np.ndarray) -> np.ndarray:
    """Sums of 2x2 blocks (even-sized grid) as uint16."""
    return sum(grid[i::2, j::2].astype(np.uint16) for i in (0, 1) for j in (0, 1))


def _rasterize(
    polygons: Sequence[Polygon],
    origin: tuple[float, float],
    resolution: float,
    shape: tuple[int, int],
) -> np.ndarray:
    """Boolean mask of the union of ``polygons`` (holes respected) on the raster grid."""
    union = shapely.unary_union(list(polygons))
    parts = [p for p in shapely.get_parts(union) if p.geom_type == "Polygon" and not p.is_empty]
    # An island inside another part's hole has a smaller outline, so drawing larger outlines first
    # and punching each part's holes right after it never erases a part drawn earlier.
    parts.sort(key=lambda p: Polygon(p.exterior).area, reverse=True)
    image = Image.new("1", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(image)

    def pixels(ring) -> list[tuple[float, float]]:
        # Pillow puts pixel centres on integer coordinates.
        xy = (np.asarray(ring.coords) - origin) / resolution - 0.5
        return [tuple(p) for p in xy]

    for part in parts:
        draw.polygon(pixels(part.exterior), fill=1)
        for ring in part.interiors:
            draw.polygon(pixels(ring), fill=0)
    return np.asarray(image, dtype=bool)


# ----------------------------------------------------------------------------------------------
# Triangle soup helpers. Each returns (vertices (V, 3), faces (F, 3)) for many shapes at once.


def _place(local: np.ndarray, xy: np.ndarray, z0: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """Rotate ``(B, V, 3)`` local vertices by ``yaw`` about z and move them to ``(xy, z0)``."""
    c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    x = c * local[..., 0] - s * local[..., 1] + xy[:, 0:1]
    y = s * local[..., 0] + c * local[..., 1] + xy[:, 1:2]
    return np.stack([x, y, local[..., 2] + z0[:, None]], axis=-1)


# Unit box corners (x, y in [-0.5, 0.5], z in [0, 1]) and its 10 faces without the bottom.
_BOX_CORNERS = np.array(
    [[x, y, z] for z in (0.0, 1.0) for y in (-0.5, 0.5) for x in (-0.5, 0.5)], dtype=np.float64
)
_BOX_FACES = np.array(
    [[4, 5, 7], [4, 7, 6], [0, 1, 5], [0, 5, 4], [1, 3, 7], [1, 7, 5], [3, 2, 6], [3, 6, 7],
     [2, 0, 4], [2, 4, 6]],
    dtype=np.int64,
)


def _boxes(
    xy: np.ndarray,
    z0: np.ndarray,
    z1: np.ndarray,
    length: np.ndarray,
    width: np.ndarray,
    yaw: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Oriented boxes standing on ``z0`` with tops at ``z1`` (no bottom face: it is never seen)."""
    scale = np.stack([length, width, z1 - z0], axis=-1)[:, None, :]
    vertices = _place(_BOX_CORNERS[None] * scale, xy, z0, yaw)
    return _batch(vertices, _BOX_FACES)


def _prism_template(sections: int) -> tuple[np.ndarray, np.ndarray]:
    angles = np.linspace(0.0, 2 * np.pi, sections, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    vertices = np.concatenate(
        [np.c_[ring, np.zeros(sections)], np.c_[ring, np.ones(sections)], [[0.0, 0.0, 1.0]]]
    )
    i, j = np.arange(sections), (np.arange(sections) + 1) % sections
    sides = np.concatenate(
        [np.stack([i, j, j + sections], 1), np.stack([i, j + sections, i + sections], 1)]
    )
    cap = np.stack([i + sections, j + sections, np.full(sections, 2 * sections)], 1)
    return vertices, np.concatenate([sides, cap])


_PRISM = _prism_template(8)
_SPHERE = (
    np.asarray(trimesh.creation.icosphere(subdivisions=1).vertices, dtype=np.float64),
    np.asarray(trimesh.creation.icosphere(subdivisions=1).faces, dtype=np.int64),
)


def _prisms(
    xy: np.ndarray, z0: np.ndarray, z1: np.ndarray, radius: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Octagonal columns (tree trunks, poles, pedestrians) with a top cap."""
    scale = np.stack([radius, radius, z1 - z0], axis=-1)[:, None, :]
    vertices = _place(_PRISM[0][None] * scale, xy, z0, np.zeros(len(xy)))
    return _batch(vertices, _PRISM[1])


def _ellipsoids(
    centre: np.ndarray, radii: np.ndarray, yaw: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """80-face ellipsoids (tree crowns), ``radii`` along the yawed x, y and z axes."""
    vertices = _place(_SPHERE[0][None] * radii[:, None, :], centre[:, :2], centre[:, 2], yaw)
    return _batch(vertices, _SPHERE[1])


def _batch(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten ``(B, V, 3)`` copies of one template into one vertex and face array."""
    count, per = vertices.shape[:2]
    offsets = (np.arange(count) * per)[:, None, None]
    return vertices.reshape(-1, 3), (faces[None] + offsets).reshape(-1, 3)


@dataclass
class _Soup:
    """Triangles being collected, each with a material id and an object id."""

    vertices: list[np.ndarray]
    faces: list[np.ndarray]
    materials: list[np.ndarray]
    objects: list[np.ndarray]
    count: int = 0

    @classmethod
    def empty(cls) -> _Soup:
        return cls([], [], [], [])

    def add(
        self, mesh: tuple[np.ndarray, np.ndarray], material: int, objects: np.ndarray | int
    ) -> None:
        """Append triangles; ``objects`` is one id, or one per template copy (equal face counts)."""
        vertices, faces = mesh
        if len(faces) == 0:
            return
        ids = np.asarray(objects, dtype=np.int32)
        if ids.ndim == 0:
            per_face = np.full(len(faces), ids, np.int32)
        else:
            per_face = np.repeat(ids, len(faces) // len(ids))
        self.vertices.append(vertices)
        self.faces.append(faces + self.count)
        self.materials.append(np.full(len(faces), material, np.int16))
        self.objects.append(per_face)
        self.count += len(vertices)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not self.faces:
            empty = np.zeros((0, 3))
            return empty, empty.astype(np.int64), np.zeros(0, np.int16), np.zeros(0, np.int32)
        return (
            np.concatenate(self.vertices),
            np.concatenate(self.faces),
            np.concatenate(self.materials),
            np.concatenate(self.objects),
        )


def _road_user_kind(category: str) -> str:
    if category.startswith("human"):
        return "person"
    return "car" if category.startswith(("vehicle.car", "vehicle.emergency")) else "box"


def _add_road_users(
    soup: _Soup, categories: Sequence[str], boxes: Sequence[Box], ids: np.ndarray
) -> None:
    """Vehicles as a body plus a cabin (cars) or one box, people as octagonal columns."""
    if not boxes:
        return
    centre = np.array([b.center for b in boxes], dtype=np.float64)
    size = np.array([b.size for b in boxes], dtype=np.float64)
    yaw = np.array([b.yaw for b in boxes], dtype=np.float64)
    bottom, top = centre[:, 2] - size[:, 2] / 2, centre[:, 2] + size[:, 2] / 2
    kind = np.array([_road_user_kind(c) for c in categories])
    vehicle = MATERIAL_ID["vehicle"]
    if (person := kind == "person").any():
        radius = size[person, :2].min(axis=1) / 2
        column = _prisms(centre[person, :2], bottom[person], top[person], radius)
        soup.add(column, MATERIAL_ID["pedestrian"], ids[person])
    if (other := kind == "box").any():
        length, width = size[other, 0], size[other, 1]
        soup.add(
            _boxes(centre[other, :2], bottom[other], top[other], length, width, yaw[other]),
            vehicle,
            ids[other],
        )
    if (car := kind == "car").any():
        xy, length, width, height = centre[car, :2], size[car, 0], size[car, 1], size[car, 2]
        waist = bottom[car] + 0.55 * height
        soup.add(_boxes(xy, bottom[car], waist, length, width, yaw[car]), vehicle, ids[car])
        # The cabin sits a little behind the middle, as on a hatchback or saloon.
        heading = np.stack([np.cos(yaw[car]), np.sin(yaw[car])], axis=-1)
        cabin_xy = xy - 0.08 * length[:, None] * heading
        cabin = _boxes(cabin_xy, waist, top[car], 0.5 * length, 0.9 * width, yaw[car])
        soup.add(cabin, vehicle, ids[car])


def _convex_pieces(polygon: Polygon, depth: int = 0) -> list[Polygon]:
    """Cut a polygon (holes allowed) into convex pieces, for fan triangulation.

    Horizontal slabs through every vertex leave trapezoids (no vertex lies strictly inside a slab,
    so each connected piece is bounded by two straight edges). Polygons with many vertices are
    first halved so every slab cut stays cheap. No triangulation engine is needed.
    """
    coords = shapely.get_coordinates(polygon)
    x_min, y_min, x_max, y_max = polygon.bounds
    if len(coords) > 48 and depth < 16:
        if x_max - x_min >= y_max - y_min:
            mid = (x_min + x_max) / 2
            halves = shapely.box([x_min - 1, mid], y_min - 1, [mid, x_max + 1], y_max + 1)
        else:
            mid = (y_min + y_max) / 2
            halves = shapely.box(x_min - 1, [y_min - 1, mid], x_max + 1, [mid, y_max + 1])
        return [
            piece
            for part in shapely.get_parts(shapely.intersection(polygon, halves))
            if part.geom_type == "Polygon" and part.area > 1e-9
            for piece in _convex_pieces(part, depth + 1)
        ]
    ys = np.unique(coords[:, 1])
    slabs = shapely.box(x_min - 1, ys[:-1], x_max + 1, ys[1:])
    parts = shapely.get_parts(shapely.intersection(polygon, slabs))
    return [p for p in parts if p.geom_type == "Polygon" and p.area > 1e-9]


def _flat_polygon(polygon: Polygon, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Triangles covering ``polygon`` at height ``z``."""
    triangles = []
    for piece in _convex_pieces(polygon):
        ring = np.asarray(piece.exterior.coords)[:-1]
        k = np.arange(1, len(ring) - 1)
        triangles.append(np.stack([np.repeat(ring[:1], len(k), 0), ring[k], ring[k + 1]], axis=1))
    if not triangles:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    tri = np.concatenate(triangles)
    edge_a, edge_b = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    tri = tri[np.abs(edge_a[:, 0] * edge_b[:, 1] - edge_a[:, 1] * edge_b[:, 0]) > 1e-9]
    vertices = np.concatenate([tri.reshape(-1, 2), np.full((len(tri) * 3, 1), z)], axis=1)
    return vertices, np.arange(len(vertices)).reshape(-1, 3)


def _walls(polygon: Polygon, height: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertical quads along every ring of ``polygon`` from the ground to ``height`` (the curb)."""
    quads = []
    for ring in [polygon.exterior, *polygon.interiors]:
        xy = np.asarray(ring.coords)
        a, b = xy[:-1], xy[1:]
        keep = np.linalg.norm(b - a, axis=1) > 1e-6
        a, b = a[keep], b[keep]
        zero, top = np.zeros((len(a), 1)), np.full((len(a), 1), height)
        corners = [np.c_[a, zero], np.c_[b, zero], np.c_[b, top], np.c_[a, top]]
        quads.append(np.stack(corners, axis=1))
    corners = np.concatenate(quads)
    base = (np.arange(len(corners)) * 4)[:, None]
    faces = np.concatenate([base + [0, 1, 2], base + [0, 2, 3]])
    return corners.reshape(-1, 3), faces


@dataclass
class StaticScene:
    """The triangles of everything in a town that does not move, built once per town.

    ``face_object`` indexes ``town.statics`` (``NO_OBJECT`` for ground and walkways); moving agents
    get ids from ``num_objects`` on, so each object can get its own colour and reflectivity.
    """

    vertices: np.ndarray
    faces: np.ndarray
    face_material: np.ndarray
    face_object: np.ndarray
    num_objects: int

    @classmethod
    def build(cls, town: Town) -> StaticScene:
        soup = _Soup.empty()
        x_min, y_min, x_max, y_max = town.bounds
        low_x, low_y = x_min - GROUND_MARGIN, y_min - GROUND_MARGIN
        high_x, high_y = x_max + GROUND_MARGIN, y_max + GROUND_MARGIN
        ground = np.array(
            [[low_x, low_y, 0.0], [high_x, low_y, 0.0], [high_x, high_y, 0.0], [low_x, high_y, 0.0]]
        )
        soup.add((ground, np.array([[0, 1, 2], [0, 2, 3]])), GROUND, NO_OBJECT)

        walkways = shapely.unary_union(list(town.layers.walkway)) if town.layers.walkway else None
        for part in shapely.get_parts(walkways) if walkways is not None else []:
            if part.geom_type != "Polygon" or part.is_empty:
                continue
            soup.add(_flat_polygon(part, town.curb_height), MATERIAL_ID["concrete"], NO_OBJECT)
            soup.add(_walls(part, town.curb_height), MATERIAL_ID["curb"], NO_OBJECT)

        def select(kind: str) -> tuple[np.ndarray, ...]:
            """Ids, centres, sizes, yaws and bottom heights of the statics of one kind."""
            ids = np.array([i for i, s in enumerate(town.statics) if s.kind == kind], np.int32)
            boxes = [town.statics[i].box for i in ids]
            centre = np.array([b.center for b in boxes], dtype=np.float64).reshape(-1, 3)
            size = np.array([b.size for b in boxes], dtype=np.float64).reshape(-1, 3)
            yaw = np.array([b.yaw for b in boxes], dtype=np.float64)
            return ids, centre, size, yaw, centre[:, 2] - size[:, 2] / 2

        ids, centre, size, yaw, bottom = select("building")
        if len(ids):
            top = bottom + size[:, 2]
            blocks = _boxes(centre[:, :2], bottom, top, size[:, 0], size[:, 1], yaw)
            soup.add(blocks, MATERIAL_ID["building"], ids)
        ids, centre, size, yaw, bottom = select("pole")
        if len(ids):
            top, radius = bottom + size[:, 2], size[:, :2].min(axis=1) / 2
            soup.add(_prisms(centre[:, :2], bottom, top, radius), MATERIAL_ID["pole"], ids)
        ids, centre, size, yaw, bottom = select("tree")
        if len(ids):
            # Crown: an ellipsoid filling the top of the box; trunk: a column up to its centre.
            crown_height = np.minimum(size[:, :2].max(axis=1) * 0.6, size[:, 2] * 0.4)
            radii = np.stack([size[:, 0] / 2, size[:, 1] / 2, crown_height], 1)
            crown = np.c_[centre[:, :2], bottom + size[:, 2] - crown_height]
            trunk = np.clip(size[:, :2].min(axis=1) * 0.06, 0.08, 0.4)
            trunks = _prisms(centre[:, :2], bottom, crown[:, 2], trunk)
            soup.add(trunks, MATERIAL_ID["tree_trunk"], ids)
            soup.add(_ellipsoids(crown, radii, yaw), MATERIAL_ID["foliage"], ids)
        parked = [i for i, s in enumerate(town.statics) if s.kind == "parked_vehicle"]
        _add_road_users(
            soup,
            [town.statics[i].category or "vehicle.car" for i in parked],
            [town.statics[i].box for i in parked],
            np.array(parked, dtype=np.int32),
        )
        vertices, faces, materials, objects = soup.arrays()
        return cls(vertices, faces, materials, objects, len(town.statics))


@dataclass
class RayHits:
    """First hits of a batch of rays: which ray, which face, where, and how far."""

    ray: np.ndarray
    face: np.ndarray
    location: np.ndarray
    distance: np.ndarray


@dataclass
class SceneMesh:
    """The whole scene at one instant, ready for ray casting."""

    mesh: trimesh.Trimesh
    face_material: np.ndarray
    face_object: np.ndarray
    intersector: RayMeshIntersector

    def cast(self, origins: np.ndarray, directions: np.ndarray) -> RayHits:
        """First hit of every ray (rays that hit nothing are absent), sorted by ray index."""
        face, ray, location = self.intersector.intersects_id(
            origins, directions, multiple_hits=False, return_locations=True
        )
        order = np.argsort(ray, kind="stable")
        face, ray, location = face[order], ray[order], location[order]
        distance = np.linalg.norm(location - origins[ray], axis=1)
        return RayHits(ray, face, location, distance)

    def occluded(self, origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Whether each ray hits anything at all (shadow rays towards the sun)."""
        return self.intersector.intersects_any(origins, directions)

    def materials(self, hits: RayHits, ground: GroundRaster) -> np.ndarray:
        """Material id at every hit, from the ground raster where the ray hit the ground plane."""
        material = self.face_material[hits.face].astype(np.int64)
        on_ground = material == GROUND
        where = hits.location[on_ground]
        material[on_ground] = ground.materials_at(where[:, 0], where[:, 1])
        return material


def scene_at(static: StaticScene, agents_boxes: Sequence[tuple[str, Box]]) -> SceneMesh:
    """The static town plus the agents of one instant, given as ``(nuScenes category, box)``."""
    soup = _Soup.empty()
    ids = static.num_objects + np.arange(len(agents_boxes), dtype=np.int32)
    _add_road_users(soup, [c for c, _ in agents_boxes], [b for _, b in agents_boxes], ids)
    vertices, faces, materials, objects = soup.arrays()
    mesh = trimesh.Trimesh(
        np.concatenate([static.vertices, vertices]),
        np.concatenate([static.faces, faces + len(static.vertices)]),
        process=False,
        validate=False,
    )
    intersector = RayMeshIntersector(mesh)
    # Build the BVH and the per-face caches now, so later (possibly concurrent) queries only read.
    intersector.intersects_first(np.zeros((1, 3)), np.array([[0.0, 0.0, -1.0]]))
    for cached in ("triangles", "face_normals", "scale"):
        getattr(mesh, cached)
    return SceneMesh(
        mesh,
        np.concatenate([static.face_material, materials]),
        np.concatenate([static.face_object, objects]),
        intersector,
    )
