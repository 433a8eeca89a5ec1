"""The dataroot checker: a valid dataroot passes, and each corruption is an error naming its file/record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bridgeta.data.check import CheckReport, check_dataroot, main
from bridgeta.data.nuscenes_writer import NuScenesWriter

VERSION = "v1.0-test"
LOCATION = "test-town"
CAMERAS = {  # channel -> yaw of the optical axis (degrees), as in the nuScenes rig
    "CAM_FRONT": 0.0,
    "CAM_FRONT_RIGHT": -55.0,
    "CAM_FRONT_LEFT": 55.0,
    "CAM_BACK": 180.0,
    "CAM_BACK_LEFT": 110.0,
    "CAM_BACK_RIGHT": -110.0,
}
IMAGE_HEIGHT, IMAGE_WIDTH = 24, 32
NUM_SAMPLES = 3


def _ego_T_camera(yaw_deg: float) -> np.ndarray:
    """A level camera (OpenCV axes) 1.5 m up, looking along ``yaw_deg`` in the ego frame."""
    c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    transform = np.eye(4)
    transform[:3, :3] = [[s, 0.0, c], [-c, 0.0, s], [0.0, -1.0, 0.0]]
    transform[:3, 3] = [1.0, 0.0, 1.5]
    return transform


def _global_T_ego(x: float) -> np.ndarray:
    transform = np.eye(4)
    transform[:3, 3] = [x, 5.0, 0.0]
    return transform


def write_map_expansion(dataroot: Path, location: str) -> Path:
    """A minimal but complete version-1.3 map: one square road with a crossing and two dividers."""
    nodes = [
        {"token": f"n{i}", "x": x, "y": y} for i, (x, y) in enumerate([(0, 0), (50, 0), (50, 50), (0, 50)])
    ]
    layers = {
        "version": "1.3",
        "canvas_edge": [100.0, 100.0],
        "node": nodes,
        "line": [{"token": "l0", "node_tokens": ["n0", "n1"]}],
        "polygon": [{"token": "p0", "exterior_node_tokens": ["n0", "n1", "n2", "n3"], "holes": []}],
        "drivable_area": [{"token": "da0", "polygon_tokens": ["p0"]}],
        "road_segment": [
            {"token": "rs0", "polygon_token": "p0", "is_intersection": False, "drivable_area_token": "da0"}
        ],
        "road_block": [],
        "lane": [],
        "ped_crossing": [{"token": "pc0", "polygon_token": "p0", "road_segment_token": "rs0"}],
        "walkway": [{"token": "w0", "polygon_token": "p0"}],
        "stop_line": [],
        "carpark_area": [],
        "road_divider": [{"token": "rd0", "line_token": "l0", "road_segment_token": "rs0"}],
        "lane_divider": [{"token": "ld0", "line_token": "l0", "lane_divider_segments": []}],
        "traffic_light": [],
        "lane_connector": [],
        "arcline_path_3": {},
        "connectivity": {},
    }
    path = dataroot / "maps" / "expansion" / f"{location}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(layers))
    return path


def build_dataroot(dataroot: Path, description: str = "Day, clear, parked cars") -> NuScenesWriter:
    """1 log, 1 scene, 3 samples, 6 cameras, LIDAR_TOP keyframes plus one LiDAR sweep per sample."""
    rng = np.random.default_rng(0)
    writer = NuScenesWriter(dataroot, VERSION)
    log = writer.log(LOCATION, "log-0")
    writer.map([log], np.zeros((8, 8), dtype=np.uint8))
    scene = writer.scene("scene-0001", description, log)
    intrinsics = np.array([[20.0, 0.0, IMAGE_WIDTH / 2], [0.0, 20.0, IMAGE_HEIGHT / 2], [0.0, 0.0, 1.0]])
    cameras = {
        name: writer.calibrated_sensor(name, "camera", _ego_T_camera(yaw), intrinsics)
        for name, yaw in CAMERAS.items()
    }
    lidar = writer.calibrated_sensor("LIDAR_TOP", "lidar", np.eye(4))
    car = writer.instance("vehicle.car")
    for i in range(NUM_SAMPLES):
        time = 1_000_000 + i * 500_000
        sample = writer.sample(scene, time)
        pose = writer.ego_pose(time, _global_T_ego(float(i)))
        for name, calibrated in cameras.items():
            image = rng.integers(0, 256, (IMAGE_HEIGHT, IMAGE_WIDTH, 3), dtype=np.uint8)
            writer.camera_image(sample, calibrated, pose, time, name, image)
        writer.lidar_sweep(sample, lidar, pose, time, "LIDAR_TOP", rng.normal(size=(64, 5)))
        sweep_pose = writer.ego_pose(time + 250_000, _global_T_ego(i + 0.5))
        writer.lidar_sweep(
            sample,
            lidar,
            sweep_pose,
            time + 250_000,
            "LIDAR_TOP",
            rng.normal(size=(64, 5)),
            is_key_frame=False,
        )
        writer.annotation(
            sample, car, (10.0 + i, 5.0, 0.8), (1.9, 4.5, 1.6), 0.1, attributes=["vehicle.moving"]
        )
    writer.finalize()
    write_map_expansion(dataroot, LOCATION)
    return writer


def read_table(dataroot: Path, table: str) -> list[dict]:
    return json.loads((dataroot / VERSION / f"{table}.json").read_text())


def write_table(dataroot: Path, table: str, records: list[dict]) -> None:
    (dataroot / VERSION / f"{table}.json").write_text(json.dumps(records))


def keyframe(dataroot: Path, channel: str) -> dict:
    """The first keyframe sample_data record of ``channel``."""
    return next(
        r
        for r in read_table(dataroot, "sample_data")
        if r["is_key_frame"] and f"/{channel}/" in r["filename"]
    )


def error_lines(report: CheckReport) -> list[str]:
    return [str(issue) for issue in report.errors]


def only_error(report: CheckReport) -> str:
    """The single error of ``report`` as its printed line (a corruption must not cascade)."""
    lines = error_lines(report)
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def dataroot(tmp_path: Path) -> Path:
    build_dataroot(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------------------------
# A valid dataroot
# --------------------------------------------------------------------------------------------


def test_valid_dataroot_is_ok_with_counts(dataroot):
    report = check_dataroot(dataroot, VERSION)
    assert report.ok, error_lines(report)
    assert report.errors == [] and report.warnings == []
    assert report.counts["scene"] == 1 and report.counts["sample"] == NUM_SAMPLES
    assert report.counts["sample_data"] == NUM_SAMPLES * (len(CAMERAS) + 2)
    assert report.counts["calibrated_sensor"] == len(CAMERAS) + 1
    assert report.counts["ego_pose"] == 2 * NUM_SAMPLES
    assert report.counts["sample_annotation"] == NUM_SAMPLES
    assert report.per_split == {"unknown": {"scenes": 1, "samples": NUM_SAMPLES}}
    assert report.per_condition == {
        "day": {"scenes": 1, "samples": NUM_SAMPLES},
        "night": {"scenes": 0, "samples": 0},
        "rain": {"scenes": 0, "samples": 0},
    }
    assert report.label_coverage is None


def test_valid_dataroot_loads_in_the_devkit(dataroot):
    """What the checker passes, the official devkit loads (it is the reference reader)."""
    nuscenes = pytest.importorskip("nuscenes.nuscenes")
    db = nuscenes.NuScenes(version=VERSION, dataroot=str(dataroot), verbose=False)
    assert len(db.sample) == NUM_SAMPLES and set(db.sample[0]["data"]) == {*CAMERAS, "LIDAR_TOP"}


def test_splits_file_and_conditions(tmp_path):
    build_dataroot(tmp_path, description="Night, heavy rain, intersection")
    (tmp_path / "bridgeta_splits.json").write_text(
        json.dumps({"train": ["scene-0001"], "val": ["scene-0999"]})
    )
    report = check_dataroot(tmp_path, VERSION)
    assert report.ok, error_lines(report)
    assert report.per_split == {
        "train": {"scenes": 1, "samples": NUM_SAMPLES},
        "val": {"scenes": 0, "samples": 0},
    }
    assert [str(w) for w in report.warnings] == [
        f"bridgeta_splits.json: split 'val' names 1 scenes not in {VERSION}/scene.json (first: scene-0999)"
    ]
    # Each scene counts once; night wins over rain, as in the prepared cache.
    assert report.per_condition == {
        "day": {"scenes": 0, "samples": 0},
        "night": {"scenes": 1, "samples": NUM_SAMPLES},
        "rain": {"scenes": 0, "samples": 0},
    }


def test_scene_in_two_splits_or_none_is_an_error(dataroot):
    splits = dataroot / "bridgeta_splits.json"
    splits.write_text(json.dumps({"train": ["scene-0001"], "val": ["scene-0001"]}))
    assert only_error(check_dataroot(dataroot, VERSION, deep=False)) == (
        "bridgeta_splits.json: scene scene-0001 is in both 'train' and 'val'"
    )
    splits.write_text(json.dumps({"train": []}))
    report = check_dataroot(dataroot, VERSION, deep=False)
    assert only_error(report) == (
        f"bridgeta_splits.json: 1 scenes of {VERSION}/scene.json are in no split (first: 'scene-0001')"
    )
    assert report.per_split["unassigned"] == {"scenes": 1, "samples": NUM_SAMPLES}


@pytest.mark.parametrize(
    "description", ["Day, clear", "Rain, parking lot", "Night, rain", "NIGHT drive", "drizzle"]
)
def test_conditions_match_the_prepared_cache(tmp_path, description):
    """The report's condition counts must be what ``bridgeta prepare`` writes into the cache."""
    pytest.importorskip("shapely")  # bridgeta.data.prepare draws labels with shapely
    from bridgeta.data.conditions import scene_condition

    build_dataroot(tmp_path, description=description)
    per_condition = check_dataroot(tmp_path, VERSION, deep=False).per_condition
    assert per_condition[scene_condition(description)] == {"scenes": 1, "samples": NUM_SAMPLES}
    assert sum(c["scenes"] for c in per_condition.values()) == 1


