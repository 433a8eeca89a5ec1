"""Forecasting and planning metrics on hand-computed cases, and the trajectory targets the
cache stores (future tracks and ego poses) against the annotation tracks and ego_pose."""

from __future__ import annotations

import math

import pytest
import torch

from bridgeta.motion_metrics import boxes_overlap, collision_rate, forecasting_metrics, planning_l2


def test_min_ade_fde_and_miss_rate_by_hand():
    truth = torch.zeros(2, 3, 2)
    truth[:, :, 0] = torch.tensor([1.0, 2.0, 3.0])  # both agents drive 1 m per step along x
    predicted = torch.zeros(2, 2, 3, 2)
    predicted[0, 0, :, 0] = torch.tensor([1.0, 2.0, 3.0])  # agent 0, mode 0: exact
    predicted[0, 1, :, 0] = torch.tensor([1.0, 2.0, 6.0])  # mode 1: 3 m off at the end
    predicted[1, 0, :, 1] = 3.0  # agent 1: both modes 3 m to the side everywhere...
    predicted[1, 0, :, 0] = truth[1, :, 0]
    predicted[1, 1, :, 0] = truth[1, :, 0] + 1.0  # ...or 1 m ahead
    mask = torch.ones(2, 3, dtype=torch.bool)
    result = forecasting_metrics(predicted, truth, mask)
    assert result["minADE"] == pytest.approx((0.0 + 1.0) / 2)
    assert result["minFDE"] == pytest.approx((0.0 + 1.0) / 2)
    assert result["miss_rate"] == pytest.approx(0.0)  # agent 1's mode 1 stays within 2 m
    predicted[1, 1, :, 0] += 1.5  # now 2.5 m ahead: no mode within 2 m at every step
    assert forecasting_metrics(predicted, truth, mask)["miss_rate"] == pytest.approx(0.5)
    # A track that ends after 2 steps: its last valid step is the FDE's.
    short = mask.clone()
    short[0, 2] = False
    assert forecasting_metrics(predicted, truth, short)["minFDE"] == pytest.approx((0.0 + 2.5) / 2)


def test_planning_l2_averages_the_steps_up_to_each_horizon():
    logged = torch.zeros(1, 6, 2)
    planned = torch.zeros(1, 6, 2)
    planned[0, :, 1] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    result = planning_l2(planned, logged, torch.ones(1, 6, dtype=torch.bool))
    assert result["L2@1s"] == pytest.approx(0.15) and result["L2@2s"] == pytest.approx(0.25)
    assert result["L2@3s"] == pytest.approx(0.35)


def test_rotated_boxes_overlap_by_separating_axes():
    a = torch.tensor([0.0, 0.0, 4.0, 2.0, 0.0])
    assert boxes_overlap(a, torch.tensor([3.9, 0.0, 4.0, 2.0, 0.0]))  # touching along x
    assert not boxes_overlap(a, torch.tensor([4.1, 0.0, 4.0, 2.0, 0.0]))
    assert not boxes_overlap(a, torch.tensor([3.2, 1.8, 4.0, 1.0, 0.0]))
    # Turned by 45 degrees, a 2 x 2 box at (2.3, 0) reaches x = 2.3 - sqrt(2) < 2: overlaps.
    assert boxes_overlap(a, torch.tensor([2.3, 0.0, 2.0, 2.0, math.pi / 4]))
    assert not boxes_overlap(a, torch.tensor([3.5, 0.0, 2.0, 2.0, math.pi / 4]))


def test_collision_rate_averages_the_per_step_rates_and_skips_the_logs_own_collisions():
    planned = torch.zeros(2, 6, 3)
    planned[:, :, 0] = torch.arange(1, 7, dtype=torch.float32) * 2.0  # 2 m per step ahead
    logged = torch.zeros(2, 6, 3)  # the log stands still
    agents = [torch.zeros(1, 6, 5), torch.zeros(0, 6, 5)]
    agents[0][0, :, 0], agents[0][0, :, 2], agents[0][0, :, 3] = 9.0, 4.0, 2.0  # parked 9 m ahead
    present = [torch.ones(1, 6, dtype=torch.bool), torch.ones(0, 6, dtype=torch.bool)]
    # The ego box spans x + 0.5 +- 2.042: it reaches the car (7 <= x <= 11) from step 2 (x = 6) on;
    # sample 1 has no agents. Per-step rates 0, 0, .5, .5, .5, .5.
    result = collision_rate(planned, logged, agents, present)
    assert result["collision@1s"] == 0.0 and result["collision@2s"] == pytest.approx(0.25)
    assert result["collision@3s"] == pytest.approx(2 / 6) and result["logged_collision@3s"] == 0.0
    # A log that is itself in the car at the last step: that step is not the planner's collision.
    logged[0, 5, 0] = 9.0
    result = collision_rate(planned, logged, agents, present)
    assert result["collision@3s"] == pytest.approx(1.5 / 6)
    assert result["logged_collision@3s"] == pytest.approx(0.5 / 6)


