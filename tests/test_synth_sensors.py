"""Synthetic sensors: camera, LiDAR and the world agree on geometry, and the physics lets LiDAR
know what the camera cannot (darkness, paint, curb height, range, rain)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
from shapely.geometry import Point, Polygon, box

pytest.importorskip("embreex")

from bridgeta.data.synth.scene_mesh import GroundRaster, StaticScene, scene_at  # noqa: E402
from bridgeta.data.synth.sensors import (  # noqa: E402
    HDL32E_ELEVATIONS_DEG,
    LidarSpec,
    camera_rays,
    headlights,
    render_camera,
    render_sample,
    scan_lidar,
)
from bridgeta.data.synth.world_types import (  # noqa: E402
    MATERIAL_ID,
    Box,
    MapLayers,
    PaintMark,
    StaticObject,
    Town,
)
from bridgeta.rig import NUSCENES_CAMERAS  # noqa: E402

# nuScenes LIDAR_TOP: x right, y forward, z up (-90 deg yaw from the ego), 1.84 m up.
EGO_T_LIDAR = np.array(
    [[0.0, 1.0, 0.0, 0.94], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.84], [0.0, 0.0, 0.0, 1.0]]
)
SIZE = (90, 160)
WHITE, ASPHALT = MATERIAL_ID["paint_white"], MATERIAL_ID["asphalt"]


def pose(x: float, y: float, yaw: float) -> np.ndarray:
    """``global_T_ego`` of a level ego at (x, y) heading ``yaw``."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0, x], [s, c, 0, y], [0, 0, 1, 0], [0, 0, 0, 1.0]])


EGO = pose(0.0, 0.0, 0.05)


