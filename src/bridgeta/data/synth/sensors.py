"""Camera rendering and LiDAR scanning of a synthetic town, ray cast with Embree (via trimesh).

The sensors differ the way real ones do, which is what makes LiDAR-to-camera distillation worth
anything on this data:

* **Darkness.** The camera integrates reflected light: at night only the ego's low beams (whose
  light on the road falls off roughly with the cube of distance) light the scene, and a high-gain
  sensor adds shot and read noise, so paint and curbs outside the beams sink into noise. The LiDAR
  brings its own light; its returns do not depend on the lighting at all.
* **Markings.** LiDAR intensity follows the material's reflectivity, and retro-reflective paint
  is far brighter than asphalt even at grazing incidence, so markings show in the point cloud in
  any light.
* **Height.** Walkways are raised by the curb in the mesh; LiDAR measures the step directly, the
  camera only sees a thin shaded strip.
* **Range.** Far away a camera pixel covers metres of road. Ground paint is read from a coverage
  pyramid at the pixel's footprint, so a distant lane line fades into a faint smear as it does
  through a real lens; rain adds haze and sky reflections on the wet road that wash out far
  contrast, while LiDAR only loses some returns.

Colours are linear radiance until :func:`_develop` turns them into an 8-bit gamma-encoded image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bridgeta.data.synth.pixel_labels import GroundSemantics, pixel_labels
from bridgeta.data.synth.scene_mesh import GROUND, GroundRaster, RayHits, SceneMesh, StaticScene, scene_at
from bridgeta.data.synth.world_types import MATERIAL_ID, MATERIALS, Box, Condition


def _direction(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    azimuth, elevation = math.radians(azimuth_deg), math.radians(elevation_deg)
    horizontal = math.cos(elevation)
    return np.array(
        [horizontal * math.cos(azimuth), horizontal * math.sin(azimuth), math.sin(elevation)]
    )


# Unit vector towards the sun (global frame): 50 deg up, towards the south-east. Fixed, so shadows
# fall the same way everywhere in a town, as they do within one drive.
SUN_DIRECTION = _direction(-40.0, 50.0)


@dataclass(frozen=True)
class Lighting:
    """Illumination and camera response for one condition (linear radiance units)."""

    sun: tuple[float, float, float]  # direct sun irradiance on a surface facing it (0: none)
    ambient: tuple[float, float, float]  # sky irradiance on an upward-facing surface
    sky_zenith: tuple[float, float, float]
    sky_horizon: tuple[float, float, float]
    haze: tuple[float, float, float]  # colour distant surfaces fade to
    haze_distance: float  # metres over which 63 % of a surface's colour turns to haze
    wetness: float  # 0 dry .. 1 soaked: darker surfaces, sky reflected by the road
    window_glow: float  # radiance of lit windows (night)
    exposure: float  # gain from radiance to sensor value (1 = white)
    shot_noise: float  # variance of photon noise per unit sensor value
    read_noise: float  # standard deviation of signal-independent noise
    flare: float  # veiling glare added to every pixel: lifts blacks, lowers contrast
    blur_passes: int  # [1, 2, 1] lens blur passes (more in rain: water on the lens)
    rain_streaks: float  # raindrop streaks per 10k pixels


LIGHTING: dict[str, Lighting] = {
    "day": Lighting(
        sun=(2.6, 2.5, 2.3),
        ambient=(0.45, 0.52, 0.65),
        sky_zenith=(0.45, 0.75, 1.6),
        sky_horizon=(1.45, 1.6, 1.8),
        haze=(1.3, 1.45, 1.65),
        haze_distance=900.0,
        wetness=0.0,
        window_glow=0.0,
        exposure=0.55,
        shot_noise=0.0006,
        read_noise=0.003,
        flare=0.004,
        blur_passes=1,
        rain_streaks=0.0,
    ),
    "night": Lighting(
        sun=(0.0, 0.0, 0.0),
        ambient=(0.00025, 0.0003, 0.0005),
        sky_zenith=(0.0001, 0.00012, 0.0002),
        sky_horizon=(0.0007, 0.00055, 0.0004),
        haze=(0.0005, 0.0004, 0.0003),
        haze_distance=400.0,
        wetness=0.0,
        window_glow=0.012,
        exposure=30.0,
        shot_noise=0.012,
        read_noise=0.006,
        flare=0.004,
        blur_passes=1,
        rain_streaks=0.0,
    ),
    "rain": Lighting(
        sun=(0.0, 0.0, 0.0),
        ambient=(0.85, 0.88, 0.92),
        sky_zenith=(0.85, 0.87, 0.9),
        sky_horizon=(1.0, 1.02, 1.05),
        haze=(0.82, 0.84, 0.87),
        haze_distance=70.0,
        wetness=1.0,
        window_glow=0.0,
        exposure=0.8,
        shot_noise=0.002,
        read_noise=0.006,
        flare=0.03,
        blur_passes=2,
        rain_streaks=2.0,
    ),
}


def lighting_for(condition: Condition) -> Lighting:
    if condition not in LIGHTING:
        raise ValueError(f"unknown condition {condition!r}; expected one of {sorted(LIGHTING)}")
    return LIGHTING[condition]


@dataclass(frozen=True)
class SpotLight:
    """A headlight: a cone along ``heading`` (global yaw) with a sharp top cut-off (low beam)."""

    position: tuple[float, float, float]
    heading: float
    intensity: float = 70.0
    colour: tuple[float, float, float] = (1.0, 0.95, 0.85)


def headlights(ego_pose: tuple[float, float, float]) -> tuple[SpotLight, SpotLight]:
    """The ego's two low beams, 3.6 m ahead of the rear axle, 0.7 m to each side, 0.7 m high."""
    x, y, yaw = ego_pose
    c, s = math.cos(yaw), math.sin(yaw)
    forward = 3.6
    left, right = (
        SpotLight((x + c * forward - s * side, y + s * forward + c * side, 0.7), yaw)
        for side in (0.7, -0.7)
    )
    return left, right


