"""evaluate / evaluate_checkpoint: IoU overall, per condition and per distance band; JSON layout."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from engine_helpers import tiny_config

from bridgeta.engine.evaluate import (
    ShardSampler,
    build_eval_loader,
    distance_band_masks,
    evaluate,
    evaluate_checkpoint,
    evaluate_checkpoint_model,
    resolve_model_file,
)
from bridgeta.engine.model_file import save_model_file
from bridgeta.geometry import BEVGrid
from bridgeta.models.bev_model import build_model
from bridgeta.models.types import BEVInputs, LidarInputs

CLASSES = ("drivable_area", "divider")
GRID = BEVGrid((-50.0, 50.0, 2.0), (-50.0, 50.0, 2.0))  # 50 x 50 cells, centres at odd metres
SUMMARY_KEYS = {"miou", "iou", "miou_at_0.5"}


# --------------------------------------------------------------------------------------------
# A fake model: stored logits per sample; a batch names its samples through one LiDAR point each.
# --------------------------------------------------------------------------------------------


class LookupModel(nn.Module):
    """Returns ``table[id]`` for each sample id the batch carries (as x of its single point)."""

    def __init__(self, table: torch.Tensor, grid: BEVGrid = GRID) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.output_grid = grid
        self.classes = CLASSES
        self.seen_training: list[bool] = []

    def forward(self, inputs: BEVInputs) -> SimpleNamespace:
        self.seen_training.append(self.training)
        ids = inputs.lidar.points[:, 0].long()  # one point per sample, in batch order
        return SimpleNamespace(logits=self.table[ids])


def make_batch(ids, labels, conditions, split="val"):
    points = torch.zeros(len(ids), 5)
    points[:, 0] = torch.tensor(ids, dtype=torch.float32)
    inputs = BEVInputs(len(ids), lidar=LidarInputs(points, torch.arange(len(ids))))
    metas = [{"condition": c, "split": split, "token": f"t{i}", "scene": "s"} for i, c in zip(ids, conditions)]
    return inputs, labels[list(ids)], metas


def random_labels(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, len(CLASSES), *GRID.shape, generator=generator) < 0.3


def perfect_logits(labels: torch.Tensor) -> torch.Tensor:
    return torch.where(labels, 8.0, -8.0)


def centre_distance() -> np.ndarray:
    """(X, Y) distance of each GRID cell centre from the ego origin, computed independently."""
    centres = np.arange(-49.0, 50.0, 2.0)
    return np.sqrt(centres[:, None] ** 2 + centres[None, :] ** 2)


# --------------------------------------------------------------------------------------------
# evaluate on the fake model
# --------------------------------------------------------------------------------------------


def test_perfect_prediction_scores_one_everywhere():
    labels = random_labels(4)
    model = LookupModel(perfect_logits(labels)).train()
    loader = [
        make_batch([0, 1], labels, ["day", "night"]),
        make_batch([2, 3], labels, ["rain", "day"]),
    ]
    result = evaluate(model, loader, "cpu", CLASSES)
    assert result["miou"] == 1.0 and result["miou_at_0.5"] == 1.0
    assert result["iou"] == {c: 1.0 for c in CLASSES} == result["iou_at_0.5"]
    for name, entry in result["by_condition"].items():
        assert entry["miou"] == 1.0 and entry["miou_at_0.5"] == 1.0, name
    assert {n: e["samples"] for n, e in result["by_condition"].items()} == {"day": 2, "night": 1, "rain": 1}
    for name, entry in result["by_range"].items():
        assert entry["miou"] == 1.0 and entry["iou"] == {c: 1.0 for c in CLASSES}, name
    assert result["samples"] == 4 and result["split"] == "val"
    # Evaluated in eval mode, handed back in the mode it came in.
    assert model.seen_training == [False, False] and model.training


def test_prediction_perfect_only_within_20_m():
    labels = random_labels(2, seed=1)
    near = torch.from_numpy(centre_distance() < 20.0)
    # Right inside 20 m, the exact opposite outside.
    logits = torch.where(near, perfect_logits(labels), perfect_logits(~labels))
    result = evaluate(LookupModel(logits), [make_batch([0, 1], labels, ["day", "day"])], "cpu", CLASSES)
    assert result["by_range"]["0-20"]["miou"] == 1.0
    assert result["by_range"]["20-35"]["miou"] == 0.0
    assert result["by_range"]["35-50"]["miou"] == 0.0
    assert 0.0 < result["miou"] < 1.0
    assert result["by_condition"]["day"]["miou"] == result["miou"]


def test_band_masks_follow_cell_centre_distance():
    masks = distance_band_masks(GRID, ((0, 20), (20, 35), (35, 50)))
    distance = centre_distance()
    assert list(masks) == ["0-20", "20-35", "35-50"]
    assert np.array_equal(masks["0-20"].numpy(), distance < 20)
    assert np.array_equal(masks["20-35"].numpy(), (distance >= 20) & (distance < 35))
    # Cell (i, j) = (34, 25) has its centre at (19, 1) m: 19.03 m away; (34, 28) at (19, 7): 20.2 m.
    assert masks["0-20"][34, 25] and masks["20-35"][34, 28]
    # The corners of a +-50 m map are farther than 50 m: in no band.
    assert not any(bool(m[0, 0]) for m in masks.values())
    with pytest.raises(ValueError, match="0 <= low < high"):
        distance_band_masks(GRID, ((20, 10),))


def test_conditions_are_attributed_by_metadata():
    labels = random_labels(2, seed=2)
    logits = torch.stack([perfect_logits(labels[0]), perfect_logits(~labels[1])])  # night is wrong
    result = evaluate(LookupModel(logits), [make_batch([0, 1], labels, ["day", "night"])], "cpu", CLASSES)
    by_condition = result["by_condition"]
    assert by_condition["day"]["miou"] == 1.0 and by_condition["day"]["samples"] == 1
    assert by_condition["night"]["miou"] < 1.0 and by_condition["night"]["samples"] == 1
    assert by_condition["rain"] == {"miou": None, "iou": None, "miou_at_0.5": None, "samples": 0}
    assert result["samples"] == 2


def test_result_is_exactly_the_documented_json():
    labels = random_labels(1, seed=3)
    logits = torch.randn(1, len(CLASSES), *GRID.shape, generator=torch.Generator().manual_seed(0))
    result = evaluate(
        LookupModel(logits), [make_batch([0], labels, ["rain"], split="test")], "cpu", CLASSES,
        ranges=((0, 20), (20, 35), (80, 100)),
    )
    assert json.loads(json.dumps(result)) == result  # plain JSON, nothing lost
    assert set(result) == {"miou", "iou", "miou_at_0.5", "iou_at_0.5", "by_condition", "by_range", "samples", "split"}
    assert isinstance(result["miou"], float) and isinstance(result["miou_at_0.5"], float)
    assert list(result["iou"]) == list(CLASSES) == list(result["iou_at_0.5"])
    assert list(result["by_condition"]) == ["day", "night", "rain"]
    for entry in result["by_condition"].values():
        assert set(entry) == SUMMARY_KEYS | {"samples"}
    assert isinstance(result["by_condition"]["rain"]["miou"], float)
    assert list(result["by_range"]) == ["0-20", "20-35", "80-100"]
    for entry in result["by_range"].values():
        assert set(entry) == SUMMARY_KEYS
    assert result["by_range"]["80-100"] == {"miou": None, "iou": None, "miou_at_0.5": None}  # off the grid
    assert result["samples"] == 1 and result["split"] == "test"
    # iou is the best threshold's IoU, so never below the 0.5 one.
    assert all(result["iou"][c] >= result["iou_at_0.5"][c] for c in CLASSES)


def test_bad_inputs_are_named():
    labels = random_labels(1)
    model = LookupModel(perfect_logits(labels))
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, [], "cpu", CLASSES)
    with pytest.raises(ValueError, match="unknown condition \\['dusk'\\]"):
        evaluate(model, [make_batch([0], labels, ["dusk"])], "cpu", CLASSES)
    with pytest.raises(ValueError, match="precision"):
        evaluate(model, [make_batch([0], labels, ["day"])], "cpu", CLASSES, precision="fp8")


def test_bf16_autocast_runs():
    labels = random_labels(1)
    result = evaluate(
        LookupModel(perfect_logits(labels)), [make_batch([0], labels, ["day"])], "cpu", CLASSES, precision="bf16"
    )
    assert result["miou"] == 1.0


# --------------------------------------------------------------------------------------------
# Distributed: two gloo processes, each with its shard, report what one process reports.
# --------------------------------------------------------------------------------------------

NUM_DISTRIBUTED = 5  # odd on purpose: DistributedSampler would pad it to 6


def distributed_case():
    labels = random_labels(NUM_DISTRIBUTED, seed=4)
    noise = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    conditions = ["day", "night", "rain", "day", "night"]
    return labels, perfect_logits(labels) * 0.2 + noise, conditions


def collate_ids(ids):
    labels, _, conditions = distributed_case()
    return make_batch(ids, labels, [conditions[i] for i in ids])


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        _, logits, _ = distributed_case()
        sampler = ShardSampler(NUM_DISTRIBUTED)
        loader = DataLoader(list(range(NUM_DISTRIBUTED)), batch_size=2, sampler=sampler, collate_fn=collate_ids)
        result = evaluate(LookupModel(logits), loader, "cpu", CLASSES)
        result["shard"] = list(sampler)
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


def test_distributed_shards_sum_to_the_single_process_result(tmp_path):
    _, logits, _ = distributed_case()
    loader = DataLoader(list(range(NUM_DISTRIBUTED)), batch_size=2, collate_fn=collate_ids)
    single = evaluate(LookupModel(logits), loader, "cpu", CLASSES)
    torch.multiprocessing.spawn(
        _distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert [r.pop("shard") for r in results] == [[0, 2, 4], [1, 3]]
    assert results[0] == results[1] == single
    assert single["samples"] == NUM_DISTRIBUTED and 0 < single["miou"] < 1


def test_shard_sampler_covers_every_index_once():
    shards = [list(ShardSampler(7, world_size=3, rank=r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7)) and [len(s) for s in shards] == [3, 2, 2]
    assert len(ShardSampler(7, world_size=3, rank=2)) == 2
    with pytest.raises(ValueError, match="rank 3"):
        ShardSampler(7, world_size=3, rank=3)


# --------------------------------------------------------------------------------------------
# evaluate_checkpoint on a tiny synthetic dataroot
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataroot(engine_world):
    return engine_world


def split_size(dataroot, split: str) -> int:
    """Samples of ``split`` in the prepared cache: evaluation must count every one, once."""
    from bridgeta.data.cache import LabelCache, default_cache_dir

    count = len(LabelCache(default_cache_dir(dataroot, "v1.0-trainval")).indices(split))
    assert count > 0
    return count


def test_evaluate_checkpoint_with_overridden_dataroot(dataroot, tmp_path):
    # The embedded data section points somewhere else, cache included: --dataroot replaces both.
    config = tiny_config("data.dataroot=/nonexistent/data", "data.cache_dir=/nonexistent/cache")
    torch.manual_seed(0)
    model = build_model(config)
    checkpoint_dir = tmp_path / "run" / "checkpoints" / "step-000010"
    save_model_file(checkpoint_dir / "model.safetensors", model, config)
    (checkpoint_dir / "state.json").write_text("{}")
    (checkpoint_dir.parent / "latest").write_text("step-000010\n")
    for where in (tmp_path / "run", checkpoint_dir, checkpoint_dir / "model.safetensors"):
        result = evaluate_checkpoint(where, dataroot=dataroot, device="cpu")
        assert result["samples"] == split_size(dataroot, "test") and result["split"] == "test"
        assert set(result["iou"]) == set(config.model.heads.map.classes)
        assert sum(entry["samples"] for entry in result["by_condition"].values()) == result["samples"]
        assert set(result["by_range"]) == {"0-20", "20-35", "35-50"}
        assert 0.0 <= result["miou"] <= 1.0
    assert evaluate_checkpoint(checkpoint_dir, dataroot=dataroot, split="val")["split"] == "val"


def test_a_run_directory_resolves_to_its_latest_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in ("step-000010", "step-000020"):
        (run / "checkpoints" / step).mkdir(parents=True)
        (run / "checkpoints" / step / "model.safetensors").write_bytes(b"")
        (run / "checkpoints" / step / "state.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step-000010\n")  # not the highest step
    assert resolve_model_file(run) == run / "checkpoints" / "step-000010" / "model.safetensors"
    (run / "model.safetensors").write_bytes(b"")  # the final model file wins
    assert resolve_model_file(run) == run / "model.safetensors"


def test_evaluate_checkpoint_needs_to_know_the_data(tmp_path):
    config = tiny_config()
    assert config.data is None
    path = save_model_file(tmp_path / "model.safetensors", build_model(config), config)
    with pytest.raises(ValueError, match="no data section and no dataroot was given: pass --dataroot"):
        evaluate_checkpoint(path, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors in .*no complete checkpoint"):
        evaluate_checkpoint(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_checkpoint(tmp_path / "missing.safetensors")


def test_evaluate_checkpoint_model_uses_the_config(dataroot):
    config = tiny_config(f"data.dataroot={dataroot}")
    model = build_model(config).train()
    result = evaluate_checkpoint_model(model, config, "val")
    assert result["samples"] == split_size(dataroot, "val") and result["split"] == "val" and model.training
    with pytest.raises(ValueError, match="no data section"):
        build_eval_loader(tiny_config(), model, "val", 1, 0, distributed=False)
    with pytest.raises(RuntimeError, match="process group"):
        build_eval_loader(config, model, "val", 1, 0, distributed=True)
