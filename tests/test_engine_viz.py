"""render_prediction: one PNG of cameras + per-class prediction / truth / errors; the error map."""

import numpy as np
import pytest
import torch
from PIL import Image
from engine_helpers import tiny_config

from bridgeta.data.dataset import BEVMapDataset, DataConfig
from bridgeta.engine.model_file import save_model_file
from bridgeta.engine.viz import ERROR_COLOURS, error_map, render_prediction
from bridgeta.geometry import BEVGrid
from bridgeta.models.bev_model import build_model


@pytest.fixture(scope="module")
def dataroot(engine_world):
    return engine_world


def test_error_map_colours_a_hand_case():
    probability = np.array([[0.9, 0.2, 0.5], [0.6, 0.4, 0.7]])
    target = np.array([[True, True, True], [False, False, False]])
    rgb = error_map(probability, target)
    tp, fp, fn, tn = (np.array(ERROR_COLOURS[k]) for k in ("true positive", "false positive", "false negative", "true negative"))
    assert rgb.shape == (2, 3, 3)
    # 0.5 itself counts as predicted, as in MapMetric.
    expected = np.array([[tp, fn, tp], [fp, tn, fp]])
    assert np.array_equal(rgb, expected)
    # A higher threshold turns the 0.5 hit into a miss and the 0.6 false alarm into a true negative.
    expected_high = np.array([[tp, fn, fn], [tn, tn, fp]])
    assert np.array_equal(error_map(probability, target, threshold=0.65), expected_high)
    assert len({tuple(c) for c in (tp, fp, fn, tn)}) == 4  # four distinguishable colours
    with pytest.raises(ValueError, match="equal"):
        error_map(probability, target[:, :2])


def test_render_from_a_model_file(dataroot, tmp_path):
    config = tiny_config()
    path = save_model_file(tmp_path / "run" / "model.safetensors", build_model(config), config)
    out = render_prediction(tmp_path / "run", None, dataroot, 1, tmp_path / "pics" / "viz.png", device="cpu")
    assert out == tmp_path / "pics" / "viz.png" and out.stat().st_size > 20_000
    with Image.open(out) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 800 and pixels.shape[1] > 800
    unique = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(unique) > 500  # camera images, not blank panels
    # The error maps are drawn: some false-negative or true-positive cells must show (any model
    # misses or finds some drivable area).
    colours = {tuple(int(v) for v in c) for c in unique}
    named = {tuple(int(round(255 * v)) for v in ERROR_COLOURS[k]) for k in ("true positive", "false negative")}
    assert colours & named
    assert path.is_file()


def test_render_from_a_model_and_dataset_by_token(dataroot, tmp_path):
    config = tiny_config(f"data.dataroot={dataroot}")
    model = build_model(config)
    dataset = BEVMapDataset(
        config.data, (0, 0), model.output_grid, model.classes, modalities=("lidar",), split="val"
    )
    token = dataset.cache.record(int(dataset.indices[0]))["token"]
    thresholds = {name: 0.4 for name in model.classes}
    out = render_prediction(model, config, dataset, token, tmp_path / "token.png", threshold=thresholds, device="cpu")
    assert out.stat().st_size > 20_000
    with pytest.raises(ValueError, match="needs the experiment config"):
        render_prediction(model, None, dataset, 0, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no threshold for classes"):
        render_prediction(model, config, dataset, 0, tmp_path / "x.png", threshold={"divider": 0.5})
    with pytest.raises(IndexError, match="out of range"):
        render_prediction(model, config, dataset, 5, tmp_path / "x.png")
    other_grid = BEVMapDataset(
        DataConfig(dataroot=str(dataroot)), (0, 0), BEVGrid((-20.0, 20.0, 1.0), (-20.0, 20.0, 1.0)),
        model.classes, modalities=("lidar",), split="val",
    )
    with pytest.raises(ValueError, match="output grid / classes differ"):
        render_prediction(model, config, other_grid, 0, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    assert torch.is_grad_enabled()
