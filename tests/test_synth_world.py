"""The procedural town: determinism, speed, and the geometric promises the sensors and labels rely on."""

from __future__ import annotations

import math
import pickle
import time

import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon

from bridgeta.data.synth.world import PEDESTRIAN_CATEGORY, SAMPLE_RATE_HZ, VEHICLE_TYPES, TownSettings, _footprint, generate_town
from bridgeta.data.synth.world_types import Box, Town


@pytest.fixture(scope="module")
def town() -> Town:
    return generate_town("synth-test-0", 3, TownSettings.default())


@pytest.fixture(scope="module")
def tiny() -> Town:
    return generate_town("synth-test-1", 0, TownSettings.tiny())


def footprint(box: Box) -> Polygon:
    c, s = math.cos(box.yaw), math.sin(box.yaw)
    half = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]]) * np.array(box.size[:2]) / 2
    return Polygon(box.center[:2] + half @ np.array([[c, s], [-s, c]]))


def ego_samples(town: Town, step: float = 0.5) -> list[np.ndarray]:
    """Per scene, ``(T, 3)`` ego poses every ``step`` seconds."""
    return [np.array([sc.ego.pose_at(t) for t in np.arange(0.0, sc.duration + 1e-9, step)]) for sc in town.scenes]


def test_same_inputs_give_the_same_town_and_seeds_differ() -> None:
    settings = TownSettings.tiny()
    first = generate_town("synth-a", 5, settings)
    assert pickle.dumps(first) == pickle.dumps(generate_town("synth-a", 5, settings))
    other_seed = generate_town("synth-a", 6, settings)
    other_name = generate_town("synth-b", 5, settings)
    for other in (other_seed, other_name):
        assert not first.layers.drivable_area[0].equals(other.layers.drivable_area[0])


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    generate_town("synth-speed", 1, TownSettings.tiny())
    tiny_seconds = time.perf_counter() - start
    start = time.perf_counter()
    generate_town("synth-speed", 1, TownSettings.default())
    default_seconds = time.perf_counter() - start
    assert tiny_seconds < 2.0
    assert default_seconds < 10.0


def test_settings_refuse_blocks_too_small_for_their_intersections() -> None:
    with pytest.raises(ValueError, match="block_size"):
        TownSettings(block_size=(30.0, 40.0))
    with pytest.raises(ValueError, match="margin"):
        TownSettings(margin=40.0)


def test_default_town_has_every_layer_paint_and_object(town: Town) -> None:
    layers = town.layers
    for name in ("drivable_area", "lane", "ped_crossing", "walkway", "stop_line", "carpark_area"):
        assert getattr(layers, name), name
    assert layers.road_divider and layers.lane_divider
    kinds = {flag for _, flag in layers.road_segment}
    assert kinds == {True, False}
    assert {mark.material for mark in town.paint} == {"paint_white", "paint_yellow"}
    assert {o.kind for o in town.statics} == {"building", "tree", "pole", "parked_vehicle"}
    assert all((o.category == "vehicle.car") == (o.kind == "parked_vehicle") for o in town.statics)
    names = [sc.name for sc in town.scenes]
    assert len(names) == TownSettings.default().num_scenes == len(set(names))
    assert names[0] == "synth-test-0-scene-000"
    assert {sc.condition for sc in town.scenes} <= {"day", "night", "rain"}
    # Two-way streets with one lane per direction on some, two on others.
    lane_tree = shapely.STRtree(layers.lane)
    streets = [shape.buffer(1e-6) for shape, inter in layers.road_segment if not inter]
    lanes_per_segment = [len(lane_tree.query(street, predicate="contains")) for street in streets]
    assert set(lanes_per_segment) == {2, 4}


def test_bounds_start_at_origin_and_leave_a_wide_margin(town: Town) -> None:
    x_min, y_min, x_max, y_max = town.bounds
    assert (x_min, y_min) == (0.0, 0.0)
    rx_min, ry_min, rx_max, ry_max = shapely.total_bounds(town.layers.drivable_area + town.layers.walkway)
    assert min(rx_min - x_min, ry_min - y_min, x_max - rx_max, y_max - ry_max) >= 60.0
    things = [footprint(o.box) for o in town.statics] + [m.polygon for m in town.paint]
    tx_min, ty_min, tx_max, ty_max = shapely.total_bounds(things)
    assert tx_min >= x_min and ty_min >= y_min and tx_max <= x_max and ty_max <= y_max


def test_ego_routes_stay_on_the_drivable_area(town: Town) -> None:
    drivable = shapely.union_all(town.layers.drivable_area).buffer(0.3)
    shapely.prepare(drivable)
    for poses in ego_samples(town):
        inside = shapely.contains_xy(drivable, poses[:, 0], poses[:, 1])
        assert inside.all(), poses[~inside]


