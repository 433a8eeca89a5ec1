"""Loading pretrained weights from a local checkpoint file.

Nothing is ever downloaded: the caller points at a file (torchvision ResNet, official Swin
release, a detection checkpoint, ...). ``.pth``/``.pt``/``.bin`` files are read with
``torch.load(weights_only=True)`` so a checkpoint can never execute code on load; ``.safetensors``
files need the optional ``safetensors`` package.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# Keys under which training frameworks nest the state dict (official Swin: "model"; mmcv/mmdet
# and Lightning: "state_dict").
CONTAINER_KEYS = ("state_dict", "model")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
MAX_NAMES_IN_SUMMARY = 8


@dataclass
class LoadReport:
    """What happened to every key.

    loaded:     module keys filled from the checkpoint.
    missing:    module keys the checkpoint did not provide (left at their initialisation);
                BatchNorm's ``num_batches_tracked`` counter is never listed (torch zero-fills it).
    unexpected: checkpoint keys the module does not have and no ignore pattern covers.
    ignored:    checkpoint keys skipped on purpose (ignore pattern, or outside ``prefix``);
                names as they appear in the checkpoint.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        groups = (("missing", self.missing), ("unexpected", self.unexpected), ("ignored", self.ignored))
        for label, names in groups:
            if names:
                shown = ", ".join(names[:MAX_NAMES_IN_SUMMARY])
                hidden = len(names) - MAX_NAMES_IN_SUMMARY
                more = f", ... (+{hidden})" if hidden > 0 else ""
                parts.append(f"{len(names)} {label} [{shown}{more}]")
        return "; ".join(parts)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a flat ``name -> tensor`` mapping from ``path``, unwrapping common containers."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise ImportError(
                f"reading {path} needs the safetensors package: pip install safetensors"
            ) from error
        state: object = load_file(str(path), device="cpu")
    elif suffix in TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise pickle.UnpicklingError(
                f"{path} holds objects other than tensors and plain containers; refusing to "
                "unpickle it. Re-save just the state dict (torch.save(state_dict, ...)) from a "
                f"trusted environment. Original error: {error}"
            ) from error
    else:
        raise ValueError(
            f"unsupported checkpoint suffix {suffix!r} for {path}; "
            f"expected .safetensors or one of {TORCH_SUFFIXES}"
        )

    while isinstance(state, Mapping):
        container = next((key for key in CONTAINER_KEYS if isinstance(state.get(key), Mapping)), None)
        if container is None:
            break
        state = state[container]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not contain a state dict (got {type(state).__name__})")
    non_tensors = [str(name) for name, value in state.items() if not isinstance(value, torch.Tensor)]
    if non_tensors:
        raise ValueError(
            f"{path}: state dict entries are not tensors: {non_tensors[:MAX_NAMES_IN_SUMMARY]}"
        )
    return dict(state)


def load_pretrained(
    module: nn.Module, path: str | Path, *, prefix: str = "", ignore: Iterable[str] = ()
) -> LoadReport:
    """Copy the weights in ``path`` into ``module`` and report what matched.

    ``prefix`` selects and strips a namespace (``"backbone."`` in a detection checkpoint,
    ``"module."`` from DDP); keys outside it are ignored. ``ignore`` holds glob patterns
    (``"head.*"``, ``"*.attn_mask"``) matched against the key after stripping, merged with the
    module's own ``pretrained_ignore`` so callers need not know a backbone's extra keys.

    Missing and unexpected keys are reported, not fatal (a backbone legitimately lacks a
    classifier and has extra output norms); a shape mismatch, or a checkpoint that matches no key
    at all (typically a wrong ``prefix``), raises ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
    patterns = tuple(ignore) + tuple(getattr(module, "pretrained_ignore", ()))

    selected: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for name, tensor in read_state_dict(path).items():
        local_name = name[len(prefix) :] if name.startswith(prefix) else None
        if local_name is None or any(fnmatchcase(local_name, pattern) for pattern in patterns):
            ignored.append(name)
        else:
            selected[local_name] = tensor

    expected = module.state_dict()
    mismatches = [
        f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[name].shape)}"
        for name, tensor in selected.items()
        if name in expected and tensor.shape != expected[name].shape
    ]
    if mismatches:
        raise ValueError(f"shape mismatch loading {path}:\n  " + "\n  ".join(mismatches))
    loaded = [name for name in selected if name in expected]
    if selected and not loaded:
        raise ValueError(
            f"no key of {path} matches {type(module).__name__} (first checkpoint key after "
            f"prefix {prefix!r}: {next(iter(selected))!r}, first model key: "
            f"{next(iter(expected), None)!r}); is the prefix right?"
        )

    result = module.load_state_dict(selected, strict=False)
    report = LoadReport(
        loaded=loaded,
        missing=list(result.missing_keys),
        unexpected=list(result.unexpected_keys),
        ignored=ignored,
    )
    level = logging.WARNING if report.unexpected else logging.INFO
    log.log(level, "loaded %s into %s: %s", path, type(module).__name__, report.summary())
    return report
