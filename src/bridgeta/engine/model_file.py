"""Self-describing model files: weights in safetensors, the resolved config in its metadata.

A model file is enough to rebuild the model with no other file (``load_model_file``), and loading
never unpickles anything: safetensors holds only tensors, the config is YAML text parsed with
``yaml.safe_load`` and validated like any config file.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from bridgeta.config import ExperimentConfig, parse_config, to_dict, validate
from bridgeta.models.bev_model import BEVModel, build_model

CONFIG_KEY = "bridgeta_config"
KIND_KEY = "bridgeta_kind"


def save_model_file(path: str | Path, model: BEVModel, config: ExperimentConfig, kind: str = "model") -> Path:
    """Write ``model``'s state dict and ``config`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage; contiguous clones are cheap next to the disk write.
    state = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    metadata = {CONFIG_KEY: yaml.safe_dump(to_dict(config), sort_keys=False), KIND_KEY: kind}
    temporary = path.with_name(path.name + ".tmp")
    save_file(state, str(temporary), metadata=metadata)
    temporary.replace(path)
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
    return config, state, metadata.get(KIND_KEY, "model")


def load_model_file(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[BEVModel, ExperimentConfig]:
    """Rebuild the model a file describes and load its weights (strict: every key must match)."""
    config, state, _ = read_model_file(path)
    model = build_model(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit the embedded config "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    return model.to(map_location), config
