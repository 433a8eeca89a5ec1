"""TinyBEV's pieces on fixed inputs: motion and planning targets and losses, region weights,
the per-cell KL, the teacher's confident cells, the headings along a path, and the distiller's
output-level terms on hand-built outputs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from bridgeta.distill.base import bernoulli_kl, bernoulli_kl_cells
from bridgeta.distill.tinybev import (
    RegionWeights,
    box_l1_by_group,
    focal_heatmap_kl,
    region_weights,
    teacher_detection_cells,
    weighted_mean,
)
from bridgeta.geometry import BEVGrid
from bridgeta.models.motion_head import (
    MotionHead,
    MotionOutputs,
    PlanningHead,
    PlanTargets,
    build_motion_targets,
    motion_losses,
    planning_loss,
    select_command,
    winner_takes_all,
)
from bridgeta.models.object_head import build_targets
from bridgeta.motion_metrics import path_headings

GRID = BEVGrid((-8.0, 8.0, 1.0), (-8.0, 8.0, 1.0), (-10.0, 10.0, 20.0))


def _box(x, y, yaw=0.0):
    return [x, y, 0.0, 4.0, 2.0, 1.5, yaw, 0.0, 0.0]


def test_motion_targets_share_the_object_slots_and_hold_displacements():
    # Box 1 is off the grid: it gets no slot, so box 2 takes slot 1 in both target sets.
    boxes = torch.tensor([_box(1.2, -2.7), _box(30.0, 0.0), _box(-3.5, 4.1)])
    future = torch.tensor([[[2.2, -2.7], [3.2, -2.7], [0.0, 0.0]],
                           [[31.0, 0.0], [32.0, 0.0], [33.0, 0.0]],
                           [[-3.5, 5.1], [-3.5, 6.1], [-3.5, 7.1]]])
    present = torch.tensor([[True, True, False], [True, True, True], [True, True, True]])
    objects = build_targets([boxes], [torch.tensor([0, 0, 1])], GRID, 2, max_objects=4)
    motion = build_motion_targets([boxes], [future], [present], GRID, steps=4, max_objects=4)
    assert torch.equal(motion.index, objects.index)
    assert motion.mask[0].tolist() == [[True, True, False, False], [True, True, True, False],
                                       [False] * 4, [False] * 4]
    torch.testing.assert_close(motion.displacement[0, 0, :2], torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    torch.testing.assert_close(motion.displacement[0, 1, :3], torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]))
    assert motion.displacement[0, 0, 2:].abs().sum() == 0  # masked steps carry no value


def test_winner_takes_all_regresses_only_the_closest_mode_and_picks_it():
    truth = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])
    modes = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [2.0, 0.0]]]], requires_grad=True)
    logits = torch.zeros(1, 2, requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    l1, ce = winner_takes_all(modes, logits, truth, mask)
    # Mode 1 is closer (ADE 0.5 against 1.5): L1 = (|0| + |1| + |0| + |0|) / 4 coordinates.
    assert float(l1.detach()) == pytest.approx(0.25)
    assert float(ce.detach()) == pytest.approx(math.log(2))
    (l1 + ce).backward()
    assert modes.grad[0, 0].abs().sum() == 0 and modes.grad[0, 1].abs().sum() > 0
    assert logits.grad[0, 1] < 0 < logits.grad[0, 0]  # the CE raises the winner's logit


def test_motion_head_is_read_at_the_target_cells():
    head = MotionHead(8, modes=3, steps=4, head_channels=8)
    out = head(torch.randn(2, 8, *GRID.shape))
    assert out.trajectories.shape == (2, 3 * 4 * 2, *GRID.shape) and out.mode_logits.shape == (2, 3, *GRID.shape)
    modes = out.trajectories.reshape(2, 3, 4 * 2, *GRID.shape)
    assert (modes[:, 0] - modes[:, 1]).abs().amax() > 0  # the modes start apart
    index = torch.tensor([[5, 100], [0, 255]])
    trajectories, logits = out.at(index)
    assert trajectories.shape == (2, 2, 3, 4, 2)
    x, y = divmod(100, GRID.shape[1])
    torch.testing.assert_close(logits[0, 1], out.mode_logits[0, :, x, y])
    boxes = torch.tensor([_box(0.5, 0.5)])
    targets = build_motion_targets([boxes, boxes], [torch.ones(1, 4, 2)] * 2, [torch.ones(1, 4, dtype=torch.bool)] * 2,
                                   GRID, steps=4, max_objects=2)
    with torch.no_grad():  # every mode at zero: an L1 of 0.5 m against 0.5 m in x and y at every step
        head.trajectory[-1].weight.zero_()
        head.trajectory[-1].bias.zero_()
    losses = motion_losses(head(torch.randn(2, 8, *GRID.shape)), targets)
    assert float(losses["trajectory"].detach()) == pytest.approx(0.5)


def test_planning_selects_the_commanded_plan_and_ignores_missing_steps():
    plans = torch.zeros(2, 3, 3, 2)
    plans[0, 0] = 1.0  # left plan of sample 0
    plans[1, 2] = 2.0  # right plan of sample 1
    command = torch.tensor([0, 2])
    torch.testing.assert_close(select_command(plans, command)[1], torch.full((3, 2), 2.0))
    truth = torch.zeros(2, 3, 2)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # Errors of 1 (3 valid steps x 2 coordinates... sample 0: 2 steps) and 2 (1 step): (4 + 4) / 6.
    assert float(planning_loss(plans, PlanTargets(truth, mask, command))) == pytest.approx(8 / 6)
    head = PlanningHead(8, steps=3, head_channels=8, hidden=16)
    assert head(torch.randn(2, 8, 16, 16)).shape == (2, 3, 3, 2)


def test_the_planner_corrects_the_constant_velocity_path_of_the_ego_status():
    head = PlanningHead(8, steps=3, head_channels=8, hidden=16)
    decoded = torch.randn(2, 8, 16, 16)
    status = torch.tensor([[4.0, -2.0, 1.0], [0.0, 0.0, 0.0]])  # known velocity; unknown
    # Untrained (last layer zero): every command plans the velocity times 0.5, 1, 1.5 s.
    expected = torch.tensor([[2.0, -1.0], [4.0, -2.0], [6.0, -3.0]])
    plans = head(decoded, status)
    torch.testing.assert_close(plans[0], expected.expand(3, 3, 2))
    assert plans[1].abs().sum() == 0 and head(decoded).abs().sum() == 0  # None: unknown
    # The correction reads the scene and the status, and its gradient reaches the encoder.
    torch.nn.init.normal_(head.mlp[-1].weight)
    plans = head(decoded, status)
    assert not torch.allclose(plans[0], expected.expand(3, 3, 2))
    moved = head(decoded, status + torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert not torch.allclose(moved[0] - plans[0], torch.tensor([0.5, 0.0]) * torch.arange(1, 4)[:, None])
    plans.sum().backward()
    assert head.encoder[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("angle, mirror", [(0.7, False), (-2.0, False), (0.3, True)])
def test_the_planners_corrections_turn_with_the_egos_heading(angle, mirror):
    """The same scene features with the velocity turned (or mirrored) give the same plan turned
    by that rotation: the corrections live in the heading frame. A mirror is a flip of the BEV,
    which the dataset pairs with a mirrored command (left <-> right), so the mirrored status
    turns the plan by the rotation between the two velocity directions, not by the mirror."""
    torch.manual_seed(0)
    head = PlanningHead(8, steps=3, head_channels=8, hidden=16).eval()
    torch.nn.init.normal_(head.mlp[-1].weight)
    decoded = torch.randn(1, 8, 16, 16)
    velocity = torch.tensor([6.0, 1.5])
    c, s = math.cos(angle), math.sin(angle)
    rotation = torch.tensor([[c, -s], [s, c]])
    turned = rotation @ (velocity * torch.tensor([1.0, -1.0]) if mirror else velocity)
    # The rotation that takes the first velocity's direction to the second's.
    delta = math.atan2(float(turned[1]), float(turned[0])) - math.atan2(float(velocity[1]), float(velocity[0]))
    turn = torch.tensor([[math.cos(delta), -math.sin(delta)], [math.sin(delta), math.cos(delta)]])
    with torch.no_grad():
        plans = head(decoded, torch.cat([velocity, torch.ones(1)])[None])
        moved = head(decoded, torch.cat([turned, torch.ones(1)])[None])
    torch.testing.assert_close(moved, plans @ turn.T, atol=1e-5, rtol=1e-5)
    # A slow ego (below MIN_HEADING_SPEED) gives no heading: its corrections keep the BEV's axes.
    from bridgeta.models.motion_head import MIN_HEADING_SPEED

    slow = torch.tensor([[0.5 * MIN_HEADING_SPEED, 0.0, 1.0]])
    slow_turned = torch.tensor([[0.0, 0.5 * MIN_HEADING_SPEED, 1.0]])
    with torch.no_grad():
        a, b = head(decoded, slow), head(decoded, slow_turned)
    seconds = 0.5 * torch.arange(1, 4)[:, None]
    torch.testing.assert_close(a - slow[0, :2] * seconds, b - slow_turned[0, :2] * seconds)


def test_future_points_go_to_the_slot_of_their_time():
    from bridgeta.data.dataset import FUTURE_STEPS, _padded_future

    # Track 0 skips the 1 s and 1.5 s keyframes (out of range), then is annotated again at 2 s;
    # keyframes are ~0.5 s apart, not exactly. Track 1 looks past the horizon.
    tracks = [[(1.0, 0.0, 0.49), (5.0, 1.0, 2.02)], [(float(k), 0.0, 0.5 * k) for k in range(1, 9)]]
    positions, mask = _padded_future(tracks)
    assert positions.shape == (2, FUTURE_STEPS, 2)
    assert mask[0].tolist() == [True, False, False, True, False, False]
    assert positions[0, 3].tolist() == [5.0, 1.0] and positions[0, 1:3].sum() == 0
    assert mask[1].all() and positions[1, :, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_region_weights_sum_to_the_cells_and_favour_foreground_and_disagreement():
    foreground = torch.zeros(2, 4, 4)
    disagreement = torch.zeros(2, 4, 4)
    foreground[0, 1, 1] = 1.0
    disagreement[1, 2, 3] = 1.0
    # Inputs that carry a graph (as the student's probabilities would): the weights must not.
    foreground.requires_grad_(True)
    disagreement.requires_grad_(True)
    weights = region_weights(foreground, disagreement, floor=0.1)
    assert weights.grad_fn is None and not weights.requires_grad
    assert float(weights.sum()) == pytest.approx(2 * 4 * 4)
    # r = 0.5 at the two marked cells, 0 elsewhere: (0.5 + 0.1) / (0.1) = 6 times the rest.
    assert float(weights[0, 1, 1] / weights[0, 0, 0]) == pytest.approx(6.0)
    assert float(weights[1, 2, 3]) == pytest.approx(float(weights[0, 1, 1]))
    values = torch.arange(32.0).reshape(2, 4, 4)
    assert float(weighted_mean(values, torch.ones_like(values))) == pytest.approx(float(values.mean()))


def test_region_weights_add_foreground_and_disagreement_and_normalise_over_the_batch():
    """r = (fg + d) / 2 where both are set on one cell; one mean over the whole batch, not per
    sample (sample 0 has two marked cells, sample 1 one)."""
    foreground, disagreement = torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)
    foreground[0, 0, 0], disagreement[0, 0, 0] = 1.0, 0.6
    foreground[0, 1, 1] = foreground[1, 2, 2] = 1.0
    score = torch.full((2, 4, 4), 0.1)
    score[0, 0, 0] = (1.0 + 0.6) / 2 + 0.1
    score[0, 1, 1] = score[1, 2, 2] = 0.5 + 0.1
    torch.testing.assert_close(region_weights(foreground, disagreement, floor=0.1), score / score.mean())


def test_per_cell_kl_averages_to_the_map_kl():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    cells = bernoulli_kl_cells(teacher, student, temperature=2.0)
    assert cells.shape == (2, 5, 5) and bool((cells >= 0).all())
    torch.testing.assert_close(cells.mean(), bernoulli_kl(teacher, student, temperature=2.0))


def test_teacher_detection_cells_are_its_confident_decoded_boxes():
    from bridgeta.models.object_head import ObjectOutputs

    grid = BEVGrid((0.0, 6.0, 1.0), (0.0, 6.0, 1.0), (-10.0, 10.0, 20.0))
    logits = torch.full((1, 2, 6, 6), -10.0)
    logits[0, 0, 2, 3] = 2.0  # a peak, p = 0.88
    logits[0, 0, 2, 4] = 1.0  # its neighbour: not a peak
    logits[0, 1, 5, 0] = -1.0  # a peak below the confidence (p = 0.27)
    objects = ObjectOutputs(logits, torch.zeros(1, 10, 6, 6))
    cells, confident = teacher_detection_cells(objects, grid, confidence=0.3, limit=3)
    assert cells.shape == confident.shape == (1, 3)
    assert int(cells[0, 0]) == 2 * 6 + 3 and bool(confident[0, 0])
    assert int(confident.sum()) == 1
    # A second peak of class 0 two cells away (p = 0.73): two detections without NMS; one with
    # the class's 2.5 m radius, the better one.
    logits[0, 0, 4, 3] = 1.0
    cells, confident = teacher_detection_cells(objects, grid, confidence=0.3, limit=3)
    assert sorted(cells[0][confident[0]].tolist()) == [2 * 6 + 3, 4 * 6 + 3]
    cells, confident = teacher_detection_cells(objects, grid, confidence=0.3, nms_radius={0: 2.5}, limit=3)
    assert cells[0][confident[0]].tolist() == [2 * 6 + 3]
    # Two classes confident at one cell: the cell counts once.
    logits[0, 1, 4, 3] = 0.5
    cells, confident = teacher_detection_cells(objects, grid, confidence=0.3, limit=3)
    assert sorted(cells[0][confident[0]].tolist()) == [2 * 6 + 3, 4 * 6 + 3]


def test_path_headings_follow_the_moves_and_hold_when_standing():
    path = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.05, 1.0]]])
    yaw = path_headings(path, torch.tensor([0.3]))
    torch.testing.assert_close(yaw[0], torch.tensor([0.3, 0.0, math.pi / 2, math.pi / 2]))
    masked = path_headings(path, torch.tensor([0.3]), torch.tensor([[True, True, False, False]]))
    torch.testing.assert_close(masked[0], torch.tensor([0.3, 0.0, 0.0, 0.0]))


def test_motion_outputs_modes_come_from_the_logits():
    out = MotionOutputs(torch.zeros(1, 2 * 3 * 2, 4, 4), torch.zeros(1, 2, 4, 4))
    assert out.modes == 2


def test_occupancy_targets_rasterise_the_agents_future_boxes_and_iou_counts_cells():
    from bridgeta.models.occupancy_head import OccupancyIoU, occupancy_targets, rasterise_boxes

    # A 4 m x 2 m box at the origin, axis-aligned: cell centres at +-0.5, +-1.5 in x, +-0.5 in y.
    occupied = rasterise_boxes(torch.tensor([[0.0, 0.0, 4.0, 2.0, 0.0]]), GRID)
    assert int(occupied.sum()) == 4 * 2 and bool(occupied[8, 8]) and not bool(occupied[8, 10])
    turned = rasterise_boxes(torch.tensor([[0.0, 0.0, 4.0, 2.0, math.pi / 2]]), GRID)
    assert torch.equal(turned, occupied.T)  # a quarter turn swaps the axes on a square grid
    # Agent 0 is annotated at steps 0 and 1 (turned a quarter at step 0), then leaves; agent 1
    # enters at step 1. Each box is drawn with its own annotated size and heading.
    agents = torch.zeros(2, 3, 5)
    agents[0, 0] = torch.tensor([0.0, 2.0, 4.0, 2.0, math.pi / 2])
    agents[0, 1] = torch.tensor([0.0, 4.0, 4.0, 2.0, 0.0])
    agents[1, 1] = torch.tensor([-5.0, -5.0, 2.0, 2.0, 0.0])
    # The scene ends after step 1: step 2 has no keyframe, so its truth is unknown, not empty.
    objects = {"future_agents": agents, "future_agents_mask": torch.tensor([[True, True, False], [False, True, False]]),
               "ego_future_mask": torch.tensor([True, True, False])}
    targets, exists = occupancy_targets([objects], GRID, steps=3)
    assert targets.shape == (1, 3, *GRID.shape) and targets[0, 2].sum() == 0
    assert exists.tolist() == [[True, True, False]]
    assert torch.equal(targets[0, 0].bool(), rasterise_boxes(agents[0, :1], GRID))
    assert torch.equal(targets[0, 1].bool(), rasterise_boxes(agents[:, 1], GRID))
    assert int(targets[0, 1].sum()) == 8 + 4
    metric = OccupancyIoU(steps=3)
    logits = torch.where(targets > 0, 5.0, -5.0)
    logits[0, 1, 0, 0] = 5.0  # one false positive at step 1
    logits[0, 2] = 5.0  # everything predicted occupied where no keyframe exists: not scored
    metric.update(logits, targets, exists)
    result = metric.compute()
    assert result["IoU@0.5s"] == 1.0 and result["IoU@1s"] == pytest.approx(12 / 13)
    assert math.isnan(result["IoU@1.5s"]) and result["mIoU"] == pytest.approx((1 + 12 / 13) / 2)


def test_occupancy_loss_leaves_out_the_steps_without_a_keyframe():
    from bridgeta.losses import sigmoid_focal_loss
    from bridgeta.models.occupancy_head import occupancy_loss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=generator, requires_grad=True)
    targets = (torch.rand(2, 3, 4, 4, generator=generator) > 0.8).float()
    exists = torch.tensor([[True, True, True], [True, False, False]])
    loss = occupancy_loss(logits, targets, exists)
    # The plain mean over the four existing (sample, step) maps.
    kept = torch.cat([logits[0], logits[1, :1]]), torch.cat([targets[0], targets[1, :1]])
    assert loss.item() == pytest.approx(sigmoid_focal_loss(*kept, reduction="mean").item(), rel=1e-6)
    loss.backward()
    assert logits.grad[1, 1:].abs().sum() == 0 and logits.grad[0].abs().sum() > 0


# -- the distiller's output-level terms on hand-built outputs ---------------------------------

STEPS, MODES = 3, 2
DISTILL_HEADS = ["model.heads.object={head_channels: 8}", f"model.heads.motion={{modes: {MODES}, steps: {STEPS}, head_channels: 8}}",
                 f"model.heads.occupancy={{steps: {STEPS}, head_channels: 8}}",
                 f"model.heads.plan={{steps: {STEPS}, head_channels: 8, hidden: 16}}"]


@pytest.fixture(scope="module")
def distiller():
    """A TinyBEV S2 distiller between a narrow student and a wider teacher (no data read)."""
    from engine_helpers import SMALL_TINY_C

    from bridgeta.config import load_config
    from bridgeta.distill.tinybev import TinyBEVDistiller
    from bridgeta.models.bev_model import build_model

    config = load_config("distill/tiny-c-tinybev-s2", [*SMALL_TINY_C, *DISTILL_HEADS, "data.dataroot=/unused"])
    teacher = load_config("tiny-lc-tinybev", [
        *SMALL_TINY_C, *DISTILL_HEADS, "model.lidar={pillar_channels: 8, channels: [16], out_channels: 16}",
        "model.fuser={out_channels: 32}", "model.decoder.blocks=[[1,32,2],[1,32,1]]",
        "model.decoder.out_channels=32", "data.dataroot=/unused"])
    return TinyBEVDistiller(build_model(config), build_model(teacher), config.distill)


@pytest.mark.parametrize("change, message", [
    # The same shapes on other cells: the grids shifted 8 m forward; the output grid 1 m back.
    (["model.grid.x=[-43.2,59.2,1.6]", "model.heads.map.output_grid.x=[-42.0,58.0,2.0]"], "feature_grid"),
    (["model.heads.map.output_grid.x=[-51.0,49.0,2.0]"], "output_grid"),
    (["model.heads.map.classes=[ped_crossing,drivable_area,walkway,stop_line,carpark_area,divider]"], "classes"),
])
def test_a_teacher_on_other_cells_or_classes_is_refused(change, message):
    from engine_helpers import SMALL_TINY_C

    from bridgeta.config import load_config
    from bridgeta.distill.tinybev import TinyBEVDistiller
    from bridgeta.models.bev_model import build_model

    config = load_config("distill/tiny-c-tinybev-s2", [*SMALL_TINY_C, *DISTILL_HEADS, "data.dataroot=/unused"])
    teacher = load_config("tiny-lc-tinybev", [
        *SMALL_TINY_C, *DISTILL_HEADS, "model.lidar={pillar_channels: 8, channels: [16], out_channels: 16}",
        "model.fuser={out_channels: 32}", "model.decoder.blocks=[[1,32,2],[1,32,1]]",
        "model.decoder.out_channels=32", "data.dataroot=/unused", *change])
    with pytest.raises(ValueError, match=message):
        TinyBEVDistiller(build_model(config), build_model(teacher), config.distill)


def _outputs(model, seed: int, objects: bool = True):
    """Random outputs of every head of ``model``, shaped as its forward gives them (batch 2)."""
    from bridgeta.models.object_head import ObjectOutputs
    from bridgeta.models.types import BEVOutputs

    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    grid, batch = model.feature_grid.shape, 2
    bev = rand(batch, 4, *grid)
    return BEVOutputs(
        camera_bev=bev, lidar_bev=None, fused_bev=bev, decoded_bev=bev,
        logits=rand(batch, len(model.classes), *model.output_grid.shape),
        objects=ObjectOutputs(rand(batch, len(model.object_classes), *grid), rand(batch, 10, *grid)) if objects else None,
        motion=MotionOutputs(rand(batch, MODES * STEPS * 2, *grid), rand(batch, MODES, *grid)),
        occupancy=rand(batch, STEPS, *grid), plan=rand(batch, 3, STEPS, 2))


def test_output_terms_without_an_object_pair_still_distil_occupancy_and_plans(distiller):
    student, teacher = _outputs(distiller.student, 0, objects=False), _outputs(distiller.teacher, 1, objects=False)
    terms = distiller._output_terms(student, teacher, None, {}, command=torch.tensor([0, 2]))
    assert set(terms) == {"kd/out_map", "kd/out_occupancy", "kd/out_plan"}
    assert all(float(v) > 0 for v in terms.values())
    # With both object heads the object-level terms join them.
    student, teacher = _outputs(distiller.student, 0), _outputs(distiller.teacher, 1)
    terms = distiller._output_terms(student, teacher, None, {}, command=torch.tensor([0, 2]))
    assert {"kd/out_heatmap", "kd/out_box", "kd/out_occupancy", "kd/out_plan"} <= set(terms)


def test_the_plan_term_distils_only_the_commanded_plan(distiller):
    student, teacher = _outputs(distiller.student, 0), _outputs(distiller.teacher, 1)
    command = torch.tensor([0, 2])
    student.plan = teacher.plan.clone()
    student.plan[0, 1:] += 10.0  # the two plans sample 0 was not commanded to follow...
    student.plan[1, :2] -= 10.0  # ...and sample 1's
    plan = distiller.settings.output * distiller.settings.heads.plan
    assert float(distiller._output_terms(student, teacher, None, {}, command)["kd/out_plan"]) == pytest.approx(0.0)
    student.plan[0, 0] += 1.0  # 1 m off on sample 0's commanded plan: mean L1 of 1 over half the entries
    assert float(distiller._output_terms(student, teacher, None, {}, command)["kd/out_plan"]) == pytest.approx(plan * 0.5)
    with pytest.raises(ValueError, match="command"):
        distiller._output_terms(student, teacher, None, {})


def test_uniform_region_weights_reproduce_the_plain_output_terms(distiller):
    student, teacher = _outputs(distiller.student, 0), _outputs(distiller.teacher, 1)
    # A few confident teacher detections, so that the box and motion terms have cells to weigh.
    teacher.objects.heatmap[:, 0, 10:40:10, 20] = 3.0
    command = torch.tensor([1, 0])
    plain = distiller._output_terms(student, teacher, None, {}, command)
    ones = torch.ones(2, *distiller.student.feature_grid.shape)
    logs: dict[str, float] = {}
    uniform = distiller._output_terms(student, teacher, RegionWeights.same(ones), logs, command)
    assert set(plain) == set(uniform) and "kd/out_motion" in plain
    for name in plain:
        torch.testing.assert_close(uniform[name], plain[name], msg=name)
    # With weights, the logs keep the unweighted values: under uniform ones, the terms themselves.
    for name in ("out_map", "out_heatmap", "out_occupancy", "out_box", "out_motion"):
        assert logs[f"unweighted/{name}"] == pytest.approx(float(plain[f"kd/{name}"]) / _term_scale(distiller, name))
    # Weights that are not uniform move the per-cell terms (so the comparison above can fail), each
    # group of terms by its own map only: the map term by the map's, the object terms by the objects'.
    skewed = ones.clone()
    skewed[:, :32] = 3.0
    skewed = skewed / skewed.mean()
    on_map = distiller._output_terms(student, teacher, RegionWeights(ones, skewed, ones), {}, command)
    on_objects = distiller._output_terms(student, teacher, RegionWeights(ones, ones, skewed), {}, command)
    assert float((on_map["kd/out_map"] - plain["kd/out_map"]).abs()) > 1e-6
    assert float((on_objects["kd/out_occupancy"] - plain["kd/out_occupancy"]).abs()) > 1e-6
    # The skew covers two of the three detections (x = 10, 20; not 30): the terms at the
    # detections move too.
    for name in ("kd/out_heatmap", "kd/out_box", "kd/out_motion"):
        assert float((on_objects[name] - plain[name]).abs()) > 1e-6, name
    for name in ("kd/out_heatmap", "kd/out_box", "kd/out_motion", "kd/out_occupancy", "kd/out_plan"):
        torch.testing.assert_close(on_map[name], plain[name], msg=name)
    for name in ("kd/out_map", "kd/out_plan"):
        torch.testing.assert_close(on_objects[name], plain[name], msg=name)


def _term_scale(distiller, name: str) -> float:
    return distiller.settings.output * getattr(distiller.settings.heads, name.removeprefix("out_"))


def test_each_heads_region_weights_come_from_that_heads_foreground(distiller):
    """A teacher sure of the road everywhere in one half of the grid and of one object: the map's
    weights favour that half; the objects' favour the object's cell and not the road; the
    features' favour both. Each map has mean 1 and no gradient."""
    student, teacher = _outputs(distiller.student, 0), _outputs(distiller.teacher, 1)
    grid = distiller.student.feature_grid.shape
    teacher.logits = torch.full_like(teacher.logits, -10.0)
    teacher.logits[:, 0, : teacher.logits.shape[2] // 2] = 10.0  # the first map class: half the grid
    student.logits = teacher.logits.clone().requires_grad_()  # the student agrees on the map
    teacher.objects.heatmap.fill_(-10.0)
    teacher.objects.heatmap[:, 0, 40, 5] = 10.0  # an object on the other half, off the road
    student.objects = replace(student.objects, heatmap=teacher.objects.heatmap.clone().requires_grad_())
    weights = distiller._region(student, teacher)
    for name in ("features", "map", "objects"):
        w = getattr(weights, name)
        assert w.shape == (2, *grid) and not w.requires_grad
        assert float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    road, field, obj = (5, 5), (grid[0] - 5, 60), (40, 5)
    assert float(weights.map[0][road] / weights.map[0][field]) > 5 and float(weights.map[0][obj]) < 1
    assert float(weights.objects[0][obj] / weights.objects[0][road]) > 5
    assert float(weights.objects[0][road]) == pytest.approx(float(weights.objects[0][field]))
    assert float(weights.features[0][road] / weights.features[0][field]) > 5
    assert float(weights.features[0][obj] / weights.features[0][field]) > 5
    # Where the student disagrees (an object it sees that the teacher does not), the object
    # weights rise as at the teacher's object: r = (0 + 1) / 2 there against (1 + 0) / 2.
    ghost = (20, 60)
    student.objects.heatmap.data[:, 0, ghost[0], ghost[1]] = 10.0
    weights = distiller._region(student, teacher)
    assert float(weights.objects[0][ghost]) == pytest.approx(float(weights.objects[0][obj]), rel=1e-4)
    assert float(weights.objects[0][ghost] / weights.objects[0][field]) > 5


def test_the_box_term_weighs_each_regression_group_as_the_task_does():
    """An error of 1 in one group at a confident cell costs that group's task weight: offset 1,
    velocity 0.2 (its two channels, not 2/10 of a ten-channel mean)."""
    weights = {"offset": 1.0, "height": 1.0, "size": 1.0, "rotation": 1.0, "velocity": 0.2}
    teacher = torch.zeros(1, 2, 10)
    cells = torch.tensor([[1.0, 0.0]])  # the second cell is not a confident detection
    for channels, expected in (([0, 1], 1.0), ([8, 9], 0.2), ([3], 1.0 / 3), ([8], 0.1)):
        student = torch.zeros(1, 2, 10)
        student[0, 0, channels] = 1.0
        student[0, 1] = 100.0  # off the detections: weighs nothing
        assert float(box_l1_by_group(student, teacher, cells, weights)) == pytest.approx(expected)
    student = torch.zeros(1, 2, 10, requires_grad=True)
    box_l1_by_group(student + 1.0, teacher, cells, weights).backward()
    assert float(student.grad[0, 0, 8]) == pytest.approx(0.2 / 2) and float(student.grad[0, 0, 0]) == pytest.approx(0.5)
    assert float(student.grad[0, 1].abs().sum()) == 0.0


def test_the_map_term_sums_the_classes_and_averages_the_cells(distiller):
    """The teacher and student agree everywhere but one (cell, class): the term is that element's
    KL over the number of cells (summed over classes, as the task's map loss sums its classes),
    not also over the number of classes."""
    student, teacher = _outputs(distiller.student, 0), _outputs(distiller.teacher, 1)
    student.logits = teacher.logits.clone()
    student.logits[1, 2, 3, 4] += 2.0
    t = distiller.config.temperature
    element = bernoulli_kl(teacher.logits[1:2, 2:3, 3:4, 4:5], student.logits[1:2, 2:3, 3:4, 4:5], t)
    cells = student.logits.shape[0] * student.logits.shape[2] * student.logits.shape[3]
    term = distiller._output_terms(student, teacher, None, {}, torch.tensor([1, 1]))["kd/out_map"]
    settings = distiller.settings
    assert float(term) == pytest.approx(settings.output * settings.heads.map * float(element) / cells, rel=1e-4)


def test_the_occupancy_term_averages_its_steps_and_cells(distiller):
    """One disagreeing (sample, step, cell): the term is that element's KL over steps x cells."""
    student, teacher = _outputs(distiller.student, 0), _outputs(distiller.teacher, 1)
    student.occupancy = teacher.occupancy.clone()
    student.occupancy[1, 2, 3, 4] += 2.0
    t = distiller.config.temperature
    element = bernoulli_kl(teacher.occupancy[1:2, 2:3, 3:4, 4:5], student.occupancy[1:2, 2:3, 3:4, 4:5], t)
    elements = teacher.occupancy.numel()
    term = distiller._output_terms(student, teacher, None, {}, torch.tensor([1, 1]))["kd/out_occupancy"]
    settings = distiller.settings
    assert float(term) == pytest.approx(settings.output * settings.heads.occupancy * float(element) / elements, rel=1e-4)


def test_the_feature_terms_are_the_adapted_mse_averaged_over_channels_and_cells(distiller):
    """Adapters that output 0 against a teacher map that is 0 but for one value 2: each level's
    term is 2^2 over the teacher's channels x cells x samples."""
    student, teacher = _outputs(distiller.student, 0), _outputs(distiller.teacher, 1)
    grid = distiller.student.feature_grid.shape
    widths = {level: (adapter.in_channels, adapter.out_channels) for level, adapter in distiller.adapters.items()}
    student.camera_bev = torch.randn(2, widths["fld"][0], *grid)
    student.decoded_bev = torch.randn(2, widths["dld"][0], *grid)
    teacher.fused_bev, teacher.decoded_bev = torch.zeros(2, widths["fld"][1], *grid), torch.zeros(2, widths["dld"][1], *grid)
    teacher.fused_bev[1, 3, 5, 7] = teacher.decoded_bev[0, 1, 2, 3] = 2.0
    saved = {k: v.clone() for k, v in distiller.adapters.state_dict().items()}
    settings = distiller.settings
    distiller.settings = replace(settings, feature=0.5, output=0.0, region=False)  # a module fixture: restored below
    distiller.teacher_forward = lambda inputs: teacher
    try:
        with torch.no_grad():
            for adapter in distiller.adapters.values():
                adapter.weight.zero_()
                adapter.bias.zero_()
        terms = distiller.distill(None, None, student, {})
    finally:
        distiller.settings = settings
        del distiller.teacher_forward
        distiller.adapters.load_state_dict(saved)
    assert set(terms) == {"kd/feature_fld", "kd/feature_dld"}
    for level in ("fld", "dld"):
        expected = 0.5 * 4.0 / (widths[level][1] * 2 * grid[0] * grid[1])
        assert float(terms[f"kd/feature_{level}"].detach()) == pytest.approx(expected, rel=1e-5), level


def test_the_heatmap_kl_is_damped_where_the_models_nearly_agree():
    """A background cell the two models put at 1 % and 2 % weighs (0.01)^2 of its KL; a missed
    object (90 % against 10 %) keeps 0.64 of its KL: the undamped sum over a grid of background
    would be the background's."""
    teacher = torch.logit(torch.tensor([0.01, 0.9]))[None, :, None, None]
    student = torch.logit(torch.tensor([0.02, 0.1]))[None, :, None, None]
    kl = bernoulli_kl(teacher[:, :1], student[:, :1]), bernoulli_kl(teacher[:, 1:], student[:, 1:])
    damped = focal_heatmap_kl(teacher, student)
    assert float(damped) == pytest.approx(float(kl[0]) * 0.01**2 + float(kl[1]) * 0.8**2, rel=1e-4)
    # Its gradient moves the student towards the teacher, and is nil where they agree.
    logits = torch.cat([student, teacher[:, :1]], dim=1).requires_grad_()
    grad = torch.autograd.grad(focal_heatmap_kl(torch.cat([teacher, teacher[:, :1]], dim=1), logits).sum(), logits)[0]
    assert grad[0, 0] > 0 and grad[0, 1] < 0 and float(grad[0, 2]) == 0.0


def test_without_a_term_the_teacher_does_not_run(distiller):
    """The staged baseline's runs (no feature or output term) never run the teacher, read none
    of its inputs and build no adapter (a module no loss reads; DDP refuses it)."""
    from bridgeta.distill.tinybev import TinyBEVDistiller

    assert set(distiller.adapters) == {"fld", "dld"} and "lidar" in distiller.input_modalities
    config = replace(distiller.config, tinybev=replace(distiller.settings, feature=0.0, output=0.0))
    bare = TinyBEVDistiller(distiller.student, distiller.teacher, config)
    assert len(bare.adapters) == 0 and bare.input_modalities == ()
    calls = []
    hook = distiller.teacher.register_forward_hook(lambda *_: calls.append(1))
    settings = distiller.settings
    distiller.settings = replace(settings, feature=0.0, output=0.0)  # a module fixture: restored below
    try:
        assert distiller.distill(None, None, None, {}) == {} and calls == []
    finally:
        distiller.settings = settings
        hook.remove()


def test_the_heatmap_term_is_normalised_by_the_teachers_detections_as_the_task_loss_by_objects(distiller):
    """The KL times |p_t - p_s|^2, summed over cells and classes, divided by the teacher's
    confident detections: one disagreeing cell weighs the same on a 64x64 grid as on any other,
    and a second detection elsewhere (agreed on) halves it."""
    student, teacher = _outputs(distiller.student, 0), _outputs(distiller.teacher, 1)
    teacher.objects.heatmap.fill_(-10.0)
    teacher.objects.heatmap[0, 1, 5, 7] = 2.0  # the one confident detection (p = 0.88)
    student.objects = replace(student.objects, heatmap=teacher.objects.heatmap.clone())
    student.objects.heatmap[0, 1, 5, 7] = 0.0  # p = 0.5 where the teacher says 0.88
    t = distiller.config.temperature
    p, q = torch.sigmoid(torch.tensor(2.0 / t)), torch.tensor(0.5)
    kl = float((p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))) * (p - q) ** 2) * t**2
    settings = distiller.settings
    one = distiller._output_terms(student, teacher, None, {}, torch.tensor([1, 1]))["kd/out_heatmap"]
    assert float(one) == pytest.approx(settings.output * settings.heads.heatmap * kl, rel=1e-4)
    teacher.objects.heatmap[1, 0, 30, 30] = student.objects.heatmap[1, 0, 30, 30] = 3.0
    two = distiller._output_terms(student, teacher, None, {}, torch.tensor([1, 1]))["kd/out_heatmap"]
    assert float(two) == pytest.approx(float(one) / 2, rel=1e-4)


