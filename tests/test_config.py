"""Config loading: presets, base inheritance, overrides, and errors that name the key and file."""

from pathlib import Path

import pytest

from bridgeta.config import ConfigError, MAP_CLASSES, list_presets, load_config, to_dict

EXPECTED_PRESETS = {"bevfusion-c", "bevfusion-c-r18", "bevfusion-lc", "bevfusion-l", "tiny-c", "tiny-lc", "tiny-l"}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_presets_exist_and_parse():
    assert EXPECTED_PRESETS <= set(list_presets())
    for name in EXPECTED_PRESETS:
        config = load_config(name)
        assert config.name == name
        assert config.model.heads.map.classes == MAP_CLASSES


def test_bevfusion_c_matches_published_setting():
    model = load_config("bevfusion-c").model
    assert model.grid.build().shape == (256, 256)
    assert model.grid.build().downsample(2).shape == (128, 128)
    assert model.heads.map.output_grid.build().shape == (200, 200)
    assert model.camera.image_size == (256, 704)
    assert model.camera.backbone.type == "swin_t" and model.camera.backbone.out_indices == [1, 2, 3]
    assert model.camera.vtransform.depth == (1.0, 60.0, 0.5)
    assert model.camera.vtransform.out_channels == 80 and model.camera.vtransform.downsample == 2
    assert model.decoder.blocks == [(2, 160, 2), (2, 320, 2), (2, 640, 1)]
    assert model.lidar is None and model.fuser is None


def test_base_inheritance_and_null_removes_branch():
    teacher = load_config("bevfusion-lc").model
    student = load_config("bevfusion-c").model
    assert teacher.camera == student.camera and teacher.decoder == student.decoder
    assert teacher.fuser.out_channels == student.camera.vtransform.out_channels
    lidar_only = load_config("bevfusion-l").model
    assert lidar_only.camera is None and lidar_only.fuser is None and lidar_only.lidar is not None


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "base: tiny-c\nmodel:\n  camera:\n    backbone:\n      typo_key: 3\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(path))
    message = str(excinfo.value)
    assert "model.camera.backbone.typo_key" in message and "bad.yaml" in message


def test_wrong_type_and_literal_are_errors(tmp_path):
    path = write(tmp_path / "t.yaml", "base: tiny-c\nmodel:\n  camera:\n    num_cameras: six\n")
    with pytest.raises(ConfigError, match="model.camera.num_cameras: expected an integer"):
        load_config(str(path))
    path = write(tmp_path / "l.yaml", "base: tiny-c\nmodel:\n  camera:\n    backbone: {type: vgg}\n")
    with pytest.raises(ConfigError, match="'vgg' is not one of"):
        load_config(str(path))


def test_missing_required_key(tmp_path):
    path = write(tmp_path / "m.yaml", "model:\n  head: {output_grid: {x: [-50, 50, 1], y: [-50, 50, 1]}}\n")
    with pytest.raises(ConfigError, match="missing required key 'model.grid'"):
        load_config(str(path))


