"""The nuScenes detection metric through ``bridgeta eval-detections``: the devkit's algorithm on
our towns' split, a submission JSON round trip, and bad files refused with the key named."""

from __future__ import annotations

import json

import pytest

from bridgeta import cli

pytest.importorskip("nuscenes")


@pytest.fixture(scope="module")
def world(engine_world):
    from nuscenes import NuScenes

    from bridgeta.detection_metrics import split_sample_tokens

    nusc = NuScenes(version="v1.0-trainval", dataroot=str(engine_world), verbose=False)
    return engine_world, nusc, split_sample_tokens(nusc, engine_world, "test")


def _submission(world, tmp_path, shift: float = 0.0, name: str = "results.json"):
    from bridgeta.detection_metrics import ground_truth_submission, write_submission

    _, nusc, tokens = world
    results = ground_truth_submission(nusc, tokens)
    for boxes in results.values():
        for box in boxes:
            box["translation"] = [box["translation"][0] + shift, *box["translation"][1:]]
    return write_submission(tmp_path / name, results)


def test_ground_truth_as_predictions_scores_one_and_shifted_boxes_score_less(world, tmp_path, capsys):
    dataroot, _, tokens = world
    path = _submission(world, tmp_path)
    assert cli.main(["eval-detections", "--dataroot", str(dataroot), "--split", "test", "--results", str(path), "--json"]) == 0
    exact = json.loads(capsys.readouterr().out)
    present = [c for c, row in exact["per_class"].items() if row["AP"] > 0]
    assert present, "the test town has boxes"
    assert all(exact["per_class"][c]["AP"] == pytest.approx(1.0) for c in present)
    assert all(exact["per_class"][c]["ATE"] == pytest.approx(0.0, abs=1e-6) for c in present)
    assert exact["samples"] == len(tokens) and set(exact["classes"]) <= {"car", "truck", "bus", "pedestrian"}
    assert exact["mAP"] == pytest.approx(1.0) and set(present) == set(exact["classes"])
    # 1.5 m off: matched at the 2 and 4 m thresholds only, so AP drops to about a half.
    shifted = _submission(world, tmp_path, shift=1.5, name="shifted.json")
    assert cli.main(["eval-detections", "--dataroot", str(dataroot), "--split", "test", "--results", str(shifted), "--json"]) == 0
    worse = json.loads(capsys.readouterr().out)
    for name in present:
        assert worse["per_class"][name]["AP"] == pytest.approx(0.5, abs=0.05)
        assert worse["per_class"][name]["ATE"] == pytest.approx(1.5, abs=1e-3)
    assert worse["mAP"] < exact["mAP"] and worse["NDS"] < exact["NDS"]