# --------------------------------------------------------------------------------------------
# Sensor files
# --------------------------------------------------------------------------------------------


def test_truncated_jpeg_is_an_error_naming_the_file(dataroot):
    record = keyframe(dataroot, "CAM_BACK")
    path = dataroot / record["filename"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    line = only_error(check_dataroot(dataroot, VERSION))
    assert line.startswith(
        f"{record['filename']}: sample_data[{record['token']}]: JPEG does not decode fully"
    )
    assert "truncated" in line
    # --quick does not decode, so it cannot see the truncation.
    assert check_dataroot(dataroot, VERSION, deep=False).ok


def test_wrong_image_size_is_an_error(dataroot):
    record = keyframe(dataroot, "CAM_FRONT_LEFT")
    Image.fromarray(np.zeros((IMAGE_HEIGHT * 2, IMAGE_WIDTH, 3), dtype=np.uint8)).save(
        dataroot / record["filename"]
    )
    line = only_error(check_dataroot(dataroot, VERSION))
    assert line.startswith(record["filename"])
    assert (
        f"image is {IMAGE_WIDTH}x{IMAGE_HEIGHT * 2}" in line and f"says {IMAGE_WIDTH}x{IMAGE_HEIGHT}" in line
    )


def test_missing_lidar_file_is_an_error_even_when_quick(dataroot):
    record = keyframe(dataroot, "LIDAR_TOP")
    (dataroot / record["filename"]).unlink()
    for deep in (True, False):
        line = only_error(check_dataroot(dataroot, VERSION, deep=deep))
        assert line == f"{record['filename']}: sample_data[{record['token']}]: keyframe file missing"


def test_missing_sweep_is_only_a_warning(dataroot):
    sweep = next(r for r in read_table(dataroot, "sample_data") if not r["is_key_frame"])
    (dataroot / sweep["filename"]).unlink()
    report = check_dataroot(dataroot, VERSION)
    assert report.ok
    assert len(report.warnings) == 1
    warning = report.warnings[0]
    assert warning.file == "sweeps/LIDAR_TOP" and f"1 of {NUM_SAMPLES} non-keyframe" in warning.message
    assert sweep["filename"] in warning.message


def test_nan_points_are_an_error_naming_the_file(dataroot):
    record = keyframe(dataroot, "LIDAR_TOP")
    path = dataroot / record["filename"]
    points = np.fromfile(path, dtype=np.float32).reshape(-1, 5)
    points[7, 2] = np.nan
    points[9, 0] = np.inf
    points.tofile(path)
    line = only_error(check_dataroot(dataroot, VERSION))
    assert line.startswith(f"{record['filename']}: sample_data[{record['token']}]")
    assert "2 NaN/Inf values" in line and "first in point 7" in line
    assert check_dataroot(dataroot, VERSION, deep=False).ok


def test_lidar_size_not_a_multiple_of_five_floats_is_an_error(dataroot):
    record = keyframe(dataroot, "LIDAR_TOP")
    path = dataroot / record["filename"]
    path.write_bytes(path.read_bytes()[:-4])
    line = only_error(check_dataroot(dataroot, VERSION, deep=False))
    assert line.startswith(record["filename"]) and "not a multiple of 20" in line


def test_empty_lidar_file_is_an_error(dataroot):
    record = keyframe(dataroot, "LIDAR_TOP")
    (dataroot / record["filename"]).write_bytes(b"")
    assert only_error(check_dataroot(dataroot, VERSION, deep=False)).endswith("file is empty")


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def test_missing_version_folder_is_an_error(dataroot):
    line = only_error(check_dataroot(dataroot, "v1.0-trainval"))
    assert line == f"v1.0-trainval: version folder missing from the dataroot (versions found: {VERSION})"


def test_missing_table_is_an_error(dataroot):
    (dataroot / VERSION / "visibility.json").unlink()
    report = check_dataroot(dataroot, VERSION)
    # References into the missing table are not reported once per record.
    assert only_error(report) == f"{VERSION}/visibility.json: visibility: required table file missing"
    assert "visibility" not in report.counts


def test_broken_json_names_file_and_position(dataroot):
    path = dataroot / VERSION / "scene.json"
    path.write_text(path.read_text()[:-10])
    line = only_error(check_dataroot(dataroot, VERSION))
    assert line.startswith(f"{VERSION}/scene.json: not valid JSON:")
    assert "line" in line and "column" in line and "char" in line


def test_table_that_is_not_a_list_is_an_error(dataroot):
    (dataroot / VERSION / "attribute.json").write_text('{"token": "a"}')
    line = error_lines(check_dataroot(dataroot, VERSION))[0]
    assert line == f"{VERSION}/attribute.json: attribute: table must be a JSON list of records, got dict"


def test_missing_required_field_is_an_error(dataroot):
    records = read_table(dataroot, "sample_data")
    token = records[0]["token"]
    del records[0]["filename"]
    write_table(dataroot, "sample_data", records)
    line = only_error(check_dataroot(dataroot, VERSION))
    assert (
        line
        == f"{VERSION}/sample_data.json: sample_data[{token}].filename: missing required field 'filename'"
    )


def test_dangling_token_is_an_error_naming_record_and_field(dataroot):
    records = read_table(dataroot, "sample_data")
    records[3]["ego_pose_token"] = "deadbeef"
    write_table(dataroot, "sample_data", records)
    line = only_error(check_dataroot(dataroot, VERSION))
    assert line == (
        f"{VERSION}/sample_data.json: sample_data[{records[3]['token']}].ego_pose_token: "
        "points at no ego_pose record ('deadbeef')"
    )


def test_dangling_list_token_is_an_error(dataroot):
    records = read_table(dataroot, "sample_annotation")
    records[1]["attribute_tokens"] = ["nope"]
    write_table(dataroot, "sample_annotation", records)
    line = only_error(check_dataroot(dataroot, VERSION))
    assert f"sample_annotation[{records[1]['token']}].attribute_tokens" in line and "'nope'" in line


def test_inconsistent_prev_next_chain_is_an_error(dataroot):
    samples = read_table(dataroot, "sample")
    first, second = samples[0], samples[1]
    assert first["next"] == second["token"]
    second["prev"] = ""  # the first sample's next no longer points back
    write_table(dataroot, "sample", samples)
    lines = error_lines(check_dataroot(dataroot, VERSION))
    assert (
        f"{VERSION}/sample.json: sample[{first['token']}].next: next record {second['token']} has prev '', "
        "not this record" in lines
    )


def test_scene_summary_disagreeing_with_its_chain_is_an_error(dataroot):
    scenes = read_table(dataroot, "scene")
    scenes[0]["nbr_samples"] = NUM_SAMPLES + 1
    write_table(dataroot, "scene", scenes)
    line = only_error(check_dataroot(dataroot, VERSION))
    assert f"scene[{scenes[0]['token']}].nbr_samples" in line and f"has {NUM_SAMPLES} samples" in line


def test_sample_without_a_camera_keyframe_is_an_error(dataroot):
    record = keyframe(dataroot, "CAM_BACK_RIGHT")
    records = read_table(dataroot, "sample_data")
    next(r for r in records if r["token"] == record["token"])["is_key_frame"] = False  # chain stays intact
    write_table(dataroot, "sample_data", records)
    line = only_error(check_dataroot(dataroot, VERSION, deep=False))
    assert (
        f"sample[{record['sample_token']}]" in line and "no keyframe sample_data for CAM_BACK_RIGHT" in line
    )


# --------------------------------------------------------------------------------------------
# Calibration and poses
# --------------------------------------------------------------------------------------------


def test_bad_quaternion_is_an_error(dataroot):
    records = read_table(dataroot, "calibrated_sensor")
    records[2]["rotation"] = [1.0, 0.1, 0.0, 0.0]
    write_table(dataroot, "calibrated_sensor", records)
    line = only_error(check_dataroot(dataroot, VERSION))
    assert line.startswith(
        f"{VERSION}/calibrated_sensor.json: calibrated_sensor[{records[2]['token']}].rotation:"
    )
    assert "norm 1.004988" in line


def test_bad_ego_pose_shapes_are_errors(dataroot):
    records = read_table(dataroot, "ego_pose")
    records[0]["rotation"] = [1.0, 0.0, 0.0]
    records[1]["translation"] = [0.0, float("nan"), 0.0]
    write_table(dataroot, "ego_pose", records)
    lines = error_lines(check_dataroot(dataroot, VERSION))
    assert len(lines) == 2
    assert f"ego_pose[{records[0]['token']}].rotation: expected a quaternion" in lines[0]
    assert f"ego_pose[{records[1]['token']}].translation: expected 3 finite numbers" in lines[1]


@pytest.mark.parametrize(
    "channel, intrinsic, message",
    [
        (
            "CAM_FRONT",
            [[-20.0, 0, 16], [0, 20.0, 12], [0, 0, 1]],
            "focal lengths must be positive, got fx=-20",
        ),
        ("CAM_FRONT", [[20.0, 0, 16], [0, 20.0, 12]], "must be a 3x3 matrix"),
        ("CAM_FRONT", [], "must be a 3x3 matrix"),
        ("CAM_FRONT", [[20.0, 0, 16], [0, 20.0, 12], [0, 1, 1]], "last row must be [0, 0, 1]"),
        (
            "LIDAR_TOP",
            [[20.0, 0, 16], [0, 20.0, 12], [0, 0, 1]],
            "a lidar sensor must have camera_intrinsic []",
        ),
    ],
)
def test_bad_intrinsics_are_errors(dataroot, channel, intrinsic, message):
    token = keyframe(dataroot, channel)["calibrated_sensor_token"]
    records = read_table(dataroot, "calibrated_sensor")
    next(r for r in records if r["token"] == token)["camera_intrinsic"] = intrinsic
    write_table(dataroot, "calibrated_sensor", records)
    line = only_error(check_dataroot(dataroot, VERSION, deep=False))
    assert f"calibrated_sensor[{token}].camera_intrinsic: " in line and message in line


# --------------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------------


def test_unknown_map_location_names_location_and_log(dataroot):
    logs = read_table(dataroot, "log")
    logs[0]["location"] = "boston-nowhere"
    write_table(dataroot, "log", logs)
    line = only_error(check_dataroot(dataroot, VERSION))
    assert line == (
        f"maps/expansion/boston-nowhere.json: log[{logs[0]['token']}].location: unknown map location "
        f"'boston-nowhere': maps/expansion/boston-nowhere.json does not exist (maps here: {LOCATION})"
    )


def test_broken_map_json_is_an_error(dataroot):
    path = dataroot / "maps" / "expansion" / f"{LOCATION}.json"
    path.write_text(path.read_text()[:100])
    line = only_error(check_dataroot(dataroot, VERSION))
    assert line.startswith(f"maps/expansion/{LOCATION}.json: not valid JSON:") and "column" in line


def test_map_polygon_with_missing_node_and_missing_layer(dataroot):
    path = dataroot / "maps" / "expansion" / f"{LOCATION}.json"
    layers = json.loads(path.read_text())
    layers["polygon"][0]["exterior_node_tokens"][2] = "ghost"
    del layers["walkway"]
    path.write_text(json.dumps(layers))
    lines = error_lines(check_dataroot(dataroot, VERSION))
    assert lines == [
        f"maps/expansion/{LOCATION}.json: walkway: required key 'walkway' missing "
        "(the 'walkway' label class is drawn from it)",
        f"maps/expansion/{LOCATION}.json: polygon[p0].exterior_node_tokens: "
        "1 polygon records reference missing node records (first: node 'ghost')",
    ]


def test_map_without_canvas_edge_or_devkit_layers_or_old_version_is_an_error(dataroot):
    path = dataroot / "maps" / "expansion" / f"{LOCATION}.json"
    layers = json.loads(path.read_text())
    del layers["canvas_edge"], layers["lane_connector"]
    layers["version"] = "1.0"
    path.write_text(json.dumps(layers))
    lines = error_lines(check_dataroot(dataroot, VERSION))
    assert [line.split(": ")[1] for line in lines] == ["canvas_edge", "lane_connector", "version"]
    assert "map version '1.0' is older than 1.3" in lines[2]


def test_map_stop_line_cue_and_lane_segment_references(dataroot):
    """What the devkit's NuScenesMap dereferences on load (and so what bridgeta prepare needs)."""
    path = dataroot / "maps" / "expansion" / f"{LOCATION}.json"
    layers = json.loads(path.read_text())
    layers["stop_line"] = [
        {
            "token": "sl0",
            "polygon_token": "p0",
            "stop_line_type": "PED_CROSSING",
            "ped_crossing_tokens": ["pcX"],
            "traffic_light_tokens": ["ignored-for-this-type"],
        },
        {"token": "sl1", "polygon_token": "p0"},
    ]
    layers["lane"] = [
        {
            "token": "ln0",
            "polygon_token": "p0",
            "left_lane_divider_segments": [{"node_token": "n9"}],
            "right_lane_divider_segments": [],
        }
    ]
    path.write_text(json.dumps(layers))
    lines = error_lines(check_dataroot(dataroot, VERSION, deep=False))
    prefix = f"maps/expansion/{LOCATION}.json: "
    assert lines == [
        prefix + "lane[ln0].left_lane_divider_segments: 1 lane records reference missing node records "
        "(first: node 'n9')",
        prefix + "stop_line[sl1].stop_line_type: 1 stop_line records lack a valid 'stop_line_type'",
        prefix
        + "stop_line[sl0].ped_crossing_tokens: 1 stop_line records reference missing ped_crossing records "
        "(first: ped_crossing 'pcX')",
    ]


def test_log_without_map_record_is_an_error(dataroot):
    write_table(dataroot, "map", [])
    log_token = read_table(dataroot, "log")[0]["token"]
    line = only_error(check_dataroot(dataroot, VERSION))
    assert line.startswith(f"{VERSION}/log.json: log[{log_token}]: no map record lists this log")


# --------------------------------------------------------------------------------------------
# Command line and report rendering
# --------------------------------------------------------------------------------------------


def test_main_exit_codes_and_text_output(dataroot, capsys):
    assert main(["--dataroot", str(dataroot), "--version", VERSION]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("OK: 0 errors, 0 warnings")
    assert "splits: unknown 1 scenes / 3 samples" in out

    jpeg = keyframe(dataroot, "CAM_FRONT")["filename"]
    lidar = keyframe(dataroot, "LIDAR_TOP")["filename"]
    path = dataroot / jpeg
    path.write_bytes(path.read_bytes()[:100])
    (dataroot / lidar).unlink()
    assert main(["--dataroot", str(dataroot), "--version", VERSION]) == 1
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2
    assert errors[0].startswith(f"error: {jpeg}: ") and errors[1].startswith(f"error: {lidar}: ")
    # --quick sees the missing file but does not decode the truncated JPEG.
    assert main(["--dataroot", str(dataroot), "--version", VERSION, "--quick"]) == 1
    assert sum(line.startswith("error: ") for line in capsys.readouterr().out.splitlines()) == 1


def test_main_json_output_structure(dataroot, capsys):
    records = read_table(dataroot, "calibrated_sensor")
    records[0]["rotation"] = [2.0, 0.0, 0.0, 0.0]
    write_table(dataroot, "calibrated_sensor", records)
    assert main(["--dataroot", str(dataroot), "--version", VERSION, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {
        "dataroot",
        "version",
        "deep",
        "ok",
        "errors",
        "warnings",
        "counts",
        "per_split",
        "per_condition",
        "label_coverage",
    }
    assert report["ok"] is False and report["deep"] is True and report["version"] == VERSION
    assert report["errors"] == [
        {
            "file": f"{VERSION}/calibrated_sensor.json",
            "message": "quaternion [2.0, 0.0, 0.0, 0.0] has norm 2.000000, not 1 (tolerance 0.001)",
            "table": "calibrated_sensor",
            "token": records[0]["token"],
            "field": "rotation",
        }
    ]
    assert report["counts"]["sample"] == NUM_SAMPLES and report["label_coverage"] is None


def test_format_includes_caller_label_coverage(dataroot):
    report = check_dataroot(dataroot, VERSION, deep=False)
    report.label_coverage = {"train": {"drivable_area": 0.41237, "divider": 0.05}}
    text = report.format()
    assert "quick (sensor files not decoded)" in text
    assert "label coverage train: drivable_area 0.4124, divider 0.05" in text
    assert report.as_dict()["label_coverage"] == report.label_coverage


def test_progress_bar_goes_to_stderr(dataroot, capsys):
    assert check_dataroot(dataroot, VERSION, progress=True).ok
    captured = capsys.readouterr()
    assert "sensor files" in captured.err and captured.out == ""
