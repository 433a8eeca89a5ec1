"""BEVDepth's explicit depth supervision (``model.camera.vtransform.depth_loss_weight``): its value
and gradient against torch's BCE, where its gradient goes, what a training batch loads for it,
and that the deployed network does not change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine_helpers import read_metrics, small_student_config, torch_threads

from bridgeta.config import ConfigError, load_config
from bridgeta.engine.trainer import train
from bridgeta.models.bev_model import build_model
from bridgeta.models.lss import depth_supervision_loss, lidar_depth_distribution
from bridgeta.rig import reference_inputs

BOUNDS = (1.0, 9.0, 1.0)  # 8 bins at 1, 2, ..., 8 m
STRIDE = 4


def sparse_depth(batch: int, cams: int, height: int = 8, width: int = 12) -> torch.Tensor:
    """Projected LiDAR depth: a few pixels with a return (some outside the bins), 0 elsewhere."""
    depth = torch.zeros(batch, cams, height, width)
    depth[0, 0, 1, 1] = 3.2       # cell (0, 0): bin 2
    depth[0, 0, 5, 9] = 7.9       # cell (1, 2): bin 7
    depth[0, 1, 2, 6] = 30.0      # beyond the bins: no target
    depth[-1, -1, 6, 2] = 1.4     # cell (1, 0): bin 0
    return depth


def test_the_loss_is_torch_bce_over_the_cells_with_a_return():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 2, 3, requires_grad=True)
    depth = sparse_depth(2, 2)
    loss = depth_supervision_loss(logits.softmax(dim=2), depth, STRIDE, BOUNDS)
    loss.backward()
    grad = logits.grad.clone()

    # Reference: the three cells with a depth inside the bins, their one-hot bins, torch's BCE
    # summed over bins, averaged over cells.
    reference_logits = logits.detach().clone().requires_grad_(True)
    probabilities = reference_logits.softmax(dim=2)
    cells = [((0, 0), (0, 0), 2), ((0, 0), (1, 2), 7), ((1, 1), (1, 0), 0)]
    terms = []
    for (b, n), (i, j), k in cells:
        target = F.one_hot(torch.tensor(k), 8).float()
        terms.append(F.binary_cross_entropy(probabilities[b, n, :, i, j], target, reduction="sum"))
    reference = torch.stack(terms).mean()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert torch.allclose(grad, reference_logits.grad, atol=1e-6)
    # Cells without a return, or with one beyond the bins, get no gradient.
    assert grad[0, 1].abs().sum() == 0 and grad[1, 0].abs().sum() == 0


def test_a_perfect_prediction_costs_almost_nothing_and_no_return_costs_zero():
    depth = sparse_depth(2, 2)
    one_hot = lidar_depth_distribution(depth.view(4, 8, 12), STRIDE, BOUNDS).view(2, 2, 8, 2, 3)
    assert depth_supervision_loss(one_hot, depth, STRIDE, BOUNDS).item() < 1e-4
    uniform = torch.full((2, 2, 8, 2, 3), 1 / 8, requires_grad=True)
    empty = depth_supervision_loss(uniform, torch.zeros(2, 2, 8, 12), STRIDE, BOUNDS)
    assert empty.item() == 0.0
    empty.backward()  # a batch without returns still backpropagates (zero)
    assert uniform.grad.abs().sum() == 0


def test_the_depth_bins_must_match_the_prediction():
    with pytest.raises(ValueError, match="depth bounds or feature stride differ"):
        depth_supervision_loss(torch.rand(1, 1, 5, 2, 3), torch.zeros(1, 1, 8, 12), STRIDE, BOUNDS)


def test_config_checks():
    with pytest.raises(ConfigError, match=r"model\.camera\.vtransform\.depth_loss_weight must be >= 0, got -1"):
        load_config("tiny-c", ["model.camera.vtransform.depth_loss_weight=-1"])
    with pytest.raises(ConfigError, match=r"model\.camera\.vtransform\.depth_loss_weight must be >= 0, got nan"):
        load_config("tiny-c", ["model.camera.vtransform.depth_loss_weight=.nan"])
    with pytest.raises(ConfigError, match="depth_source 'lidar'"):
        load_config("tiny-c", ["model.camera.vtransform.depth_loss_weight=3",
                               "model.camera.vtransform.depth_source=lidar"])


def test_the_loss_reaches_the_depth_net_and_not_the_heads():
    config = load_config("tiny-c", ["model.camera.vtransform.depth_loss_weight=3"])
    torch.manual_seed(0)
    model = build_model(config).train()
    assert model.modalities == ("camera",) and model.training_modalities == ("camera", "depth")
    inputs = reference_inputs(1, (64, 176), 6)
    depth = torch.zeros(1, 6, 64, 176)
    depth[..., 20:40, 30:90] = 12.0
    inputs.camera.depth = depth
    outputs = model(inputs)
    terms = model.depth_losses(outputs, inputs)
    assert set(terms) == {"depth/bce"} and terms["depth/bce"].item() > 0
    terms["depth/bce"].backward()
    reached = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(name.startswith("camera_encoder.vtransform.depthnet") for name in reached)
    assert any(name.startswith("camera_encoder.backbone") for name in reached)
    assert not any(name.startswith(("decoder", "head", "camera_encoder.vtransform.downsample")) for name in reached)


def test_without_the_weight_nothing_changes():
    model = build_model(load_config("tiny-c"))
    inputs = reference_inputs(1, (64, 176), 6)
    assert model.training_modalities == model.modalities == ("camera",)
    assert model.depth_losses(model(inputs), inputs) == {}


def test_a_missing_depth_is_named():
    model = build_model(load_config("tiny-c", ["model.camera.vtransform.depth_loss_weight=3"]))
    inputs = reference_inputs(1, (64, 176), 6)
    with pytest.raises(ValueError, match="load the 'depth' modality"):
        model.depth_losses(model(inputs), inputs)


def test_training_with_depth_supervision_logs_it_and_deploys_camera_only(engine_world, tmp_path):
    from bridgeta.engine.model_file import load_model_file
    from bridgeta.models.deploy import input_specs

    config = small_student_config(engine_world, "model.camera.vtransform.depth_loss_weight=3", "train.max_steps=3")
    with torch_threads(1):
        train(config, tmp_path / "run")
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert rows and all(r["depth/bce"] > 0 for r in rows)
    model, _ = load_model_file(tmp_path / "run")
    assert model.modalities == ("camera",)
    # Camera inputs only: depth supervision is a training loss, the deployed graph reads no depth.
    assert [spec.name for spec in input_specs(model)] == ["images", "intrinsics", "ego_T_camera", "image_aug"]
