"""TinyBEV through the CLI on the session's tiny world: the three stages, each starting from the
previous stage's student, then eval (motion and planning figures) and ONNX export of the student."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine_helpers import SMALL_TINY_C, export_onnx_and_run, torch_threads

from bridgeta import cli
from bridgeta.engine.model_file import load_model_file, read_model_file

# A narrow multi-task student, and a teacher twice as wide (the adapters bridge the widths).
HEADS = ["model.heads.object={head_channels: 8}", "model.heads.motion={modes: 2, head_channels: 8}",
         "model.heads.occupancy={steps: 3, head_channels: 8}",
         "model.heads.plan={steps: 3, head_channels: 8, hidden: 16}"]  # the tiny world's scenes last 2 s
STUDENT = [*SMALL_TINY_C, *HEADS]
TEACHER = [*SMALL_TINY_C, *HEADS, "model.lidar={pillar_channels: 8, channels: [16], out_channels: 16}",
           "model.fuser={out_channels: 32}", "model.decoder.blocks=[[1,32,2],[1,32,1]]", "model.decoder.out_channels=32"]


def _sets(overrides):
    return [arg for override in overrides for arg in ("--set", override)]


@pytest.fixture(scope="module")
def stages(engine_world, tmp_path_factory):
    from bridgeta.config import load_config
    from bridgeta.engine.model_file import save_model_file
    from bridgeta.models.bev_model import build_model

    root = tmp_path_factory.mktemp("tinybev")
    config = load_config("tiny-lc-tinybev", [*TEACHER, f"data.dataroot={engine_world}"])
    torch.manual_seed(3)
    model = build_model(config)
    # Heads start at "standing still" (zero output layers); a teacher with opinions is one that moves.
    for layer in (model.motion_head.trajectory[-1], model.planning_head.mlp[-1]):
        torch.nn.init.normal_(layer.weight, std=0.1)
        torch.nn.init.normal_(layer.bias, std=1.0)
    teacher = save_model_file(root / "teacher.safetensors", model, config)
    common = ["--dataroot", str(engine_world), "--teacher", str(teacher), *_sets(STUDENT),
              "--set", "train.max_steps=2", "--set", "train.eval_every=0"]
    previous = None
    with torch_threads(1):
        for stage in (1, 2, 3):
            start = ["--set", f"distill.tinybev.init_from={previous}"] if previous else []
            out = root / f"s{stage}"
            assert cli.main(["distill", "--config", f"distill/tiny-c-tinybev-s{stage}", *common, *start,
                             "--out", str(out)]) == 0
            previous = out
    return root


def test_each_stage_logs_its_terms(stages):
    def last(stage):
        rows = [json.loads(line) for line in (stages / f"s{stage}" / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "loss" in r][-1]

    s1, s2, s3 = last(1), last(2), last(3)
    for row in (s1, s2, s3):
        assert {"kd/feature_fld", "kd/feature_dld", "object/heatmap", "motion/trajectory", "occupancy/focal",
                "plan/l1"} <= set(row)
    assert not any(key.startswith("kd/out_") for key in s1)
    assert {"kd/out_map", "kd/out_heatmap", "kd/out_box", "kd/out_motion", "kd/out_occupancy", "kd/out_plan"} <= set(s2)
    region_logs = {"region/max_weight_features", "region/max_weight_map", "region/max_weight_objects",
                   "unweighted/feature_fld", "unweighted/out_map", "unweighted/out_heatmap", "unweighted/out_box"}
    assert region_logs <= set(s3) and not region_logs & set(s2)


def test_a_stage_starts_from_the_previous_stages_student(engine_world, stages, tmp_path, monkeypatch):
    """S2 through the real trainer path with the optimiser's update switched off: its student
    ends where S1's ended, so nothing between init_from and the first step replaced a weight."""
    from bridgeta.config import load_config
    from bridgeta.distill import init_from_previous_stage
    from bridgeta.models.bev_model import build_model

    previous, _ = load_model_file(stages / "s1")
    fresh = build_model(load_config("distill/tiny-c-tinybev-s2", [*STUDENT, f"data.dataroot={engine_world}"]))
    # S1 trained: its weights are not the ones a fresh student starts from.
    assert any(not torch.equal(p, fresh.state_dict()[k]) for k, p in previous.named_parameters())
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *args, **kwargs: None)
    out = tmp_path / "s2"
    with torch_threads(1):
        assert cli.main(["distill", "--config", "distill/tiny-c-tinybev-s2", "--dataroot", str(engine_world),
                         "--teacher", str(stages / "teacher.safetensors"), *_sets(STUDENT),
                         "--set", "train.max_steps=1", "--set", "train.eval_every=0",
                         "--set", f"distill.tinybev.init_from={stages / 's1'}", "--out", str(out)]) == 0
    continued, _ = load_model_file(out)
    # Parameters, not BatchNorm's running statistics (the one training forward moves those).
    for key, value in previous.named_parameters():
        assert torch.equal(dict(continued.named_parameters())[key], value), key
    # The adapters S1 learned go on too (S2's optimiser is off, so S2's file holds what it
    # started from), rather than fresh random projections: S2 logs that it carried them.
    _, s1_state, _ = read_model_file(stages / "s1")
    _, s2_state, _ = read_model_file(out)
    adapters = [key for key in s1_state if key.startswith("adapters.")]
    assert adapters and all(torch.equal(s2_state[key], s1_state[key]) for key in adapters)
    other = build_model(load_config("tiny-c", [*SMALL_TINY_C, f"data.dataroot={engine_world}"]))
    with pytest.raises(ValueError, match="previous stage's model differs"):
        init_from_previous_stage(other, previous)


