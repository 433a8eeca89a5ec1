"""Training checkpoints: everything a run needs to continue exactly, and nothing that unpickles.

Layout of one checkpoint (``out_dir/checkpoints/step-00001200/``)::

    model.safetensors      weights + buffers, a self-describing model file (``save_model_file``)
    optimizer.safetensors  every optimiser state tensor, key ``state.<param index>.<name>``
    rng.safetensors        torch RNG states as uint8 tensors: ``rank<r>.torch_cpu``, ``rank<r>.cuda``
    state.json             step, epoch and batch position, optimiser param groups and non-tensor
                           per-parameter state, scheduler and GradScaler state, python/numpy RNG
                           states per rank, config hash

``out_dir/checkpoints/latest`` is a text file naming the newest complete checkpoint directory.

A checkpoint is written into ``.tmp-step-XXXXXXXX`` and renamed into place, then ``latest`` is
replaced through a renamed temporary file, so a run killed at any moment leaves ``latest`` naming
a complete checkpoint. Only the newest ``keep`` checkpoints are kept.

Loading reads safetensors and JSON only; ``torch.load`` is never called. Tensors keep their
dtype and bits, and JSON floats round-trip exactly (``repr``), which is what makes a resumed run
bitwise identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from bridgeta.config import ExperimentConfig, to_dict
from bridgeta.engine.distributed import DistributedContext, all_gather_bytes
from bridgeta.engine.model_file import read_model_file, save_model_file
from bridgeta.files import atomic_write_text
from bridgeta.provenance import write_json

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
KEEP_CHECKPOINTS = 3
FORMAT_VERSION = 1
_PREFIX = "step-"
_TEMPORARY_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    """Zero-padded, so names sort in step order."""
    return f"{_PREFIX}{step:08d}"


def _without_absent(value: Any) -> Any:
    """The config dict without its absent (``None``) keys, at every depth."""
    if isinstance(value, dict):
        return {k: _without_absent(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_absent(v) for v in value]
    return value


def config_hash(config: ExperimentConfig) -> str:
    """Short digest of the resolved config; a resume with a different one is reported. Absent
    optional keys are left out, so a version that adds an optional section (a new head, a new
    method's settings) still recognises the configs of runs it did not change."""
    text = json.dumps(_without_absent(to_dict(config)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's python, numpy and torch (CPU, and ``device``'s CUDA) generator states."""
    version, keys, gauss = random.getstate()
    name, mt_keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(keys), gauss],
        "numpy": [name, mt_keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, mt_keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(mt_keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch_cpu"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _encode_rng(state: dict[str, Any]) -> bytes:
    tensors = {k: state[k] for k in ("torch_cpu", "cuda")}
    payload = {k: v for k, v in state.items() if k not in tensors}
    for key, tensor in tensors.items():
        payload[key] = None if tensor is None else base64.b64encode(tensor.numpy().tobytes()).decode()
    return json.dumps(payload).encode()


def _decode_rng(data: bytes) -> dict[str, Any]:
    state = json.loads(data)
    for key in ("torch_cpu", "cuda"):
        if state[key] is not None:
            raw = bytearray(base64.b64decode(state[key]))
            state[key] = torch.frombuffer(raw, dtype=torch.uint8).clone()
    return state


def gather_rng_states(ctx: DistributedContext) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective: all ranks must call it).

    Each rank draws from its own streams (seeded ``seed + rank``), so a resumed multi-process
    run needs all of them; rank 0 writes them into the one checkpoint.
    """
    local = capture_rng_state(ctx.device)
    if not ctx.distributed:
        return [local]
    return [_decode_rng(data) for data in all_gather_bytes(_encode_rng(local), ctx)]


# ----------------------------------------------------------------------------------------------
# Save


def _fsync_tree(directory: Path) -> None:
    """Flush the files, then the directory entry, so a power loss cannot leave a torn checkpoint."""
    for path in directory.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def checkpoint_bytes(model: nn.Module, optimizer: Optimizer) -> int:
    """About what one checkpoint of ``model`` takes on disk: its state plus the optimiser's tensors.

    Adam-type optimisers hold two tensors the size of each trainable parameter; they exist only
    after the first step, so they are counted from the parameters, not from the optimiser state.
    """
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(
        p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"]
    )
    return state + 2 * trainable + (1 << 20)  # RNG states, JSON


def _prune(root: Path, keep: int, latest: str) -> None:
    """Delete all but the newest ``keep`` checkpoints (never the one ``latest`` names)."""
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))
    for path in steps[:-keep]:
        if path.name != latest:
            shutil.rmtree(path)


