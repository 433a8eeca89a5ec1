"""ONNX export of the deployable student and an onnxruntime runner for it (docs/deploy.md).

``export_onnx`` traces :class:`~bridgeta.models.deploy.DeployedStudent` (images and camera
geometry in, map logits out) with PyTorch's TorchScript-based exporter at opset 17. Why that
exporter: on torch 2.13 it and the ``torch.export``-based one (``dynamo=True``) give the same
graph for these models and the same parity, but the latter needs ``onnxscript`` on top and takes
about six times longer (7 s against 1 s for ``tiny-c``), which the parity test pays on every CI
run; every torch >= 2.4 that users may install has the TorchScript exporter.

Nothing in the graph is custom: ``bev_pool`` is one ``ScatterND`` with ``reduction="add"``
(opset >= 16) of feature rows into a buffer with one discard row past the grid, to which the
frustum points a rig sends outside the grid are routed, so the number of kept points is decided by
the inputs at run time; the camera matrices are inverted in closed form
(:func:`~bridgeta.geometry.invert_3x3`).

The file carries its own description in ONNX ``metadata_props`` (``bridgeta_*`` keys, JSON
values): classes, grids, image size, camera count, the input and output specs, the bridgeta
version, the hash of the resolved config and the config itself.

onnx and onnxruntime come with the ``deploy`` extra and are imported only here, when used.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

import bridgeta
from bridgeta.config import ExperimentConfig, to_dict
from bridgeta.engine.checkpoint import config_hash
from bridgeta.engine.model_file import load_deployable
from bridgeta.geometry import BEVGrid
from bridgeta.models.bev_model import BEVModel
from bridgeta.models.deploy import (
    EGO_MOTION_INPUT,
    INPUT_NAMES,
    DeployedStudent,
    TensorSpec,
    check_inputs,
    input_names,
    input_specs,
    output_names,
    output_specs,
)
from bridgeta.rig import reference_camera_inputs

ONNX_OPSET = 17
METADATA_PREFIX = "bridgeta_"


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is not installed: ONNX export and inference need the deploy extra "
            "(pip install -e '.[deploy]')"
        ) from exc


def _grid_dict(grid: BEVGrid) -> dict[str, list[float]]:
    return {f.name: list(getattr(grid, f.name)) for f in fields(grid)}


def onnx_metadata(model: BEVModel, config: ExperimentConfig, batch_size: int) -> dict[str, str]:
    """The ``metadata_props`` of an exported file: what a deployment needs to know about it."""
    values: dict[str, Any] = {
        "version": bridgeta.__version__,
        "config_hash": config_hash(config),
        "classes": list(model.classes),
        "grid": _grid_dict(model.camera_encoder.vtransform.grid),
        "output_grid": _grid_dict(model.output_grid),
        "image_size": list(model.camera_encoder.image_size),
        "num_cameras": model.camera_encoder.num_cameras,
        "batch_size": batch_size,
        "inputs": [spec.as_dict() for spec in input_specs(model, batch_size)],
        "outputs": [spec.as_dict() for spec in output_specs(model, batch_size)],
    }
    metadata = {METADATA_PREFIX + key: json.dumps(value) for key, value in values.items()}
    # The resolved config as YAML (as in model files), so the file names its own architecture.
    metadata[METADATA_PREFIX + "config"] = yaml.safe_dump(to_dict(config), sort_keys=False)
    return metadata


def reference_arrays(specs: tuple[TensorSpec, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of the nuScenes reference rig at the specs' size (random images), keyed by name."""
    batch, cams, _, height, width = specs[0].shape
    camera = reference_camera_inputs(batch, (height, width), cams, seed=seed)
    arrays = {name: getattr(camera, name) for name in INPUT_NAMES}
    if EGO_MOTION_INPUT in input_names(specs):  # driving straight ahead at 5 m/s
        arrays[EGO_MOTION_INPUT] = torch.tensor([[5.0, 0.0, 1.0]]).expand(batch, 3).contiguous()
    return arrays


@dataclass
class OnnxExport:
    path: Path
    model: BEVModel
    config: ExperimentConfig
    parity_max_abs: float | None  # onnxruntime vs PyTorch on the reference rig; None if not run


