"""BEVMapDataset + collate_bev over a prepared tiny dataroot; show and the loader benchmark."""

import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from data_fixture import (
    EGO_T_LIDAR,
    KNOWN_INTENSITY,
    KNOWN_LIDAR_POINT,
    SELF_POINT,
    STATIC_POINTS,
    VERSION,
    build_dataroot,
    ego_pose,
)

from bridgeta.data.augment import apply_image_aug
from bridgeta.data.cache import CacheError, LabelCache
from bridgeta.data.config import IMAGENET_MEAN, IMAGENET_STD
from bridgeta.data.dataset import (
    AugmentConfig,
    BEVMapDataset,
    DataConfig,
    DataFileError,
    collate_bev,
    load_image,
)
from bridgeta.geometry import BEVGrid
from bridgeta.models.types import BEVInputs

IMAGE_SIZE = (32, 88)
LABEL_GRID = BEVGrid((-50.0, 50.0, 0.5), (-50.0, 50.0, 0.5))
TINY_GRID = BEVGrid((-50.0, 50.0, 1.0), (-50.0, 50.0, 1.0))


@pytest.fixture(scope="module")
def dataroot(tmp_path_factory):
    pytest.importorskip("nuscenes")
    from bridgeta.data.prepare import prepare_dataroot

    root = tmp_path_factory.mktemp("dataroot")
    fixture = build_dataroot(root)
    prepare_dataroot(root, VERSION, progress=False)
    return fixture


def config_for(root, **changes) -> DataConfig:
    return replace(DataConfig(dataroot=str(root), version=VERSION, split="train"), **changes)


def test_sample_shapes_and_collate(dataroot):
    dataset = BEVMapDataset(config_for(dataroot.root), IMAGE_SIZE, TINY_GRID, train=True)
    assert len(dataset) == 2
    sample = dataset[1]
    assert sample.images.shape == (6, 3, *IMAGE_SIZE) and sample.images.dtype == torch.float32
    assert sample.intrinsics.shape == (6, 3, 3) and sample.ego_T_camera.shape == (6, 4, 4)
    assert sample.image_aug.shape == (6, 3, 3) and sample.bev_aug.shape == (4, 4)
    assert sample.points.dtype == torch.float32 and sample.points.shape[1] == 5
    assert sample.labels.shape == (6, 100, 100) and sample.labels.dtype == torch.bool
    assert sample.meta == {
        "token": sample.meta["token"], "scene": "scene-a", "condition": "night", "split": "train",
        "location": "synth-fixture", "timestamp": 1_500_000, "index": 1,
        "global_T_ego": dataset.cache.record(int(dataset.indices[1]))["global_T_ego"],
    }
    # Normalised with the ImageNet statistics: undoing them gives [0, 1] RGB.
    rgb = sample.images * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5 and rgb.max() > 0.5

    inputs, labels, metas = collate_bev([dataset[0], dataset[1]])
    assert isinstance(inputs, BEVInputs) and inputs.batch_size == 2
    assert inputs.camera.images.shape == (2, 6, 3, *IMAGE_SIZE)
    assert inputs.bev_aug.shape == (2, 4, 4)
    assert labels.shape == (2, 6, 100, 100) and labels.dtype == torch.bool
    counts = [len(dataset[0].points), len(dataset[1].points)]
    assert inputs.lidar.batch_index.tolist() == [0] * counts[0] + [1] * counts[1]
    assert torch.equal(inputs.lidar.points[counts[0]:], dataset[1].points)
    assert [m["index"] for m in metas] == [0, 1]


def test_points_are_in_the_keyframe_ego_frame(dataroot):
    config = config_for(dataroot.root, max_sweeps=0)
    dataset = BEVMapDataset(config, IMAGE_SIZE, TINY_GRID, modalities=("lidar",))
    points = dataset[0].points.numpy()
    known = points[points[:, 3] == KNOWN_INTENSITY]
    # LIDAR_TOP x points to the ego's right: lidar (10, 0, 0) is 10 m right of the sensor.
    assert np.allclose(known[0], [0.94, -10.0, 1.84, KNOWN_INTENSITY, 0.0], atol=1e-5)
    assert np.all(points[:, 4] == 0)
    assert np.allclose(EGO_T_LIDAR[:3, :3] @ KNOWN_LIDAR_POINT + EGO_T_LIDAR[:3, 3], [0.94, -10.0, 1.84])