def test_overrides_apply_and_are_validated():
    config = load_config("tiny-c", ["model.camera.neck.out_channels=48", "name=changed"])
    assert config.model.camera.neck.out_channels == 48 and config.name == "changed"
    with pytest.raises(ConfigError, match="unknown key 'model.camera.neck.width'"):
        load_config("tiny-c", ["model.camera.neck.width=48"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config("tiny-c", ["model.camera.neck.out_channels"])


def test_cross_field_validation(tmp_path):
    with pytest.raises(ConfigError, match="whole number of cells"):
        load_config("tiny-c", ["model.grid.x=[-51.2, 51.2, 0.7]"])
    with pytest.raises(ConfigError, match="needs 'model.fuser'"):
        load_config("tiny-lc", ["model.fuser=null"])
    with pytest.raises(ConfigError, match="at least one of"):
        load_config("tiny-c", ["model.camera=null"])
    with pytest.raises(ConfigError, match="unknown class 'lane'"):
        load_config("tiny-c", ["model.heads.map.classes=[lane]"])
    with pytest.raises(ConfigError, match="divisible by"):
        load_config("tiny-c", ["model.camera.image_size=[60, 176]"])


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config("no-such-preset")
    path = write(tmp_path / "broken.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(str(path))
    loop = write(tmp_path / "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(str(loop))


def test_yaml_tags_are_not_executed(tmp_path):
    path = write(tmp_path / "evil.yaml", "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))


def test_round_trip_through_dict():
    import yaml

    from bridgeta.config import parse_config

    config = load_config("bevfusion-lc")
    again = parse_config(yaml.safe_load(yaml.safe_dump(to_dict(config))))
    assert again == config


def test_experiment_sections_and_scientific_notation():
    config = load_config(
        "tiny-c", ["data.dataroot=/data/world", "train.optimizer.lr=1e-3", "data.augment.bev=false"]
    )
    assert config.data.dataroot == "/data/world" and config.data.augment.bev is False
    assert config.train.optimizer.lr == 1e-3
    assert load_config("tiny-c").data is None  # presets do not know where the data is
    with pytest.raises(ConfigError, match="train.optimizer.lr: expected a number, got 'fast'"):
        load_config("tiny-c", ["train.optimizer.lr=fast"])
    with pytest.raises(ConfigError, match="unknown key 'train.optimiser'"):
        load_config("tiny-c", ["train.optimiser.lr=0.1"])
    with pytest.raises(ConfigError, match="data.max_sweeps must be an integer >= 0"):
        load_config("tiny-c", ["data.dataroot=/x", "data.max_sweeps=-1"])


def test_the_config_names_its_heads_and_reads_the_earlier_keys(tmp_path):
    """``model.heads: {map, object, motion, plan}``; files, overrides and runs written with the
    earlier keys (``model.head``, ``model.object_head``, ...) read as the same config."""
    import yaml

    from bridgeta.config import parse_config

    config = load_config("tiny-c-tinybev")
    assert config.model.heads.map.classes == MAP_CLASSES
    assert config.model.heads.object.classes == ("car", "truck", "bus", "pedestrian")
    assert config.model.heads.motion.modes == 6 and config.model.heads.plan.steps == 6
    assert load_config("tiny-c").model.heads.object is None  # a map-only model names its map head alone
    # An earlier run's config.yaml, with the keys of that version.
    old = to_dict(load_config("tiny-c-mt"))
    heads = old["model"].pop("heads")
    old["model"]["head"], old["model"]["object_head"] = heads["map"], heads["object"]
    assert to_dict(parse_config(old, "old.yaml")) == to_dict(load_config("tiny-c-mt"))
    # An earlier file and earlier overrides.
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"base": "tiny-c", "model": {"object_head": {"head_channels": 16}}}))
    legacy = load_config(str(path), ["model.head.weight=0.5", "model.motion_head={modes: 2}"])
    assert legacy.model.heads.object.head_channels == 16 and legacy.model.heads.map.weight == 0.5
    assert legacy.model.heads.motion.modes == 2
    path.write_text(yaml.safe_dump({"base": "tiny-c", "model": {"object_head": {}, "heads": {"object": {}}}}))
    with pytest.raises(ConfigError, match="'model.object_head' and 'model.heads.object' name the same head"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="unknown key 'model.heads.lanes'"):
        load_config("tiny-c", ["model.heads.lanes={}"])
    with pytest.raises(ConfigError, match="'model.heads.occupancy' is rasterised from the annotated agents"):
        load_config("tiny-c", ["model.heads.occupancy={}"])


@pytest.mark.parametrize("workers, as_trained", [(1, "once"), (0, "every_epoch")])
def test_a_run_stored_before_augment_draws_reads_as_the_stream_it_trained_on(tmp_path, workers, as_trained):
    """Before ``data.augment.draws``, persistent loader workers kept the first epoch's
    augmentation (data/epoch.py): a stored run with workers matches ``once``, one without
    ``every_epoch``; a preset or file without the key still means the default."""
    import yaml

    from bridgeta.config import matches_stored

    overrides = [f"train.num_workers={workers}", "data.dataroot=/nowhere"]
    stored = to_dict(load_config("tiny-c", overrides))
    del stored["data"]["augment"]["draws"]
    path = write(tmp_path / "config.yaml", yaml.safe_dump(stored))
    other = "every_epoch" if as_trained == "once" else "once"
    assert matches_stored(path, load_config("tiny-c", [*overrides, f"data.augment.draws={as_trained}"]))
    assert not matches_stored(path, load_config("tiny-c", [*overrides, f"data.augment.draws={other}"]))
    assert load_config("tiny-c", ["data.dataroot=/nowhere"]).data.augment.draws == "every_epoch"
    with pytest.raises(ConfigError, match="draws"):
        load_config("tiny-c", ["data.dataroot=/nowhere", "data.augment.draws=twice"])
    # One epoch drew the same stream either way: it matches both (a demo student's run dir).
    one = [*overrides, "train.epochs=1"]
    stored = to_dict(load_config("tiny-c", one))
    del stored["data"]["augment"]["draws"]
    path.write_text(yaml.safe_dump(stored))
    assert all(matches_stored(path, load_config("tiny-c", [*one, f"data.augment.draws={d}"])) for d in ("once", "every_epoch"))
