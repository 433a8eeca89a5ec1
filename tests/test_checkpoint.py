"""load_pretrained: container unwrapping, prefixes, ignore patterns, and refusing unsafe files."""

from __future__ import annotations

import logging
import pickle
import sys

import pytest
import torch

from bridgeta.models.backbones import build_backbone
from bridgeta.models.checkpoint import LoadReport, load_pretrained


class NotATensor:
    """A custom class: unpickling it would mean running arbitrary code paths."""

    def __init__(self) -> None:
        self.value = 3


def fake_official_swin_state() -> dict[str, torch.Tensor]:
    """What ``swin_tiny_patch4_window7_224.pth["model"]`` holds, with random values."""
    source = build_backbone("swin_t", [0, 1, 2, 3])
    state = {k: v.clone() for k, v in source.state_dict().items() if not k.startswith("norm")}
    state |= {
        "norm.weight": torch.randn(768),
        "norm.bias": torch.randn(768),
        "head.weight": torch.randn(1000, 768),
        "head.bias": torch.randn(1000),
        "layers.0.blocks.1.attn_mask": torch.zeros(64, 49, 49),
        "layers.1.blocks.1.attn_mask": torch.zeros(16, 49, 49),
        "layers.2.blocks.1.attn_mask": torch.zeros(4, 49, 49),
    }
    for stage, depth in enumerate((2, 2, 6, 2)):
        for block in range(depth):
            index_key = f"layers.{stage}.blocks.{block}.attn.relative_position_index"
            state[index_key] = torch.zeros(49, 49, dtype=torch.long)
    return state


def test_official_swin_checkpoint_round_trip(tmp_path, caplog):
    state = fake_official_swin_state()
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": state}, path)

    model = build_backbone("swin_t", [1, 2, 3])
    with caplog.at_level(logging.INFO, logger="bridgeta.models.checkpoint"):
        report = load_pretrained(model, path)

    loaded_state = model.state_dict()
    assert report.loaded and set(report.loaded) == {k for k in loaded_state if not k.startswith("norm")}
    for name in report.loaded:
        assert torch.equal(loaded_state[name], state[name]), name
    assert sorted(report.missing) == sorted(f"norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias"))
    assert report.unexpected == []
    assert {"head.weight", "head.bias", "norm.weight", "layers.0.blocks.1.attn_mask"} <= set(report.ignored)
    assert "layers.3.blocks.1.attn.relative_position_index" in report.ignored
    assert any(report.summary() in record.getMessage() for record in caplog.records)


def test_torchvision_resnet_checkpoint_ignores_fc(tmp_path):
    source = build_backbone("resnet18", [0, 1, 2, 3])
    state = source.state_dict() | {"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)

    model = build_backbone("resnet18", [0, 1, 2, 3])
    report = load_pretrained(model, path)
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(model.layer3[1].conv2.weight, source.layer3[1].conv2.weight)


def test_prefixed_detection_checkpoint(tmp_path):
    source = build_backbone("resnet18", [1, 2, 3])
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    state["neck.lateral_convs.0.weight"] = torch.randn(8, 8, 1, 1)
    path = tmp_path / "detector.pth"
    torch.save({"state_dict": state, "meta": {"epoch": 12}}, path)

    model = build_backbone("resnet18", [1, 2, 3])
    report = load_pretrained(model, path, prefix="backbone.")
    assert report.ignored == ["neck.lateral_convs.0.weight"]
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(model.conv1.weight, source.conv1.weight)

    with pytest.raises(ValueError, match="prefix"):
        load_pretrained(build_backbone("resnet18", [1, 2, 3]), path)


def test_explicit_ignore_patterns_and_unexpected_keys(tmp_path):
    source = build_backbone("resnet18", [0, 1, 2, 3])
    state = source.state_dict() | {"extra.weight": torch.zeros(3)}
    path = tmp_path / "extra.pt"
    torch.save(state, path)

    report = load_pretrained(build_backbone("resnet18", [0, 1, 2, 3]), path, ignore=["layer4.*"])
    assert report.unexpected == ["extra.weight"]
    assert all(name.startswith("layer4.") for name in report.ignored) and report.ignored
    # BatchNorm fills an absent num_batches_tracked counter itself, so it is never "missing".
    expected_missing = {
        k for k in state if k.startswith("layer4.") and not k.endswith("num_batches_tracked")
    }
    assert set(report.missing) == expected_missing


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    state = build_backbone("resnet18", [0, 1, 2, 3]).state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    expected = r"layer1\.0\.conv1\.weight: checkpoint \(64, 64, 5, 5\) vs model \(64, 64, 3, 3\)"
    with pytest.raises(ValueError, match=expected):
        load_pretrained(build_backbone("resnet18", [0, 1, 2, 3]), path)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pretrained(build_backbone("resnet18", [3]), path)


def test_pickled_custom_object_is_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": build_backbone("resnet18", [0]).state_dict(), "config": NotATensor()}, path)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_pretrained(build_backbone("resnet18", [0]), path)


def test_safetensors_without_package_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x00" * 16)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_pretrained(build_backbone("resnet18", [0]), path)


def test_safetensors_round_trip(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source = build_backbone("resnet18", [0, 1])
    path = tmp_path / "weights.safetensors"
    safetensors_torch.save_file(source.state_dict(), str(path))
    model = build_backbone("resnet18", [0, 1])
    report = load_pretrained(model, path)
    assert report.missing == [] and torch.equal(model.layer2[0].conv1.weight, source.layer2[0].conv1.weight)


def test_unknown_suffix_is_rejected(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported checkpoint suffix"):
        load_pretrained(build_backbone("resnet18", [0]), path)


def test_summary_lists_counts():
    report = LoadReport(loaded=["a"], missing=["b"], unexpected=[], ignored=[f"k{i}" for i in range(10)])
    summary = report.summary()
    assert "loaded 1 tensors" in summary and "1 missing [b]" in summary
    assert "10 ignored" in summary and "(+2)" in summary and "unexpected" not in summary


def test_config_hash_ignores_absent_optional_sections():
    """A version that adds an optional section (None by default) keeps recognising older runs'
    configs, while any value that differs still changes the hash."""
    from bridgeta.config import load_config, to_dict
    from bridgeta.engine.checkpoint import _without_absent, config_hash

    config = load_config("tiny-c")
    older = to_dict(config)
    del older["model"]["heads"]["motion"], older["distill"]  # as a version without these keys wrote it
    assert _without_absent(older) == _without_absent(to_dict(config))
    assert _without_absent({"a": 1, "b": None, "c": {"d": None, "e": [{"f": None}]}}) == {"a": 1, "c": {"e": [{}]}}
    assert config_hash(load_config("tiny-c", ["train.seed=3"])) != config_hash(config)
    assert config_hash(load_config("tiny-c", ["model.heads.motion=null"])) == config_hash(config)
