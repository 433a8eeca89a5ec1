"""A model with a map head and an object head trains through the unchanged trainer, and a
map-only model is exactly what it was (state dict, outputs)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

from engine_helpers import read_metrics, small_student_config, torch_threads

from bridgeta.config import load_config
from bridgeta.data.dataset import BEVMapDataset, collate_bev
from bridgeta.engine.model_file import load_model_file
from bridgeta.engine.trainer import train
from bridgeta.models.bev_model import build_model
from bridgeta.rig import reference_inputs


# A map-only tiny-c, narrowed, as the code before the multi-head refactor (1e9cb57) built it:
# its state dict's keys and shapes, and map logits on the reference inputs with every tensor
# filled from its own name (``_fill_by_name``), so that any version with the same keys gets the
# same weights. tests/data/map_only_reference.json was written by ``map_only_reference`` run at
# 1e9cb57^ (the function is unchanged since), and is never regenerated from the current code.
MAP_ONLY_REFERENCE = Path(__file__).parent / "data" / "map_only_reference.json"
MAP_ONLY_OVERRIDES = ["model.camera.image_size=[32,88]", "model.camera.neck.out_channels=16",
                      "model.camera.vtransform.out_channels=16"]


def _fill_by_name(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            values = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            tensor.copy_((0.1 * values).to(tensor.dtype))


def map_only_reference() -> dict:
    torch.manual_seed(0)
    model = build_model(load_config("tiny-c", MAP_ONLY_OVERRIDES)).eval()
    _fill_by_name(model)
    with torch.no_grad():
        logits = model(reference_inputs(1, (32, 88), 6)).logits
    return {"keys": {k: list(v.shape) for k, v in model.state_dict().items()}, "logits_shape": list(logits.shape),
            "logits_sample": logits[0, :, ::9, ::9].double().flatten().tolist(),
            "logits_abs_mean": float(logits.double().abs().mean())}


def test_a_map_only_model_matches_the_one_before_the_multi_head_refactor():
    reference = json.loads(MAP_ONLY_REFERENCE.read_text())
    now = map_only_reference()
    assert now["keys"] == reference["keys"]  # the same names, in the same order, with the same shapes
    assert now["logits_shape"] == reference["logits_shape"]
    assert reference["logits_abs_mean"] > 0.01  # the reference is not a degenerate all-zero output
    torch.testing.assert_close(torch.tensor(now["logits_sample"]), torch.tensor(reference["logits_sample"]),
                               rtol=1e-4, atol=1e-5)


def test_a_map_only_model_is_unchanged_by_the_object_head():
    torch.manual_seed(0)
    plain = build_model(load_config("tiny-c"))
    torch.manual_seed(0)
    both = build_model(load_config("tiny-c", ["model.heads.object={}"]))
    plain_state, both_state = plain.state_dict(), both.state_dict()
    assert {k for k in both_state if not k.startswith("object_head.")} == set(plain_state)
    assert all(torch.equal(both_state[k], v) for k, v in plain_state.items())
    assert plain.head_names == ("map",) and both.head_names == ("map", "object")
    inputs = reference_inputs(1, (64, 176), 6)
    with torch.no_grad():
        a, b = plain.eval()(inputs), both.eval()(inputs)
    assert a.objects is None and set(a.heads) == {"map"}
    assert torch.equal(a.logits, b.logits) and set(b.heads) == {"map", "object"}
    assert b.objects.heatmap.shape == (1, 4, 128, 128)


def test_the_dataset_gives_boxes_in_the_augmented_frame(engine_world):
    from dataclasses import replace

    config = small_student_config(engine_world, "model.heads.object={}")
    model = build_model(config)
    plain = BEVMapDataset.for_model(config.data, model, "train", train=False)
    augmented = BEVMapDataset.for_model(replace(config.data), model, "train", train=True, seed=3)
    found = 0
    for index in range(len(plain)):
        a, b = plain[index], augmented[index]
        boxes, moved = a.meta["objects"]["boxes"], b.meta["objects"]["boxes"]
        assert torch.equal(a.meta["objects"]["labels"], b.meta["objects"]["labels"])
        if len(boxes):
            found += 1
            centres = boxes[:, :3].double() @ b.bev_aug[:3, :3].double().T + b.bev_aug[:3, 3].double()
            assert torch.allclose(moved[:, :3].double(), centres, atol=1e-4)
    assert found > 0
    _, _, metas = collate_bev([plain[0], plain[1]])
    assert all("objects" in m for m in metas)


def test_a_two_head_model_trains_logs_both_heads_and_saves_them(engine_world, tmp_path):
    config = small_student_config(engine_world, "model.heads.object={head_channels: 8}", "train.max_steps=3",
                                  "train.eval_every=0")
    with torch_threads(1):
        summary = train(config, tmp_path / "run")
    assert summary["steps"] == 3
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    terms = {"object/heatmap", "object/offset", "object/height", "object/size", "object/rotation", "object/velocity"}
    assert terms <= set(rows[-1]) and all(r["object/heatmap"] > 0 for r in rows)
    assert any(k.startswith("focal/") for k in rows[-1])
    model, loaded = load_model_file(tmp_path / "run")
    assert model.head_names == ("map", "object") and loaded.model.heads.object is not None


def test_training_an_object_head_without_the_devkit_fails_before_writing(engine_world, tmp_path, monkeypatch):
    import sys

    # Its validation scores detections with the devkit's DetectionEval: the run must stop at
    # once, naming why, not at its first evaluation after minutes of training.
    for name in [m for m in sys.modules if m == "nuscenes" or m.startswith("nuscenes.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "nuscenes", None)
    config = small_student_config(engine_world, "model.heads.object={head_channels: 8}", "train.max_steps=3")
    with pytest.raises(ImportError, match=r"score 3D detections.*bridgeta\[nuscenes\]"):
        train(config, tmp_path / "run", evaluate_fn=lambda model, config, split: {"miou": 0.0})
    assert not (tmp_path / "run").exists()


def test_an_unprepared_cache_is_named_with_the_fix(engine_world, tmp_path, monkeypatch):
    from bridgeta.data.cache import CacheError, LabelCache

    config = small_student_config(engine_world, "model.heads.object={}")
    dataset = BEVMapDataset.for_model(config.data, build_model(config), "train")
    original = LabelCache.record
    monkeypatch.setattr(LabelCache, "record", lambda self, i: {k: v for k, v in original(self, i).items() if k != "objects"})
    with pytest.raises(CacheError, match="data prepare .*--force"):
        dataset[0]


def test_an_oracle_object_head_scores_map_one_through_eval(engine_world):
    """Frames end to end: object maps built from each sample's own ground truth, decoded,
    turned into global-frame submission boxes and scored by the devkit, give AP 1."""
    from bridgeta.engine.evaluate import build_eval_loader, evaluate
    from bridgeta.models.object_head import ObjectOutputs, build_targets

    config = small_student_config(engine_world, "model.heads.object={nms_radius: [0, 0, 0, 0], score_threshold: 0.5}")
    model = build_model(config).eval()
    loader = build_eval_loader(config, model, "test", batch_size=1, num_workers=0, distributed=False)
    samples = iter(loader.dataset)
    original = model.forward

    def oracle(inputs):
        outputs = original(inputs)
        meta = next(samples).meta["objects"]
        targets = build_targets([meta["boxes"]], [meta["labels"]], model.feature_grid, 4)
        heat = targets.heatmap.clamp(1e-6, 1 - 1e-6)
        regression = torch.zeros_like(outputs.objects.regression).view(1, 10, -1)
        for m in range(int(targets.mask.sum())):
            regression[0, :, targets.index[0, m]] = targets.regression[0, m]
        outputs.objects = ObjectOutputs(torch.log(heat / (1 - heat)), regression.view_as(outputs.objects.regression))
        return outputs

    model.forward = oracle
    with torch_threads(1):
        result = evaluate(model, loader, "cpu", model.classes)
    detection = result["detection"]
    assert detection["classes"] and detection["mAP"] == pytest.approx(1.0, abs=1e-6)
    assert detection["tp_errors"]["ATE"] < 0.05 and detection["tp_errors"]["AOE"] < 0.05
    assert detection["tp_errors"]["ASE"] < 0.01 and detection["tp_errors"]["AVE"] < 0.05
    present = [name for name, row in detection["by_condition"].items() if row is not None]
    assert present and all(detection["by_condition"][n]["mAP"] == pytest.approx(1.0, abs=1e-6) for n in present)
    bands = [row for row in detection["by_range"].values() if row is not None]
    assert set(detection["by_range"]) == {"0-20", "20-35", "35-50"} and bands
    assert all(row["mAP"] == pytest.approx(1.0, abs=1e-6) for row in bands)
    # The diagnostic without the devkit's 10 % floors, from every top-K peak (no score threshold):
    # nearly 1 on the oracle. Not exactly: below the test's 0.5 threshold, where two boxes'
    # Gaussians overlap, a secondary peak can outscore a faint true box.
    assert detection["unclipped_from"] == "every top-K peak (score threshold 0)"
    assert 0.99 <= detection["mAP_unclipped"] <= 1.0
    assert all(row["AP_unclipped"] >= 0.98 for row in detection["per_class"].values())


@pytest.mark.parametrize("method", ["bridgeta", "direct", "feature_kd"])
def test_a_multi_task_pair_distils_the_object_heatmaps(engine_world, tmp_path, method):
    """BridgeTA, direct and feature KD on a two-head teacher/student: LLD and the CrossKD-style
    term (BridgeTA's through the teacher's and the TA's object heads, direct's through the
    teacher's), and BridgeTA's TA's own object loss, reach the object heads; feature KD,
    task-agnostic, imitates the fused BEV; the student's object loss is trained in every case."""
    from engine_helpers import distill_config, write_teacher

    teacher = write_teacher(tmp_path / "teacher.safetensors", engine_world, 2, "model.heads.object={head_channels: 8}")
    recipe = "distill/tiny-c-direct" if method == "direct" else "distill/tiny-c-bridgeta"
    config = distill_config(engine_world, teacher, "model.heads.object={head_channels: 8}", "train.max_steps=2",
                            "train.eval_every=0", f"distill.method={method}", recipe=recipe)
    with torch_threads(1):
        train(config, tmp_path / "run")
    row = [r for r in read_metrics(tmp_path / "run") if "loss" in r][-1]
    assert "object/heatmap" in row
    if method == "feature_kd":
        assert "kd/feature" in row and not any(k.startswith(("kd/lld", "ta_object/")) for k in row)
        return
    assert {"kd/lld_object", "kd/lld", "kd/lld_aux", "kd/lld_aux_object"} <= set(row)
    if method == "bridgeta":
        assert {"ta_object/heatmap", "lld_object/epsilon"} <= set(row)
    else:
        assert not any(k.startswith("ta_object/") for k in row)


def test_bridgeta_object_terms_route_gradients_like_the_map_terms(engine_world, tmp_path):
    """The CrossKD object term trains the student only: the teacher's object head is frozen and
    the TA's object head gets no gradient from it; the TA's own object loss trains its head."""
    from engine_helpers import distill_config, write_teacher

    from bridgeta.distill import build_distiller
    from bridgeta.engine.trainer import load_teacher
    from bridgeta.models.object_head import build_targets
    from bridgeta.models.targets import build_task_targets

    teacher_file = write_teacher(tmp_path / "teacher.safetensors", engine_world, 2, "model.heads.object={head_channels: 8}")
    config = distill_config(engine_world, teacher_file, "model.heads.object={head_channels: 8}")
    student = build_model(config)
    distiller = build_distiller(config, student, load_teacher(config)).train()
    dataset = BEVMapDataset.for_model(config.data, student, "train", modalities=("camera", "lidar"))
    inputs, labels, metas = collate_bev([dataset[0], dataset[1]])
    targets = build_task_targets(student, metas, "cpu")
    assert torch.equal(targets.objects.heatmap, build_targets(
        [m["objects"]["boxes"] for m in metas], [m["objects"]["labels"] for m in metas], student.feature_grid, 4).heatmap)
    out = distiller(inputs, labels, targets)
    ta_head = list(distiller.assistant.object_head.parameters())
    crosskd = torch.autograd.grad(out.losses["kd/lld_aux_object"], ta_head, allow_unused=True, retain_graph=True)
    assert all(g is None or g.abs().sum() == 0 for g in crosskd)
    heatmap_branch = list(distiller.assistant.object_head.heatmap.parameters())
    own = torch.autograd.grad(out.losses["ta_object/heatmap"], heatmap_branch, allow_unused=True, retain_graph=True)
    assert all(g is not None and g.abs().sum() > 0 for g in own)
    student_head = list(distiller.student.decoder.parameters())
    assert any(g is not None and g.abs().sum() > 0 for g in
               torch.autograd.grad(out.losses["kd/lld_aux_object"], student_head, allow_unused=True))
    assert all(not p.requires_grad for p in distiller.teacher.object_head.parameters())


def test_predict_writes_a_submission_that_eval_detections_scores(engine_world, tmp_path, capsys):
    import json

    from bridgeta import cli

    config = small_student_config(engine_world, "model.heads.object={head_channels: 8, score_threshold: 0.0, top_k: 20}",
                                  "train.max_steps=1", "train.eval_every=0")
    with torch_threads(1):
        train(config, tmp_path / "run")
        out = tmp_path / "results.json"
        assert cli.main(["predict", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--split", "test"]) == 0
        assert "boxes)" in capsys.readouterr().out
        submission = json.loads(out.read_text())
        assert submission["meta"]["use_camera"] is True and submission["meta"]["use_lidar"] is False
        assert submission["results"] and all(len(boxes) <= 20 for boxes in submission["results"].values())
        assert cli.main(["eval-detections", "--dataroot", str(engine_world), "--split", "test",
                         "--results", str(out), "--json"]) == 0
        scored = json.loads(capsys.readouterr().out)
        assert 0.0 <= scored["mAP"] <= 1.0 and 0.0 <= scored["NDS"] <= 1.0
        before = out.read_bytes()
        assert cli.main(["predict", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 2
        assert "--force" in capsys.readouterr().err and out.read_bytes() == before
    plain = tmp_path / "plain"
    with torch_threads(1):
        train(small_student_config(engine_world, "train.max_steps=1", "train.eval_every=0"), plain)
    assert cli.main(["predict", "--checkpoint", str(plain), "--out", str(tmp_path / "x.json")]) == 2
    assert "no object head" in capsys.readouterr().err


def test_box_corners_and_a_two_head_picture(engine_world, tmp_path):
    import numpy as np

    from bridgeta.engine.viz import box_corners, render_prediction

    corners = box_corners(np.array([[10.0, 2.0, 1.0, 4.0, 2.0, 2.0, np.pi / 2, 0.0, 0.0]]))[0]
    # Turned by 90 degrees: the 4 m length runs along ego Y, the 2 m width along X.
    assert np.allclose(corners[:, 0].min(), 9.0) and np.allclose(corners[:, 0].max(), 11.0)
    assert np.allclose(corners[:, 1].min(), 0.0) and np.allclose(corners[:, 1].max(), 4.0)
    assert np.allclose(sorted(set(np.round(corners[:, 2], 6))), [0.0, 2.0])
    config = small_student_config(engine_world, "model.heads.object={head_channels: 8}", "train.max_steps=1",
                                  "train.eval_every=0")
    with torch_threads(1):
        train(config, tmp_path / "run")
        png = render_prediction(tmp_path / "run", None, None, 0, tmp_path / "viz.png", split="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_boxes_are_drawn_where_the_camera_sees_them():
    """``viz`` projects each box corner through camera-to-ego and the intrinsics: a front camera
    (optical axis along ego X, 1 m up) sees a box 10 m ahead around its principal point, with
    each corner where the pinhole model puts it; a box behind the camera is not drawn."""
    import numpy as np

    from bridgeta.engine.viz import BOX_EDGES, _draw_boxes_in_camera, box_corners

    class Axes:
        def __init__(self):
            self.segments = []

        def plot(self, xs, ys, **kwargs):
            self.segments.append(tuple(zip(np.round(xs, 6), np.round(ys, 6))))

    ego_T_camera = np.eye(4)
    ego_T_camera[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]  # camera x = ego -y, y = ego -z, z = ego x
    ego_T_camera[2, 3] = 1.0
    camera = {"ego_T_camera": ego_T_camera.tolist(), "intrinsics": [[100, 0, 50], [0, 100, 40], [0, 0, 1]],
              "width": 100, "height": 80}
    ahead, behind = box_corners(np.array([[10.0, 0.0, 1.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0],
                                          [-10.0, 0.0, 1.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0]]))
    axes = Axes()
    _draw_boxes_in_camera(axes, np.stack([ahead, behind]), camera, "red")
    assert len(axes.segments) == len(BOX_EDGES)  # one box's 12 edges: the one behind is left out
    expected = {(round(50 - 100 * y / x, 6), round(40 - 100 * (z - 1.0) / x, 6)) for x, y, z in ahead}
    drawn = {point for segment in axes.segments for point in segment}
    assert drawn == expected
    assert (round(50 - 100 * 1 / 9, 6), round(40 + 100 / 9, 6)) in drawn  # the near, left, bottom corner


def test_a_two_head_model_exports_both_heads_to_onnx(engine_world, tmp_path):
    pytest.importorskip("onnxruntime")
    from bridgeta.engine.deploy import OnnxStudent, export_onnx
    from bridgeta.engine.model_file import save_model_file

    config = small_student_config(engine_world, "model.heads.object={head_channels: 8}")
    torch.manual_seed(0)
    model = build_model(config).eval()
    source = save_model_file(tmp_path / "mt.safetensors", model, config)
    with torch_threads(1):
        exported = export_onnx(source, tmp_path / "mt.onnx")
    assert exported.parity_max_abs < 1e-4  # every output: map logits, heatmap and regressions
    session = OnnxStudent(exported.path, threads=1)
    assert [o["name"] for o in session.metadata["outputs"]] == ["logits", "object_heatmap", "object_regression"]
    from bridgeta.engine.deploy import reference_arrays

    outputs = session.run_outputs(reference_arrays(session.specs))
    assert outputs["object_heatmap"].shape == (1, 4, *model.feature_grid.shape)
    assert outputs["object_regression"].shape == (1, 10, *model.feature_grid.shape)


def test_a_multi_task_run_resumes_from_a_checkpoint_to_the_same_weights(engine_world, tmp_path):
    """Resuming a camera model with an object head from its step-2 checkpoint (what a run killed
    after it leaves) gives the uninterrupted run's weights and losses: the object targets, the
    augmentation and the loader order are restored with it."""
    import shutil

    from bridgeta.engine.checkpoint import LATEST_FILE, CHECKPOINT_DIR

    config = small_student_config(engine_world, "model.heads.object={head_channels: 8}", "train.max_steps=4",
                                  "train.epochs=4", "train.checkpoint_every=2", "train.deterministic=true",
                                  "train.eval_every=0", "train.seed=3")
    with torch_threads(1):
        train(config, tmp_path / "reference")
        train(config, tmp_path / "killed")
    # What a run killed between step 2 and step 4 leaves: the step-2 checkpoint, no final model,
    # metrics lines past the checkpoint (dropped on resume).
    killed = tmp_path / "killed"
    checkpoints = killed / CHECKPOINT_DIR
    shutil.rmtree(checkpoints / "step-00000004")
    (checkpoints / LATEST_FILE).write_text("step-00000002\n")
    (killed / "model.safetensors").unlink()
    with torch_threads(1):
        resumed = train(config, killed, resume=True)
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 4
    ours = load_model_file(killed / "model.safetensors")[0].state_dict()
    theirs = load_model_file(tmp_path / "reference" / "model.safetensors")[0].state_dict()
    assert any(k.startswith("object_head.") for k in ours)
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    rows = [r for r in read_metrics(killed) if "loss" in r]
    reference_rows = [r for r in read_metrics(tmp_path / "reference") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["object/heatmap"] for r in rows] == [r["object/heatmap"] for r in reference_rows]