def test_sweeps_are_aligned_and_capped(dataroot):
    scene_index, t = dataroot.keyframes[1]
    expected = (np.linalg.inv(ego_pose(scene_index, t)) @ np.c_[STATIC_POINTS, np.ones(3)].T).T[:, :3]

    def points(**changes):
        config = config_for(dataroot.root, **changes)
        return BEVMapDataset(config, IMAGE_SIZE, TINY_GRID, modalities=("lidar",))[1].points.numpy()

    all_sweeps = points(max_sweeps=9, max_sweep_lag=1.0)
    assert sorted(set(np.round(all_sweeps[:, 4], 6))) == [0.0, 0.25, 0.5, 0.75]
    for lag in (0.0, 0.25, 0.5, 0.75):
        at_lag = all_sweeps[np.isclose(all_sweeps[:, 4], lag)]
        static = at_lag[np.isin(at_lag[:, 3], [10.0, 11.0, 12.0])]
        assert np.allclose(static[np.argsort(static[:, 3]), :3], expected, atol=1e-4)
        # The ego car's own return is kept in the keyframe only.
        assert (at_lag[:, 3] == 5.0).sum() == (1 if lag == 0 else 0)
    self_point = all_sweeps[all_sweeps[:, 3] == 5.0][0, :3]
    assert np.allclose(self_point, EGO_T_LIDAR[:3, :3] @ SELF_POINT + EGO_T_LIDAR[:3, 3], atol=1e-5)
    assert sorted(set(np.round(points(max_sweeps=9, max_sweep_lag=0.5)[:, 4], 6))) == [0.0, 0.25, 0.5]
    assert sorted(set(np.round(points(max_sweeps=1)[:, 4], 6))) == [0.0, 0.25]


def test_identity_sample_reproduces_the_cache(dataroot):
    config = config_for(dataroot.root, split="val")
    dataset = BEVMapDataset(config, IMAGE_SIZE, LABEL_GRID, classes=("divider", "drivable_area"))
    cache = LabelCache(config.resolved_cache_dir())
    sample = dataset[0]
    assert torch.equal(sample.bev_aug, torch.eye(4))
    assert np.array_equal(sample.labels.numpy(), cache.labels(2)[[5, 0]])
    record = cache.record(2)
    cached = np.array([c["ego_T_camera"] for c in record["cameras"]])
    assert np.allclose(sample.ego_T_camera.numpy(), cached, atol=1e-6)
    assert np.allclose(sample.image_aug[0].numpy(), [[0.61, 0, -4], [0, 0.61, -22], [0, 0, 1]], atol=1e-6)
    # The camera input is the original image through image_aug.
    with Image.open(dataroot.root / record["cameras"][0]["path"]) as original:
        matrix = sample.image_aug[0].double().numpy()
        expected = np.asarray(apply_image_aug(original.convert("RGB"), matrix, IMAGE_SIZE))
    pixels = sample.images[0] * torch.tensor(config.std).view(3, 1, 1) + torch.tensor(config.mean).view(3, 1, 1)
    assert np.allclose(pixels.permute(1, 2, 0).numpy() * 255, expected, atol=1e-3)


def test_reduced_jpeg_decoding_keeps_the_geometry(tmp_path):
    """JPEG draft decoding (1/2, 1/4 size) is compensated in the matrix: a dot stays where it should."""
    height, width = 448, 800
    v, u = np.mgrid[0:height, 0:width] + 0.5
    dot = np.exp(-((u - 431.0) ** 2 + (v - 297.0) ** 2) / (2 * 6.0**2))
    pixels = (np.repeat(dot[..., None], 3, axis=2) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "dot.jpg", quality=95)
    matrix = np.array([[0.2, 0.0, -10.0], [0.0, 0.2, -20.0], [0.0, 0.0, 1.0]])
    with Image.open(tmp_path / "dot.jpg") as probe:
        probe.draft("RGB", (160, 89))
        assert probe.size == (200, 112)  # libjpeg really decodes at 1/4 here
    loaded = load_image(tmp_path / "dot.jpg", matrix, (height, width), (64, 128))
    image = np.asarray(loaded, dtype=np.float64)[..., 0]
    weight = np.where(image > 20, image, 0)
    rows, cols = np.mgrid[0:64, 0:128] + 0.5
    found = np.array([(cols * weight).sum(), (rows * weight).sum()]) / weight.sum()
    assert np.allclose(found, (matrix @ [431.0, 297.0, 1.0])[:2], atol=0.2)