def test_a_stage_resumed_mid_way_ends_as_the_uninterrupted_stage(engine_world, stages, tmp_path):
    """S2 from S1, stopped after its first step and resumed: the resume loads its checkpoint over
    the previous stage's weights, and the student and the adapters end bit for bit as in the run
    that was never stopped."""
    from safetensors.torch import load_file

    from bridgeta.config import load_config
    from bridgeta.engine.trainer import train

    def config(steps):
        return load_config("distill/tiny-c-tinybev-s2", [
            *STUDENT, f"data.dataroot={engine_world}", f"distill.teacher={stages / 'teacher.safetensors'}",
            f"distill.tinybev.init_from={stages / 's1'}", "train.eval_every=0", "train.checkpoint_every=1",
            "train.deterministic=true", "train.seed=7", f"train.max_steps={steps}"])

    with torch_threads(1):
        reference = train(config(2), tmp_path / "whole")
        stopped = train(config(1), tmp_path / "cut")
        resumed = train(config(2), tmp_path / "cut", resume=True)
    assert stopped["steps"] == 1 and reference["steps"] == resumed["steps"] == 2 and resumed["resumed_from"] == 1
    whole, cut = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert whole.keys() == cut.keys() and any(k.startswith("adapters.") for k in whole)
    assert [k for k in whole if not torch.equal(whole[k], cut[k])] == []
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    reference_rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in reference_rows if "loss" in r]


def test_the_adapters_live_in_training_only(engine_world, stages, tmp_path):
    _, state, kind = read_model_file(stages / "s3")
    assert kind == "distiller" and any(k.startswith("adapters.") for k in state)
    assert not any(k.startswith("teacher.") for k in state)
    exported = tmp_path / "student.safetensors"
    assert cli.main(["export", "--checkpoint", str(stages / "s3"), "--out", str(exported)]) == 0
    _, trained, _ = read_model_file(stages / "s3")
    config, state, kind = read_model_file(exported)
    assert kind == "model"
    assert not any(k.startswith(("teacher.", "adapters.", "student.")) for k in state)
    assert any(k.startswith("motion_head.") for k in state) and any(k.startswith("planning_head.") for k in state)
    # Exactly the student's own tensors, with the values S3 trained (not a fresh student's).
    from bridgeta.models.bev_model import build_model as build

    assert set(state) == set(build(config).state_dict())
    assert all(torch.equal(value, trained[f"student.{key}"]) for key, value in state.items())
    # ...while the distiller trains them: the feature term sends gradient to the adapters, none to the teacher.
    from bridgeta.config import load_config
    from bridgeta.data.dataset import BEVMapDataset, collate_bev
    from bridgeta.distill import build_distiller
    from bridgeta.engine.trainer import load_teacher
    from bridgeta.models.bev_model import build_model
    from bridgeta.models.targets import build_task_targets

    config = load_config("distill/tiny-c-tinybev-s3", [*STUDENT, f"data.dataroot={engine_world}",
                                                       f"distill.teacher={stages / 'teacher.safetensors'}"])
    student = build_model(config)
    distiller = build_distiller(config, student, load_teacher(config)).train()
    dataset = BEVMapDataset.for_model(config.data, student, "train", modalities=("camera", "lidar"))
    inputs, labels, metas = collate_bev([dataset[0], dataset[1]])
    out = distiller(inputs, labels, build_task_targets(student, metas, "cpu"))
    adapter = list(distiller.adapters["dld"].parameters())
    grads = torch.autograd.grad(out.losses["kd/feature_dld"], adapter, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)
    # The plan term reaches the student's planning head, and the feature terms do not.
    plan = list(student.planning_head.parameters())
    assert any(g is not None and g.abs().sum() > 0
               for g in torch.autograd.grad(out.losses["kd/out_plan"], plan, allow_unused=True, retain_graph=True))
    assert all(g is None for g in torch.autograd.grad(out.losses["kd/feature_fld"], plan, allow_unused=True,
                                                      retain_graph=True))
    # The whole loss, backwards: the student and the adapters learn, the teacher receives nothing.
    out.total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None for p in distiller.adapters.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())


