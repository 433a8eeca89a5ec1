"""ONNX export of the student: onnxruntime parity, rig geometry as inputs, metadata, input errors.

A narrow ``tiny-c`` (``engine_helpers.SMALL_TINY_C``: 6 x 32x88 images, a 1.6 m grid) exported once
per module; an export takes about a second. The mIoU parity on a synthetic world, through the CLI
on a distilled run, is in test_engine_distill.py.
"""

from __future__ import annotations

import math
import warnings

import onnx
import pytest
import torch

from engine_helpers import SMALL_TINY_C, torch_threads

from bridgeta import __version__
from bridgeta.config import load_config
from bridgeta.engine.checkpoint import config_hash
from bridgeta.engine.deploy import ONNX_OPSET, OnnxStudent, export_onnx, reference_arrays
from bridgeta.engine.model_file import save_model_file
from bridgeta.geometry import make_transform, rotation_z
from bridgeta.models.bev_model import build_model
from bridgeta.models.bev_pool import bev_pool, compute_pool_plan
from bridgeta.models.deploy import INPUT_NAMES, DeployedStudent, input_specs
from bridgeta.models.lss import frustum_to_ego

PARITY = 1e-4  # max abs logit difference, fp32 (issue 16)


def _student_file(path, seed=0):
    """A seeded narrow tiny-c with non-trivial BatchNorm statistics, saved as a model file."""
    config = load_config("tiny-c", SMALL_TINY_C)
    torch.manual_seed(seed)
    model = build_model(config)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return save_model_file(path, model, config), config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    source, config = _student_file(root / "student.safetensors")
    with torch_threads(1):
        result = export_onnx(source, root / "student.onnx", batch_size=2)
    return result, OnnxStudent(result.path, threads=1)


def _moved(arrays, sample, yaw, shift):
    """The reference rig of one sample turned by ``yaw`` and moved by ``shift`` (m) in the ego frame."""
    moved = {name: value.clone() for name, value in arrays.items()}
    move = make_transform(rotation_z(yaw)[:3, :3], shift)
    moved["ego_T_camera"][sample] = move @ moved["ego_T_camera"][sample]
    return moved


def _kept_points(model, arrays):
    vtransform = model.camera_encoder.vtransform
    points = frustum_to_ego(vtransform.frustum, arrays["intrinsics"], arrays["ego_T_camera"], arrays["image_aug"])
    batch = points.shape[0]
    plan = compute_pool_plan(
        vtransform.grid.point_to_cell(points), torch.arange(batch).view(batch, 1, 1, 1, 1), vtransform.grid, batch
    )
    return int(plan.kept.sum())


def test_onnxruntime_equals_pytorch_for_rigs_the_file_was_not_traced_with(exported):
    """The geometry is an input: moving cameras changes which frustum points fall in the grid (masked
    in the graph, not dropped at export), and onnxruntime still matches PyTorch."""
    result, session = exported
    assert result.parity_max_abs is not None and result.parity_max_abs < PARITY
    wrapper = DeployedStudent(result.model, batch_size=2).eval()
    reference = reference_arrays(wrapper.specs)
    reference["images"] = torch.randn_like(reference["images"])
    rigs = {
        "reference": reference,
        "turned and shifted 30 m": _moved(reference, 1, math.pi / 5, [30.0, -12.0, 0.5]),
        "one sample's rig 1 km away": _moved(reference, 0, 0.0, [1000.0, 0.0, 0.0]),
    }
    kept = {name: _kept_points(result.model, arrays) for name, arrays in rigs.items()}
    assert len(set(kept.values())) == 3, kept
    for name, arrays in rigs.items():
        with torch.no_grad(), torch_threads(1):
            expected = wrapper(*(arrays[n] for n in INPUT_NAMES))
        actual = torch.from_numpy(session.run(arrays))
        assert actual.shape == expected.shape
        assert (actual - expected).abs().max().item() < PARITY, name
    # A sample whose cameras see nothing of the grid: every frustum point is masked, so its
    # images do not matter; the other sample's do.
    far = rigs["one sample's rig 1 km away"]
    logits = torch.from_numpy(session.run(far))
    other_images = {**far, "images": torch.randn_like(far["images"])}
    changed = torch.from_numpy(session.run(other_images))
    assert torch.equal(changed[0], logits[0]) and not torch.allclose(changed[1], logits[1])