def export_onnx(source: str | Path, out: str | Path, batch_size: int = 1, verify: bool = True) -> OnnxExport:
    """Write the deployable student of ``source`` (any model file) as an ONNX graph at ``out``.

    Written atomically (temporary file, then rename) after ``onnx.checker`` accepts it. With
    ``verify``, onnxruntime runs the file once on the reference rig, on one thread, and the
    largest absolute difference of any output to the PyTorch model's is returned (the parity
    tests bound it).
    """
    onnx = _require("onnx")
    model, config = load_deployable(source)
    wrapper = DeployedStudent(model, batch_size).eval()  # not a camera-only model: clear error here
    arrays = reference_arrays(wrapper.specs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The tracer warns about every Python shape check it meets (ours and the model's): all
            # shapes are fixed in the exported graph, so those checks are constant there by design.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # torch >= 2.9 calls the TorchScript exporter "legacy"; it is our choice (module docstring).
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
            # torch < 2.5 has no ``dynamo`` argument and always uses the TorchScript exporter.
            choice = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
            torch.onnx.export(
                wrapper,
                tuple(arrays[name] for name in input_names(wrapper.specs)),
                str(temporary),
                **choice,
                opset_version=ONNX_OPSET,
                input_names=list(input_names(wrapper.specs)),
                output_names=list(output_names(model)),
                do_constant_folding=True,
            )
        graph = onnx.load(str(temporary))
        onnx.helper.set_model_props(graph, onnx_metadata(model, config, batch_size))
        onnx.checker.check_model(graph, full_check=True)
        onnx.save(graph, str(temporary))
        parity = None
        if verify:
            with torch.no_grad():
                expected = wrapper(*(arrays[name] for name in input_names(wrapper.specs)))
            expected = expected if isinstance(expected, tuple) else (expected,)
            # One thread, as the PyTorch side sums: onnxruntime's threads split its reductions
            # (bev_pool's scatter-add, the convolutions) in another order, whose float32
            # rounding moved the figure up to 1e-4 from run to run on 2 cores: not a graph error.
            got = OnnxStudent(temporary, threads=1).run_outputs(arrays)
            parity = max(max_abs_difference(got[name], value) for name, value in zip(output_names(model), expected))
        temporary.replace(out)
    finally:
        temporary.unlink(missing_ok=True)
    return OnnxExport(path=out, model=model, config=config, parity_max_abs=parity)


def max_abs_difference(a: Any, b: Any) -> float:
    """Largest absolute difference of two arrays or tensors (numpy or torch), in float64."""
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


@dataclass
class DeployedOutputs:
    """What :class:`OnnxStudent` returns to code written for ``BEVModel`` outputs (``.logits``)."""

    logits: torch.Tensor


class OnnxStudent(nn.Module):
    """An exported file run by onnxruntime, usable where a ``BEVModel`` is evaluated.

    ``run`` takes numpy arrays (or tensors) by input name and checks them against the specs the
    file declares, so a wrong image size, camera count or matrix shape names the input and the
    expected shape; ``forward`` takes :class:`~bridgeta.models.types.BEVInputs` like a
    ``BEVModel`` and exposes ``classes`` and ``output_grid``, so ``evaluate`` runs it unchanged.
    The module has no parameters: its state is the onnxruntime session.
    """

    def __init__(self, path: str | Path, threads: int | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        super().__init__()
        ort = _require("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {path}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own error types for unreadable files
            raise ValueError(f"{path}: onnxruntime cannot load it ({exc})") from exc
        raw = self.session.get_modelmeta().custom_metadata_map
        if METADATA_PREFIX + "inputs" not in raw:
            raise ValueError(f"{path}: no bridgeta metadata: not written by `bridgeta export --format onnx`")
        self.metadata = {
            key[len(METADATA_PREFIX):]: value if key == METADATA_PREFIX + "config" else json.loads(value)
            for key, value in raw.items()
            if key.startswith(METADATA_PREFIX)
        }
        self.specs = tuple(
            TensorSpec(d["name"], tuple(d["shape"]), d["dtype"], d["description"]) for d in self.metadata["inputs"]
        )
        self.classes = tuple(self.metadata["classes"])
        self.output_grid = BEVGrid(**{k: tuple(v) for k, v in self.metadata["output_grid"].items()})
        self.path = path

    def run(self, inputs: Mapping[str, Any]) -> Any:
        """Logits ``(B, K, X, Y)`` as a numpy array for inputs keyed by name."""
        return self.run_outputs(inputs)["logits"]

    def run_outputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Every output of the file by name (``logits``; ``object_heatmap`` and
        ``object_regression`` with an object head; ``motion_trajectories``, ``motion_mode_logits``
        and ``plan`` with TinyBEV's heads), as numpy arrays."""
        arrays = {name: value.numpy() if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}
        check_inputs(self.specs, arrays)
        names = [output.name for output in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, arrays)))

    def forward(self, inputs) -> DeployedOutputs:
        camera = inputs.camera
        if camera is None:
            raise ValueError("the deployed model reads cameras; the batch has none")
        if inputs.bev_aug is not None:
            identity = torch.eye(4, device=inputs.bev_aug.device).expand_as(inputs.bev_aug)
            if not torch.allclose(inputs.bev_aug.float(), identity):
                raise ValueError("the deployed model has no bev_aug input: evaluate without BEV augmentation")
        arrays = {name: getattr(camera, name).detach().cpu() for name in INPUT_NAMES}
        if EGO_MOTION_INPUT in input_names(self.specs):
            motion = inputs.ego_motion if inputs.ego_motion is not None else torch.zeros(inputs.batch_size, 3)
            arrays[EGO_MOTION_INPUT] = motion.detach().float().cpu()
        logits = self.run(arrays)
        return DeployedOutputs(logits=torch.from_numpy(logits).to(camera.images.device))