# ----------------------------------------------------------------------------------------------
# Materials: linear albedo, how dark they get when wet (factor), and LiDAR reflectivity (0-255 at
# normal incidence and short range).

_MATERIAL_TABLE = {
    "grass": ((0.10, 0.19, 0.05), 0.8, 28.0),
    "asphalt": ((0.085, 0.085, 0.09), 0.5, 17.0),
    "concrete": ((0.36, 0.35, 0.33), 0.65, 48.0),
    "paint_white": ((0.75, 0.75, 0.72), 0.85, 105.0),
    "paint_yellow": ((0.72, 0.52, 0.08), 0.85, 85.0),
    "building": ((0.42, 0.38, 0.33), 0.8, 40.0),
    "vehicle": ((0.3, 0.3, 0.3), 0.9, 40.0),
    "pedestrian": ((0.2, 0.18, 0.2), 0.9, 30.0),
    "pole": ((0.3, 0.3, 0.32), 0.9, 50.0),
    "tree_trunk": ((0.2, 0.13, 0.08), 0.8, 22.0),
    "foliage": ((0.07, 0.17, 0.05), 0.9, 18.0),
    "curb": ((0.46, 0.46, 0.44), 0.65, 45.0),
}
_ALBEDO = np.array([_MATERIAL_TABLE[m][0] for m in MATERIALS])
_WET = np.array([_MATERIAL_TABLE[m][1] for m in MATERIALS])
_REFLECTIVITY = np.array([_MATERIAL_TABLE[m][2] for m in MATERIALS])
_PAINT_IDS = (MATERIAL_ID["paint_white"], MATERIAL_ID["paint_yellow"])
# Share of the LiDAR return that follows the cosine of the incidence angle. Road paint carries
# glass beads that send light back where it came from, so it stays bright at grazing incidence,
# which is why LiDAR reads markings far down the road.
_INCIDENCE = np.where(np.isin(np.arange(len(MATERIALS)), _PAINT_IDS), 0.15, 0.5)

