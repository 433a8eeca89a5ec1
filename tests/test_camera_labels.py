"""Per-pixel camera labels: the file format, the renderer's labels against the geometry, and the
labels of a generated world."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from shapely.geometry import box

from bridgeta.data.camera_labels import (
    CAMERA_CLASS_ID,
    CAMERA_CLASSES,
    IGNORE_INDEX,
    INDEX_FILE,
    CameraLabelError,
    CameraLabelWriter,
    decode_depth,
    depth_png,
    encode_depth,
    read_depth,
    read_index,
    read_semantic,
    semantic_png,
)


def test_depth_encoding_is_kitti_with_zero_for_no_depth():
    metres = np.array([0.0, -1.0, np.nan, np.inf, 1.0, 10.123, 255.99, 300.0])
    encoded = encode_depth(metres)
    assert encoded.dtype == np.uint16
    assert encoded.tolist() == [0, 0, 0, 0, 256, round(10.123 * 256), round(255.99 * 256), 0]
    decoded = decode_depth(encoded)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded[4:7], metres[4:7], atol=0.5 / 256)
    assert decoded[[0, 1, 2, 3, 7]].tolist() == [0.0] * 5


def test_label_pngs_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    classes = rng.integers(0, len(CAMERA_CLASSES), (9, 16)).astype(np.uint8)
    classes[0, 0] = IGNORE_INDEX
    depth = rng.uniform(0.5, 200.0, (9, 16)).astype(np.float32)
    depth[1, 1] = 0.0
    (tmp_path / "s.png").write_bytes(semantic_png(classes))
    (tmp_path / "d.png").write_bytes(depth_png(depth))
    assert np.array_equal(read_semantic(tmp_path / "s.png"), classes)
    np.testing.assert_allclose(read_depth(tmp_path / "d.png"), depth, atol=0.5 / 256)
    with pytest.raises(ValueError, match="uint8"):
        semantic_png(classes.astype(np.int32))
    with pytest.raises(CameraLabelError, match="8-bit"):
        read_semantic(tmp_path / "d.png")
    with pytest.raises(CameraLabelError, match="missing"):
        read_depth(tmp_path / "none.png")


def test_index_round_trip_and_refusals(tmp_path):
    with pytest.raises(CameraLabelError, match="docs/data.md"):
        read_index(tmp_path)
    writer = CameraLabelWriter(tmp_path)
    image = "samples/CAM_FRONT/a.jpg"
    writer.add(image, semantic_png(np.zeros((2, 3), np.uint8)), None)
    with pytest.raises(FileExistsError, match="share one label file"):
        writer.add(image, semantic_png(np.zeros((2, 3), np.uint8)), None)
    writer.finalize()
    index = read_index(tmp_path)
    assert index.classes == CAMERA_CLASSES
    row = index.rows[image]
    assert row.semantic == "camera_labels/semantic/samples/CAM_FRONT/a.png" and row.depth is None
    assert index.semantic(row).shape == (2, 3) and index.depth(row) is None

    path = tmp_path / INDEX_FILE
    data = json.loads(path.read_text())
    for change, message in [
        ({"format": "nuimages"}, "'format'"),
        ({"classes": ["a", "a"]}, "unique"),
        ({"depth_scale": 1000.0}, "KITTI"),
        ({"images": [{"image": image}]}, "needs 'image' and 'semantic'"),
        ({"images": data["images"] * 2}, "listed twice"),
    ]:
        path.write_text(json.dumps({**data, **change}))
        with pytest.raises(CameraLabelError, match=message):
            read_index(tmp_path)


# ---- the renderer's labels agree with the geometry ---------------------------------------------


@pytest.fixture(scope="module")
def labelled_street():
    """A street seen by the front camera: crossing, stop line, dividers, car park, walkway,
    a building and a car, with the ground truth of each pixel from shapely, not from the raster."""
    pytest.importorskip("embreex")
    from bridgeta.data.synth.pixel_labels import GroundSemantics
    from bridgeta.data.synth.scene_mesh import GROUND, GroundRaster, StaticScene, scene_at
    from bridgeta.data.synth.sensors import camera_rays, render_camera_frame
    from bridgeta.data.synth.world_types import MATERIAL_ID, Box, MapLayers, PaintMark, StaticObject, Town
    from bridgeta.rig import NUSCENES_CAMERAS

    crossing, stop = box(6.0, -7.0, 10.0, 7.0), box(10.5, 0.3, 11.5, 7.0)
    carpark, walkway = box(14.0, 8.0, 60.0, 40.0), box(-100.0, -11.0, 100.0, -7.0)
    stripes = [box(6.0, y, 10.0, y + 0.5) for y in np.arange(-6.5, 6.5, 1.0)]
    yellow, dash = box(12.0, -0.25, 60.0, 0.25), box(13.0, -3.75, 16.0, -3.25)
    stall = box(20.0, 10.0, 20.3, 15.0)
    layers = MapLayers(
        drivable_area=[box(-100, -7, 100, 7)], ped_crossing=[crossing], stop_line=[stop],
        carpark_area=[carpark], walkway=[walkway],
    )
    paint = [PaintMark(p, "paint_white") for p in [*stripes, stop, dash, stall]] + [PaintMark(yellow, "paint_yellow")]
    building = StaticObject("building", Box((40.0, -20.0, 6.0), (20.0, 10.0, 12.0), 0.0))
    town = Town("test", (-100.0, -40.0, 100.0, 40.0), layers, paint, [building], [], 0.15)
    static, raster = StaticScene.build(town), GroundRaster.build(town, resolution=0.05)
    semantics = GroundSemantics(town, raster)
    scene = scene_at(static, [("vehicle.car", Box((22.0, -3.5, 0.8), (4.5, 1.9, 1.6), 0.0))])

    size = (180, 320)
    spec = NUSCENES_CAMERAS[0]
    intrinsics = spec.intrinsics().numpy().astype(np.float64)
    intrinsics[:2] *= size[0] / 900.0
    global_T_camera = spec.ego_T_camera().numpy().astype(np.float64)  # ego at the origin, yaw 0

    def frame(condition):
        rng = np.random.default_rng(1)
        return render_camera_frame(scene, raster, intrinsics, global_T_camera, size, condition, rng,
                                   semantics=semantics)

    origins, directions = camera_rays(intrinsics, global_T_camera, size)
    hits = scene.cast(origins, directions)
    expected = np.full(size[0] * size[1], CAMERA_CLASS_ID["sky"])
    depth = np.zeros(size[0] * size[1])
    depth[hits.ray] = (hits.location - origins[hits.ray]) @ global_T_camera[:3, 2]
    material = scene.face_material[hits.face]
    by_material = {MATERIAL_ID["building"]: "building", MATERIAL_ID["vehicle"]: "vehicle",
                   MATERIAL_ID["concrete"]: "walkway", MATERIAL_ID["curb"]: "walkway"}
    truth = np.array([CAMERA_CLASS_ID[by_material.get(int(m), "terrain")] for m in material])
    ground = material == GROUND
    x, y = hits.location[ground, 0], hits.location[ground, 1]
    on_ground = np.full(len(x), CAMERA_CLASS_ID["terrain"])
    # Lowest priority first: road < divider paint < car park < crossing < stop line.
    for name, geometry in [
        ("road", layers.drivable_area[0]), ("divider", shapely.union_all([p.polygon for p in paint])),
        ("carpark", carpark), ("ped_crossing", crossing), ("stop_line", stop),
    ]:
        on_ground[shapely.contains_xy(geometry, x, y)] = CAMERA_CLASS_ID[name]
    truth[ground] = on_ground
    expected[hits.ray] = truth
    return frame, expected.reshape(size), depth.reshape(size)


def test_renderer_labels_every_pixel_with_what_it_hits(labelled_street):
    frame, expected, depth = labelled_street
    day = frame("day")
    assert day.semantic.shape == expected.shape and day.semantic.dtype == np.uint8
    # The test scene shows every class but pole, vegetation and pedestrian, each on many pixels.
    for name in ("sky", "terrain", "road", "carpark", "ped_crossing", "stop_line", "divider", "walkway",
                 "building", "vehicle"):
        assert (expected == CAMERA_CLASS_ID[name]).sum() >= 40, name
    # Raster cells are 5 cm, so only pixels whose hit is within a cell of a border may differ.
    agreement = (day.semantic == expected).mean()
    assert agreement > 0.995, agreement
    for name in ("stop_line", "divider", "ped_crossing", "carpark"):
        mask = expected == CAMERA_CLASS_ID[name]
        assert (day.semantic[mask] == CAMERA_CLASS_ID[name]).mean() > 0.85, name
    # Depth is along the optical axis (not the ray length), 0 where the ray hits nothing.
    assert day.depth.dtype == np.float32
    np.testing.assert_allclose(day.depth, depth, rtol=1e-5, atol=1e-4)
    assert (day.depth[expected == CAMERA_CLASS_ID["sky"]] == 0).all()
    assert (day.depth[expected != CAMERA_CLASS_ID["sky"]] > 0).all()


def test_labels_do_not_depend_on_the_light(labelled_street):
    frame, _, _ = labelled_street
    day, night = frame("day"), frame("night")
    assert not np.array_equal(day.image, night.image)
    assert np.array_equal(day.semantic, night.semantic)
    assert np.array_equal(day.depth, night.depth)


def test_generated_world_labels_every_keyframe_image(engine_world):
    pytest.importorskip("nuscenes")
    from bridgeta.data.cache import LabelCache, default_cache_dir

    index = read_index(engine_world)
    cache = LabelCache(default_cache_dir(engine_world, "v1.0-trainval"))
    images = [camera for i in range(len(cache)) for camera in cache.record(i)["cameras"]]
    assert set(index.rows) == {camera["path"] for camera in images}
    seen = set()
    for camera in images[::5]:  # every camera of the rig, from all splits
        row = index.rows[camera["path"]]
        semantic, depth = index.semantic(row), index.depth(row)
        assert semantic.shape == depth.shape == (camera["height"], camera["width"])
        assert semantic.max() < len(CAMERA_CLASSES)
        sky = semantic == CAMERA_CLASS_ID["sky"]
        # Ground beyond 256 m (towards the horizon) has no KITTI depth; everything else does.
        assert (depth[sky] == 0).all() and (depth[~sky] > 0).mean() > 0.9
        seen |= set(np.unique(semantic).tolist())
    for name in ("sky", "road", "walkway", "terrain"):
        assert CAMERA_CLASS_ID[name] in seen, name
    assert seen & {CAMERA_CLASS_ID[name] for name in ("building", "vegetation", "pole", "vehicle")}
    assert len(index.rows) == 6 * len(cache)