def test_eval_reports_motion_and_planning(stages):
    from bridgeta.engine.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(stages / "s3", split="train", device="cpu")  # the split with agents
    motion, planning = result["motion"], result["planning"]
    assert motion["agents"] > 0 and motion["minADE"] >= 0 and motion["matched_to"] == "ground-truth agents"
    # The head forecasts 6 steps (3 s); the world's 2 s scenes never give an agent a complete
    # future, so the final-step figures are undefined rather than scored on truncated tracks.
    assert motion["complete_agents"] == 0
    assert all(math.isnan(motion[k]) for k in ("minFDE", "miss_rate_all_steps", "miss_rate_fde"))
    assert 0 <= result["motion_detected"]["recall"] <= 1 and result["motion_detected"]["agents"] <= motion["agents"]
    # Complete 1.5 s futures: each scene's first keyframe; horizons up to the head's 3 steps.
    assert planning["samples"] > 0 and planning["samples"] + planning["incomplete_skipped"] == result["samples"]
    assert set(planning) == {"l2@1s", "l2_avg@1s", "collision@1s", "collision_avg@1s", "logged_collision@1s",
                             "logged_collision_avg@1s", "samples", "incomplete_skipped", "constant_velocity"}
    assert set(planning["constant_velocity"]) == {"l2@1s", "l2_avg@1s", "collision@1s", "collision_avg@1s",
                                                  "logged_collision@1s", "logged_collision_avg@1s"}
    assert "detection" in result
    occupancy = result["occupancy"]
    assert set(occupancy) == {"IoU@0.5s", "IoU@1s", "IoU@1.5s", "mIoU"}


def test_the_tinybev_student_exports_to_onnx_with_every_head(stages, tmp_path):
    pytest.importorskip("onnxruntime")
    session, inputs, expected = export_onnx_and_run(stages / "s3", tmp_path / "student.onnx")
    # A planning model also reads the ego's status.
    assert [spec.name for spec in session.specs] == ["images", "intrinsics", "ego_T_camera", "image_aug", "ego_motion"]
    arrays = session.run_outputs({**{name: getattr(inputs.camera, name) for name in
                                     ("images", "intrinsics", "ego_T_camera", "image_aug")},
                                  "ego_motion": inputs.ego_motion})
    assert bool(inputs.ego_motion[:, 2].all())  # a known velocity: the plan depends on it
    assert set(arrays) >= {"logits", "object_heatmap", "motion_trajectories", "motion_mode_logits", "occupancy", "plan"}
    assert abs(arrays["occupancy"] - expected.occupancy.numpy()).max() < 1e-4
    assert abs(arrays["plan"] - expected.plan.numpy()).max() < 1e-4
    assert abs(arrays["motion_trajectories"] - expected.motion.trajectories.numpy()).max() < 1e-4


def test_a_missing_previous_stage_is_refused_before_training(engine_world, stages, tmp_path, capsys):
    out = tmp_path / "s2"
    code = cli.main(["distill", "--config", "distill/tiny-c-tinybev-s2", "--dataroot", str(engine_world),
                     "--teacher", str(stages / "teacher.safetensors"), *_sets(STUDENT),
                     "--set", f"distill.tinybev.init_from={tmp_path / 'no-such-run'}", "--out", str(out)])
    assert code == 2
    assert "distill.tinybev.init_from" in capsys.readouterr().err
    assert not out.exists()


def test_the_motion_and_planning_heads_overfit_one_batch(engine_world):
    """Trained alone on one batch, every head's loss falls: the targets are learnable as built."""
    from bridgeta.config import load_config
    from bridgeta.data.dataset import BEVMapDataset, collate_bev
    from bridgeta.models.bev_model import build_model
    from bridgeta.models.targets import build_task_targets, task_losses

    config = load_config("tiny-c-tinybev", [*STUDENT, f"data.dataroot={engine_world}"])
    torch.manual_seed(0)
    model = build_model(config).train()
    dataset = BEVMapDataset.for_model(config.data, model, "train")
    inputs, _, metas = collate_bev([dataset[0], dataset[1]])
    targets = build_task_targets(model, metas, "cpu")
    assert bool(targets.motion.mask.any()) and bool(targets.plan.mask.any())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    with torch_threads(1):
        for _ in range(60):
            terms = task_losses(model, model(inputs), targets)
            history.append({k: float(v.detach()) for k, v in terms.items()})
            optimizer.zero_grad()
            torch.stack(list(terms.values())).sum().backward()
            optimizer.step()
    for name in ("motion/trajectory", "plan/l1", "object/heatmap", "occupancy/focal"):
        assert history[-1][name] < 0.5 * history[0][name], (name, history[0][name], history[-1][name])