def rig_camera(index: int, size: tuple[int, int] = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Intrinsics of a nuScenes camera scaled to ``size``, and its ``global_T_camera`` at EGO."""
    spec = NUSCENES_CAMERAS[index]
    intrinsics = spec.intrinsics().numpy().astype(np.float64)
    intrinsics[:2] *= size[0] / 900.0
    return intrinsics, EGO @ spec.ego_T_camera().numpy().astype(np.float64)


def make_town(statics=(), walkway=(), paint=(), curb_height: float = 0.15) -> Town:
    """A 200 x 80 m asphalt square with whatever the test puts on it."""
    layers = MapLayers(drivable_area=[box(-100, -40, 100, 40)], walkway=list(walkway))
    bounds = (-100.0, -40.0, 100.0, 40.0)
    return Town("test", bounds, layers, list(paint), list(statics), [], curb_height)


def scan_global(scene, raster, global_T_lidar, seed=0, spec=LidarSpec()) -> np.ndarray:
    """A day LiDAR sweep moved to the global frame: x, y, z, intensity, ring."""
    points = scan_lidar(scene, raster, global_T_lidar, np.random.default_rng(seed), "day", spec)
    xyz = points[:, :3].astype(np.float64) @ global_T_lidar[:3, :3].T + global_T_lidar[:3, 3]
    return np.concatenate([xyz, points[:, 3:]], axis=1)


def box_surface_distance(points: np.ndarray, b: Box) -> np.ndarray:
    """Unsigned distance from points to the surface of an oriented box."""
    c, s = math.cos(b.yaw), math.sin(b.yaw)
    d = points - np.asarray(b.center)
    local = np.stack([d[:, 0] * c + d[:, 1] * s, -d[:, 0] * s + d[:, 1] * c, d[:, 2]], axis=1)
    excess = np.abs(local) - np.asarray(b.size) / 2
    outside = np.linalg.norm(np.maximum(excess, 0), axis=1)
    return np.abs(outside + np.minimum(excess.max(axis=1), 0))


def project(points: np.ndarray, intrinsics: np.ndarray, global_T_camera: np.ndarray):
    """Pixel coordinates (u, v) and depth of global points in a camera."""
    camera_T_global = np.linalg.inv(global_T_camera)
    in_camera = points @ camera_T_global[:3, :3].T + camera_T_global[:3, 3]
    uv = in_camera @ intrinsics.T
    return uv[:, :2] / uv[:, 2:3], in_camera[:, 2]


def pixel_truth(scene, raster, intrinsics, global_T_camera, size):
    """Per pixel: material, object id and hit distance of the primary ray (-1, -1, inf: sky)."""
    origins, directions = camera_rays(intrinsics, global_T_camera, size)
    hits = scene.cast(origins, directions)
    material, objects = np.full(size[0] * size[1], -1), np.full(size[0] * size[1], -1)
    distance = np.full(size[0] * size[1], np.inf)
    material[hits.ray] = scene.materials(hits, raster)
    objects[hits.ray] = scene.face_object[hits.face]
    distance[hits.ray] = hits.distance
    return material.reshape(size), objects.reshape(size), distance.reshape(size)


def paint_contrast(image: np.ndarray, material: np.ndarray, band: np.ndarray) -> float:
    """(white paint - asphalt) grey level in a region, in units of the asphalt's spread."""
    grey = image.mean(axis=-1)
    paint, asphalt = grey[band & (material == WHITE)], grey[band & (material == ASPHALT)]
    assert len(paint) > 20 and len(asphalt) > 100
    return (paint.mean() - asphalt.mean()) / asphalt.std()


# ---- one box seen by a camera and a LiDAR --------------------------------------------------

BOX = Box((20.0, 1.5, 1.5), (4.0, 6.0, 3.0), 0.4)


@pytest.fixture(scope="module")
def box_world():
    town, empty = make_town(statics=[StaticObject("building", BOX)]), make_town()
    raster = GroundRaster.build(town)
    return scene_at(StaticScene.build(town), []), scene_at(StaticScene.build(empty), []), raster


def projected_box(intrinsics, global_T_camera, grow: float) -> np.ndarray:
    """Pixels whose centre is in the hull of the projected box corners, grown by ``grow`` px."""
    c, s = math.cos(BOX.yaw), math.sin(BOX.yaw)
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
    corners = corners * np.asarray(BOX.size) / 2
    x, y = corners[:, 0] * c - corners[:, 1] * s, corners[:, 0] * s + corners[:, 1] * c
    rotated = np.stack([x, y, corners[:, 2]], axis=1)
    uv, depth = project(rotated + np.asarray(BOX.center), intrinsics, global_T_camera)
    assert (depth > 0).all()
    hull = Polygon(uv).convex_hull.buffer(grow)
    v, u = np.mgrid[0 : SIZE[0], 0 : SIZE[1]] + 0.5
    return shapely.contains_xy(hull, u, v)


def test_camera_sees_the_box_where_it_projects(box_world):
    scene, empty, raster = box_world
    intrinsics, global_T_camera = rig_camera(0)
    inside = projected_box(intrinsics, global_T_camera, -1.0)
    outside = ~projected_box(intrinsics, global_T_camera, 3.0)
    assert inside.sum() > 150 and outside.sum() > 0.8 * inside.size

    # Object-id render: the primary rays hit the building exactly where it projects.
    _, objects, _ = pixel_truth(scene, raster, intrinsics, global_T_camera, SIZE)
    assert (objects[inside] == 0).all() and not (objects[outside] == 0).any()

    # The shaded image: the box changes its own pixels and nothing else (no sun in rain, and the
    # same seed draws the same sensor noise and streaks).
    def render(world) -> np.ndarray:
        rng = np.random.default_rng(3)
        return render_camera(world, raster, intrinsics, global_T_camera, SIZE, "rain", rng)

    difference = np.abs(render(scene).astype(int) - render(empty).astype(int)).max(axis=-1)
    assert (difference[outside] == 0).all()
    assert np.mean(difference[inside] > 8) > 0.9


def test_lidar_hits_box_surfaces_and_agrees_with_camera(box_world):
    scene, _, raster = box_world
    points = scan_global(scene, raster, EGO @ EGO_T_LIDAR)
    distance = box_surface_distance(points[:, :3], BOX)
    # Everything above the ground within a metre of the box is on its surface (2 cm range noise).
    on_box = (distance < 1.0) & (points[:, 2] > 0.05)
    assert on_box.sum() > 100
    assert np.median(distance[on_box]) < 0.03 and distance[on_box].max() < 0.05 + 5 * 0.02

    # LiDAR points projected into the camera land on pixels that see the same object.
    intrinsics, global_T_camera = rig_camera(0)
    _, objects, _ = pixel_truth(scene, raster, intrinsics, global_T_camera, SIZE)
    uv, depth = project(points[:, :3], intrinsics, global_T_camera)
    inside = (depth > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < SIZE[1]) & (uv[:, 1] >= 0)
    inside &= uv[:, 1] < SIZE[0]
    pixel = np.floor(uv[inside]).astype(int)
    seen = objects[pixel[:, 1], pixel[:, 0]]
    box_points = on_box[inside]
    assert box_points.sum() > 50
    assert np.mean(seen[box_points] == 0) > 0.95  # the building is static object 0
    # Ground returns nearer than the box are in front of it: the camera sees ground there too.
    near_ground = ~box_points & (depth[inside] < 12)
    assert near_ground.sum() > 50 and np.mean(seen[near_ground] == 0) < 0.02


# ---- LiDAR geometry -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def walled_world():
    """Four 40 m tall walls 15 m around the origin: every beam of the LiDAR returns."""
    walls = [((15.5, 0.0), (1.0, 40.0)), ((-15.5, 0.0), (1.0, 40.0))]
    walls += [((0.0, 15.5), (40.0, 1.0)), ((0.0, -15.5), (40.0, 1.0))]
    statics = [StaticObject("building", Box((*xy, 20.0), (*lw, 40.0), 0.0)) for xy, lw in walls]
    town = make_town(statics=statics)
    return scene_at(StaticScene.build(town), []), GroundRaster.build(town, resolution=0.1)


def test_lidar_rings_and_vertical_angles(walled_world):
    scene, raster = walled_world
    spec = LidarSpec(dropout=0.0)
    global_T_lidar = pose(0.0, 0.0, 0.3) @ EGO_T_LIDAR
    points = scan_lidar(scene, raster, global_T_lidar, np.random.default_rng(0), "day", spec)
    assert points.dtype == np.float32 and points.shape[1] == 5
    ring = points[:, 4].astype(int)
    assert np.array_equal(np.bincount(ring, minlength=32), np.full(32, spec.azimuth_steps))
    expected = np.linspace(-30.67, 10.67, 32)  # HDL-32E
    assert np.allclose(HDL32E_ELEVATIONS_DEG, expected)
    elevation = np.degrees(np.arctan2(points[:, 2], np.hypot(points[:, 0], points[:, 1])))
    assert np.abs(elevation - expected[ring]).max() < 0.01


def test_lidar_dropout_fraction(walled_world):
    scene, raster = walled_world

    def count(dropout: float, condition: str = "day") -> int:
        spec, rng = LidarSpec(dropout=dropout), np.random.default_rng(1)
        return len(scan_lidar(scene, raster, EGO_T_LIDAR, rng, condition, spec))

    full, some = count(0.0), count(0.1)
    assert abs(1 - some / full - 0.1) < 0.01
    assert count(0.1, "rain") < 0.96 * some  # rain loses more returns


def test_lidar_max_range():
    near = StaticObject("building", Box((60.0, 0.0, 2.0), (2.0, 8.0, 4.0), 0.0))
    far = StaticObject("building", Box((-75.0, 0.0, 2.0), (2.0, 8.0, 4.0), 0.0))
    town = make_town(statics=[near, far])
    scene, raster = scene_at(StaticScene.build(town), []), GroundRaster.build(town, resolution=0.1)
    points = scan_global(scene, raster, EGO_T_LIDAR)
    assert np.linalg.norm(points[:, :3] - EGO_T_LIDAR[:3, 3], axis=1).max() <= 70.0
    assert (box_surface_distance(points[:, :3], near.box) < 0.1).sum() > 20
    assert (points[:, 0] < -69).sum() == 0


# ---- what LiDAR knows and the camera does not ----------------------------------------------


@pytest.fixture(scope="module")
def painted_road():
    """White lane lines, a zebra of far stripes, a yellow centre line and a raised walkway."""
    paint = [PaintMark(box(-60, y - 0.075, 80, y + 0.075), "paint_white") for y in (-1.75, 5.25)]
    paint += [PaintMark(box(x, -3, x + 0.5, 3), "paint_white") for x in np.arange(30.0, 80, 1.2)]
    paint.append(PaintMark(box(-60, 1.65, 80, 1.85), "paint_yellow"))
    town = make_town(walkway=[box(-60, 7.0, 80, 10.0)], paint=paint, curb_height=0.15)
    return town, scene_at(StaticScene.build(town), []), GroundRaster.build(town)


def test_lidar_intensity_reads_paint(painted_road):
    _, scene, raster = painted_road
    points = scan_global(scene, raster, EGO_T_LIDAR)
    material = raster.materials_at(points[:, 0], points[:, 1])
    ground_near = (np.abs(points[:, 2]) < 0.1) & (np.hypot(points[:, 0], points[:, 1]) < 20)
    paint = points[ground_near & (material == WHITE), 3]
    asphalt = points[ground_near & (material == ASPHALT), 3]
    assert len(paint) > 20 and len(asphalt) > 1000
    assert paint.mean() > 50 and asphalt.mean() < 15


def test_night_blinds_the_camera_not_the_lidar(painted_road):
    _, scene, raster = painted_road
    global_T_lidar = EGO @ EGO_T_LIDAR
    day, night = (
        scan_lidar(scene, raster, global_T_lidar, np.random.default_rng(5), condition)
        for condition in ("day", "night")
    )
    assert np.array_equal(day, night)

    lights = headlights((0.0, 0.0, 0.05))

    def render(camera: int, condition: str) -> np.ndarray:
        intrinsics, global_T_camera = rig_camera(camera)
        rng = np.random.default_rng(camera)
        return render_camera(
            scene, raster, intrinsics, global_T_camera, SIZE, condition, rng, lights
        )

    front_day, front_night = render(0, "day"), render(0, "night")
    assert front_night.mean() < 0.3 * front_day.mean()
    # Lane lines in the headlight beams stay visible at night...
    material, _, distance = pixel_truth(scene, raster, *rig_camera(0), SIZE)
    assert paint_contrast(front_night, material, (distance > 4) & (distance < 15)) > 1.0
    # ...behind the car they sink into the noise.
    material, _, distance = pixel_truth(scene, raster, *rig_camera(3), SIZE)
    behind = (distance > 4) & (distance < 30)
    day_contrast = paint_contrast(render(3, "day"), material, behind)
    assert day_contrast > 3.0
    assert paint_contrast(render(3, "night"), material, behind) < 0.3 * day_contrast


def test_rain_lowers_far_contrast(painted_road):
    _, scene, raster = painted_road
    size = (180, 320)
    intrinsics, global_T_camera = rig_camera(0, size)
    material, _, distance = pixel_truth(scene, raster, intrinsics, global_T_camera, size)
    far, near = (distance > 40) & (distance < 70), (distance > 3) & (distance < 15)

    def far_to_near(condition: str) -> float:
        rng = np.random.default_rng(0)
        image = render_camera(scene, raster, intrinsics, global_T_camera, size, condition, rng)
        grey = image.mean(axis=-1)
        step = [grey[b & (material == WHITE)].mean() - grey[b & (material == ASPHALT)].mean()
                for b in (far, near)]
        return step[0] / step[1]

    assert far_to_near("rain") < 0.6 * far_to_near("day")


def test_lidar_measures_the_curb(painted_road):
    town, scene, raster = painted_road
    points = scan_global(scene, raster, EGO_T_LIDAR)
    y, z = points[:, 1], points[:, 2]
    along = np.abs(points[:, 0]) < 15
    walkway_top, road = z[along & (y > 7.3) & (y < 9.7)], z[along & (y > 5.0) & (y < 6.7)]
    assert len(walkway_top) > 50 and len(road) > 20
    assert abs(np.median(walkway_top) - np.median(road) - town.curb_height) < 0.015
    assert np.abs(road).max() < 0.1


# ---- mesh and raster building blocks --------------------------------------------------------


def test_walkway_mesh_covers_polygon_with_holes():
    ring = Point(0, 0).buffer(12.0, quad_segs=32).difference(Point(0, 0).buffer(9.0, quad_segs=32))
    notched = ring.difference(box(-1, -13, 1, 0))  # > 48 vertices and a notch: splits and slabs
    town = make_town(walkway=[notched])
    static = StaticScene.build(town)
    tri = static.vertices[static.faces[static.face_material == MATERIAL_ID["concrete"]]]
    area = 0.5 * np.abs(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])[:, 2]).sum()
    assert area == pytest.approx(notched.area, rel=1e-6)
    assert np.allclose(tri[..., 2], town.curb_height)
    centroids = tri.mean(axis=1)
    assert shapely.contains_xy(notched.buffer(1e-6), centroids[:, 0], centroids[:, 1]).all()
    curb = static.vertices[static.faces[static.face_material == MATERIAL_ID["curb"]]]
    assert curb[..., 2].min() == 0.0 and curb[..., 2].max() == pytest.approx(town.curb_height)