def test_augmentation_is_deterministic_and_shared_across_modalities(dataroot):
    config = config_for(dataroot.root)
    camera = BEVMapDataset(config, IMAGE_SIZE, TINY_GRID, train=True, modalities=("camera",), seed=3)
    lidar = BEVMapDataset(config, IMAGE_SIZE, TINY_GRID, train=True, modalities=("lidar",), seed=3)
    first, again = camera[0], camera[0]
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert torch.equal(first.bev_aug, lidar[0].bev_aug)
    assert not torch.equal(first.bev_aug, torch.eye(4))
    camera.set_epoch(1)
    assert not torch.equal(camera[0].bev_aug, first.bev_aug)
    camera.set_epoch(0)
    assert torch.equal(camera[0].image_aug, first.image_aug)
    other_seed = BEVMapDataset(config, IMAGE_SIZE, TINY_GRID, train=True, modalities=("camera",), seed=4)
    assert not torch.equal(other_seed[0].image_aug, first.image_aug)


@pytest.mark.parametrize("draws", ["every_epoch", "once"])
def test_persistent_loader_workers_draw_the_epoch_the_loop_set(dataroot, draws):
    """A persistent worker gets its copy of the dataset once, at the first epoch: the epoch set
    afterwards must still reach it (data/epoch.py). It did not: every epoch replayed the first."""
    from torch.utils.data import DataLoader

    config = config_for(dataroot.root, augment=AugmentConfig(draws=draws))
    dataset = BEVMapDataset(config, IMAGE_SIZE, TINY_GRID, train=True, modalities=("lidar",), seed=3)
    loader = DataLoader(dataset, batch_size=None, sampler=[0], num_workers=1, persistent_workers=True,
                        collate_fn=lambda sample: sample)
    in_workers, in_process = [], []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        in_workers += [sample.bev_aug for sample in loader]
        in_process.append(dataset[0].bev_aug)
    assert all(torch.equal(a, b) for a, b in zip(in_workers, in_process, strict=True))
    distinct = {tuple(m.flatten().tolist()) for m in in_workers}
    assert len(distinct) == (3 if draws == "every_epoch" else 1)


def test_augmented_points_and_labels_stay_aligned(dataroot):
    """Points on the road (from the un-augmented sample) stay on augmented drivable cells."""
    config = config_for(dataroot.root, max_sweeps=0)
    plain = BEVMapDataset(config, IMAGE_SIZE, LABEL_GRID, modalities=("lidar",))[0]
    grid = np.linspace(-20, 20, 41)
    ego = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    cells = np.floor((ego + 50) / 0.5).astype(int)
    on_road = ego[plain.labels[0].numpy()[cells[:, 0], cells[:, 1]]]
    assert len(on_road) > 50
    augmented = BEVMapDataset(config, IMAGE_SIZE, LABEL_GRID, train=True, modalities=("lidar",), seed=1)
    for epoch in range(4):
        augmented.set_epoch(epoch)
        sample = augmented[0]
        bev_aug = sample.bev_aug.double().numpy()
        moved = on_road @ bev_aug[:2, :2].T + bev_aug[:2, 3]
        index = np.floor((moved + 50) / 0.5).astype(int)
        drivable = sample.labels[0].numpy()[index[:, 0], index[:, 1]]
        assert drivable.mean() > 0.95  # nearest-cell resampling may miss a cell at the road edge
        known = sample.points.numpy()[sample.points[:, 3] == KNOWN_INTENSITY][0, :3]
        assert np.allclose(known, (bev_aug @ [0.94, -10.0, 1.84, 1.0])[:3], atol=1e-4)


