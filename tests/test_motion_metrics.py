"""Forecasting and planning metrics on hand-computed cases, and the trajectory targets the
cache stores and the loader gives (future tracks, future agent boxes, ego poses and headings)
against the annotation tracks, the later keyframes' annotations and ego_pose."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bridgeta.motion_metrics import box_collisions, boxes_overlap, collision_rate, forecasting_metrics, planning_l2



def _plain_and_augmented(engine_world, *overrides: str):
    """The train split of the engine world for an object-head student (plus ``overrides``), as is
    and augmented, and the model."""
    from engine_helpers import small_student_config

    from bridgeta.data.dataset import BEVMapDataset
    from bridgeta.models.bev_model import build_model

    config = small_student_config(engine_world, "model.heads.object={}", *overrides)
    model = build_model(config)
    return (BEVMapDataset.for_model(config.data, model, "train"),
            BEVMapDataset.for_model(config.data, model, "train", train=True, seed=5), model)

def test_min_ade_fde_and_both_miss_rates_by_hand():
    truth = torch.zeros(3, 3, 2)
    truth[:, :, 0] = torch.tensor([1.0, 2.0, 3.0])  # every agent drives 1 m per step along x
    predicted = torch.zeros(3, 2, 3, 2)
    predicted[:, :, :, 0] = truth[:, None, :, 0]
    # Agent 0: mode 0 exact, mode 1 3 m off at the end.
    predicted[0, 1, 2, 0] += 3.0
    # Agent 1: mode 0 swerves 3 m aside at step 1 and ends 0.5 m off; mode 1 is 2.5 m ahead
    # throughout. No mode stays within 2 m at every step (nuScenes' miss), yet the best final
    # displacement is 0.5 m (no miss for UniAD and VAD).
    predicted[1, 0, 1, 1], predicted[1, 0, 2, 1] = 3.0, 0.5
    predicted[1, 1, :, 0] += 2.5
    # Agent 2: its track ends after 2 steps; 1 m off there, 100 m off at the step it lacks.
    predicted[2, :, :2, 1] = 1.0
    predicted[2, :, 2, 1] = 100.0
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[2, 2] = False
    result = forecasting_metrics(predicted, truth, mask)
    assert result["agents"] == 3 and result["complete_agents"] == 2
    # minADE over every agent, on its own steps: 0, min(3.5 / 3, 2.5), 1.
    assert result["minADE"] == pytest.approx((0.0 + 3.5 / 3 + 1.0) / 3)
    # minFDE and the miss rates over the complete agents only (agent 2's 100 m never counts).
    assert result["minFDE"] == pytest.approx((0.0 + 0.5) / 2)
    assert result["miss_rate_all_steps"] == pytest.approx(0.5)
    assert result["miss_rate_fde"] == pytest.approx(0.0)
    predicted[1, 0, 2, 1] = 2.5  # now it ends 2.5 m off too: a miss under both definitions
    result = forecasting_metrics(predicted, truth, mask)
    assert result["miss_rate_all_steps"] == pytest.approx(0.5) and result["miss_rate_fde"] == pytest.approx(0.5)
    # No complete future: minADE still, the final-step figures undefined.
    partial = forecasting_metrics(predicted[2:], truth[2:], mask[2:])
    assert partial["minADE"] == pytest.approx(1.0) and partial["complete_agents"] == 0
    assert math.isnan(partial["minFDE"]) and math.isnan(partial["miss_rate_fde"])


def test_min_fde_is_the_best_final_displacement_over_modes_not_the_best_ade_modes():
    """nuScenes' minFDE_k: the minimum over modes of each mode's own final error, which need not
    be the mode with the smallest ADE."""
    truth = torch.zeros(1, 3, 2)
    predicted = torch.zeros(1, 2, 3, 2)
    predicted[0, 0, 2, 1] = 1.5  # mode 0: ADE 0.5, final error 1.5
    predicted[0, 1, :2, 1] = 1.0  # mode 1: ADE 2/3, final error 0
    result = forecasting_metrics(predicted, truth, torch.ones(1, 3, dtype=torch.bool))
    assert result["minADE"] == pytest.approx(0.5) and result["minFDE"] == pytest.approx(0.0)


def test_planning_l2_at_the_horizon_and_averaged_up_to_it():
    logged = torch.zeros(1, 6, 2)
    planned = torch.zeros(1, 6, 2)
    planned[0, :, 1] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    result = planning_l2(planned, logged, torch.ones(1, 6, dtype=torch.bool))
    # UniAD: the error at the horizon's step (2, 4, 6).
    assert result["l2@1s"] == pytest.approx(0.2) and result["l2@2s"] == pytest.approx(0.4)
    assert result["l2@3s"] == pytest.approx(0.6) and result["l2@mean"] == pytest.approx(0.4)
    # ST-P3 / VAD: the mean over the steps up to it.
    assert result["l2_avg@1s"] == pytest.approx(0.15) and result["l2_avg@2s"] == pytest.approx(0.25)
    assert result["l2_avg@3s"] == pytest.approx(0.35) and result["l2_avg@mean"] == pytest.approx(0.25)
    # The means are the protocol's 1-2-3 s average: not given for other horizons.
    short = planning_l2(planned, logged, torch.ones(1, 6, dtype=torch.bool), horizons=(1.0, 2.0))
    assert set(short) == {"l2@1s", "l2@2s", "l2_avg@1s", "l2_avg@2s"}


def test_planning_l2_pools_only_the_valid_steps_of_every_sample():
    """Two samples: 0.1 m more error per step, and 1 m throughout with its last step unlogged.
    At 3 s only the first sample counts; up to it, the 6 + 5 valid steps."""
    planned = torch.zeros(2, 6, 2)
    logged = torch.zeros(2, 6, 2)
    logged[0, :, 1] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    logged[1, :, 0] = 1.0
    logged[1, 5, 0] = 50.0  # an unlogged step holds whatever: it never counts
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 5] = False
    result = planning_l2(planned, logged, mask)
    assert result["l2@1s"] == pytest.approx((0.2 + 1.0) / 2) and result["l2@2s"] == pytest.approx((0.4 + 1.0) / 2)
    assert result["l2@3s"] == pytest.approx(0.6)
    assert result["l2_avg@3s"] == pytest.approx((2.1 + 5 * 1.0) / 11)


def test_rotated_boxes_overlap_by_separating_axes():
    a = torch.tensor([0.0, 0.0, 4.0, 2.0, 0.0])
    assert boxes_overlap(a, torch.tensor([3.9, 0.0, 4.0, 2.0, 0.0]))  # touching along x
    assert not boxes_overlap(a, torch.tensor([4.1, 0.0, 4.0, 2.0, 0.0]))
    assert not boxes_overlap(a, torch.tensor([3.2, 1.8, 4.0, 1.0, 0.0]))
    # Turned by 45 degrees, a 2 x 2 box at (2.3, 0) reaches x = 2.3 - sqrt(2) < 2: overlaps.
    assert boxes_overlap(a, torch.tensor([2.3, 0.0, 2.0, 2.0, math.pi / 4]))
    assert not boxes_overlap(a, torch.tensor([3.5, 0.0, 2.0, 2.0, math.pi / 4]))


def test_the_ego_box_is_turned_with_its_heading_and_centred_half_a_metre_ahead():
    """Heading along +y: the ego footprint (4.084 x 1.85 m) spans y from -1.542 to 2.542 m, so a
    1 m box at y = 2.9 (from 2.4) is hit and its mirror at y = -2.9 (up to -2.4) is not; an
    agent that is not present at that step is never hit."""
    path = torch.tensor([[[0.0, 0.0, math.pi / 2]]])
    present = torch.ones(1, 1, dtype=torch.bool)
    ahead, behind = torch.tensor([[[0.0, 2.9, 1.0, 1.0, 0.0]]]), torch.tensor([[[0.0, -2.9, 1.0, 1.0, 0.0]]])
    assert bool(box_collisions(path, [ahead], [present]))
    assert not bool(box_collisions(path, [behind], [present]))
    assert not bool(box_collisions(path, [ahead], [~present]))
    # Beside it, 1.5 m off the heading axis (from 1.0): clear of a 1.85 m wide ego along +y, in a
    # 4.084 m long one along +x.
    beside = torch.tensor([[[1.5, 0.0, 1.0, 1.0, 0.0]]])
    assert not bool(box_collisions(path, [beside], [present]))
    assert bool(box_collisions(torch.tensor([[[0.0, 0.0, 0.0]]]), [beside], [present]))


def test_collision_rate_at_the_horizon_and_averaged_and_skipping_the_logs_own_collisions():
    planned = torch.zeros(2, 6, 3)
    planned[:, :, 0] = torch.arange(1, 7, dtype=torch.float32) * 2.0  # 2 m per step ahead
    logged = torch.zeros(2, 6, 3)  # the log stands still
    agents = [torch.zeros(1, 6, 5), torch.zeros(0, 6, 5)]
    agents[0][0, :, 0], agents[0][0, :, 2], agents[0][0, :, 3] = 9.0, 4.0, 2.0  # parked 9 m ahead
    present = [torch.ones(1, 6, dtype=torch.bool), torch.ones(0, 6, dtype=torch.bool)]
    # The ego box spans x + 0.5 +- 2.042: it reaches the car (7 <= x <= 11) from step 2 (x = 6) on;
    # sample 1 has no agents. Per-step rates 0, 0, .5, .5, .5, .5.
    result = collision_rate(planned, logged, agents, present)
    # UniAD: the rate at steps 2, 4 and 6.
    assert result["collision@1s"] == 0.0 and result["collision@2s"] == pytest.approx(0.5)
    assert result["collision@3s"] == pytest.approx(0.5) and result["collision@mean"] == pytest.approx(1 / 3)
    # ST-P3 / VAD: the mean of the per-step rates up to the horizon.
    assert result["collision_avg@1s"] == 0.0 and result["collision_avg@2s"] == pytest.approx(0.25)
    assert result["collision_avg@3s"] == pytest.approx(2 / 6)
    assert result["collision_avg@mean"] == pytest.approx((0 + 0.25 + 2 / 6) / 3)
    assert result["logged_collision@3s"] == 0.0 and result["logged_collision_avg@3s"] == 0.0
    # A log that is itself in the car at the last step: that step is not the planner's collision.
    logged[0, 5, 0] = 9.0
    result = collision_rate(planned, logged, agents, present)
    assert result["collision@3s"] == 0.0 and result["collision_avg@3s"] == pytest.approx(1.5 / 6)
    assert result["logged_collision@3s"] == pytest.approx(0.5)
    assert result["logged_collision_avg@3s"] == pytest.approx(0.5 / 6)


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
            # The whole track up to 6 keyframes (3 s) ahead: none cut short.
            links, later = 0, annotation
            while later["next"] and links < 6:
                later, links = nusc.get("sample_annotation", later["next"]), links + 1
            assert len(obj["future"]) == links
            for x, y, ahead in obj["future"]:
                annotation = nusc.get("sample_annotation", annotation["next"])
                centre = global_T_ego[:3, :3] @ np.array([x, y, 0.0]) + global_T_ego[:3, 3]
                np.testing.assert_allclose(centre[:2], annotation["translation"][:2], atol=1e-4)
                later = nusc.get("sample", annotation["sample_token"])["timestamp"]
                assert ahead == pytest.approx((later - sample["timestamp"]) / 1e6)
                tracks += 1
        links, later = 0, sample
        while later["next"] and links < 6:
            later, links = nusc.get("sample", later["next"]), links + 1
        assert len(record["ego_future"]) == links
        current = sample
        for x, y, yaw, ahead in record["ego_future"]:
            current = nusc.get("sample", current["next"])
            pose = pose_matrix(nusc.get("ego_pose", nusc.get("sample_data", current["data"]["LIDAR_TOP"])["ego_pose_token"]))
            np.testing.assert_allclose(global_T_ego[:2, :2] @ [x, y] + global_T_ego[:2, 3], pose[:2, 3], atol=1e-4)
            # The cached heading is the logged pose's, relative to this sample's ego.
            relative = np.linalg.inv(global_T_ego) @ pose
            assert math.cos(yaw - math.atan2(relative[1, 0], relative[0, 0])) == pytest.approx(1.0, abs=1e-8)
            egos += 1
    assert tracks > 0 and egos > 0


def test_the_loader_gives_future_tracks_and_ego_paths_in_the_augmented_frame(engine_world):
    import numpy as np

    from bridgeta.data.dataset import driving_command

    plain, moved, _ = _plain_and_augmented(engine_world)
    checked = ego_steps = 0
    for index in range(len(plain)):
        a, b = plain[index].meta["objects"], moved[index]
        aug = b.bev_aug.double().numpy()
        b = b.meta["objects"]
        assert a["future"].shape == (len(a["boxes"]), 6, 2) and torch.equal(a["future_mask"], b["future_mask"])
        expected = a["future"].double().numpy() @ aug[:2, :2].T + aug[:2, 3]
        np.testing.assert_allclose(b["future"].numpy()[a["future_mask"].numpy()], expected[a["future_mask"].numpy()], atol=1e-3)
        assert a["ego_future"].shape == (6, 2) and 0 <= a["command"] <= 2
        # The logged ego path moves with the scene, and the ego's own place with it: the plan's
        # displacements (ego_future - ego_position) are the plain ones turned.
        ego_mask = a["ego_future_mask"].numpy()
        assert torch.equal(a["ego_future_mask"], b["ego_future_mask"])
        np.testing.assert_allclose(a["ego_position"].numpy(), 0.0, atol=1e-6)
        np.testing.assert_allclose(b["ego_position"].numpy(), aug[:2, 3], atol=1e-5)
        ego = a["ego_future"].double().numpy()
        np.testing.assert_allclose(b["ego_future"].numpy()[ego_mask], (ego @ aug[:2, :2].T + aug[:2, 3])[ego_mask], atol=1e-3)
        ego_steps += int(ego_mask.sum())
        # The command is relative to the ego's heading: a rotation keeps it, a flip mirrors it.
        mirrored = np.linalg.det(aug[:2, :2]) < 0
        assert b["command"] == (2 - a["command"] if mirrored else a["command"])
        checked += int(a["future_mask"].sum())
    assert checked > 0 and ego_steps > 0
    mask = np.ones(6, dtype=bool)
    path = np.zeros((6, 2))
    path[:, 0] = np.arange(1, 7) * 2.0
    assert driving_command(path, mask) == 1
    path[-1, 1] = 3.0
    assert driving_command(path, mask) == 0
    path[-1, 1] = -2.5
    assert driving_command(path, mask) == 2


def test_plan_targets_are_the_logged_displacements_turned_by_the_augmentation(engine_world):
    """The planning head's targets: the ego's logged future relative to where it is now, in the
    augmented frame, i.e. the plain displacements turned (and scaled) by the augmentation, never
    moved by its translation."""
    from bridgeta.models.targets import build_task_targets

    plain, moved, model = _plain_and_augmented(engine_world, "model.heads.plan={head_channels: 8, hidden: 16}")
    checked = 0
    for index in range(len(plain)):
        a, b = plain[index], moved[index]
        turn = b.bev_aug.double().numpy()[:2, :2]
        assert np.abs(b.bev_aug.double().numpy()[:2, 3]).max() > 0.01  # the augmentation moves the scene
        before = build_task_targets(model, [a.meta], "cpu").plan
        after = build_task_targets(model, [b.meta], "cpu").plan
        assert torch.equal(before.mask, after.mask)
        valid = before.mask[0].numpy()
        logged = a.meta["objects"]["ego_future"].double().numpy()[: len(valid)]
        np.testing.assert_allclose(before.displacement[0].numpy()[valid], logged[valid], atol=1e-5)
        np.testing.assert_allclose(after.displacement[0].numpy()[valid], (logged @ turn.T)[valid], atol=1e-3)
        checked += int(valid.sum())
    assert checked > 0


def test_the_ego_motion_is_the_velocity_of_the_logged_poses_turned_by_the_augmentation(engine_world):
    """Against the devkit: the mean velocity from the LiDAR pose up to 0.5 s earlier to the
    keyframe's, in the keyframe's ego frame; turned (and scaled) as the plan targets are."""
    from nuscenes import NuScenes

    from bridgeta.data.dataset import EGO_MOTION_WINDOW
    from bridgeta.data.prepare import pose_matrix

    nusc = NuScenes(version="v1.0-trainval", dataroot=str(engine_world), verbose=False)
    plain, moved, _ = _plain_and_augmented(engine_world)
    known = 0
    for index in range(len(plain)):
        sample, shifted = plain[index], moved[index]
        lidar = nusc.get("sample_data", nusc.get("sample", sample.meta["token"])["data"]["LIDAR_TOP"])
        keyframe = pose_matrix(nusc.get("ego_pose", lidar["ego_pose_token"]))
        earlier = lidar
        while earlier["prev"]:
            previous = nusc.get("sample_data", earlier["prev"])
            if (lidar["timestamp"] - previous["timestamp"]) / 1e6 > EGO_MOTION_WINDOW:
                break
            earlier = previous
        if earlier is lidar:  # no earlier pose: unknown
            assert sample.ego_motion.abs().sum() == 0 and shifted.ego_motion.abs().sum() == 0
            continue
        lag = (lidar["timestamp"] - earlier["timestamp"]) / 1e6
        before = np.linalg.inv(keyframe) @ pose_matrix(nusc.get("ego_pose", earlier["ego_pose_token"]))
        velocity = -before[:2, 3] / lag
        np.testing.assert_allclose(sample.ego_motion.numpy(), [*velocity, 1.0], atol=1e-3)
        aug = shifted.bev_aug.double().numpy()
        np.testing.assert_allclose(shifted.ego_motion.numpy(), [*(aug[:2, :2] @ velocity), 1.0], atol=1e-3)
        assert torch.equal(sample.meta["objects"]["ego_motion"], sample.ego_motion)
        known += 1
    assert known > 0


def _heading(yaw):
    return np.stack([np.cos(yaw), np.sin(yaw)], axis=-1)


def test_the_future_agents_are_every_vehicle_and_pedestrian_annotated_at_each_future_keyframe(engine_world):
    """Against the devkit: per future keyframe, every vehicle and pedestrian annotation (LiDAR
    points or not, present now or not) with its own box and heading, in this sample's frame; the
    logged ego headings likewise; both turn with the BEV augmentation."""
    from nuscenes import NuScenes
    from nuscenes.eval.detection.utils import category_to_detection_name

    from bridgeta.data.dataset import FUTURE_AGENT_CLASSES
    from bridgeta.data.nuscenes_writer import quaternion_to_matrix
    from bridgeta.data.prepare import pose_matrix

    nusc = NuScenes(version="v1.0-trainval", dataroot=str(engine_world), verbose=False)
    plain, moved, _ = _plain_and_augmented(engine_world)
    boxes = 0
    for index in range(len(plain)):
        sample, shifted = plain[index], moved[index]
        a, b, aug = sample.meta["objects"], shifted.meta["objects"], shifted.bev_aug.double().numpy()
        ego_T_global = np.linalg.inv(np.asarray(sample.meta["global_T_ego"]))
        rows: dict[str, int] = {}
        expected: dict[tuple[int, int], np.ndarray] = {}
        current = nusc.get("sample", sample.meta["token"])
        for step in range(int(a["ego_future_mask"].sum())):
            current = nusc.get("sample", current["next"])
            for token in current["anns"]:
                annotation = nusc.get("sample_annotation", token)
                if category_to_detection_name(annotation["category_name"]) not in FUTURE_AGENT_CLASSES:
                    continue
                row = rows.setdefault(annotation["instance_token"], len(rows))
                centre = ego_T_global[:3, :3] @ np.asarray(annotation["translation"]) + ego_T_global[:3, 3]
                heading = ego_T_global[:3, :3] @ quaternion_to_matrix(annotation["rotation"])[:, 0]
                width, length, _ = annotation["size"]
                expected[row, step] = np.array([centre[0], centre[1], length, width, math.atan2(heading[1], heading[0])])
            pose = ego_T_global @ pose_matrix(nusc.get("ego_pose", nusc.get("sample_data", current["data"]["LIDAR_TOP"])["ego_pose_token"]))
            np.testing.assert_allclose(_heading(float(a["ego_future_yaw"][step])), pose[:2, 0], atol=1e-4)
        agents, present = a["future_agents"].double().numpy(), a["future_agents_mask"].numpy()
        assert agents.shape == (len(rows), 6, 5) and int(present.sum()) == len(expected)
        for (row, step), box in expected.items():
            assert present[row, step]
            np.testing.assert_allclose(agents[row, step, :4], box[:4], atol=1e-3)
            np.testing.assert_allclose(_heading(agents[row, step, 4]), _heading(box[4]), atol=1e-4)
        boxes += len(expected)
        # Augmented: centres moved, headings turned (and mirrored by a flip) by the augmentation.
        assert torch.equal(b["future_agents_mask"], a["future_agents_mask"])
        turned = b["future_agents"].double().numpy()
        np.testing.assert_allclose(turned[present][:, :2], agents[present][:, :2] @ aug[:2, :2].T + aug[:2, 3], atol=1e-3)
        planar = aug[:2, :2] / math.sqrt(abs(np.linalg.det(aug[:2, :2])))
        np.testing.assert_allclose(_heading(turned[present][:, 4]), _heading(agents[present][:, 4]) @ planar.T, atol=1e-4)
        valid = a["ego_future_mask"].numpy()
        np.testing.assert_allclose(_heading(b["ego_future_yaw"].double().numpy()[valid]),
                                   _heading(a["ego_future_yaw"].double().numpy()[valid]) @ planar.T, atol=1e-4)
    assert boxes > 0


def test_future_agents_refuse_a_cache_whose_records_are_not_in_keyframe_order(engine_world, monkeypatch):
    from engine_helpers import small_student_config

    from bridgeta.data.cache import CacheError
    from bridgeta.data.dataset import BEVMapDataset
    from bridgeta.models.bev_model import build_model

    config = small_student_config(engine_world, "model.heads.object={}")
    dataset = BEVMapDataset.for_model(config.data, build_model(config), "train")
    first = int(dataset.indices[0])
    original = dataset.cache.record

    def shuffled(index):  # the record after the first sample claims another scene
        record = original(index)
        return {**record, "scene": "elsewhere"} if index == first + 1 else record

    monkeypatch.setattr(dataset.cache, "record", shuffled)
    with pytest.raises(CacheError, match="not its next keyframe"):
        dataset[0]