def test_ground_raster_layers_and_holes():
    road = box(0, 0, 20, 20).difference(box(5, 5, 10, 10))  # a hole stays grass...
    island = box(6, 6, 9, 9)  # ...except where another road polygon sits inside it
    layers = MapLayers(drivable_area=[road, island], walkway=[box(15, 0, 20, 20)])
    paint = [PaintMark(box(1, 1, 3, 19), "paint_white")]
    paint.append(PaintMark(box(16, 1, 17, 2), "paint_yellow"))
    town = Town("t", (-5.0, -5.0, 25.0, 25.0), layers, paint, [], [])
    raster = GroundRaster.build(town, resolution=0.1)
    probes = {
        (-2.0, 2.0): "grass",
        (12.0, 12.0): "asphalt",
        (5.5, 7.5): "grass",
        (7.5, 7.5): "asphalt",
        (17.5, 10.0): "concrete",
        (2.0, 10.0): "paint_white",
        (16.5, 1.5): "paint_yellow",
    }
    xy = np.array(list(probes))
    expected = [MATERIAL_ID[m] for m in probes.values()]
    assert raster.materials_at(xy[:, 0], xy[:, 1]).tolist() == expected
    # The coverage pyramid keeps the amount of paint and spreads it over the footprint.
    coarse = raster.paint_coverage(np.array([2.0, 12.0]), np.array([10.0, 12.0]), np.full(2, 3.2))
    assert 0.3 < coarse[0, 0] < 0.8 and coarse[1].sum() == 0.0