_VEHICLE_COLOURS = np.array(
    [
        [0.75, 0.75, 0.75],
        [0.45, 0.46, 0.48],
        [0.035, 0.035, 0.04],
        [0.17, 0.17, 0.18],
        [0.45, 0.05, 0.04],
        [0.05, 0.11, 0.33],
        [0.6, 0.55, 0.45],
        [0.8, 0.8, 0.78],
    ]
)
_BUILDING_COLOURS = np.array(
    [[0.45, 0.3, 0.22], [0.55, 0.5, 0.42], [0.33, 0.33, 0.35], [0.6, 0.58, 0.55], [0.38, 0.26, 0.2]]
)
_CLOTHES = np.array(
    [[0.08, 0.08, 0.1], [0.3, 0.08, 0.08], [0.12, 0.18, 0.33], [0.4, 0.37, 0.3], [0.04, 0.04, 0.04]]
)
_GLASS = np.array([0.05, 0.06, 0.075])
_ROOF = np.array([0.2, 0.2, 0.21])
_WINDOW_LIGHT = np.array([1.0, 0.78, 0.5])
_LUMA = np.array([0.2126, 0.7152, 0.0722])


def _hash(*keys: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random values in [0, 1) from integer keys (texture cells, objects)."""
    h = np.full(np.shape(keys[0]), 2166136261, dtype=np.uint32)
    for key in keys:
        h = (h ^ np.asarray(key).astype(np.int64).astype(np.uint32)) * np.uint32(16777619)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    return h.astype(np.float64) * (1.0 / 2**32)


def _pick(palette: np.ndarray, objects: np.ndarray, seed: int) -> np.ndarray:
    """One palette colour per object, the same in every frame."""
    return palette[(_hash(objects, seed) * len(palette)).astype(np.int64)]


def _value_noise(u: np.ndarray, v: np.ndarray, cell: float, seed: int) -> np.ndarray:
    """Smooth noise in [0, 1) with features of ``cell`` metres (blotches, wear, puddles)."""
    x, y = u / cell, v / cell
    ix, iy = np.floor(x), np.floor(y)
    fx, fy = x - ix, y - iy
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    a, b = _hash(ix, iy, seed), _hash(ix + 1, iy, seed)
    c, d = _hash(ix, iy + 1, seed), _hash(ix + 1, iy + 1, seed)
    return (a + (b - a) * fx) * (1 - fy) + (c + (d - c) * fx) * fy


def _grain(
    u: np.ndarray, v: np.ndarray, cell: float, seed: int, footprint: np.ndarray
) -> np.ndarray:
    """Zero-mean cell noise, faded out where a pixel covers many cells (no aliasing shimmer)."""
    return (_hash(np.floor(u / cell), np.floor(v / cell), seed) - 0.5) * np.exp(-footprint / cell)


def _sky(directions: np.ndarray, lighting: Lighting) -> np.ndarray:
    up = np.sqrt(np.clip(directions[:, 2], 0.0, 1.0))[:, None]
    return np.asarray(lighting.sky_horizon) * (1 - up) + np.asarray(lighting.sky_zenith) * up


def _surface(
    material: np.ndarray,
    on_ground: np.ndarray,
    points: np.ndarray,
    normals: np.ndarray,
    objects: np.ndarray,
    footprint: np.ndarray,
    ground: GroundRaster,
    lighting: Lighting,
) -> tuple[np.ndarray, np.ndarray]:
    """Textured albedo ``(N, 3)`` and emitted radiance ``(N, 3)`` at hit points.

    Textures are procedural in world coordinates, so they stay put as the ego moves and the same
    surface looks the same from every camera.
    """
    base = material.copy()
    # Under the paint is road; the paint itself is mixed in below by coverage at this footprint.
    base[on_ground & np.isin(material, _PAINT_IDS)] = MATERIAL_ID["asphalt"]
    albedo = _ALBEDO[base]
    emission = np.zeros_like(albedo)
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    # Texture coordinates: (x, y) on horizontal surfaces, (along the wall, height) on walls.
    horizontal = np.maximum(np.hypot(normals[:, 0], normals[:, 1]), 1e-6)
    along = (y * normals[:, 0] - x * normals[:, 1]) / horizontal
    flat = np.abs(normals[:, 2]) > 0.7
    u, v = np.where(flat, x, along), np.where(flat, y, z)

    def subset(name: str) -> np.ndarray:
        return np.flatnonzero(base == MATERIAL_ID[name])

    # (material, blotch size m or 0, grain strength, grain cell m)
    for name, blotch, grain, cell in [
        ("asphalt", 4.0, 0.5, 0.03),
        ("grass", 1.5, 0.5, 0.05),
        ("curb", 0.0, 0.2, 0.03),
        ("tree_trunk", 0.0, 0.4, 0.05),
    ]:
        i = subset(name)
        shade = 1.0 + grain * _grain(u[i], v[i], cell, 1, footprint[i])
        if blotch:
            shade *= 0.8 + 0.4 * _value_noise(u[i], v[i], blotch, 2)
        albedo[i] *= shade[:, None]
    i = subset("concrete")
    # 1.5 m slabs with slightly different tones and dark joints that fade with distance.
    slab = 0.92 + 0.16 * _hash(np.floor(u[i] / 1.5), np.floor(v[i] / 1.5), 3)
    joint = np.minimum(np.mod(u[i], 1.5), np.mod(v[i], 1.5)) < 0.02
    joint = joint * np.exp(-footprint[i] / 0.05)
    grain = 1 + 0.25 * _grain(u[i], v[i], 0.03, 4, footprint[i])
    albedo[i] *= (slab * (1 - 0.45 * joint) * grain)[:, None]
    i = subset("foliage")
    albedo[i] *= (0.55 + 0.9 * _value_noise(u[i] + z[i], v[i] - z[i], 0.6, 5))[:, None]
    i = subset("vehicle")
    albedo[i] = _pick(_VEHICLE_COLOURS, objects[i], 6)
    i = subset("pedestrian")
    albedo[i] = _pick(_CLOTHES, objects[i], 7)
    i = subset("building")
    colour = _pick(_BUILDING_COLOURS, objects[i], 8)
    colour *= (1 + 0.3 * _grain(u[i], v[i], 0.1, 9, footprint[i]))[:, None]
    # A window grid by storey (3.2 m) and bay (2.6 m) on the facades; flat roofs.
    storey, bay = (z[i] - 0.8) / 3.2, u[i] / 2.6
    in_storey = (np.mod(storey, 1.0) > 0.3) & (np.mod(storey, 1.0) < 0.82)
    window = in_storey & (np.abs(np.mod(bay, 1.0) - 0.5) < 0.3) & ~flat[i] & (z[i] > 0.8)
    colour[window] = _GLASS
    colour[flat[i]] = _ROOF
    albedo[i] = colour
    # At night one window in five is lit from inside.
    lit = window & (_hash(np.floor(storey), np.floor(bay), objects[i], 10) < 0.2)
    emission[i[lit]] = lighting.window_glow * _WINDOW_LIGHT
    albedo *= (1 - lighting.wetness * (1 - _WET[base]))[:, None]

    g = np.flatnonzero(on_ground)
    coverage = ground.paint_coverage(x[g], y[g], footprint[g])
    wear = 0.85 + 0.15 * _value_noise(x[g], y[g], 0.4, 11)
    paint = np.zeros((len(g), 3))
    for k, paint_id in enumerate(_PAINT_IDS):
        wet = 1 - lighting.wetness * (1 - _WET[paint_id])
        paint += coverage[:, k : k + 1] * _ALBEDO[paint_id] * (wear * wet)[:, None]
    albedo[g] = albedo[g] * (1 - coverage.sum(axis=1, keepdims=True)) + paint
    return albedo, emission


def _headlight_irradiance(
    scene: SceneMesh, points: np.ndarray, normals: np.ndarray, lights: Sequence[SpotLight]
) -> np.ndarray:
    """Irradiance from the ego's low beams, shadowed by whatever stands between lamp and point."""
    total = np.zeros((len(points), 3))
    for light in lights:
        offset = points - np.asarray(light.position)
        distance = np.linalg.norm(offset, axis=1)
        c, s = math.cos(light.heading), math.sin(light.heading)
        forward = offset[:, 0] * c + offset[:, 1] * s
        side = -offset[:, 0] * s + offset[:, 1] * c
        azimuth = np.arctan2(side, forward)
        elevation = np.arctan2(offset[:, 2], np.hypot(forward, side))
        # Aimed 1.5 deg down, wide sideways, a sharp cut-off above the aim and a softer one below.
        spread = np.where(elevation < -0.026, 0.09, 0.026)
        cone = np.exp(-((azimuth / 0.3) ** 2) - ((elevation + 0.026) / spread) ** 2) * (forward > 0)
        facing = -np.sum(normals * offset, axis=1) / np.maximum(distance, 1e-6)
        power = light.intensity * cone * np.maximum(facing, 0.0) / np.maximum(distance, 0.5) ** 2
        total += power[:, None] * np.asarray(light.colour)
    # One shadow ray per lit point towards the middle of the lamps stands in for both lamps.
    lit = np.flatnonzero(total.sum(axis=1) > 1e-4)
    if len(lit):
        centre = np.mean([light.position for light in lights], axis=0)
        towards = centre - points[lit]
        length = np.linalg.norm(towards, axis=1)
        towards /= length[:, None]
        hits = scene.cast(points[lit] + normals[lit] * 0.02, towards)
        blocked = hits.distance < length[hits.ray] - 0.3
        total[lit[hits.ray[blocked]]] = 0.0
    return total


def _shade(
    scene: SceneMesh,
    ground: GroundRaster,
    directions: np.ndarray,
    hits: RayHits,
    pixel_angle: float,
    lighting: Lighting,
    lights: Sequence[SpotLight],
) -> np.ndarray:
    """Linear radiance ``(N, 3)`` arriving along each ray (one primary ray per pixel, first
    ``hits`` already cast)."""
    radiance = _sky(directions, lighting)
    if not len(hits.ray):
        return radiance
    view, points, distance = directions[hits.ray], hits.location, hits.distance
    normals = scene.mesh.face_normals[hits.face]
    normals = np.where((np.sum(normals * view, axis=1) > 0)[:, None], -normals, normals)
    cosine = np.clip(-np.sum(normals * view, axis=1), 0.0, 1.0)
    # Size of the pixel on the surface: across the ray, stretched along a tilted surface.
    footprint = distance * pixel_angle / np.sqrt(np.maximum(cosine, 0.02))
    material = scene.materials(hits, ground)
    on_ground = scene.face_material[hits.face] == GROUND
    objects = scene.face_object[hits.face]
    albedo, emission = _surface(
        material, on_ground, points, normals, objects, footprint, ground, lighting
    )

    irradiance = np.asarray(lighting.ambient) * (0.55 + 0.45 * normals[:, 2:3])
    sun = np.asarray(lighting.sun)
    if sun.any():
        facing = normals @ SUN_DIRECTION
        lit = np.flatnonzero(facing > 0)
        shadow_origins = points[lit] + normals[lit] * 0.02
        sun_rays = np.broadcast_to(SUN_DIRECTION, shadow_origins.shape)
        visible = ~scene.occluded(shadow_origins, sun_rays)
        irradiance[lit] += sun * (facing[lit] * visible)[:, None]
        # Glossy car paint: a highlight where the sun's mirror direction meets the eye.
        is_car = material[lit] == MATERIAL_ID["vehicle"]
        car = lit[is_car]
        half = SUN_DIRECTION - view[car]
        half /= np.linalg.norm(half, axis=1, keepdims=True)
        gloss = np.maximum(np.sum(normals[car] * half, axis=1), 0.0) ** 60 * visible[is_car]
        emission[car] += 0.25 * gloss[:, None] * sun
    if lights:
        irradiance += _headlight_irradiance(scene, points, normals, lights)
    shaded = albedo * irradiance + emission

    if lighting.wetness:
        # A wet road is a dim mirror of the sky; Fresnel makes it brighter towards grazing
        # angles, so far road turns sky-grey and the paint on it loses contrast.
        wet = np.flatnonzero(normals[:, 2] > 0.9)
        n = normals[wet]
        reflected = view[wet] - 2 * np.sum(view[wet] * n, axis=1, keepdims=True) * n
        fresnel = 0.03 + 0.97 * (1 - cosine[wet]) ** 5
        puddles = 0.45 + 0.55 * _value_noise(points[wet, 0], points[wet, 1], 3.0, 12)
        mirror = fresnel * lighting.wetness * puddles
        shaded[wet] += mirror[:, None] * _sky(reflected, lighting)
    haze = (1 - np.exp(-distance / lighting.haze_distance))[:, None]
    radiance[hits.ray] = shaded * (1 - haze) + np.asarray(lighting.haze) * haze
    return radiance


def _blur(image: np.ndarray, passes: int) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur: lens softness, which also hides per-pixel aliasing."""
    for _ in range(passes):
        p = np.pad(image, ((1, 1), (0, 0), (0, 0)), mode="edge")
        image = (p[:-2] + 2 * p[1:-1] + p[2:]) * 0.25
        p = np.pad(image, ((0, 0), (1, 1), (0, 0)), mode="edge")
        image = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) * 0.25
    return image


def _rain_streaks(height: int, width: int, density: float, rng: np.random.Generator) -> np.ndarray:
    """Soft, slightly slanted streaks of falling drops, ``(H, W)`` in [0, 1]."""
    count = int(density * height * width / 1e4)
    layer = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(layer)
    start = rng.random((count, 2)) * (width, height)
    length = rng.uniform(0.03, 0.1, count) * height
    slant = rng.normal(0.15, 0.05, count) * length
    for (x, y), dy, dx in zip(start, length, slant):
        draw.line([(x, y), (x + dx, y + dy)], fill=255, width=1)
    return np.asarray(layer.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float64) / 255.0


def _develop(radiance: np.ndarray, lighting: Lighting, rng: np.random.Generator) -> np.ndarray:
    """Sensor and ISP: exposure, lens blur, streaks, flare, shot + read noise, gamma, 8 bits."""
    signal = _blur(radiance * lighting.exposure, lighting.blur_passes)
    if lighting.rain_streaks:
        streaks = _rain_streaks(*signal.shape[:2], lighting.rain_streaks, rng)
        signal += 0.12 * streaks[..., None]
    signal += lighting.flare
    sigma = np.sqrt(np.maximum(signal, 0.0) * lighting.shot_noise + lighting.read_noise**2)
    signal += sigma * rng.standard_normal(signal.shape)
    return (np.clip(signal, 0.0, 1.0) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8)


def camera_rays(
    intrinsics: np.ndarray, global_T_camera: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Origins and unit directions ``(H * W, 3)`` (global) through the pixel centres, row-major."""
    height, width = size
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    global_T_camera = np.asarray(global_T_camera, dtype=np.float64)
    v, u = np.mgrid[0:height, 0:width] + 0.5
    pixels = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=1)
    directions = pixels @ np.linalg.inv(intrinsics).T @ global_T_camera[:3, :3].T
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    origins = np.broadcast_to(global_T_camera[:3, 3], directions.shape)
    return origins, directions