def test_graph_is_standard_onnx_with_metadata(exported):
    result, session = exported
    graph = onnx.load(str(result.path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= ONNX_OPSET >= 17
    assert {o.domain for o in graph.opset_import} <= {"", "ai.onnx"}  # no custom operators
    scatters = [n for n in graph.graph.node if n.op_type.startswith("Scatter")]
    assert [n.op_type for n in scatters] == ["ScatterND"]  # bev_pool, by rows (not ScatterElements)
    assert {a.name: a.s for a in scatters[0].attribute}["reduction"] == b"add"
    assert [i.name for i in graph.graph.input] == list(INPUT_NAMES)
    assert [o.name for o in graph.graph.output] == ["logits"]

    meta = session.metadata
    config = result.config
    assert meta["version"] == __version__
    assert meta["config_hash"] == config_hash(config)
    assert meta["classes"] == list(config.model.heads.map.classes) == list(session.classes)
    assert meta["image_size"] == [32, 88] and meta["num_cameras"] == 6 and meta["batch_size"] == 2
    assert meta["grid"]["x"] == [-51.2, 51.2, 1.6] and session.output_grid.shape == (50, 50)
    assert [spec["shape"] for spec in meta["inputs"]] == [[2, 6, 3, 32, 88], [2, 6, 3, 3], [2, 6, 4, 4], [2, 6, 3, 3]]
    assert meta["outputs"][0]["shape"] == [2, 6, 50, 50]
    assert "tiny-c" in meta["config"]


@pytest.mark.parametrize(
    "name, shape, message",
    [
        ("images", (2, 6, 3, 64, 176), r"'images' must have shape \(2, 6, 3, 32, 88\)"),
        ("images", (2, 5, 3, 32, 88), r"'images' must have shape \(2, 6, 3, 32, 88\)"),
        ("intrinsics", (2, 6, 4, 4), r"'intrinsics' must have shape \(2, 6, 3, 3\)"),
        ("ego_T_camera", (2, 6, 3, 4), r"'ego_T_camera' must have shape \(2, 6, 4, 4\)"),
        ("image_aug", (2, 6, 2, 3), r"'image_aug' must have shape \(2, 6, 3, 3\)"),
    ],
)
def test_wrong_inputs_name_the_input_and_expected_shape(exported, name, shape, message):
    result, session = exported
    arrays = reference_arrays(session.specs)
    arrays[name] = torch.zeros(shape)
    with pytest.raises(ValueError, match=message):  # at load/run time, on the exported file
        session.run(arrays)
    with pytest.raises(ValueError, match=message):  # in PyTorch, which is what export traces
        DeployedStudent(result.model, batch_size=2)(*(arrays[n] for n in INPUT_NAMES))


def test_wrong_dtype_and_missing_inputs(exported):
    _, session = exported
    arrays = reference_arrays(session.specs)
    with pytest.raises(ValueError, match="'intrinsics' must be float32, got float64"):
        session.run({**arrays, "intrinsics": arrays["intrinsics"].double()})
    with pytest.raises(ValueError, match=r"missing \['image_aug'\]"):
        session.run({k: v for k, v in arrays.items() if k != "image_aug"})


def test_export_refuses_models_with_lidar_and_files_without_metadata(tmp_path):
    config = load_config("tiny-l")
    with pytest.raises(ValueError, match="only camera-only models deploy"):
        input_specs(build_model(config))
    source = save_model_file(tmp_path / "lidar.safetensors", build_model(config), config)
    with pytest.raises(ValueError, match="only camera-only models deploy"):
        export_onnx(source, tmp_path / "lidar.onnx")
    assert not (tmp_path / "lidar.onnx").exists() and not list(tmp_path.glob("*.tmp"))

    plain = tmp_path / "plain.onnx"
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = lambda n: onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1])  # noqa: E731
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], "g", [value("x")], [value("y")])), str(plain))
    with pytest.raises(ValueError, match="no bridgeta metadata"):
        OnnxStudent(plain)


