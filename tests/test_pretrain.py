"""``bridgeta pretrain-backbone``: the camera-label dataset keeps to its split, the loop learns,
and every camera model starts from what it writes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from bridgeta.cli import main
from bridgeta.config import ConfigError, load_config
from bridgeta.data.camera_labels import CAMERA_CLASSES, IGNORE_INDEX
from bridgeta.engine.pretrain import BACKBONE_FILE, SUMMARY_FILE, backbone_state, build_pixel_model, pixel_losses, save_backbone
from bridgeta.models.checkpoint import load_pretrained
from bridgeta.models.pixel_head import PixelOutputs

from engine_helpers import SMALL_TINY_C, read_metrics

# 6 x 32x88 inputs like the small student; in-process loading.
SMALL_PRETRAIN = ["model.camera.image_size=[32,88]", "train.num_workers=0", "pretrain.log_every=1"]


def _data_config(world):
    return load_config("tiny-c", [f"data.dataroot={world}"]).data


def test_dataset_keeps_to_its_split_and_prepares_images_like_the_bev_loader(engine_world):
    pytest.importorskip("nuscenes")
    from bridgeta.data.camera_label_dataset import CameraLabelDataset
    from bridgeta.data.dataset import BEVMapDataset

    data = _data_config(engine_world)
    train = CameraLabelDataset(data, (32, 88), "train", train=True, seed=3)
    val = CameraLabelDataset(data, (32, 88), "val")
    assert len(train) == 6 * len(train.cache.indices("train")) and len(val) == 6 * len(val.cache.indices("val"))
    assert train.locations and all(loc.startswith("synth-train-") for loc in train.locations)
    assert val.locations and all(loc.startswith("synth-val-") for loc in val.locations)
    train_images = {train.image_path(i) for i in range(len(train))}
    assert not train_images & {val.image_path(i) for i in range(len(val))}
    item = train[0]
    assert item["image"].shape == (3, 32, 88) and item["semantic"].shape == item["depth"].shape == (32, 88)
    assert item["semantic"].dtype == torch.int64
    labels = item["semantic"][item["semantic"] != IGNORE_INDEX]
    assert len(labels) and int(labels.max()) < len(CAMERA_CLASSES)
    # The same normalised pixels as the BEV dataset gives the model (test-time transform).
    assert train.missing_files() == []
    from dataclasses import replace

    first = train.image_path(0)
    train.index.rows[first] = replace(train.index.rows[first], depth="camera_labels/depth/gone.png")
    assert train.missing_files() == [engine_world / "camera_labels/depth/gone.png"]
    grid = load_config("tiny-c").model.heads.map.output_grid.build()
    bev = BEVMapDataset(data, (32, 88), grid, modalities=("camera",), split="val")
    assert torch.equal(val[0]["image"], bev[0].images[0])


def test_pixel_losses_on_fixed_inputs():
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    semantic = torch.tensor([[[0, 1], [2, IGNORE_INDEX]]])
    depth = torch.tensor([[[math.e, 0.0], [math.e, math.e]]])
    log_depth = torch.zeros(1, 2, 2)
    terms = pixel_losses(PixelOutputs(logits, log_depth), semantic, depth, depth_weight=0.5)
    assert math.isclose(float(terms["semantic"].detach()), math.log(3), rel_tol=1e-6)
    assert math.isclose(float(terms["depth"]), 0.5, rel_tol=1e-6)  # |0 - log e| on the 3 pixels with depth
    empty = pixel_losses(PixelOutputs(logits, None), torch.full_like(semantic, IGNORE_INDEX), depth, 1.0)
    assert set(empty) == {"semantic"} and float(empty["semantic"].detach()) == 0.0
    empty["semantic"].backward()  # still a graph: a batch with no labels is a zero update, not a crash


def test_pretrain_learns_on_the_train_towns_only_and_writes_its_outputs(engine_world, tmp_path, monkeypatch, capsys):
    pytest.importorskip("nuscenes")
    from bridgeta.data.camera_label_dataset import CameraLabelDataset

    seen: list[tuple[str, bool, str]] = []
    original = CameraLabelDataset.__getitem__

    def spy(self, index):
        seen.append((self.split, self.train, self.image_path(index)))
        return original(self, index)

    monkeypatch.setattr(CameraLabelDataset, "__getitem__", spy)
    out = tmp_path / "pretrain"
    # One train sample (6 images) in one batch without augmentation: the loop must overfit it
    # (measured: 3.17 -> 1.61 in 20 steps, decreasing at every step).
    args = ["pretrain-backbone", "--config", "tiny-c", "--dataroot", str(engine_world), "--out", str(out),
            "--max-steps", "20", "--epochs", "20", *sum((["--set", o] for o in SMALL_PRETRAIN), []),
            "--set", "data.load_interval=4", "--set", "data.augment.image=false", "--set", "pretrain.batch_size=6",
            "--set", "pretrain.optimizer={lr: 0.003, warmup_steps: 0}"]
    assert main(args) == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary == json.loads(capsys.readouterr().out)
    assert summary["steps"] == 20 and summary["train_images"] == 6
    assert summary["final_loss"] < 0.6 * summary["first_loss"], summary
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))
    assert {"semantic", "depth", "lr", "images_per_s"} <= set(rows[0])
    assert rows[-1]["eval"]["split"] == "val"
    evaluation = summary["eval"]
    assert evaluation["images"] == 6 and 0 <= evaluation["pixel_accuracy"] <= 1 and evaluation["miou"] is not None
    assert evaluation["iou"]["sky"] is not None and evaluation["depth_abs_rel"] > 0

    # Training read train-town images only; the val towns were only evaluated.
    trained = [(split, path) for split, train, path in seen if train]
    assert trained and {split for split, _ in trained} == {"train"}
    assert summary["train_locations"] and all(loc.startswith("synth-train-") for loc in summary["train_locations"])
    val_paths = {path for split, train, path in seen if not train and split == "val"}
    assert val_paths and not val_paths & {path for _, path in trained}

    # The file holds plain tensors under the backbone's own keys.
    state = load_file(str(out / BACKBONE_FILE))
    assert "conv1.weight" in state and "layer4.1.bn2.running_var" in state and not any(k.startswith("head") for k in state)

    # Outputs are never overwritten without --force.
    assert main(args) == 2
    assert "already holds" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


@pytest.mark.parametrize("preset", ["tiny-c", "tiny-lc", "distill/tiny-c-bridgeta"])
def test_camera_models_start_from_the_pretrained_backbone(preset, tmp_path):
    from bridgeta.models.bev_model import build_model

    config = load_config("tiny-c", SMALL_TINY_C)
    torch.manual_seed(0)
    pixel = build_pixel_model(config, len(CAMERA_CLASSES))
    with torch.no_grad():
        for parameter in pixel.backbone.parameters():
            parameter.add_(torch.randn_like(parameter))  # unlike any fresh initialisation
    path = save_backbone(tmp_path / BACKBONE_FILE, pixel.backbone, config, CAMERA_CLASSES)
    saved = load_file(str(path))

    model_config = load_config(preset, [*SMALL_TINY_C, f"model.camera.backbone.pretrained={path}"])
    model = build_model(model_config)
    backbone = model.camera_encoder.backbone.state_dict()
    assert set(saved) <= set(backbone)
    assert all(torch.equal(backbone[name], tensor) for name, tensor in saved.items())
    fresh = build_model(load_config(preset, SMALL_TINY_C)).camera_encoder.backbone.state_dict()
    assert not torch.equal(fresh["conv1.weight"], saved["conv1.weight"])
    report = load_pretrained(build_model(load_config(preset, SMALL_TINY_C)).camera_encoder.backbone, path)
    assert not report.missing and not report.unexpected and not report.ignored



def test_swin_backbone_file_loads_without_missing_keys(tmp_path):
    config = load_config("bevfusion-c")
    pixel = build_pixel_model(config, len(CAMERA_CLASSES)).eval()
    with torch.no_grad():
        outputs = pixel(torch.zeros(1, 3, 64, 96))
    assert outputs.semantic.shape == (1, len(CAMERA_CLASSES), 64, 96) and outputs.log_depth.shape == (1, 64, 96)
    state = backbone_state(pixel.backbone)
    assert not any(name.endswith(("attn_mask", "relative_position_index")) for name in state)
    path = save_backbone(tmp_path / BACKBONE_FILE, pixel.backbone, config, CAMERA_CLASSES)
    from bridgeta.models.backbones import build_backbone

    spec = config.model.camera.backbone
    report = load_pretrained(build_backbone(spec.type, spec.out_indices), path)
    assert not report.missing and not report.unexpected


def test_pretrain_config_is_checked():
    with pytest.raises(ConfigError, match="unknown key 'pretrain.lr'"):
        load_config("tiny-c", ["pretrain.lr=0.1"])
    with pytest.raises(ConfigError, match="pretrain.batch_size must be >= 1"):
        load_config("tiny-c", ["pretrain.batch_size=0"])
    # One optimiser key keeps the pretraining's defaults for the others.
    assert load_config("tiny-c", ["pretrain.optimizer.warmup_steps=5"]).pretrain.optimizer.lr == 1e-3


def test_pretrain_needs_a_camera_branch(tmp_path, capsys):
    assert main(["pretrain-backbone", "--config", "tiny-l", "--dataroot", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no camera branch" in capsys.readouterr().err


# ---- pretrain.lift_depth: the camera encoder's neck and LSS depth net, pretrained on depth ----


def test_lift_depth_model_gives_the_depth_distribution_the_lss_lift_uses():
    from bridgeta.engine.pretrain import LiftDepthModel
    from bridgeta.models.bev_model import build_model
    from bridgeta.models.types import CameraInputs

    config = load_config("tiny-c", [*SMALL_TINY_C, "pretrain.lift_depth=true"])
    torch.manual_seed(0)
    model = build_pixel_model(config, len(CAMERA_CLASSES)).eval()
    assert isinstance(model, LiftDepthModel)
    images = torch.randn(1, 6, 3, 32, 88)
    eye = torch.eye(4).expand(1, 6, 4, 4).clone()
    eye[..., 2, 3] = 1.5
    camera = CameraInputs(images=images, intrinsics=torch.tensor([[40.0, 0, 44], [0, 40, 16], [0, 0, 1]]).expand(1, 6, 3, 3),
                          ego_T_camera=eye, image_aug=torch.eye(3).expand(1, 6, 3, 3))
    with torch.no_grad():
        outputs = model(images[0])
        lifted_depth = model.encoder(camera, None).depth
    assert outputs.depth_bins.shape == (6, model.encoder.vtransform.num_depth_bins, 4, 11)
    torch.testing.assert_close(outputs.depth_bins, lifted_depth[0])
    # Its encoder is the BEV model's own: the same keys (so the saved file loads by name).
    bev_keys = set(build_model(load_config("tiny-c", SMALL_TINY_C)).camera_encoder.state_dict())
    assert set(model.encoder.state_dict()) == bev_keys


def test_lift_depth_metrics_on_fixed_inputs():
    from bridgeta.engine.pretrain import LiftDepthMetrics

    bounds = (1.0, 9.0, 1.0)  # 8 bins at 1, 2, ..., 8 m
    depth = torch.zeros(1, 4, 8)
    depth[0, :, :4] = 3.0  # one 4x4 cell at 3 m (bin 2), the other without depth
    metrics = LiftDepthMetrics(4, bounds)
    exact = torch.zeros(1, 8, 1, 2)
    exact[0, 2] = 1.0
    metrics.update(exact, depth)
    assert metrics.summary() == pytest.approx({"cells": 1, "bce": 0.0, "abs_rel": 0.0}, abs=1e-5)
    uniform = LiftDepthMetrics(4, bounds)
    uniform.update(torch.full((1, 8, 1, 2), 1 / 8), depth)
    # BCE summed over the bins: -log(1/8) - 7 log(7/8); expected depth 4.5 m against 3 m.
    assert uniform.summary() == pytest.approx({"cells": 1, "bce": math.log(8) - 7 * math.log(7 / 8), "abs_rel": 0.5})


def test_lift_depth_pretraining_learns_depth_bins_and_camera_models_start_from_it(engine_world, tmp_path, capsys):
    pytest.importorskip("nuscenes")
    from bridgeta.engine.pretrain import CAMERA_ENCODER_FILE
    from bridgeta.models.bev_model import build_model

    out = tmp_path / "pretrain"
    small = [*SMALL_PRETRAIN, "model.camera.neck.out_channels=16", "model.camera.vtransform.out_channels=16",
             "pretrain.lift_depth=true", "pretrain.lift_depth_weight=2.0"]
    # One train sample (6 images), one batch, no augmentation: the depth bins must be learnt.
    args = ["pretrain-backbone", "--config", "tiny-c", "--dataroot", str(engine_world), "--out", str(out),
            "--max-steps", "20", "--epochs", "20", *sum((["--set", o] for o in small), []),
            "--set", "data.load_interval=4", "--set", "data.augment.image=false", "--set", "pretrain.batch_size=6",
            "--set", "pretrain.optimizer={lr: 0.003, warmup_steps: 0}"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert {"semantic", "depth", "lift_depth"} <= set(rows[0])
    # Measured: 10.38 -> 7.76, falling at every step.
    lift_terms = [r["lift_depth"] for r in rows]
    assert all(b < a for a, b in zip(lift_terms, lift_terms[1:])), lift_terms
    assert lift_terms[-1] < 0.8 * lift_terms[0], lift_terms
    lift = summary["eval"]["lift_depth"]
    assert lift["cells"] > 0 and lift["bce"] > 0 and 0 < lift["abs_rel"] < 10
    assert summary["camera_encoder_file"] == str(out / CAMERA_ENCODER_FILE)

    saved = load_file(str(out / CAMERA_ENCODER_FILE))
    assert {"backbone.conv1.weight", "vtransform.depthnet.weight"} <= set(saved)
    assert any(k.startswith("neck.") for k in saved)
    assert not any(k.startswith(("head.", "vtransform.downsample", "backbone.fc")) for k in saved)
    # Backbone file and encoder file agree on the backbone.
    backbone = load_file(str(out / BACKBONE_FILE))
    assert all(torch.equal(saved[f"backbone.{k}"], v) for k, v in backbone.items())

    # A camera student and the fusion teacher start from it: every saved tensor, loaded by name.
    for preset in ("tiny-c", "tiny-lc"):
        config = load_config(preset, [*SMALL_TINY_C, "model.camera.neck.out_channels=16",
                                      f"model.camera.pretrained={out / CAMERA_ENCODER_FILE}"])
        encoder = build_model(config).camera_encoder.state_dict()
        assert all(torch.equal(encoder[name], tensor) for name, tensor in saved.items())
        report = load_pretrained(build_model(load_config(preset, SMALL_TINY_C)).camera_encoder, out / CAMERA_ENCODER_FILE)
        assert not report.unexpected and report.missing and all(k.startswith("vtransform.downsample") for k in report.missing)


def test_lift_depth_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        load_config("tiny-c", ["model.camera.pretrained=a.safetensors", "model.camera.backbone.pretrained=b.safetensors"])
    with pytest.raises(ConfigError, match="pretrain.lift_depth_weight must be >= 0"):
        load_config("tiny-c", ["pretrain.lift_depth_weight=-1"])
    config = load_config("tiny-c", [*SMALL_TINY_C, "pretrain.lift_depth=true",
                                    "model.camera.vtransform.depth_net={type: camera_aware}"])
    with pytest.raises(ValueError, match="camera_aware"):
        build_pixel_model(config, len(CAMERA_CLASSES))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        from bridgeta.models.bev_model import build_model

        build_model(load_config("tiny-c", [*SMALL_TINY_C, f"model.camera.pretrained={tmp_path / 'missing.safetensors'}"]))