def test_render_sample_outputs():
    parked = Box((12.0, -3.0, 0.8), (4.5, 1.9, 1.6), 0.0)
    town = make_town(statics=[StaticObject("parked_vehicle", parked, "vehicle.car")])
    static, raster = StaticScene.build(town), GroundRaster.build(town, resolution=0.1)
    agents = [
        ("vehicle.car", Box((20.0, 2.0, 0.8), (4.5, 1.9, 1.6), math.pi)),
        ("human.pedestrian.adult", Box((9.0, 5.0, 0.9), (0.6, 0.6, 1.8), 0.0)),
    ]
    size = (45, 80)
    cameras = []
    for spec in NUSCENES_CAMERAS[:2]:
        intrinsics = spec.intrinsics().numpy().astype(np.float64)
        intrinsics[:2] *= size[0] / 900
        cameras.append((spec.name, intrinsics, spec.ego_T_camera()))

    def sample(condition: str, with_cameras: bool = True) -> dict:
        ego = (0.0, 0.0, 0.05)
        rigs, rng = cameras if with_cameras else [], np.random.default_rng(9)
        return render_sample(
            static, raster, agents, ego, rigs, size, EGO, EGO_T_LIDAR, condition, rng
        )

    day, night = sample("day"), sample("night")
    for result in (day, night):
        assert set(result["images"]) == {"CAM_FRONT", "CAM_FRONT_RIGHT"}
        assert all(i.shape == (*size, 3) and i.dtype == np.uint8 for i in result["images"].values())
        assert result["lidar"].dtype == np.float32 and result["lidar"].shape[1] == 5
    # At night the headlights light the road ahead, not the side.
    front, side = night["images"]["CAM_FRONT"], night["images"]["CAM_FRONT_RIGHT"]
    assert front[30:, 20:60].mean() > 2 * side[30:].mean()
    # The LiDAR has its own random stream: the lighting and the cameras do not touch it.
    lidar_only = sample("day", with_cameras=False)
    assert lidar_only["images"] == {}
    assert np.array_equal(day["lidar"], night["lidar"])
    assert np.array_equal(day["lidar"], lidar_only["lidar"])
    # The agents are in the point cloud: returns on the oncoming car.
    global_T_lidar = EGO @ EGO_T_LIDAR
    xyz = day["lidar"][:, :3].astype(np.float64) @ global_T_lidar[:3, :3].T + global_T_lidar[:3, 3]
    assert (box_surface_distance(xyz, agents[0][1]) < 0.1).sum() > 30
    with pytest.raises(ValueError, match="unknown condition"):
        sample("fog")