def test_cached_futures_follow_the_tracks_and_the_ego_poses(engine_world):
    import numpy as np
    from nuscenes import NuScenes

    from bridgeta.data.cache import LabelCache, default_cache_dir
    from bridgeta.data.prepare import pose_matrix

    nusc = NuScenes(version="v1.0-trainval", dataroot=str(engine_world), verbose=False)
    cache = LabelCache(default_cache_dir(engine_world, "v1.0-trainval"))
    tracks = egos = 0
    for index in range(len(cache)):
        record = cache.record(index)
        global_T_ego = np.asarray(record["global_T_ego"])
        sample = nusc.get("sample", record["token"])
        for obj in record["objects"]:
            annotation = nusc.get("sample_annotation", obj["token"])
            for x, y, ahead in obj["future"]:
                annotation = nusc.get("sample_annotation", annotation["next"])
                centre = global_T_ego[:3, :3] @ np.array([x, y, 0.0]) + global_T_ego[:3, 3]
                np.testing.assert_allclose(centre[:2], annotation["translation"][:2], atol=1e-4)
                later = nusc.get("sample", annotation["sample_token"])["timestamp"]
                assert ahead == pytest.approx((later - sample["timestamp"]) / 1e6)
                tracks += 1
        current = sample
        for x, y, yaw, ahead in record["ego_future"]:
            current = nusc.get("sample", current["next"])
            pose = pose_matrix(nusc.get("ego_pose", nusc.get("sample_data", current["data"]["LIDAR_TOP"])["ego_pose_token"]))
            np.testing.assert_allclose(global_T_ego[:2, :2] @ [x, y] + global_T_ego[:2, 3], pose[:2, 3], atol=1e-4)
            egos += 1
    assert tracks > 0 and egos > 0


def test_the_loader_gives_future_tracks_and_ego_paths_in_the_augmented_frame(engine_world):
    import numpy as np

    from engine_helpers import small_student_config

    from bridgeta.data.dataset import BEVMapDataset, driving_command
    from bridgeta.models.bev_model import build_model

    config = small_student_config(engine_world, "model.heads.object={}")
    model = build_model(config)
    plain = BEVMapDataset.for_model(config.data, model, "train")
    moved = BEVMapDataset.for_model(config.data, model, "train", train=True, seed=5)
    checked = 0
    for index in range(len(plain)):
        a, b = plain[index].meta["objects"], moved[index]
        aug = b.bev_aug.double().numpy()
        b = b.meta["objects"]
        assert a["future"].shape == (len(a["boxes"]), 6, 2) and torch.equal(a["future_mask"], b["future_mask"])
        expected = a["future"].double().numpy() @ aug[:2, :2].T + aug[:2, 3]
        np.testing.assert_allclose(b["future"].numpy()[a["future_mask"].numpy()], expected[a["future_mask"].numpy()], atol=1e-3)
        assert a["ego_future"].shape == (6, 2) and 0 <= a["command"] <= 2
        # The command is relative to the ego's heading: a rotation keeps it, a flip mirrors it.
        mirrored = np.linalg.det(aug[:2, :2]) < 0
        assert b["command"] == (2 - a["command"] if mirrored else a["command"])
        checked += int(a["future_mask"].sum())
    assert checked > 0
    mask = np.ones(6, dtype=bool)
    path = np.zeros((6, 2))
    path[:, 0] = np.arange(1, 7) * 2.0
    assert driving_command(path, mask) == 1
    path[-1, 1] = 3.0
    assert driving_command(path, mask) == 0
    path[-1, 1] = -2.5
    assert driving_command(path, mask) == 2
