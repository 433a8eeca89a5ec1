"""The deployed student as a function of plain tensors: what ``bridgeta export --format onnx`` traces.

A deployed camera model receives the images and the rig's geometry as arrays, not our
dataclasses, so :class:`DeployedStudent` wraps a camera-only :class:`BEVModel` with the signature

    (images, intrinsics, ego_T_camera, image_aug) -> logits

in the layouts of docs/conventions.md (a model with a planning head also reads ``ego_motion``,
the ego's velocity, and returns its heads' outputs after the logits). The geometry is an input, not a constant of the graph: one
exported file serves any rig with the trained camera count and image size, and the frustum points
that a given rig sends outside the BEV grid are masked inside the graph (``bev_pool`` routes them
to a discard row), so nothing about the point count is decided at export time.

:func:`input_specs` is the one description of the inputs (names, shapes, dtypes) that the wrapper,
the exporter, the onnxruntime runner and docs/deploy.md share; :func:`check_inputs` turns a wrong
shape into an error naming the input and the shape it should have.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bridgeta.models.bev_model import BEVModel
from bridgeta.models.types import BEVInputs, CameraInputs

INPUT_NAMES = ("images", "intrinsics", "ego_T_camera", "image_aug")  # every deployed camera model's
EGO_MOTION_INPUT = "ego_motion"  # and, after them, a planning model's ego status
DTYPE = "float32"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the deployed graph: its name, fixed shape, dtype and meaning."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    description: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "description": self.description}


def _require_camera_only(model: BEVModel) -> None:
    if model.camera_encoder is None or model.lidar_encoder is not None or "depth" in model.modalities:
        raise ValueError(
            f"only camera-only models deploy with camera inputs; this one reads {', '.join(model.modalities)}"
        )


def input_specs(model: BEVModel, batch_size: int = 1) -> tuple[TensorSpec, ...]:
    """The deployed inputs of ``model`` at ``batch_size`` (shapes are fixed: the trained rig size)."""
    _require_camera_only(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cams = model.camera_encoder.num_cameras
    height, width = model.camera_encoder.image_size
    specs = (
        TensorSpec("images", (batch_size, cams, 3, height, width), DTYPE,
                   "normalised images after image augmentation, cameras in rig order"),
        TensorSpec("intrinsics", (batch_size, cams, 3, 3), DTYPE,
                   "pinhole intrinsics of the original (un-augmented) images"),
        TensorSpec("ego_T_camera", (batch_size, cams, 4, 4), DTYPE, "camera frame -> ego frame"),
        TensorSpec("image_aug", (batch_size, cams, 3, 3), DTYPE,
                   "original pixels -> network-input pixels (resize, crop); identity if none"),
    )
    if model.planning_head is not None:
        specs += (TensorSpec(EGO_MOTION_INPUT, (batch_size, 3), DTYPE,
                             "the ego's velocity (vx, vy) m/s in the ego frame over the last 0.5 s, and 1; "
                             "zeros if unknown"),)
    return specs


def output_specs(model: BEVModel, batch_size: int = 1) -> tuple[TensorSpec, ...]:
    """The deployed outputs: the map logits on the output grid and, with an object head, its
    heatmap logits and box regressions on the decoded BEV's grid (decode them as
    ``bridgeta.models.object_head.decode`` does)."""
    size_x, size_y = model.output_grid.shape
    specs = [
        TensorSpec("logits", (batch_size, len(model.classes), size_x, size_y), DTYPE,
                   "map logits (B, K, X, Y) on the output grid; sigmoid for per-class probabilities"),
    ]
    if model.object_head is not None:
        grid_x, grid_y = model.feature_grid.shape
        specs += [
            TensorSpec("object_heatmap", (batch_size, len(model.object_classes), grid_x, grid_y), DTYPE,
                       "object centre heatmap logits (B, classes, X, Y) on the decoded BEV grid"),
            TensorSpec("object_regression", (batch_size, 10, grid_x, grid_y), DTYPE,
                       "per cell: sub-cell offset (2), height (1), log size (3), sin/cos yaw (2), velocity (2)"),
        ]
    if model.motion_head is not None:
        grid_x, grid_y = model.feature_grid.shape
        head = model.motion_head
        specs += [
            TensorSpec("motion_trajectories", (batch_size, head.modes * head.steps * 2, grid_x, grid_y), DTYPE,
                       f"per cell: {head.modes} modes x {head.steps} steps (2 Hz) x (dx, dy) m from the agent centred there"),
            TensorSpec("motion_mode_logits", (batch_size, head.modes, grid_x, grid_y), DTYPE,
                       "per cell: a logit per mode (softmax over modes)"),
        ]
    if model.occupancy_head is not None:
        grid_x, grid_y = model.feature_grid.shape
        specs.append(TensorSpec("occupancy", (batch_size, model.occupancy_head.steps, grid_x, grid_y), DTYPE,
                                "per cell and future step (2 Hz): the logit that an agent's box covers it"))
    if model.planning_head is not None:
        specs.append(TensorSpec("plan", (batch_size, 3, model.planning_head.steps, 2), DTYPE,
                                "ego (dx, dy) m per future step (2 Hz), one trajectory per command: left, straight, right"))
    return tuple(specs)


def input_names(specs: tuple[TensorSpec, ...]) -> tuple[str, ...]:
    """The deployed graph's input names, in its argument order."""
    return tuple(spec.name for spec in specs)


