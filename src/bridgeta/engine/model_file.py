"""Self-describing model files: weights in safetensors, the resolved config in its metadata.

A model file is enough to rebuild the model with no other file (``load_model_file``), and loading
never unpickles anything: safetensors holds only tensors, the config is YAML text parsed with
``yaml.safe_load`` and validated like any config file.

Two kinds of file:

* ``model``: a ``BEVModel``'s state dict, the deployable network (baselines, teachers, exports).
* ``distiller``: what a distillation run trains, i.e. the student under ``student.`` plus the
  training-only modules (BridgeTA's ``assistant.``); never the teacher, which the run reads
  from ``distill.teacher``. :func:`load_model_file` returns its student, so ``eval`` and ``viz``
  accept distillation runs as they are; :func:`export_student` writes the student alone as a
  ``model`` file.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from torch import nn

from bridgeta.config import ExperimentConfig, parse_config, to_dict, validate
from bridgeta.distill.base import Distiller
from bridgeta.files import atomic_path
from bridgeta.models.bev_model import BEVModel, build_model

CONFIG_KEY = "bridgeta_config"
KIND_KEY = "bridgeta_kind"


MODEL_KIND = "model"
DISTILLER_KIND = "distiller"
STUDENT_PREFIX = "student."


def save_model_file(path: str | Path, model: nn.Module, config: ExperimentConfig, kind: str | None = None) -> Path:
    """Write ``model``'s state dict and ``config`` atomically (temporary file, then rename).

    ``kind`` defaults to ``distiller`` for a :class:`~bridgeta.distill.Distiller` (whose state
    dict leaves the teacher out) and ``model`` otherwise.
    """
    if kind is None:
        kind = DISTILLER_KIND if isinstance(model, Distiller) else MODEL_KIND
    if kind not in (MODEL_KIND, DISTILLER_KIND):
        raise ValueError(f"unknown model file kind '{kind}'")
    path = Path(path)
    # safetensors refuses shared storage; contiguous clones are cheap next to the disk write.
    state = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    metadata = {CONFIG_KEY: yaml.safe_dump(to_dict(config), sort_keys=False), KIND_KEY: kind}
    with atomic_path(path) as temporary:  # no .tmp left when the write fails (full disk, a folder)
        save_file(state, str(temporary), metadata=metadata)
    return path


def read_model_file(path: str | Path) -> tuple[ExperimentConfig, dict[str, torch.Tensor], str]:
    """(config, state dict, kind) of a model file; errors name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{path}: no '{CONFIG_KEY}' metadata: not a bridgeta model file")
    config = parse_config(yaml.safe_load(metadata[CONFIG_KEY]), f"{path} (embedded config)")
    validate(config, str(path))
    kind = metadata.get(KIND_KEY, MODEL_KIND)
    if kind not in (MODEL_KIND, DISTILLER_KIND):
        raise ValueError(f"{path}: unknown model file kind '{kind}'")
    return config, state, kind


def without_pretrained(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` with no ``model.camera.backbone.pretrained`` file, for rebuilding a saved model.

    A model file's weights replace the pretrained ones anyway, and the file must rebuild the model
    alone: the pretrained checkpoint it started from may be gone. The embedded config keeps the
    path, as a record of where the backbone started.
    """
    camera = config.model.camera
    if camera is None or not camera.backbone.pretrained:
        return config
    backbone = replace(camera.backbone, pretrained=None)
    return replace(config, model=replace(config.model, camera=replace(camera, backbone=backbone)))


def student_state(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The deployable network's weights: the state itself, or a distiller's ``student.*`` part."""
    if kind == MODEL_KIND:
        return state
    return {key[len(STUDENT_PREFIX):]: value for key, value in state.items() if key.startswith(STUDENT_PREFIX)}


def load_model_file(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[BEVModel, ExperimentConfig]:
    """Rebuild the model a file describes and load its weights (strict: every key must match).

    For a ``distiller`` file this is the student: the network the run deploys.
    """
    config, state, kind = read_model_file(path)
    return build_from_state(config, state, kind, path).to(map_location), config


def build_from_state(
    config: ExperimentConfig, state: dict[str, torch.Tensor], kind: str, path: str | Path
) -> BEVModel:
    """The deployable network of a file :func:`read_model_file` has read (``path`` names it in
    errors), so a caller that also needs the file's other tensors reads it only once."""
    state = student_state(state, kind)
    model = build_model(without_pretrained(config))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit the embedded config "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    return model


def deployable_config(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` less what never runs at inference: MonoTAKD's residual branch without FFM (the
    ``ffm: false`` ablation), which only CMRD reads in training."""
    residual = config.model.residual
    if residual is None or residual.ffm:
        return config
    return replace(config, model=replace(config.model, residual=None))


def load_deployable(source: str | Path) -> tuple[BEVModel, ExperimentConfig]:
    """The deployable network of ``source`` (any model file), in eval mode.

    A distiller file loses its ``student.`` prefix and every training-only tensor (teacher
    assistant); the result has exactly the keys and shapes of the baseline model its config
    describes, which is checked here, before any export writes a file. A residual branch that
    nothing reads at inference (:func:`deployable_config`) is left out with its config key, so
    the exported file, its ONNX graph and its cost are those of the network that runs.
    """
    model, config = load_model_file(source)
    deployed = deployable_config(config)
    if deployed is not config:
        slim = build_model(without_pretrained(deployed))
        # Strict: everything but the unused branch must carry over.
        slim.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("residual_branch.")})
        model, config = slim, deployed
    expected = build_model(without_pretrained(config)).state_dict()
    exported = model.state_dict()
    if list(exported) != list(expected) or any(exported[k].shape != expected[k].shape for k in expected):
        raise AssertionError(f"{source}: exported keys do not match the baseline architecture")
    return model.eval(), config


def export_student(source: str | Path, out: str | Path) -> tuple[Path, BEVModel]:
    """Write the deployable network of ``source`` (:func:`load_deployable`) as a ``model`` file."""
    model, config = load_deployable(source)
    return save_model_file(out, model, config, kind=MODEL_KIND), model
