"""What each camera pixel sees, as labels: its class (``camera_labels.CAMERA_CLASSES``) and depth.

The renderer's primary rays already know their first hit (face, point, distance), so labelling
costs a table lookup per pixel and no extra ray. Mesh faces carry a material; the ground plane's
meaning comes from :class:`GroundSemantics`, a raster of the map layers on the ground raster's
grid (the material raster alone cannot tell a crossing stripe from a lane dash, or a car park
from a road: both are paint, both asphalt).
"""

from __future__ import annotations

import numpy as np

from bridgeta.data.camera_labels import CAMERA_CLASS_ID
from bridgeta.data.synth.scene_mesh import GROUND, GroundRaster, RayHits, SceneMesh, _rasterize
from bridgeta.data.synth.world_types import MATERIAL_ID, MATERIALS, Town

# Class of a mesh face by material (the ground plane is looked up in GroundSemantics instead).
_MATERIAL_CLASS = np.array(
    [
        CAMERA_CLASS_ID[
            {
                "grass": "terrain",
                "asphalt": "road",
                "concrete": "walkway",  # the walkway top: the only concrete mesh
                "paint_white": "divider",
                "paint_yellow": "divider",
                "building": "building",
                "vehicle": "vehicle",
                "pedestrian": "pedestrian",
                "pole": "pole",
                "tree_trunk": "vegetation",
                "foliage": "vegetation",
                "curb": "walkway",
            }[name]
        ]
        for name in MATERIALS
    ],
    dtype=np.uint8,
)


class GroundSemantics:
    """Class of the ground at any point: the material raster plus three map layers over it.

    The material raster gives terrain (grass), road (asphalt), walkway (concrete) and paint; all
    paint starts as ``divider``. Car parks, crossings and stop lines are drawn over it in that
    order, so stall lines become car park, zebra stripes crossing and stop bars stop line, and the
    paint left is exactly the lane and road dividers. The overlay is drawn polygon by polygon in
    each one's bounding window (the layers cover a few percent of a town), so building it costs
    little next to the material raster itself.
    """

    def __init__(self, town: Town, raster: GroundRaster) -> None:
        self.raster = raster
        rows, cols = raster.material.shape
        self.overlay = np.zeros((rows, cols), dtype=np.uint8)  # 0: no layer, else class id + 1
        size = raster.resolution
        for name, polygons in (
            ("carpark", town.layers.carpark_area),
            ("ped_crossing", town.layers.ped_crossing),
            ("stop_line", town.layers.stop_line),
        ):
            for polygon in polygons:
                x0, y0, x1, y1 = polygon.bounds
                c0 = max(0, int(np.floor((x0 - raster.origin[0]) / size)) - 1)
                r0 = max(0, int(np.floor((y0 - raster.origin[1]) / size)) - 1)
                c1 = min(cols, int(np.ceil((x1 - raster.origin[0]) / size)) + 1)
                r1 = min(rows, int(np.ceil((y1 - raster.origin[1]) / size)) + 1)
                if c1 <= c0 or r1 <= r0:
                    continue
                origin = (raster.origin[0] + c0 * size, raster.origin[1] + r0 * size)
                mask = _rasterize([polygon], origin, size, (r1 - r0, c1 - c0))
                self.overlay[r0:r1, c0:c1][mask] = CAMERA_CLASS_ID[name] + 1

    def classes_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Class of the ground at points (terrain outside the canvas, like the grass there)."""
        row, col, inside = self.raster._cells(x, y, 0)
        out = np.full(x.shape, CAMERA_CLASS_ID["terrain"], dtype=np.uint8)
        row, col = row[inside], col[inside]
        overlay = self.overlay[row, col]
        out[inside] = np.where(overlay > 0, overlay - 1, _MATERIAL_CLASS[self.raster.material[row, col]])
        return out


def pixel_labels(
    scene: SceneMesh,
    semantics: GroundSemantics,
    hits: RayHits,
    directions: np.ndarray,
    optical_axis: np.ndarray,
    size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """``(H, W)`` uint8 classes and float32 depth (metres along ``optical_axis``, 0 for sky).

    ``directions`` are the unit rays of the pixels (row-major), ``hits`` their first hits.
    """
    count = size[0] * size[1]
    classes = np.full(count, CAMERA_CLASS_ID["sky"], dtype=np.uint8)
    depth = np.zeros(count, dtype=np.float32)
    face_material = scene.face_material[hits.face]
    on_ground = face_material == GROUND
    mesh_class = _MATERIAL_CLASS[np.where(on_ground, MATERIAL_ID["grass"], face_material)]
    where = hits.location[on_ground]
    mesh_class[on_ground] = semantics.classes_at(where[:, 0], where[:, 1])
    classes[hits.ray] = mesh_class
    # The camera's z axis, not the ray length: the depth a pinhole model (and LSS) uses.
    depth[hits.ray] = hits.distance * (directions[hits.ray] @ np.asarray(optical_axis, dtype=np.float64))
    return classes.reshape(size), depth.reshape(size)
