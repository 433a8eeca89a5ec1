"""Label geometry on a large map: one polygon part at a time vs a union first (docs/data.md).

Writes a 2 km x 2 km map whose drivable_area layer holds N overlapping random polygons (a real
city map holds a few thousand), then rasterises the drivable_area labels of 50 ego poses both ways
on the same repaired, indexed polygons, and prints the time per sample and how many cells differ. Run: ``python scripts/label_geometry_speed.py [--polygons 4000]``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np
import shapely
from shapely.geometry import Polygon

from bridgeta.data import labels as L
from bridgeta.data.devkit import load_map
from bridgeta.data.map_expansion import write_map_expansion
from bridgeta.data.prepare import DEFAULT_LABEL_GRID
from bridgeta.data.synth.world_types import MapLayers


def random_polygons(count: int, rng: np.random.Generator) -> list[Polygon]:
    polygons = []
    for _ in range(count):
        cx, cy = rng.uniform(100, 1900, 2)
        angles = np.sort(rng.uniform(0, 2 * math.pi, 8))
        radii = rng.uniform(5, 30, 8)
        polygons.append(Polygon(np.c_[cx + radii * np.cos(angles), cy + radii * np.sin(angles)]))
    return polygons


PER_PART = L.polygon_draw_groups


def union_groups(parts):
    merged = [p for p in shapely.get_parts(shapely.union_all(parts)) if isinstance(p, Polygon)] if parts else []
    return PER_PART(merged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polygons", type=int, default=4000)
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        write_map_expansion(root, "big-map", MapLayers(drivable_area=random_polygons(args.polygons, rng)),
                            (0.0, 0.0, 2000.0, 2000.0))
        nusc_map = load_map(root, "big-map")
        poses = []
        for _ in range(args.samples):
            yaw = rng.uniform(-math.pi, math.pi)
            pose = np.eye(4)
            pose[:2, :2] = [[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]]
            pose[:2, 3] = rng.uniform(200, 1800, 2)
            poses.append(pose)
        L.rasterise_map_labels(nusc_map, poses[0], DEFAULT_LABEL_GRID, ("drivable_area",))  # builds the index
        results = {}
        for name, grouping in (("one part at a time", PER_PART), ("union first", union_groups)):
            original = L.polygon_draw_groups
            L.polygon_draw_groups = grouping  # the only difference between the two ways
            try:
                started = time.perf_counter()
                masks = [L.rasterise_map_labels(nusc_map, p, DEFAULT_LABEL_GRID, ("drivable_area",)) for p in poses]
                results[name] = (time.perf_counter() - started) / len(poses), masks
            finally:
                L.polygon_draw_groups = original
        (a, masks_a), (b, masks_b) = results.values()
        differ = np.mean([(x != y).sum() for x, y in zip(masks_a, masks_b)])
        cells = np.mean([m.sum() for m in masks_a])
        print(f"{args.polygons} overlapping polygons, {args.samples} samples, {cells:.0f} drivable cells per sample")
        print(f"one part at a time: {a * 1e3:.1f} ms/sample; union first: {b * 1e3:.1f} ms/sample; "
              f"cells that differ: {differ:.1f} per sample (union vertices are new points, rounded to cells)")


if __name__ == "__main__":
    main()