def test_a_weak_detector_scores_official_map_zero_but_a_positive_unclipped_map(world, tmp_path, capsys):
    """Each true box found, but behind 29 confident false boxes: precision stays below the official
    10 % floor at every recall (at most 2 of 30 boxes can match a true one), so the devkit's AP is
    exactly 0, while the unclipped AP (the same calc_ap without floors) sees the true boxes."""
    from bridgeta.detection_metrics import ground_truth_submission, write_submission

    dataroot, nusc, tokens = world
    results = ground_truth_submission(nusc, tokens)
    for token, boxes in results.items():
        weak = []
        for box in boxes:
            weak.append({**box, "detection_score": 0.5})
            # 6 m ahead: outside the 4 m threshold of its own box, inside every class range.
            weak += [{**box, "translation": [box["translation"][0] + 6.0, *box["translation"][1:]],
                      "detection_score": 1.0}] * 29
        results[token] = weak
    path = write_submission(tmp_path / "weak.json", results)
    assert cli.main(["eval-detections", "--dataroot", str(dataroot), "--split", "test", "--results", str(path), "--json"]) == 0
    weak = json.loads(capsys.readouterr().out)
    exact_path = _submission(world, tmp_path)
    assert cli.main(["eval-detections", "--dataroot", str(dataroot), "--split", "test", "--results", str(exact_path),
                     "--json"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert weak["mAP"] == 0.0 and all(row["AP"] == 0.0 for row in weak["per_class"].values())
    assert 0.0 < weak["mAP_unclipped"] < 0.1
    # Perfect predictions: precision 1 at every recall, so 1 without floors too.
    assert exact["mAP_unclipped"] == pytest.approx(1.0, abs=1e-6)
    assert weak["mAP_unclipped"] == pytest.approx(
        sum(row["AP_unclipped"] for row in weak["per_class"].values()) / len(weak["per_class"]))


def test_a_submission_without_any_box_scores_zero(world, tmp_path, capsys):
    """An untrained model may detect nothing: mAP 0, not the devkit's error on an empty filter."""
    from bridgeta.detection_metrics import write_submission

    dataroot, _, tokens = world
    path = write_submission(tmp_path / "empty.json", {token: [] for token in tokens})
    assert cli.main(["eval-detections", "--dataroot", str(dataroot), "--split", "test", "--results", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mAP"] == 0.0 and all(row["AP"] == 0.0 for row in result["per_class"].values())


def test_submission_round_trips_through_the_devkit_loader(world, tmp_path):
    from nuscenes.eval.common.loaders import load_prediction_of_sample_tokens
    from nuscenes.eval.detection.data_classes import DetectionBox

    from bridgeta.detection_metrics import ground_truth_submission

    _, nusc, tokens = world
    path = _submission(world, tmp_path)
    loaded, meta = load_prediction_of_sample_tokens(str(path), 500, DetectionBox, sample_tokens=tokens)
    expected = ground_truth_submission(nusc, tokens)
    assert meta["use_camera"] is True
    for token in tokens:
        def key(b):
            return tuple(b["translation"]), tuple(b["size"]), tuple(b["rotation"]), b["detection_name"], b["attribute_name"]

        assert [key(b.serialize()) for b in loaded[token]] == [key(b) for b in expected[token]]


def test_bad_submissions_are_refused_with_the_key_named(world, tmp_path, capsys):
    dataroot, _, tokens = world
    path = _submission(world, tmp_path)
    data = json.loads(path.read_text())
    cases = {
        "missing.json": lambda d: d["results"].pop(tokens[0]),
        "name.json": lambda d: next(b for bs in d["results"].values() for b in bs).update(detection_name="dragon"),
        "nan.json": lambda d: next(b for bs in d["results"].values() for b in bs).update(translation=[0, 0, float("nan")]),
    }
    messages = {}
    for name, corrupt in cases.items():
        broken = json.loads(json.dumps(data))
        corrupt(broken)
        (tmp_path / name).write_text(json.dumps(broken))
        code = cli.main(["eval-detections", "--dataroot", str(dataroot), "--split", "test", "--results", str(tmp_path / name)])
        messages[name] = capsys.readouterr().err
        assert code == 2 and str(tmp_path / name) in messages[name]
    assert f"first: {tokens[0]}" in messages["missing.json"]
    assert "'dragon' is not a nuScenes class" in messages["name.json"]
    assert ".translation must be 3 finite numbers" in messages["nan.json"]


def test_attributes_follow_the_agents_speed():
    from bridgeta.data.synth.generate import annotation_attribute

    assert annotation_attribute("vehicle.car", agent=False, speed=0.0) == "vehicle.parked"
    assert annotation_attribute("vehicle.car", agent=True, speed=0.1) == "vehicle.stopped"
    assert annotation_attribute("vehicle.bus.rigid", agent=True, speed=5.0) == "vehicle.moving"
    assert annotation_attribute("human.pedestrian.adult", agent=True, speed=1.2) == "pedestrian.moving"
    assert annotation_attribute("human.pedestrian.adult", agent=True, speed=0.0) == "pedestrian.standing"


def test_prepared_records_carry_the_boxes_in_the_ego_frame(world):
    """``data prepare`` stores each sample's detection boxes in its keyframe ego frame: moved back
    by the record's global_T_ego they are the annotations, heading and size included."""
    import math

    import numpy as np

    from bridgeta.data.cache import LabelCache, default_cache_dir
    from bridgeta.data.nuscenes_writer import quaternion_to_matrix

    dataroot, nusc, _ = world
    cache = LabelCache(default_cache_dir(dataroot, "v1.0-trainval"))
    checked = 0
    for index in range(len(cache)):
        record = cache.record(index)
        global_T_ego = np.asarray(record["global_T_ego"])
        for obj in record["objects"]:
            annotation = nusc.get("sample_annotation", obj["token"])
            x, y, z, length, width, height, yaw = obj["box"][:7]
            centre = global_T_ego[:3, :3] @ np.array([x, y, z]) + global_T_ego[:3, 3]
            np.testing.assert_allclose(centre, annotation["translation"], atol=1e-4)
            heading = global_T_ego[:3, :3] @ np.array([math.cos(yaw), math.sin(yaw), 0.0])
            np.testing.assert_allclose(heading, quaternion_to_matrix(annotation["rotation"])[:, 0], atol=1e-5)
            assert (width, length, height) == pytest.approx(annotation["size"])
            assert obj["name"] in ("car", "truck", "bus", "pedestrian")
            checked += 1
    assert checked > 0