def test_docs_inference_script_runs_without_bridgeta(tmp_path):
    """docs/deploy.md's onnxruntime script runs on an exported file and never imports bridgeta."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text()
    scripts = [block for block in re.findall(r"```python\n(.*?)```", page, re.DOTALL) if "onnxruntime" in block]
    assert len(scripts) == 1
    assert "bridgeta" not in re.sub(r"['\"].*?['\"]|#.*", "", scripts[0])  # only in strings/comments
    script = tmp_path / "run_student.py"
    script.write_text(scripts[0])
    source, config = _student_file(tmp_path / "student.safetensors")
    with torch_threads(1):
        path = export_onnx(source, tmp_path / "student.onnx", verify=False).path
    done = subprocess.run([sys.executable, "-I", str(script), str(path)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(config.model.heads.map.classes)


class _Pool(torch.nn.Module):
    def __init__(self, grid, batch_size):
        super().__init__()
        self.grid, self.batch_size = grid, batch_size

    def forward(self, points, features):
        batch = self.batch_size
        index = torch.arange(batch).view(batch, 1)
        plan = compute_pool_plan(self.grid.point_to_cell(points), index, self.grid, batch)
        return bev_pool(features, plan)


def test_exported_bev_pool_sums_duplicates_and_masks_out_of_grid_points(tmp_path):
    """bev_pool's ONNX form (ScatterND, add) against PyTorch's: many points per cell, many outside."""
    import onnxruntime

    from bridgeta.geometry import BEVGrid

    grid = BEVGrid((-4.0, 4.0, 1.0), (-3.0, 3.0, 1.0), (-1.0, 1.0, 1.0))
    generator = torch.Generator().manual_seed(0)
    points = (torch.rand(2, 3000, 3, generator=generator) * 2 - 1) * torch.tensor([6.0, 5.0, 1.5])
    features = torch.randn(6000, 5, generator=generator)
    module = _Pool(grid, 2)
    path = tmp_path / "pool.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = module(points, features)
        torch.onnx.export(module, (points, features), str(path), dynamo=False, opset_version=ONNX_OPSET)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    kept_elsewhere = (points * 0.5, features)  # other geometry: another set of kept points
    for arrays in ((points, features), kept_elsewhere):
        with torch.no_grad():
            reference = module(*arrays)
        actual = session.run(None, dict(zip(names, (a.numpy() for a in arrays))))[0]
        assert (torch.from_numpy(actual) - reference).abs().max().item() < 1e-5
    assert expected.shape == (2, 2 * 5, 8, 6)


def test_a_camera_aware_depth_net_exports_with_parity(tmp_path):
    """BEVDepth's depth net (camera-parameter MLPs, BatchNorm1d, ASPP, the grid_sample deformable
    conv) is in the deployed graph; onnxruntime matches PyTorch on the reference rig and on one
    with other focal lengths, which changes the output."""
    config = load_config("tiny-c", [*SMALL_TINY_C, "model.camera.vtransform.depth_net={type: camera_aware, mid_channels: 8, blocks: 1}"])
    torch.manual_seed(0)
    model = build_model(config)
    depth_net = model.camera_encoder.vtransform.depthnet
    depth_net.bn.running_mean.copy_(torch.randn(27))
    depth_net.bn.running_var.uniform_(0.5, 2.0)
    source = save_model_file(tmp_path / "aware.safetensors", model, config)
    with torch_threads(1):
        result = export_onnx(source, tmp_path / "aware.onnx", batch_size=1)
    assert result.parity_max_abs is not None and result.parity_max_abs < PARITY
    session = OnnxStudent(result.path, threads=1)
    wrapper = DeployedStudent(result.model, batch_size=1).eval()
    reference = reference_arrays(wrapper.specs)
    reference["images"] = torch.randn_like(reference["images"])
    refocused = {**reference, "intrinsics": reference["intrinsics"].clone()}
    refocused["intrinsics"][..., 0, 0] *= 1.1
    outputs = []
    for arrays in (reference, refocused):
        with torch.no_grad(), torch_threads(1):
            expected = wrapper(*(arrays[n] for n in INPUT_NAMES))
        actual = torch.from_numpy(session.run(arrays))
        assert (actual - expected).abs().max().item() < PARITY
        outputs.append(actual)
    assert not torch.allclose(outputs[0], outputs[1])
