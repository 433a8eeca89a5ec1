"""Map-expansion JSON: the official devkit loads, rasterises, queries and renders what we write."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import shapely  # noqa: E402
import shapely.plotting  # noqa: E402
from shapely.geometry import LineString, Polygon, box  # noqa: E402

from bridgeta.data.map_expansion import map_expansion_json, write_map_expansion  # noqa: E402
from bridgeta.data.synth.world import TownSettings, generate_town  # noqa: E402
from bridgeta.data.synth.world_types import MapLayers  # noqa: E402

pytest.importorskip("nuscenes")
with matplotlib.rc_context():  # the devkit sets a global matplotlib style on import
    from nuscenes.map_expansion import map_api  # noqa: E402

# The devkit only knows the four nuScenes cities by name (and get_map_mask needs their sizes),
# so the hand-built map is written under a real city's name: the devkit runs unmodified.
CITY = "boston-seaport"
BOUNDS = (0.0, 0.0, 300.0, 300.0)


def hand_built() -> MapLayers:
    """A 20 m square of road with a strip of walkway east of it, and a walkway ring with a hole."""
    return MapLayers(
        drivable_area=[box(110, 100, 130, 120)],
        road_segment=[(box(110, 100, 130, 120), False)],
        lane=[Polygon([(110, 100), (130, 100), (130, 105), (110, 105)])],  # eastbound, right edge first
        walkway=[box(130, 100, 133, 120), box(141, 131, 161, 151).difference(box(146, 136, 156, 146))],
        ped_crossing=[box(112, 100, 116, 120)],
        stop_line=[box(116.5, 100, 117, 110)],
        carpark_area=[box(200, 200, 240, 212)],
        road_divider=[LineString([(118, 110), (128, 110)])],
        lane_divider=[LineString([(118, 105), (128, 105)])],
    )


@pytest.fixture()
def city_map(tmp_path: Path) -> map_api.NuScenesMap:
    write_map_expansion(tmp_path, CITY, hand_built(), BOUNDS)
    return map_api.NuScenesMap(dataroot=str(tmp_path), map_name=CITY)


def test_devkit_map_mask_rows_walk_y_and_columns_walk_x(city_map: map_api.NuScenesMap) -> None:
    # Patch centred at (120, 120), 40 x 40 m at 1 px/m: pixel (row, col) covers local (y, x) + 20,
    # i.e. global x = 100 + col, y = 100 + row. The road square is x 110..130, y 100..120.
    mask = city_map.get_map_mask((120.0, 120.0, 40.0, 40.0), 0.0, ["drivable_area", "walkway"], (40, 40))
    assert mask.shape == (2, 40, 40)
    road, walk = mask
    assert road[2:18, 12:28].all()
    assert not road[22:].any() and not road[:, :8].any() and not road[:, 32:].any()
    assert walk[2:18, 31].all() and not walk[2:18, 35].any()  # the strip at x 130..133
    # (Shapes touching the patch edge without entering it break the devkit under shapely 2, so the
    # hand-built map keeps its other walkway off the edges of this patch.)
    # Rotated by 90 degrees (heading north): local x is global y, local y is -global x, so the
    # road (south of the centre) lands at negative local x = columns < 20, rows 10..30.
    rotated = city_map.get_map_mask((120.0, 120.0, 40.0, 40.0), 90.0, ["drivable_area"], (40, 40))[0]
    assert rotated[12:28, 2:18].all()
    assert not rotated[:, 22:].any()


def test_devkit_keeps_polygon_holes(city_map: map_api.NuScenesMap) -> None:
    # Ring 141..161 with hole 146..156; patch centred at (151, 141), global x = 131 + col, y = 121 + row.
    walk = city_map.get_map_mask((151.0, 141.0, 40.0, 40.0), 0.0, ["walkway"], (40, 40))[0]
    assert walk[12, 20] == 1 and walk[20, 12] == 1
    assert walk[20, 20] == 0  # inside the hole
    assert city_map.record_on_point(151.0, 141.0, "walkway") == ""
    assert city_map.record_on_point(143.0, 141.0, "walkway") == city_map.walkway[1]["token"]


def test_devkit_finds_records_in_patch(city_map: map_api.NuScenesMap) -> None:
    found = city_map.get_records_in_patch((105.0, 95.0, 135.0, 125.0), mode="intersect")
    assert found["drivable_area"] == [city_map.drivable_area[0]["token"]]
    assert found["walkway"] == [city_map.walkway[0]["token"]]
    assert found["carpark_area"] == []
    for layer in ("road_segment", "lane", "ped_crossing", "stop_line", "road_divider", "lane_divider"):
        assert found[layer] == [getattr(city_map, layer)[0]["token"]], layer
    far = city_map.get_records_in_patch((190.0, 190.0, 250.0, 250.0), ["carpark_area", "walkway"], mode="within")
    assert far == {"carpark_area": [city_map.carpark_area[0]["token"]], "walkway": []}


def test_records_link_to_each_other(city_map: map_api.NuScenesMap) -> None:
    segment = city_map.road_segment[0]
    assert segment["drivable_area_token"] == city_map.drivable_area[0]["token"]
    assert city_map.ped_crossing[0]["road_segment_token"] == segment["token"]
    assert city_map.road_divider[0]["road_segment_token"] == segment["token"]
    stop = city_map.stop_line[0]
    assert stop["stop_line_type"] == "PED_CROSSING" and stop["cue"] == [city_map.ped_crossing[0]]
    lane = city_map.lane[0]
    # Lane polygons run [start_right, end_right, end_left, start_left]: entry and exit edges.
    assert list(city_map.extract_line(lane["from_edge_line_token"]).coords) == [(110, 105), (110, 100)]
    assert list(city_map.extract_line(lane["to_edge_line_token"]).coords) == [(130, 100), (130, 105)]
    divider = city_map.lane_divider[0]
    assert [s["node_token"] for s in divider["lane_divider_segments"]] == divider["node_tokens"]
    assert np.sin(city_map.carpark_area[0]["orientation"]) == pytest.approx(0.0, abs=1e-9)  # long side along x


def test_json_is_deterministic_splits_multipolygons_and_shares_nodes() -> None:
    two_roads = shapely.union_all([box(10, 10, 20, 20), box(40, 10, 50, 20)])
    walkways = [box(20, 10, 23, 20), box(20, 20, 23, 30)]
    layers = MapLayers(drivable_area=[two_roads], walkway=walkways, road_segment=[(two_roads, False)])
    data = map_expansion_json(layers, BOUNDS, "synth-x")
    assert data == map_expansion_json(layers, BOUNDS, "synth-x")
    assert data["version"] == "1.3" and data["canvas_edge"] == [300.0, 300.0]
    assert data["arcline_path_3"] == {} and data["connectivity"] == {} and data["lane_connector"] == []
    assert len(data["drivable_area"]) == 1 and len(data["drivable_area"][0]["polygon_tokens"]) == 2
    assert len(data["road_segment"]) == 2
    assert len(data["walkway"]) == 2
    # The walkway rectangles share the nodes (20, 20) and (23, 20); road and walkway share (20, 10), (20, 20).
    assert len(data["node"]) == 4 + 4 + 4 + 4 - 2 - 2
    tables = [table for key, table in data.items() if key != "canvas_edge" and isinstance(table, list)]
    tokens = [record["token"] for table in tables for record in table]
    assert len(tokens) == len(set(tokens)) and all(re.fullmatch(r"[0-9a-f]{32}", t) for t in tokens)
    assert map_expansion_json(layers, BOUNDS, "synth-y")["node"][0]["token"] != data["node"][0]["token"]


def test_negative_coordinates_are_refused() -> None:
    with pytest.raises(ValueError, match="canvas"):
        map_expansion_json(MapLayers(walkway=[box(-5, 0, 5, 5)]), BOUNDS)
    with pytest.raises(ValueError, match="positive"):
        map_expansion_json(MapLayers(), (-10.0, 0.0, 100.0, 100.0))


def test_generated_town_round_trips_through_the_devkit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    town = generate_town("synth-test-0", 2, TownSettings.tiny())
    path = write_map_expansion(tmp_path, town.location, town.layers, town.bounds)
    assert path == tmp_path / "maps" / "expansion" / "synth-test-0.json"
    assert json.loads(path.read_text())["canvas_edge"] == [town.bounds[2], town.bounds[3]]
    monkeypatch.setattr(map_api, "locations", [*map_api.locations, town.location])
    nmap = map_api.NuScenesMap(dataroot=str(tmp_path), map_name=town.location)

    assert len(nmap.lane) == len(town.layers.lane)
    assert len(nmap.ped_crossing) == len(nmap.stop_line) == len(town.layers.stop_line)
    assert all(r["stop_line_type"] == "PED_CROSSING" and len(r["cue"]) == 1 for r in nmap.stop_line)
    assert all(r["drivable_area_token"] for r in nmap.road_segment)
    polygons = [nmap.extract_polygon(r["token"]) for r in nmap.polygon]
    assert all(p.is_valid for p in polygons)
    walkways = shapely.union_all([nmap.extract_polygon(r["polygon_token"]) for r in nmap.walkway])
    expected = shapely.union_all(town.layers.walkway)
    assert walkways.symmetric_difference(expected).area < 1e-4 * expected.length  # nodes are rounded to 0.1 mm
    drivable = [nmap.extract_polygon(t) for r in nmap.drivable_area for t in r["polygon_tokens"]]
    assert sum(p.area for p in drivable) == pytest.approx(sum(p.area for p in town.layers.drivable_area), rel=1e-6)

    x, y, yaw = town.scenes[0].ego.pose_at(0.0)
    found = nmap.get_records_in_patch((x - 5, y - 5, x + 5, y + 5), ["drivable_area", "lane", "road_segment"])
    assert all(found.values())
    assert nmap.layers_on_point(x, y, ["drivable_area"])["drivable_area"] == nmap.drivable_area[0]["token"]
    geometry = nmap.explorer.get_map_geom((x, y, 100.0, 100.0), np.degrees(yaw), ["drivable_area", "walkway"])
    drivable_mask, walkway_mask = nmap.explorer.map_geom_to_mask(geometry, (0.0, 0.0, 100.0, 100.0), (200, 200))
    assert drivable_mask[100, 100] == 1 and walkway_mask[100, 100] == 0  # the ego stands on the road

    # Headless rendering. The devkit draws polygons with descartes, which does not work with
    # shapely 2; lines render as is, polygons with shapely's own patch builder standing in.
    patch = (x - 50, y - 50, x + 50, y + 50)
    figure, _ = nmap.render_map_patch(patch, ["road_divider", "lane_divider"], figsize=(4, 4))
    plt.close(figure)
    monkeypatch.setattr(map_api.descartes, "PolygonPatch", shapely.plotting.patch_from_polygon)
    figure, _ = nmap.render_map_patch(patch, figsize=(4, 4))
    plt.close(figure)
    figure, _ = nmap.render_layers(["drivable_area", "walkway", "ped_crossing", "carpark_area"], figsize=2)
    plt.close(figure)
