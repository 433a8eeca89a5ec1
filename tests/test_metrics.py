"""MapMetric against hand-computed TP/FP/FN and BEVFusion's evaluate_map conventions."""

from __future__ import annotations

import pytest
import torch

from bridgeta.metrics import MapMetric


def batch(class_a: list[float], class_b: list[float]) -> torch.Tensor:
    """(B=1, K=2, X=2, Y=2) from two lists of 4 cells."""
    return torch.tensor([class_a, class_b], dtype=torch.float32).view(1, 2, 2, 2)


def hand_metric() -> MapMetric:
    """Two updates, thresholds 0.4 and 0.5.

    class a, update 1: p [.9 .45 .3 .6 ], t [1 1 0 0] -> @0.4 TP2 FP1 FN0, @0.5 TP1 FP1 FN1
    class a, update 2: p [.1 .2 .48 .95], t [0 0 1 1] -> @0.4 TP2 FP0 FN0, @0.5 TP1 FP0 FN1
    class b, update 1: p [.2 .55 .7 .1 ], t [0 1 0 1] -> @0.4 TP1 FP1 FN1, @0.5 TP1 FP1 FN1
    class b, update 2: p [.52 .55 .45 .8], t [1 1 0 0] -> @0.4 TP2 FP2 FN0, @0.5 TP2 FP1 FN0
    Totals: a @0.4 4/1/0 -> 4/5 = 0.8, @0.5 2/1/2 -> 2/5 = 0.4
            b @0.4 3/3/1 -> 3/7,       @0.5 3/2/1 -> 3/6 = 0.5
    """
    metric = MapMetric(["a", "b"], thresholds=(0.4, 0.5))
    metric.update(batch([0.9, 0.45, 0.3, 0.6], [0.2, 0.55, 0.7, 0.1]), batch([1, 1, 0, 0], [0, 1, 0, 1]).bool())
    metric.update(batch([0.1, 0.2, 0.48, 0.95], [0.52, 0.55, 0.45, 0.8]), batch([0, 0, 1, 1], [1, 1, 0, 0]).bool())
    return metric


def test_hand_computed_two_updates() -> None:
    result = hand_metric().compute()
    assert result["tp"].tolist() == [[4, 2], [3, 3]]
    assert result["fp"].tolist() == [[1, 1], [3, 2]]
    assert result["fn"].tolist() == [[0, 2], [1, 1]]
    assert result["tp"].dtype == torch.int64
    assert result["iou"] == pytest.approx({"a": 0.8, "b": 0.5})
    assert result["best_threshold"] == {"a": 0.4, "b": 0.5}
    assert result["miou"] == pytest.approx(0.65)
    assert result["iou_at_0.5"] == pytest.approx({"a": 0.4, "b": 0.5})
    assert result["miou_at_0.5"] == pytest.approx(0.45)
    torch.testing.assert_close(
        result["iou_per_threshold"], torch.tensor([[0.8, 0.4], [3 / 7, 0.5]], dtype=torch.float64)
    )
    assert result["thresholds"] == (0.4, 0.5)


def test_probability_equal_to_threshold_is_positive() -> None:
    metric = MapMetric(["a"])  # default thresholds 0.35 ... 0.65
    below_half = torch.nextafter(torch.tensor(0.5), torch.tensor(0.0)).item()
    probabilities = torch.tensor([0.5, below_half, 0.35, 0.65]).view(1, 1, 2, 2)
    metric.update(probabilities, torch.ones(1, 1, 2, 2, dtype=torch.bool))
    tp = metric.compute()["tp"][0].tolist()
    # thresholds:  0.35 0.40 0.45 0.50 0.55 0.60 0.65
    assert tp == [4, 3, 3, 2, 1, 1, 1]


def test_empty_class_has_zero_iou() -> None:
    metric = MapMetric(["present", "empty"], thresholds=(0.4, 0.5))
    probabilities = batch([0.9, 0.9, 0.1, 0.1], [0.1, 0.2, 0.3, 0.0])
    metric.update(probabilities, batch([1, 1, 0, 0], [0, 0, 0, 0]).bool())
    result = metric.compute()
    assert result["tp"][1].tolist() == result["fp"][1].tolist() == result["fn"][1].tolist() == [0, 0]
    assert result["iou"] == {"present": 1.0, "empty": 0.0}
    assert result["best_threshold"]["empty"] == 0.4  # ties go to the lowest threshold
    assert result["miou"] == pytest.approx(0.5)


def test_no_update_gives_zeros() -> None:
    result = MapMetric(["a", "b"]).compute()
    assert result["miou"] == 0.0 and result["miou_at_0.5"] == 0.0


def test_at_half_keys_need_half_threshold() -> None:
    result = MapMetric(["a"], thresholds=(0.4, 0.6)).compute()
    assert "iou_at_0.5" not in result and "miou_at_0.5" not in result


def test_valid_mask_excludes_cells() -> None:
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(2, 3, 4, 5, generator=generator)
    targets = torch.rand(2, 3, 4, 5, generator=generator) > 0.6
    valid = torch.zeros(2, 4, 5, dtype=torch.bool)
    valid[0, :2] = True  # only the first two X rows of sample 0 count
    masked = MapMetric(["a", "b", "c"])
    masked.update(probabilities, targets, valid_mask=valid)
    subset = MapMetric(["a", "b", "c"])
    subset.update(probabilities[:1, :, :2], targets[:1, :, :2])
    assert torch.equal(masked.counts(), subset.counts())
    assert masked.counts().sum() > 0


def test_merge_equals_single_pass() -> None:
    generator = torch.Generator().manual_seed(1)
    probabilities = torch.rand(6, 2, 8, 8, generator=generator)
    targets = torch.rand(6, 2, 8, 8, generator=generator) > 0.5
    single = MapMetric(["a", "b"])
    single.update(probabilities, targets)

    first, second = MapMetric(["a", "b"]), MapMetric(["a", "b"])
    first.update(probabilities[:2], targets[:2])
    first.update(probabilities[2:3], targets[2:3])
    second.update(probabilities[3:], targets[3:])
    assert not torch.equal(first.counts(), single.counts())
    assert first.merge(second) is first
    assert torch.equal(first.counts(), single.counts())
    assert first.compute()["iou"] == single.compute()["iou"]

    # The all-reduce idiom: sum count tensors, then load them into a fresh metric.
    third = MapMetric(["a", "b"])
    third.update(probabilities[:3], targets[:3])
    total = third.counts() + second.counts()
    third.reset()
    third.add_counts(total)
    assert torch.equal(third.counts(), single.counts())


def test_merge_rejects_other_protocol() -> None:
    with pytest.raises(ValueError):
        MapMetric(["a"]).merge(MapMetric(["a"], thresholds=(0.5,)))
    with pytest.raises(ValueError):
        MapMetric(["a"]).merge(MapMetric(["b"]))


def test_reset() -> None:
    metric = hand_metric()
    metric.reset()
    assert not metric.counts().any()