@dataclass
class CameraFrame:
    """One camera's rendering: the image and, when asked for, what each pixel sees.

    ``semantic``: ``(H, W)`` uint8 indices into ``camera_labels.CAMERA_CLASSES``; ``depth``:
    ``(H, W)`` float32 metres along the camera's z axis (0 where the ray hits nothing).
    """

    image: np.ndarray
    semantic: np.ndarray | None = None
    depth: np.ndarray | None = None


def render_camera_frame(
    scene: SceneMesh,
    ground: GroundRaster,
    intrinsics: np.ndarray,
    global_T_camera: np.ndarray,
    size: tuple[int, int],
    condition: Condition,
    rng: np.random.Generator,
    ego_lights: Sequence[SpotLight] = (),
    semantics: GroundSemantics | None = None,
) -> CameraFrame:
    """The image of :func:`render_camera`, plus per-pixel labels when ``semantics`` is given.

    Labels come from the same primary rays as the image (no extra ray cast) and do not depend on
    the condition or on ``rng``: night and rain change what the camera records, not what is there.
    """
    lighting = lighting_for(condition)
    origins, directions = camera_rays(intrinsics, global_T_camera, size)
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    pixel_angle = 1.0 / math.sqrt(intrinsics[0, 0] * intrinsics[1, 1])
    hits = scene.cast(origins, directions)
    radiance = _shade(scene, ground, directions, hits, pixel_angle, lighting, ego_lights)
    frame = CameraFrame(_develop(radiance.reshape(size[0], size[1], 3), lighting, rng))
    if semantics is not None:
        optical_axis = np.asarray(global_T_camera, dtype=np.float64)[:3, 2]
        frame.semantic, frame.depth = pixel_labels(scene, semantics, hits, directions, optical_axis, size)
    return frame