def save_checkpoint(
    out_dir: Path,
    step: int,
    epoch: int,
    model: nn.Module,
    config: ExperimentConfig,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    scaler: torch.amp.GradScaler,
    rng_state: list[dict[str, Any]],
    data_state: dict[str, Any],
    keep: int = KEEP_CHECKPOINTS,
) -> Path:
    """Write ``out_dir/checkpoints/step-<step>/`` atomically, point ``latest`` at it, prune.

    ``model`` is the bare model (not a DDP wrapper). ``epoch`` and ``data_state["batch"]`` are the
    position to continue from: the epoch in progress and the micro-batches of it already used.
    ``rng_state`` is :func:`gather_rng_states`'s list, one entry per rank.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(out_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    for stale in root.glob(f"{_TEMPORARY_PREFIX}*"):  # left by a run killed while saving
        shutil.rmtree(stale)
    temporary = root / f"{_TEMPORARY_PREFIX}{name}"
    temporary.mkdir()
    try:
        _write_checkpoint(temporary, step, epoch, model, config, optimizer, scheduler, scaler, rng_state, data_state)
    except BaseException as exc:  # a full disk, an interrupt: no half checkpoint stays behind
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, f"writing checkpoint {root / name}: {exc.strerror or exc}") from exc
        raise

    final = root / name
    if final.exists():  # the same step saved again by a resumed run: replace it
        shutil.rmtree(final)
    temporary.rename(final)
    atomic_write_text(root / LATEST_FILE, name + "\n")
    _prune(root, keep, name)
    return final


def _write_checkpoint(
    temporary: Path,
    step: int,
    epoch: int,
    model: nn.Module,
    config: ExperimentConfig,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    scaler: torch.amp.GradScaler,
    rng_state: list[dict[str, Any]],
    data_state: dict[str, Any],
) -> None:
    save_model_file(temporary / "model.safetensors", model, config)

    optimizer_state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    save_file(tensors, str(temporary / "optimizer.safetensors"))

    rng_tensors = {}
    for rank, state in enumerate(rng_state):
        rng_tensors[f"rank{rank}.torch_cpu"] = state["torch_cpu"].cpu()
        if state["cuda"] is not None:
            rng_tensors[f"rank{rank}.cuda"] = state["cuda"].cpu()
    save_file(rng_tensors, str(temporary / "rng.safetensors"))

    write_json(
        temporary / "state.json",
        {
            "format": FORMAT_VERSION,
            "step": step,
            "epoch": epoch,
            "data": data_state,
            "optimizer": {"param_groups": optimizer_state["param_groups"], "scalar_state": scalars},
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": [{"python": s["python"], "numpy": s["numpy"]} for s in rng_state],
            "config_hash": config_hash(config),
            "torch": torch.__version__,
        },
    )
    _fsync_tree(temporary)


# ----------------------------------------------------------------------------------------------
# Load


@dataclass
class CheckpointState:
    """What a loaded checkpoint says about the run (the module states are restored in place)."""

    path: Path
    step: int
    epoch: int
    data: dict[str, Any]
    config_hash: str
    ranks: int  # processes whose RNG states it holds


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint ``out_dir/checkpoints/latest`` names, or None when there is none."""
    root = Path(out_dir) / CHECKPOINT_DIR
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def _restore_param_groups(saved: list[dict], current: list[dict]) -> list[dict]:
    """JSON turns tuples (``betas``) into lists; give them back the type the optimiser uses."""
    groups = []
    for saved_group, current_group in zip(saved, current):
        group = dict(saved_group)
        for key, value in group.items():
            if isinstance(current_group.get(key), tuple) and isinstance(value, list):
                group[key] = tuple(value)
        groups.append(group)
    return groups


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    rank: int = 0,
    device: torch.device = torch.device("cpu"),
    restore_rng: bool = True,
) -> CheckpointState:
    """Restore the model (strictly), and whichever of optimiser/scheduler/scaler are given.

    With ``restore_rng`` the RNG states of ``rank`` are restored too: call it last, after
    everything that draws random numbers while being built (model init), so nothing consumes
    them between here and the next training step.
    """
    path = Path(path)
    try:
        return _load_checkpoint(path, model, optimizer, scheduler, scaler, rank, device, restore_rng)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: {exc}") from None
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
        # A truncated or foreign file, or weights of another model: name the checkpoint.
        raise ValueError(f"checkpoint {path} cannot be resumed: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None


def _match_parameter_layouts(optimizer: Optimizer) -> None:
    """Give every per-parameter state tensor its parameter's memory layout.

    Checkpoints store contiguous tensors, but a channels-last model's parameters are not
    contiguous. Element-wise updates do not care; a fused optimiser kernel that walks the raw
    memory of a parameter and its moments together does, and would pair the wrong elements.
    """
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == parameter.shape and value.stride() != parameter.stride():
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def _load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: Optimizer | None,
    scheduler: LRScheduler | None,
    scaler: torch.amp.GradScaler | None,
    rank: int,
    device: torch.device,
    restore_rng: bool,
) -> CheckpointState:
    state_path = path / "state.json"
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path} is missing")
    try:
        state = json.loads(state_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{state_path}: not valid JSON ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        found = state.get("format") if isinstance(state, dict) else None
        raise ValueError(f"{state_path}: checkpoint format {found} is not {FORMAT_VERSION}")
    _, weights, _ = read_model_file(path / "model.safetensors")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise ValueError(f"{path / 'model.safetensors'} holds another model's weights ({_first_line(exc)})") from None

    if optimizer is not None:
        per_param: dict[int, dict[str, Any]] = {}
        for key, tensor in _safetensors(path / "optimizer.safetensors").items():
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = tensor
        for index, values in state["optimizer"]["scalar_state"].items():
            per_param.setdefault(int(index), {}).update(values)
        groups = _restore_param_groups(state["optimizer"]["param_groups"], optimizer.param_groups)
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
        _match_parameter_layouts(optimizer)
    if scheduler is not None:  # after the optimiser: it sets the groups' learning rates
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and scaler.is_enabled():
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        else:
            log.warning("%s was saved without fp16 loss scaling; the GradScaler starts afresh", path)

    ranks = len(state["rng"])
    if restore_rng:
        if rank < ranks:
            tensors = _safetensors(path / "rng.safetensors")
            restore_rng_state(
                {
                    **state["rng"][rank],
                    "torch_cpu": tensors[f"rank{rank}.torch_cpu"],
                    "cuda": tensors.get(f"rank{rank}.cuda"),
                },
                device,
            )
        else:
            log.warning("%s holds RNG states of %d processes, none for rank %d", path, ranks, rank)
    return CheckpointState(
        path=path,
        step=state["step"],
        epoch=state["epoch"],
        data=state["data"],
        config_hash=state["config_hash"],
        ranks=ranks,
    )