def test_ego_keeps_right_of_the_road_divider_outside_intersections(town: Town) -> None:
    segments = [shape for shape, inter in town.layers.road_segment if not inter]
    segment_tree = shapely.STRtree(segments)
    dividers = town.layers.road_divider
    divider_tree = shapely.STRtree(dividers)
    checked = total = 0
    for poses in ego_samples(town):
        for x, y, yaw in poses:
            total += 1
            point = shapely.points(x, y)
            hits = segment_tree.query(point, predicate="within")
            if len(hits) == 0:
                continue  # turning inside an intersection
            candidates = divider_tree.query(segments[hits[0]], predicate="intersects")
            line = min((dividers[i] for i in candidates), key=point.distance)
            along = line.project(point)
            a, b = line.interpolate(max(along - 0.5, 0.0)), line.interpolate(min(along + 0.5, line.length))
            tangent = np.array([b.x - a.x, b.y - a.y])
            heading = np.array([math.cos(yaw), math.sin(yaw)])
            tangent *= np.sign(tangent @ heading)
            offset = np.array([x - a.x, y - a.y])
            lateral = tangent[0] * offset[1] - tangent[1] * offset[0]  # > 0: left of the divider
            assert lateral < -0.5 * np.linalg.norm(tangent), (x, y, yaw)
            checked += 1
    assert checked > total / 2


def test_ego_speed_and_yaw_are_smooth_and_in_range(town: Town) -> None:
    low, high = TownSettings.default().ego_speed
    for scene in town.scenes:
        times, poses = scene.ego.times, scene.ego.poses
        assert np.diff(times).max() <= 1.0 / SAMPLE_RATE_HZ + 1e-9
        speed = np.linalg.norm(np.diff(poses[:, :2], axis=0), axis=1) / np.diff(times)
        assert speed.max() <= high + 0.05
        assert np.median(speed) >= 0.5 * low
        yaw_rate = np.abs(np.diff(np.unwrap(poses[:, 2]))) / np.diff(times)
        assert yaw_rate.max() < 1.5  # rad/s: tangent-continuous curves, slowed for their curvature
        heading = np.arctan2(np.diff(poses[:, 1]), np.diff(poses[:, 0]))
        mismatch = np.angle(np.exp(1j * (heading - poses[:-1, 2])))
        assert np.abs(mismatch).max() < 0.2  # the yaw is the direction of travel


def test_agents_cover_the_scene_and_stay_where_they_belong(town: Town) -> None:
    drivable = shapely.union_all(town.layers.drivable_area).buffer(0.5)
    footway = shapely.union_all(town.layers.walkway + town.layers.ped_crossing).buffer(0.3)
    shapely.prepare(drivable)
    shapely.prepare(footway)
    categories = set(VEHICLE_TYPES) | {PEDESTRIAN_CATEGORY}
    on_foot = []
    for scene in town.scenes:
        assert scene.ego.times[0] == 0.0 and scene.ego.times[-1] >= scene.duration - 1e-9
        assert len(scene.agents) == TownSettings.default().pedestrians_per_scene + sum(
            a.category != PEDESTRIAN_CATEGORY for a in scene.agents
        )
        for agent in scene.agents:
            assert agent.category in categories
            assert agent.times[0] == 0.0 and agent.times[-1] >= scene.duration - 1e-9
            assert agent.poses.shape == (len(agent.times), 3) and np.all(np.diff(agent.times) > 0)
            x, y = agent.poses[:, 0], agent.poses[:, 1]
            if agent.category == PEDESTRIAN_CATEGORY:
                on_foot.append(shapely.contains_xy(footway, x, y))
            else:
                assert shapely.contains_xy(drivable, x, y).all()
    # Pedestrians walk on walkways and zebra crossings (a few steps cross car-park driveways).
    assert np.concatenate(on_foot).mean() > 0.95
    assert sum(a.category != PEDESTRIAN_CATEGORY for sc in town.scenes for a in sc.agents) >= len(town.scenes)


def test_map_layers_are_consistent(town: Town) -> None:
    layers = town.layers
    drivable = shapely.union_all(layers.drivable_area)
    inside = drivable.buffer(1e-6)
    assert all(stop.within(inside) for stop in layers.stop_line)
    assert all(crossing.within(inside) for crossing in layers.ped_crossing)
    assert all(lane.within(inside) for lane in layers.lane)
    depths = [min(np.linalg.norm(np.diff(np.asarray(s.exterior.coords)[:3], axis=0), axis=1)) for s in layers.stop_line]
    assert 0.4 <= min(depths) and max(depths) <= 0.6
    walkway = shapely.union_all(layers.walkway)
    assert walkway.intersection(drivable).area < 1e-3
    assert walkway.area > 0.05 * drivable.area
    assert shapely.union_all(layers.carpark_area).intersection(walkway).area < 1e-3


