"""Per-class score calibration of the object head: matching, the Platt fit, the error it
reduces, decoding with it, and `bridgeta calibrate-detections` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from bridgeta import cli
from bridgeta.engine.calibrate import calibration_error, fit_platt, match_peaks
from bridgeta.models.object_head import calibrated_scores


def _box(x, y):
    return [x, y, 0.0, 4.0, 2.0, 1.5, 0.0, 0.0, 0.0]


def test_peaks_match_greedily_by_score_within_two_metres_and_by_class():
    true = torch.tensor([_box(0.0, 0.0), _box(10.0, 0.0)])
    true_labels = torch.tensor([0, 1])
    boxes = torch.tensor([_box(0.5, 0.0), _box(0.2, 0.0), _box(10.0, 1.0), _box(30.0, 0.0)])
    scores = torch.tensor([0.6, 0.9, 0.8, 0.7])
    labels = torch.tensor([0, 0, 0, 1])  # the third is near the class-1 box, but says class 0
    # The 0.9 peak takes box 0 first; the 0.6 one finds it taken; the third has the wrong class.
    assert match_peaks(boxes, scores, labels, true, true_labels).tolist() == [False, True, False, False]


def test_platt_scaling_recovers_a_known_calibration():
    torch.manual_seed(0)
    logits = torch.randn(20000) * 2
    hits = torch.rand(20000) < torch.sigmoid(0.5 * logits - 1.0)  # true chance: sigmoid(0.5 z - 1)
    a, b = fit_platt(logits, hits)
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(-1.0, abs=0.05)
    assert calibration_error(torch.sigmoid(a * logits + b), hits) < 0.2 * calibration_error(torch.sigmoid(logits), hits)
    assert fit_platt(logits[:5], torch.ones(5, dtype=torch.bool)) is None  # only hits: nothing to fit
    # A separable class stays finite (Platt's smoothed targets, a bounded slope).
    a, b = fit_platt(torch.tensor([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0]), torch.tensor([False] * 3 + [True] * 3))
    assert 0 < a <= 100 and abs(b) < 100


def test_calibration_changes_the_reported_scores_only():
    from bridgeta.geometry import BEVGrid
    from bridgeta.models.object_head import ObjectOutputs, decode

    scores = calibrated_scores(torch.zeros(2), torch.tensor([0, 1]), ((2.0, 1.0), (1.0, -1.0)))
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([1.0, -1.0], dtype=torch.float64)), atol=1e-6, rtol=0)
    grid = BEVGrid((-4.0, 4.0, 1.0), (-4.0, 4.0, 1.0), (-10.0, 10.0, 20.0))
    heatmap = torch.full((1, 2, 8, 8), -8.0)
    heatmap[0, 0, 2, 2], heatmap[0, 1, 5, 5] = 1.0, 0.0
    outputs = ObjectOutputs(heatmap, torch.zeros(1, 10, 8, 8))
    raw = decode(outputs, grid, top_k=5, score_threshold=0.3)[0]
    calibrated = decode(outputs, grid, top_k=5, score_threshold=0.3, calibration=((1.0, -3.0), (1.0, 3.0)))[0]
    # The same boxes (selected on raw scores), with the calibrated scores reported.
    assert torch.equal(raw["cells"], calibrated["cells"]) and raw["labels"].tolist() == [0, 1]
    torch.testing.assert_close(raw["logits"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(calibrated["scores"], torch.sigmoid(torch.tensor([-2.0, 3.0], dtype=torch.float64)),
                               atol=1e-6, rtol=0)


def test_calibrated_scores_keep_the_raw_ranking_where_the_sigmoid_saturates():
    # A steep fit (the largest slope the fit allows): sigmoid(100 z + 5) is exactly 1.0 in
    # float64 for every logit here above about 0.33, so without the tie-break these detections would
    # tie, and the metric's unstable sort could reorder them and change the class's AP.
    logits = torch.linspace(-4.0, 4.0, 801)
    labels = torch.zeros(801, dtype=torch.long)
    steep = ((100.0, 5.0),)
    saturated = torch.sigmoid(100.0 * logits.double() + 5.0)
    assert int((saturated == 1.0).sum()) > 300  # ties exist (the low end stays distinct in float64)
    scores = calibrated_scores(logits, labels, steep)
    assert bool((scores[1:] > scores[:-1]).all())  # strictly increasing: the raw ranking
    assert bool(((scores > 0) & (scores < 1)).all())
    torch.testing.assert_close(scores, saturated, atol=1e-6, rtol=0)  # the calibrated value, to 1e-6


def test_calibrate_detections_writes_a_calibrated_model_file(engine_world, tmp_path, capsys):
    from engine_helpers import small_student_config, torch_threads

    from bridgeta.engine.model_file import load_model_file, save_model_file
    from bridgeta.models.bev_model import build_model

    config = small_student_config(engine_world, "model.heads.object={head_channels: 8}")
    torch.manual_seed(0)
    source = save_model_file(tmp_path / "model.safetensors", build_model(config), config)
    out = tmp_path / "calibrated.safetensors"
    with torch_threads(1):
        assert cli.main(["calibrate-detections", "--checkpoint", str(source), "--split", "train", "--out", str(out)]) == 2
    assert "not 'train'" in capsys.readouterr().err and not out.exists()
    with torch_threads(1):
        assert cli.main(["calibrate-detections", "--checkpoint", str(source), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["classes"]) == set(config.model.heads.object.classes) and report["split"] == "val"
    calibrated, calibrated_config = load_model_file(out)
    table = calibrated_config.model.heads.object.score_calibration
    assert [list(row) for row in table] == [[r["a"], r["b"]] for r in report["classes"].values()]
    original, _ = load_model_file(source)
    assert all(torch.equal(a, b) for a, b in zip(calibrated.state_dict().values(), original.state_dict().values()))
    with torch_threads(1):  # an existing output is refused
        assert cli.main(["calibrate-detections", "--checkpoint", str(source), "--out", str(out)]) == 2