def render_camera(
    scene: SceneMesh,
    ground: GroundRaster,
    intrinsics: np.ndarray,
    global_T_camera: np.ndarray,
    size: tuple[int, int],
    condition: Condition,
    rng: np.random.Generator,
    ego_lights: Sequence[SpotLight] = (),
) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 image; ``intrinsics`` are for the render ``size`` (H, W).

    ``ego_lights`` (see :func:`headlights`) matter at night; ``rng`` draws the sensor noise and
    rain streaks only, so the scene itself renders identically for every seed.
    """
    return render_camera_frame(
        scene, ground, intrinsics, global_T_camera, size, condition, rng, ego_lights
    ).image


# ----------------------------------------------------------------------------------------------
# LiDAR

HDL32E_ELEVATIONS_DEG: tuple[float, ...] = tuple(float(a) for a in np.linspace(-30.67, 10.67, 32))


@dataclass(frozen=True)
class LidarSpec:
    """A spinning LiDAR; ring ``k`` fires at ``elevations_deg[k]`` (ring 0 is the lowest beam)."""

    elevations_deg: tuple[float, ...] = HDL32E_ELEVATIONS_DEG
    azimuth_steps: int = 1080
    max_range: float = 70.0
    range_noise: float = 0.02  # metres, standard deviation along the beam
    dropout: float = 0.03  # fraction of returns lost in any weather
    rain_dropout: float = 0.08  # extra fraction lost in rain at mid range, growing with range
    rain_intensity: float = 0.8  # wet surfaces send less light back

    def directions(self) -> np.ndarray:
        """Unit beam directions in the LiDAR frame, ``(azimuth_steps * rings, 3)``, by azimuth."""
        elevation = np.radians(np.asarray(self.elevations_deg))[None, :]
        azimuth = (2 * np.pi * np.arange(self.azimuth_steps) / self.azimuth_steps)[:, None]
        x = np.cos(elevation) * np.cos(azimuth)
        y = np.cos(elevation) * np.sin(azimuth)
        z = np.broadcast_to(np.sin(elevation), x.shape)
        return np.stack([x, y, z], axis=-1).reshape(-1, 3)


def scan_lidar(
    scene: SceneMesh,
    ground: GroundRaster,
    global_T_lidar: np.ndarray,
    rng: np.random.Generator,
    condition: Condition,
    spec: LidarSpec = LidarSpec(),
) -> np.ndarray:
    """One revolution: ``(N, 5)`` float32 x, y, z (LiDAR frame), intensity (0-255), ring index.

    Light does not matter (night returns equal day returns for the same ``rng``); rain loses more
    returns, more so far away, and weakens the rest. The random draws do not depend on the
    condition, so the same seed gives the same beams in every weather.
    """
    weather = lighting_for(condition)
    global_T_lidar = np.asarray(global_T_lidar, dtype=np.float64)
    local = spec.directions()
    directions = local @ global_T_lidar[:3, :3].T
    origins = np.broadcast_to(global_T_lidar[:3, 3], directions.shape)
    hits = scene.cast(origins, directions)
    count = len(hits.ray)
    range_noise, lost = rng.standard_normal(count), rng.random(count)
    speckle = rng.standard_normal(count)

    measured = hits.distance + spec.range_noise * range_noise
    material = scene.materials(hits, ground)
    normals = scene.mesh.face_normals[hits.face]
    cosine = np.abs(np.sum(normals * directions[hits.ray], axis=1))
    reflectivity = _REFLECTIVITY[material]
    # A car's reflectivity follows its paint: a black car returns a third of what a white one does.
    car = material == MATERIAL_ID["vehicle"]
    colour = _pick(_VEHICLE_COLOURS, scene.face_object[hits.face[car]], 6)
    reflectivity[car] = 15.0 + 60.0 * (colour @ _LUMA)
    incidence = 1 - _INCIDENCE[material] + _INCIDENCE[material] * cosine
    falloff = 1 + np.maximum(measured, 0.0) / 60.0
    intensity = reflectivity * incidence / falloff * (1 + 0.08 * speckle)
    drop = np.full(count, spec.dropout)
    if weather.wetness:
        drop += spec.rain_dropout * weather.wetness * (0.5 + measured / spec.max_range)
        intensity *= 1 - weather.wetness * (1 - spec.rain_intensity)
    keep = (measured > 0) & (measured <= spec.max_range) & (lost >= drop)
    rings = len(spec.elevations_deg)
    points = np.concatenate(
        [
            local[hits.ray] * measured[:, None],
            np.clip(np.round(intensity), 0, 255)[:, None],
            (hits.ray % rings)[:, None],
        ],
        axis=1,
    )
    return points[keep].astype(np.float32)


# ----------------------------------------------------------------------------------------------


def render_sample(
    static: StaticScene,
    town_raster: GroundRaster,
    agents_boxes: Sequence[tuple[str, Box]],
    ego_pose: tuple[float, float, float],
    cameras: Sequence[tuple[str, np.ndarray, np.ndarray]],
    image_size: tuple[int, int],
    global_T_ego: np.ndarray,
    ego_T_lidar: np.ndarray,
    condition: Condition,
    rng: np.random.Generator,
    threads: int = 2,
    semantics: GroundSemantics | None = None,
) -> dict:
    """Everything the sensors record at one instant: ``{"images": {name: uint8}, "lidar": (N, 5)}``.

    ``agents_boxes`` are ``(nuScenes category, box)`` of the agents at this time; ``cameras`` are
    ``(name, intrinsics at image_size, ego_T_camera)`` (may be empty for a LiDAR-only sweep).
    ``ego_pose`` (x, y, yaw) places the ego's headlights (on at night and in rain);
    ``global_T_ego`` places the sensors (normally the same pose). The LiDAR gets its own random
    stream, so its points depend neither on the cameras (nor their count) nor on the lighting.
    Cameras render on ``threads`` threads (Embree and most numpy work release the GIL); pass 1
    when the caller already runs one process per core. With ``semantics`` the result also has
    ``"semantic"`` and ``"depth"``: ``{name: (H, W)}`` per-pixel labels (:class:`CameraFrame`).
    """
    lighting_for(condition)
    scene = scene_at(static, agents_boxes)
    lights = headlights(ego_pose) if condition != "day" else ()
    lidar_stream, *camera_streams = rng.spawn(len(cameras) + 1)
    global_T_ego = np.asarray(global_T_ego, dtype=np.float64)

    def render(index: int) -> CameraFrame:
        _, intrinsics, ego_T_camera = cameras[index]
        global_T_camera = global_T_ego @ np.asarray(ego_T_camera, dtype=np.float64)
        stream = camera_streams[index]
        return render_camera_frame(
            scene, town_raster, intrinsics, global_T_camera, image_size, condition, stream, lights,
            semantics,
        )

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        frames = list(pool.map(render, range(len(cameras))))
    global_T_lidar = global_T_ego @ np.asarray(ego_T_lidar, dtype=np.float64)
    lidar = scan_lidar(scene, town_raster, global_T_lidar, lidar_stream, condition)
    names = [name for name, _, _ in cameras]
    result = {"images": {name: frame.image for name, frame in zip(names, frames)}, "lidar": lidar}
    if semantics is not None:
        result["semantic"] = {name: frame.semantic for name, frame in zip(names, frames)}
        result["depth"] = {name: frame.depth for name, frame in zip(names, frames)}
    return result