def test_camera_only_dataset_never_reads_lidar(dataroot, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataroot.root, copy)
    shutil.rmtree(copy / "samples" / "LIDAR_TOP")
    shutil.rmtree(copy / "sweeps" / "LIDAR_TOP")
    config = config_for(copy)
    camera = BEVMapDataset(config, IMAGE_SIZE, TINY_GRID, train=True, modalities=("camera",))
    inputs, labels, _ = collate_bev([camera[0], camera[1]])
    assert inputs.lidar is None and inputs.camera.images.shape[0] == 2
    with pytest.raises(DataFileError, match=r"sample \w+: .*LIDAR_TOP.*pcd\.bin: LiDAR file is missing"):
        BEVMapDataset(config, IMAGE_SIZE, TINY_GRID, modalities=("lidar",))[0]
    lidar_only = BEVMapDataset(config_for(dataroot.root), IMAGE_SIZE, TINY_GRID, modalities=("lidar",))
    assert collate_bev([lidar_only[0]])[0].camera is None


def test_training_never_needs_the_devkit(dataroot):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["nuscenes"] = None  # any import of the devkit now fails
        from bridgeta.data.dataset import BEVMapDataset, DataConfig, collate_bev
        from bridgeta.data.show import render_sample_picture
        from bridgeta.geometry import BEVGrid
        config = DataConfig(dataroot={str(dataroot.root)!r}, version={VERSION!r})
        dataset = BEVMapDataset(config, (32, 88), BEVGrid((-50, 50, 1.0), (-50, 50, 1.0)), train=True)
        inputs, labels, metas = collate_bev([dataset[0], dataset[1]])
        assert inputs.lidar is not None and labels.shape == (2, 6, 100, 100)
        assert [m for m in sys.modules if m.startswith("nuscenes.")] == []
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_config_and_cache_mismatches_are_errors(dataroot, tmp_path):
    with pytest.raises(CacheError, match="max_sweeps=10, fewer than data.max_sweeps=12"):
        BEVMapDataset(config_for(dataroot.root, max_sweeps=12), IMAGE_SIZE, TINY_GRID)
    cache_dir = str(config_for(dataroot.root).resolved_cache_dir())
    with pytest.raises(CacheError, match="prepared for v1.0-mini, not data.version=v1.0-trainval"):
        BEVMapDataset(config_for(dataroot.root, version="v1.0-trainval", cache_dir=cache_dir), IMAGE_SIZE, TINY_GRID)
    with pytest.raises(CacheError, match="no prepared cache"):
        BEVMapDataset(config_for(tmp_path), IMAGE_SIZE, TINY_GRID)
    with pytest.raises(ValueError, match="modalities"):
        BEVMapDataset(config_for(dataroot.root), IMAGE_SIZE, TINY_GRID, modalities=("radar",))
    with pytest.raises(ValueError, match="data.load_interval"):
        DataConfig(dataroot="x", load_interval=0)
    with pytest.raises(ValueError, match="data.max_sweeps"):
        DataConfig(dataroot="x", max_sweeps=1.5)
    assert len(BEVMapDataset(config_for(dataroot.root, load_interval=2), IMAGE_SIZE, TINY_GRID)) == 1
    assert isinstance(DataConfig(dataroot="x").augment, AugmentConfig)


def test_data_config_loads_through_the_config_schema():
    from bridgeta.config import _build_dataclass

    config = _build_dataclass(
        DataConfig,
        {"dataroot": "/data", "max_sweeps": 4, "augment": {"bev_scale": [0.95, 1.05], "image": False}},
        "data",
    )
    assert config.max_sweeps == 4 and config.augment.bev_scale == (0.95, 1.05) and not config.augment.image
    assert config.mean == (0.485, 0.456, 0.406)


def test_render_sample_picture(dataroot, tmp_path):
    from bridgeta.data.show import render_sample_picture

    cache = LabelCache(config_for(dataroot.root).resolved_cache_dir())
    out = render_sample_picture(cache, cache.tokens[3], tmp_path / "cache.png")
    with Image.open(out) as image:
        assert image.size == (1296, 1080)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    config = config_for(dataroot.root)
    dataset = BEVMapDataset(config, IMAGE_SIZE, TINY_GRID, train=True, modalities=("camera",))
    out = render_sample_picture(dataset, 1, tmp_path / "dataset.png")
    assert out.stat().st_size > 10_000


def test_loader_throughput_report(dataroot):
    from bridgeta.bench.loader import measure_loader_throughput

    result = measure_loader_throughput(
        config_for(dataroot.root), IMAGE_SIZE, TINY_GRID, ("camera", "lidar"),
        batch_size=2, num_workers=0, batches=2,
    )
    assert result["samples_per_s"] > 0 and result["batches"] == 2 and result["num_workers"] == 0
    assert result["points_per_sample"] > 4