def test_lane_divider_paint_lies_on_lane_dividers(town: Town) -> None:
    white = [m.polygon for m in town.paint if m.material == "paint_white"]
    white_tree = shapely.STRtree(white)
    for line in town.layers.lane_divider:
        # White marks painted along the line (stop bars only touch its ends).
        touching = [white[i] for i in white_tree.query(line, predicate="intersects")]
        marks = [mark for mark in touching if mark.intersection(line).length > 0.01]
        assert marks
        assert all(mark.within(line.buffer(0.1)) for mark in marks)
        painted = shapely.union_all(marks).intersection(line).length / line.length
        assert 0.25 < painted < 0.45  # 3 m dashes every 9 m
    yellow = [m.polygon for m in town.paint if m.material == "paint_yellow"]
    for line in town.layers.road_divider:
        near = [mark for mark in yellow if mark.intersects(line.buffer(0.2))]
        assert all(mark.within(line.buffer(0.2)) for mark in near)
        assert sum(mark.area for mark in near) == pytest.approx(2 * 0.1 * line.length, rel=1e-6)


def test_buildings_stand_clear_of_roads_walkways_and_car_parks(town: Town) -> None:
    layers = town.layers
    barrier = shapely.union_all(layers.drivable_area + layers.walkway + layers.carpark_area)
    buildings = [footprint(o.box) for o in town.statics if o.kind == "building"]
    overlap = shapely.area(shapely.intersection(buildings, barrier))
    assert overlap.max() < 1e-6
    assert shapely.union_all(buildings).area == pytest.approx(sum(b.area for b in buildings), rel=1e-9)


def test_parked_vehicles_sit_inside_car_parks_or_at_the_kerb(town: Town) -> None:
    carparks = shapely.union_all(town.layers.carpark_area)
    drivable = shapely.union_all(town.layers.drivable_area)
    parked = [footprint(o.box) for o in town.statics if o.kind == "parked_vehicle"]
    in_carparks = [car for car in parked if car.intersects(carparks)]
    at_kerb = [car for car in parked if not car.intersects(carparks)]
    assert in_carparks and at_kerb
    assert all(car.within(carparks.buffer(1e-6)) for car in in_carparks)
    assert all(car.within(drivable.buffer(1e-6)) for car in at_kerb)


def test_tiny_town_is_small(tiny: Town) -> None:
    assert len(tiny.scenes) == 2 and all(sc.duration == 20.0 for sc in tiny.scenes)
    blocks = len(tiny.layers.drivable_area[0].interiors)
    assert 7 <= blocks <= 9  # 3 x 3, fewer where a T-junction merged two


def test_the_traffic_preset_fills_the_streets_and_empties_the_stalls() -> None:
    """``tiny-traffic`` (the detection tables' world): per town, several times more moving
    vehicles than ``tiny`` and fewer parked ones, every vehicle class among the movers, and its
    vehicles still never overlap each other (checked every 0.5 s, like the ego)."""
    from bridgeta.data.synth.generate import synth_presets

    presets = synth_presets()
    counts = {}
    for name in ("tiny", "tiny-traffic"):
        moving, parked, classes = 0, 0, set()
        for seed in range(3):
            town = generate_town(f"t{seed}", 100 + seed, presets[name].town)
            parked += sum(s.kind == "parked_vehicle" for s in town.statics)
            for scene in town.scenes:
                vehicles = [a for a in scene.agents if a.category in VEHICLE_TYPES]
                moving += len(vehicles)
                classes |= {a.category for a in vehicles}
        counts[name] = (moving, parked, classes)
    assert counts["tiny-traffic"][0] > 3 * counts["tiny"][0]
    assert counts["tiny-traffic"][1] < 0.6 * counts["tiny"][1]
    assert counts["tiny-traffic"][2] == set(VEHICLE_TYPES)
    town = generate_town("busy", 7, presets["tiny-traffic"].town)
    for scene in town.scenes:
        vehicles = [a for a in scene.agents if a.category in VEHICLE_TYPES]
        for time_s in scene.ego.times[:: int(SAMPLE_RATE_HZ // 2)]:
            boxes = [_footprint(a.box_at(float(time_s))) for a in vehicles]
            overlaps = sum(boxes[i].intersection(boxes[j]).area > 1e-6
                           for i in range(len(boxes)) for j in range(i + 1, len(boxes)))
            assert overlaps == 0