def output_names(model: BEVModel) -> tuple[str, ...]:
    """The deployed graph's output names, in order (``logits`` first)."""
    return tuple(spec.name for spec in output_specs(model))


def _dtype_name(dtype: Any) -> str:
    """``torch.float32`` and ``numpy.dtype('float32')`` both as ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def check_inputs(specs: tuple[TensorSpec, ...], inputs: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the input and its expected shape/dtype if ``inputs`` do not fit.

    ``inputs`` maps names to anything with ``.shape`` and ``.dtype`` (torch tensors, numpy arrays).
    """
    expected = {spec.name for spec in specs}
    missing, unknown = sorted(expected - set(inputs)), sorted(set(inputs) - expected)
    if missing or unknown:
        raise ValueError(
            f"deployed model inputs are {[s.name for s in specs]}; missing {missing}, unexpected {unknown}"
        )
    for spec in specs:
        value = inputs[spec.name]
        shape = tuple(int(v) for v in value.shape)
        if shape != spec.shape:
            raise ValueError(
                f"input '{spec.name}' must have shape {spec.shape} ({spec.description}), got {shape}"
            )
        if _dtype_name(value.dtype) != spec.dtype:
            raise ValueError(f"input '{spec.name}' must be {spec.dtype}, got {_dtype_name(value.dtype)}")


class DeployedStudent(nn.Module):
    """``(images, intrinsics, ego_T_camera, image_aug[, ego_motion]) -> logits[, heads]`` of a
    camera-only ``BEVModel`` (``ego_motion`` for a model with a planning head, which reads it).

    Shapes are checked against :func:`input_specs` on every call, so a wrong rig fails here (and
    at export, which calls this) with the input's name rather than deep inside a matmul.
    """

    def __init__(self, model: BEVModel, batch_size: int = 1) -> None:
        super().__init__()
        self.specs = input_specs(model, batch_size)
        self.model = model

    def forward(
        self,
        images: torch.Tensor,
        intrinsics: torch.Tensor,
        ego_T_camera: torch.Tensor,
        image_aug: torch.Tensor,
        ego_motion: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        given = dict(zip(INPUT_NAMES, (images, intrinsics, ego_T_camera, image_aug)))
        if ego_motion is not None:
            given[EGO_MOTION_INPUT] = ego_motion
        check_inputs(self.specs, given)
        camera = CameraInputs(images, intrinsics, ego_T_camera, image_aug)
        outputs = self.model(BEVInputs(batch_size=images.shape[0], camera=camera, ego_motion=ego_motion))
        if outputs.objects is None:
            return outputs.logits
        extra: tuple[torch.Tensor, ...] = ()  # in output_specs' order
        if outputs.motion is not None:
            extra += (outputs.motion.trajectories, outputs.motion.mode_logits)
        if outputs.occupancy is not None:
            extra += (outputs.occupancy,)
        if outputs.plan is not None:
            extra += (outputs.plan,)
        return (outputs.logits, outputs.objects.heatmap, outputs.objects.regression, *extra)