def test_the_motion_term_regresses_the_teachers_most_probable_mode(distiller):
    """One confident teacher detection: its mode 0 (the more probable) moves 1 m along x per step;
    the student's closer mode stands still, so L1 = 0.5 per coordinate, and its uniform logits
    give a cross-entropy of ln 2."""
    student, teacher = _outputs(distiller.student, 0), _outputs(distiller.teacher, 1)
    grid = distiller.student.feature_grid.shape
    teacher.objects.heatmap.fill_(-10.0)
    teacher.objects.heatmap[0, 1, 5, 7] = 2.0  # p = 0.88 at one cell of sample 0
    t_traj = torch.zeros(2, MODES, STEPS, 2, *grid)
    t_traj[0, 0, :, 0, 5, 7] = 1.0
    t_traj[0, 1, :, :, 5, 7] = 5.0
    t_logits = torch.zeros(2, MODES, *grid)
    t_logits[0, 0, 5, 7] = 2.0
    teacher.motion = MotionOutputs(t_traj.reshape(2, -1, *grid), t_logits)
    s_traj = torch.zeros(2, MODES, STEPS, 2, *grid)
    s_traj[0, 1, :, 0, 5, 7], s_traj[0, 1, :, 1, 5, 7] = 1.0, 3.0  # ADE 3 against mode 0's 1
    student.motion = MotionOutputs(s_traj.reshape(2, -1, *grid), torch.zeros(2, MODES, *grid))
    logs: dict[str, float] = {}
    terms = distiller._output_terms(student, teacher, None, logs, torch.tensor([1, 1]))
    assert logs["out/teacher_detections"] == pytest.approx(0.5)  # one detection over two samples
    settings = distiller.settings
    mode_weight = distiller.student.config.heads.motion.mode_weight
    expected = settings.output * settings.heads.motion * (0.5 + mode_weight * math.log(2))
    assert float(terms["kd/out_motion"]) == pytest.approx(expected)
    # At the student's task weights (its motion loss's): a trajectory weight of 2 doubles the L1.
    heads = distiller.student.config.heads
    motion = heads.motion
    heads.motion = replace(motion, weight=2.0)  # a module fixture: restored below
    try:
        terms = distiller._output_terms(student, teacher, None, {}, torch.tensor([1, 1]))
    finally:
        heads.motion = motion
    expected = settings.output * settings.heads.motion * (2 * 0.5 + mode_weight * math.log(2))
    assert float(terms["kd/out_motion"]) == pytest.approx(expected)