def test_an_untrained_planner_plans_the_constant_velocity_reference(engine_world):
    """The planning head starts at the ego status' constant-velocity path (its last layer is zero),
    so the metric scores it exactly as its constant-velocity reference."""
    from bridgeta.config import load_config
    from bridgeta.data.dataset import BEVMapDataset, collate_bev
    from bridgeta.engine.task_metrics import MotionPlanningMetric
    from bridgeta.models.bev_model import build_model

    config = load_config("tiny-c-tinybev", [*STUDENT, f"data.dataroot={engine_world}"])
    torch.manual_seed(0)
    model = build_model(config).eval()
    dataset = BEVMapDataset.for_model(config.data, model, "train", train=True, seed=3)  # augmented
    metric = MotionPlanningMetric(model)
    moving = 0
    with torch.no_grad(), torch_threads(1):
        for start in range(0, len(dataset), 4):
            inputs, _, metas = collate_bev([dataset[i] for i in range(start, min(start + 4, len(dataset)))])
            outputs = model(inputs)
            seconds = 0.5 * torch.arange(1, outputs.plan.shape[2] + 1)
            expected = inputs.ego_motion[:, None, :2] * seconds[None, :, None]
            torch.testing.assert_close(outputs.plan, expected[:, None].expand(-1, 3, -1, -1))
            moving += int((expected.abs().sum(dim=(1, 2)) > 0).sum())
            metric.update(outputs, metas, torch.device("cpu"))
    assert moving > 0
    planning = metric.compute()["planning"]
    reference = planning.pop("constant_velocity")
    for key, value in reference.items():
        assert planning[key] == pytest.approx(value, abs=1e-5), key


def test_an_oracle_motion_head_forecasts_without_error_at_true_and_detected_agents(engine_world):
    """Object and motion maps built from each sample's own ground truth, two samples a batch: the
    detection-free and the matched-to-detection forecasts both have zero error, and every agent
    is matched (each sample reads its own maps)."""
    from bridgeta.config import load_config
    from bridgeta.engine.evaluate import build_eval_loader, evaluate
    from bridgeta.models.bev_model import build_model
    from bridgeta.models.motion_head import MotionOutputs
    from bridgeta.models.object_head import ObjectOutputs
    from bridgeta.models.targets import build_task_targets

    heads = ["model.heads.object={head_channels: 8, nms_radius: [0, 0, 0, 0], score_threshold: 0.5}",
             "model.heads.motion={modes: 2, steps: 3, head_channels: 8}"]
    config = load_config("tiny-c", [*SMALL_TINY_C, *heads, f"data.dataroot={engine_world}"])
    model = build_model(config).eval()
    loader = build_eval_loader(config, model, "train", batch_size=2, num_workers=0, distributed=False)
    samples = iter(loader.dataset)
    original = model.forward

    def oracle(inputs):
        outputs = original(inputs)
        batch = inputs.batch_size
        targets = build_task_targets(model, [next(samples).meta for _ in range(batch)], "cpu")
        objects, motion = targets.objects, targets.motion
        heat = objects.heatmap.clamp(1e-6, 1 - 1e-6)
        regression = torch.zeros_like(outputs.objects.regression).view(batch, 10, -1)
        trajectories = torch.zeros_like(outputs.motion.trajectories).view(batch, 2, 3, 2, -1)
        for b in range(batch):
            for m in range(int(objects.mask[b].sum())):
                cell = objects.index[b, m]
                regression[b, :, cell] = objects.regression[b, m]
                # Mode 1 is the truth, relative to the cell's agent centre; mode 0 stands still.
                trajectories[b, 1, :, :, cell] = motion.displacement[b, m]
        outputs.objects = ObjectOutputs(torch.log(heat / (1 - heat)), regression.view_as(outputs.objects.regression))
        outputs.motion = MotionOutputs(trajectories.view_as(outputs.motion.trajectories), outputs.motion.mode_logits)
        return outputs

    model.forward = oracle
    with torch_threads(1):
        result = evaluate(model, loader, "cpu", model.classes)
    truth_cells, detected = result["motion"], result["motion_detected"]
    assert truth_cells["agents"] > 0 and truth_cells["minADE"] == pytest.approx(0.0, abs=1e-5)
    assert detected["recall"] == pytest.approx(1.0) and detected["agents"] == truth_cells["agents"]
    # The decoded centre's float error only; the first keyframe of each scene has a complete 1.5 s future.
    assert detected["minADE"] < 0.05 and detected["complete_agents"] > 0 and detected["minFDE"] < 0.05
    assert detected["miss_rate_all_steps"] == 0.0 and detected["miss_rate_fde"] == 0.0
