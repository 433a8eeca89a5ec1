"""Model files: self-describing, atomic, never unpickled."""

import pytest
import torch

from bridgeta.config import load_config
from bridgeta.engine.model_file import load_model_file, read_model_file, save_model_file
from bridgeta.models.bev_model import build_model


def test_round_trip_rebuilds_the_model_from_the_file_alone(tmp_path):
    config = load_config("tiny-l", ["train.optimizer.lr=0.001"])
    model = build_model(config)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # weights differ from a fresh build
    path = save_model_file(tmp_path / "m.safetensors", model, config)
    assert not (tmp_path / "m.safetensors.tmp").exists()
    loaded, loaded_config = load_model_file(path)
    assert loaded_config == config and loaded_config.train.optimizer.lr == 0.001
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert read_model_file(path)[2] == "model"  # a BEVModel's file; distillers write "distiller"
    with pytest.raises(ValueError, match="unknown model file kind 'teacher'"):
        save_model_file(tmp_path / "t.safetensors", model, config, kind="teacher")


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model file"):
        load_model_file(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.safetensors: not a readable safetensors file"):
        load_model_file(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="not a bridgeta model file"):
        load_model_file(plain)


def test_a_model_started_from_a_pretrained_backbone_rebuilds_without_that_file(tmp_path):
    from safetensors.torch import save_file

    from bridgeta.engine.model_file import export_student

    donor = build_model(load_config("tiny-c")).camera_encoder.backbone
    with torch.no_grad():
        donor.conv1.weight.add_(1.0)
    backbone = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(backbone))
    config = load_config("tiny-c", [f"model.camera.backbone.pretrained={backbone}"])
    model = build_model(config)
    assert torch.equal(model.camera_encoder.backbone.conv1.weight, donor.conv1.weight)
    with torch.no_grad():
        model.camera_encoder.backbone.conv1.weight.mul_(2.0)  # trained on: the file's weights win
    path = save_model_file(tmp_path / "m.safetensors", model, config)
    backbone.unlink()  # the run moved on; its model file must not depend on the start point
    loaded, loaded_config = load_model_file(path)
    assert loaded_config.model.camera.backbone.pretrained == str(backbone)  # kept, as a record
    assert torch.equal(loaded.camera_encoder.backbone.conv1.weight, model.camera_encoder.backbone.conv1.weight)
    export_student(path, tmp_path / "student.safetensors")
