"""The frozen-output cache: a run that reads its teacher's (and MonoTAKD's TA's) outputs back
computes the same losses, bit for bit, whether the cache starts cold, warm or half full, and
those of a run without one to float rounding; any change of input or model is a miss."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from bridgeta.config import DistillConfig, MonoTAKDConfig, load_config
from bridgeta.distill import build_distiller
from bridgeta.distill.base import inputs_of
from bridgeta.distill.monotakd import assistant_config
from bridgeta.distill.output_cache import OUTPUT_CACHE_ENV, FrozenOutputCache, model_identity, sample_key
from bridgeta.models.bev_model import build_model
from bridgeta.models.types import BEVInputs, LidarInputs
from bridgeta.rig import reference_inputs

from engine_helpers import SMALL_TINY_C, SMALL_TINY_LC, distill_config, read_metrics, torch_threads, write_teacher

METHODS = ("direct", "feature_kd", "logit_kd", "bridgeta", "monotakd")


def _batch(batch_size: int = 2, seed: int = 1) -> tuple[BEVInputs, torch.Tensor]:
    torch.manual_seed(seed)
    inputs = reference_inputs(batch_size, (32, 88), 6, with_lidar=True, points_per_sample=2000)
    # Samples that differ (reference_inputs repeats one rig): other pixels and points per sample.
    inputs.camera = replace(inputs.camera, images=torch.randn_like(inputs.camera.images),
                            depth=torch.rand(batch_size, 6, 32, 88) * 50.0 * (torch.rand(batch_size, 6, 32, 88) < 0.3))
    points = inputs.lidar.points.clone()
    points[:, :3] += torch.randn_like(points[:, :3])
    inputs.lidar = LidarInputs(points, inputs.lidar.batch_index)
    labels = (torch.rand(batch_size, 6, 50, 50) > 0.7).float()
    return inputs, labels


def _distiller(method: str):
    torch.manual_seed(0)
    if method == "monotakd":
        config = load_config("distill/tiny-c-monotakd", SMALL_TINY_C)
        student, teacher = build_model(config), build_model(load_config("tiny-lc", SMALL_TINY_LC))
        assistant = build_model(assistant_config(config, teacher="unread"))
        experiment = replace(config, distill=replace(config.distill, monotakd=MonoTAKDConfig(imd=1.0, cmrd=1.0, logit=1.0)))
        return build_distiller(experiment, student, teacher, assistant)
    config = load_config("tiny-c", SMALL_TINY_C)
    student, teacher = build_model(config), build_model(load_config("tiny-lc", SMALL_TINY_LC))
    return build_distiller(replace(config, distill=DistillConfig(method=method)), student, teacher)


def _losses(distiller, inputs, labels) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: value.detach().clone() for name, value in distiller(inputs, labels).losses.items()}


def test_select_takes_the_samples_rows_and_renumbers_their_points():
    inputs, _ = _batch(3)
    picked = inputs.select([2, 0])
    assert picked.batch_size == 2
    assert torch.equal(picked.camera.images, inputs.camera.images[[2, 0]])
    assert torch.equal(picked.camera.depth, inputs.camera.depth[[2, 0]])
    lidar = inputs.lidar
    assert torch.equal(picked.lidar.points, torch.cat([lidar.points[lidar.batch_index == 2],
                                                       lidar.points[lidar.batch_index == 0]]))
    assert picked.lidar.batch_index.tolist() == [0] * int((lidar.batch_index == 2).sum()) + \
        [1] * int((lidar.batch_index == 0).sum())
    with pytest.raises(IndexError, match="not in a batch of 3"):
        inputs.select([3])
    # Per-sample tensors beside the sensors, another index dtype, and a sample without points.
    inputs.bev_aug = torch.eye(4).repeat(3, 1, 1) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    inputs.ego_motion = torch.arange(9.0).view(3, 3)
    keep = lidar.batch_index != 1
    inputs.lidar = LidarInputs(lidar.points[keep], lidar.batch_index[keep].int())
    picked = inputs.select([1, 2])
    assert torch.equal(picked.bev_aug, inputs.bev_aug[[1, 2]]) and torch.equal(picked.ego_motion, inputs.ego_motion[[1, 2]])
    assert picked.lidar.batch_index.dtype == torch.int32 and picked.lidar.batch_index.tolist() == [1] * int((lidar.batch_index == 2).sum())
    assert picked.camera.images.shape[0] == 2


@pytest.mark.parametrize("method", METHODS)
def test_cached_outputs_give_the_same_losses_whatever_the_cache_holds(method, tmp_path):
    # A forward in training mode moves BatchNorm statistics (BridgeTA's TA probe reads them), so
    # each variant starts from its own copy of one distiller.
    with torch_threads(2):
        base = _distiller(method).train()
        inputs, labels = _batch()
        expected = _losses(copy.deepcopy(base), inputs, labels)
        results = {}
        for run in ("cold", "warm", "mixed"):
            distiller = copy.deepcopy(base)
            caches = distiller.use_output_cache(tmp_path / run.replace("warm", "cold"))
            assert len(caches) == (2 if method == "monotakd" else 1)
            if run == "mixed":  # a sample computed alone, beside one read back
                primer = copy.deepcopy(base)
                primer.use_output_cache(tmp_path / run)
                _losses(primer, inputs.select([1]), labels[[1]])
            results[run] = _losses(distiller, inputs, labels)
            hits = {"cold": 0, "warm": 2, "mixed": 1}[run]
            assert [(c.hits, c.misses) for c in caches] == [(hits, 2 - hits)] * len(caches), run
    # Cold, warm or half full: the same per-sample outputs, so the same losses bit for bit; and
    # those of the teacher run on the whole batch, to its kernels' rounding.
    for name, value in expected.items():
        for run, losses in results.items():
            assert torch.equal(losses[name], results["cold"][name]), f"{run} cache: {name}"
            assert torch.allclose(losses[name], value, rtol=1e-5, atol=1e-7), f"{run} cache: {name} {losses[name]} != {value}"


def test_a_teacher_is_keyed_by_what_it_reads_and_by_every_change_of_it(tmp_path):
    teacher = build_model(load_config("tiny-lc", SMALL_TINY_LC))
    inputs, _ = _batch()
    # The camera's LiDAR depth (a MonoTAKD batch carries it) is not the teacher's input.
    bare = replace(inputs, camera=replace(inputs.camera, depth=None))
    assert sample_key(inputs_of(teacher, inputs), 0) == sample_key(inputs_of(teacher, bare), 0)
    changed = replace(inputs, camera=replace(inputs.camera, images=inputs.camera.images.clone()))
    changed.camera.images[0, 3, 1, 5, 7] += 1e-3
    keys = [sample_key(inputs_of(teacher, x), 0) for x in (inputs, changed)]
    assert keys[0] != keys[1]
    assert sample_key(inputs_of(teacher, inputs), 1) == sample_key(inputs_of(teacher, changed), 1)
    moved = replace(inputs, lidar=LidarInputs(inputs.lidar.points + 0.01, inputs.lidar.batch_index))
    assert sample_key(inputs_of(teacher, moved), 0) != keys[0]

    config = {"grid": 1}
    identity = model_identity(teacher, "teacher", "fp32", config)
    assert identity == model_identity(teacher, "teacher", "fp32", config)
    assert identity != model_identity(teacher, "teacher", "bf16", config)  # another autocast dtype
    assert identity != model_identity(teacher, "teacher", "fp32", {"grid": 2})
    assert identity != model_identity(teacher, "assistant", "fp32", config)
    with torch_threads(1 if torch.get_num_threads() != 1 else 2):
        assert identity != model_identity(teacher, "teacher", "fp32", config)
    teacher.to(memory_format=torch.channels_last)
    assert identity != model_identity(teacher, "teacher", "fp32", config)
    teacher.to(memory_format=torch.contiguous_format)
    assert identity == model_identity(teacher, "teacher", "fp32", config)
    with torch.no_grad():
        next(teacher.parameters()).view(-1)[0] += 1e-4
    assert identity != model_identity(teacher, "teacher", "fp32", config)


def test_a_full_or_read_only_disk_stops_the_writes_and_a_damaged_file_is_computed_again(tmp_path):
    inputs, _ = _batch()
    calls = []

    def compute(batch):
        calls.append(batch.batch_size)
        return {"x": batch.camera.images.sum(dim=(1, 2, 3, 4)).reshape(-1, 1) * 2}

    full = FrozenOutputCache(tmp_path, "a" * 64, min_free_bytes=2**62)
    out = full.fetch(inputs, ("x",), compute)
    alone = torch.cat([compute(inputs.select([i]))["x"] for i in range(2)])
    assert torch.equal(out["x"], alone) and not list(tmp_path.rglob("*.safetensors"))
    calls.clear()
    cache = FrozenOutputCache(tmp_path, "a" * 64, min_free_bytes=0)
    first = cache.fetch(inputs, ("x",), compute)
    assert calls == [1, 1] and len(list(tmp_path.rglob("*.safetensors"))) == 2
    damaged = sorted(tmp_path.rglob("*.safetensors"))[0]
    damaged.write_bytes(b"not a safetensors file")
    again = cache.fetch(inputs, ("x",), compute)
    assert calls == [1, 1, 1] and torch.equal(first["x"], again["x"])
    # A directory that cannot be written: the values are computed, and the run goes on.
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache wants a directory")
    assert torch.equal(FrozenOutputCache(blocked, "b" * 64, min_free_bytes=0).fetch(inputs, ("x",), compute)["x"], alone)
    # A field another method did not store is computed, and kept beside the first.
    more = cache.fetch(inputs, ("x", "y"), lambda b: {"x": compute(b)["x"], "y": compute(b)["x"] + 1})
    assert torch.equal(more["y"], first["x"] + 1)
    assert cache.fetch(inputs, ("x", "y"), compute)["x"].shape == (2, 1) and len(calls) == 9


def test_training_with_a_cold_or_a_warm_cache_gives_the_same_weights(engine_world, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from bridgeta.engine.trainer import train

    teacher = write_teacher(tmp_path / "teacher.safetensors", engine_world)
    # 4 training samples, 2 a step: the third step is the second epoch's first, drawn as the first's.
    config = distill_config(engine_world, teacher, "train.epochs=2", "train.max_steps=3",
                            "data.augment.draws=once", recipe="distill/tiny-c-direct")
    weights = {}
    # The environment's cache is the default (the benchmarks' spawned runs read it); False: none.
    monkeypatch.setenv(OUTPUT_CACHE_ENV, str(tmp_path / "cache"))
    with torch_threads(2):
        for run, cache in (("none", False), ("cold", None), ("warm", tmp_path / "cache")):
            summary = train(config, tmp_path / run, output_cache=cache)
            weights[run] = load_file(str(tmp_path / run / "model.safetensors"))
            counts = summary["output_cache"]
            expected = {"none": None, "cold": {"hits": 2, "misses": 4}, "warm": {"hits": 6, "misses": 0}}[run]
            assert (counts and {k: counts[k] for k in ("hits", "misses")}) == expected, run
    assert weights["cold"].keys() == weights["warm"].keys() == weights["none"].keys()
    assert all(torch.equal(weights["warm"][k], weights["cold"][k]) for k in weights["none"])
    # Without a cache the teacher runs on whole batches: the same losses to its kernels' rounding
    # (which Adam then amplifies in the weights whose gradients are near zero).
    curves = {run: [(row["step"], row["loss"], row["kd/fld"], row["kd/dld"], row["kd/lld"])
                    for row in read_metrics(tmp_path / run) if "kd/fld" in row] for run in ("none", "cold")}
    assert [row[0] for row in curves["cold"]] == [row[0] for row in curves["none"]] == [1, 2, 3]
    for cached, plain in zip(curves["cold"], curves["none"]):
        assert cached[1:] == pytest.approx(plain[1:], rel=1e-4)
