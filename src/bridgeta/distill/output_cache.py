"""A frozen model's outputs kept on disk, one file per sample, so a run reads them back instead
of running the model again.

A distillation step runs its frozen teacher (and MonoTAKD's frozen TA) on every batch, and on 2
CPU cores that forward is a quarter of a step. It is a fixed function of the sample's inputs, and
where the augmentation is drawn once per sample (``data.augment.draws: once``, the cpu tables'
regime) or absent, every epoch of a run, and every run of the same seed, feeds it the same inputs.
With a cache each sample is run once per seed and read back afterwards.

**What a hit means.** A sample's file is named by a hash of everything that decides its outputs:

* the model's identity (:func:`model_identity`): its weights and buffers, its config, which part
  of it runs (``what``), the source of the code that runs it (``bridgeta/models``,
  ``geometry.py``, ``precision.py``, ``rig.py``, as this process imported it) and how it runs
  (:func:`execution_settings`: the autocast dtype its precision resolves to, the memory format of
  its weights, the torch version, the CPU's capability, native bf16 and thread count, the
  deterministic-algorithms switch, and on CUDA the GPU, cuDNN and the TF32 switches);
* the sample's inputs, as the model receives them (the caller leaves out what the model does not
  read, so a MonoTAKD batch, which also carries LiDAR depth, shares the teacher's files with
  other methods' batches).

Any change to any of them is a miss, never a stale read.

**A sample's outputs are its own.** A sample that misses runs through the model alone, as a batch
of one, and that is what is stored: a convolution kernel may round differently for another batch
size (oneDNN picks its algorithm by shape; measured on a small decoder, 1e-8 apart), so outputs
computed beside other samples would depend on which samples shared the batch. With a cache, a
run trains the same weights bit for bit whether the cache starts cold, warm or half full
(``tests/test_output_cache.py``). Against a run without a cache, whose teacher runs on whole
batches, it differs by that rounding where the model's kernels are not batch-invariant. Running
the misses one by one costs a little more than whole batches on CPU (more on a GPU, whose kernels
want batches); hits cost a hash of the inputs and a file read.

Files are written atomically (a rank or run that reads concurrently sees a whole file or none),
readable by every user of a shared directory. The cache does not write, and only reads, while
fewer than ``min_free_bytes`` stay free on its disk, and a write that fails (a read-only or full
disk) is logged and skipped, never fatal. Deleting the directory is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from bridgeta.models.types import BEVInputs
from bridgeta.precision import autocast_dtype, cpu_has_native_bf16

log = logging.getLogger(__name__)

# The source whose behaviour a frozen BEV model's forward depends on (besides torch).
_CODE_ROOT = Path(__file__).resolve().parents[1]
_CODE = ("models", "geometry.py", "precision.py", "rig.py")
DEFAULT_MIN_FREE_BYTES = 10 * 2**30
# Where ``bridgeta.engine.trainer.train`` finds a cache directory it was not given (the
# benchmarks' spawned runs inherit it).
OUTPUT_CACHE_ENV = "BRIDGETA_OUTPUT_CACHE"


def _source_digest() -> str:
    digest = hashlib.sha256()
    for name in _CODE:
        root = _CODE_ROOT / name
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for path in files:
            digest.update(f"{path.relative_to(_CODE_ROOT).as_posix()}|".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


# Read when this module is imported, next to the models' own import: a long benchmark process
# whose files are edited afterwards still runs, and so names, the code it imported.
_CODE_DIGEST = _source_digest()


def code_digest() -> str:
    """sha256 over the source files a frozen model's forward runs (path and bytes, in path order),
    as they were when this process imported them."""
    return _CODE_DIGEST


def execution_settings(model: nn.Module, precision: str) -> dict:
    """How ``model`` runs here, as far as it can change its outputs (see the module docstring)."""
    parameter = next(model.parameters())
    device = parameter.device
    settings = {
        "device": device.type,
        "autocast": str(autocast_dtype(precision, device)),
        "channels_last": any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
                             for p in model.parameters()),
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }
    if device.type == "cuda":
        settings.update(
            gpu=torch.cuda.get_device_name(device),
            capability=list(torch.cuda.get_device_capability(device)),
            cudnn=torch.backends.cudnn.version(),
            cudnn_deterministic=torch.backends.cudnn.deterministic,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    return settings


def _update_with_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy


def model_identity(model: nn.Module, what: str, precision: str, config: Mapping | None = None) -> str:
    """The hash of everything about ``model``, run under ``precision`` (a ``train.precision``
    value) where it is now, that decides its outputs for given inputs. Take it once the model
    has its final device and memory format."""
    digest = hashlib.sha256()
    header = {"what": what, "config": config, "code": code_digest(), **execution_settings(model, precision)}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        _update_with_tensor(digest, name, tensor)
    return digest.hexdigest()


def sample_key(inputs: BEVInputs, sample: int) -> str:
    """The hash of sample ``sample``'s inputs: every per-sample tensor of ``inputs`` (absent ones
    count as absent) and that sample's LiDAR points."""
    digest = hashlib.blake2b(digest_size=20)
    one = inputs.select([sample])
    for group_name, group in (("camera", one.camera), ("lidar", one.lidar)):
        if group is None:
            digest.update(f"{group_name}:none|".encode())
            continue
        for field in fields(group):
            value = getattr(group, field.name)
            if value is None:
                digest.update(f"{group_name}.{field.name}:none|".encode())
            else:
                _update_with_tensor(digest, f"{group_name}.{field.name}", value)
    for name in ("bev_aug", "ego_motion"):
        value = getattr(one, name)
        if value is None:
            digest.update(f"{name}:none|".encode())
        else:
            _update_with_tensor(digest, name, value)
    return digest.hexdigest()


class FrozenOutputCache:
    """Per-sample outputs of one frozen model (``identity``: :func:`model_identity`) under
    ``root/<identity>/``; see the module docstring for what makes a hit exact."""

    def __init__(self, root: str | Path, identity: str, min_free_bytes: int = DEFAULT_MIN_FREE_BYTES) -> None:
        self.directory = Path(root) / identity[:32]
        self.min_free_bytes = min_free_bytes
        self.hits = 0
        self.misses = 0
        self._warned: set[str] = set()

    def _warn_once(self, reason: str, message: str, *args) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning(message, *args)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def _load(self, key: str, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self._path(key)
        if not path.is_file():
            return None
        try:
            stored = load_file(str(path))
        except Exception as exc:  # a damaged file is a miss, and is written again
            log.warning("output cache: %s is unreadable (%s); computing it again", path, exc)
            return None
        if not all(name in stored for name in names):
            return None
        return stored

    def _store(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import load_file, save_file

        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(path.parent).free < self.min_free_bytes:
                self._warn_once("space", "output cache: less than %.1f GiB free under %s; not writing while "
                                "that lasts", self.min_free_bytes / 2**30, self.directory)
                return
            merged = dict(tensors)
            if path.is_file():  # keep what another method stored of this sample
                try:
                    merged = {**load_file(str(path)), **tensors}
                except Exception:
                    pass
            handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(handle)
            try:
                save_file({name: t.detach().to("cpu").contiguous() for name, t in merged.items()}, temporary)
                os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the file from other users
                os.replace(temporary, path)
            finally:
                if os.path.exists(temporary):
                    os.unlink(temporary)
        except OSError as exc:  # the run goes on, computing what it cannot store
            self._warn_once("write", "output cache: cannot write under %s (%s); computing instead", self.directory, exc)

    def fetch(
        self,
        inputs: BEVInputs,
        names: tuple[str, ...],
        compute: Callable[[BEVInputs], Mapping[str, torch.Tensor]],
        device: torch.device | str = "cpu",
    ) -> dict[str, torch.Tensor]:
        """The batch's outputs ``names``, each ``(B, ...)``: read where stored, else computed by
        ``compute(one_sample_batch)`` for each sample that misses (and stored). ``inputs`` must
        hold what the model reads and nothing else that varies (it is the key)."""
        keys = [sample_key(inputs, i) for i in range(inputs.batch_size)]
        found: list[dict[str, torch.Tensor] | None] = [self._load(key, names) for key in keys]
        missing = [i for i, sample in enumerate(found) if sample is None]
        self.hits += inputs.batch_size - len(missing)
        self.misses += len(missing)
        for sample in missing:  # alone: see "A sample's outputs are its own" above
            computed = compute(inputs.select([sample]))
            tensors = {name: computed[name][0].detach().to("cpu").contiguous() for name in names}
            self._store(keys[sample], tensors)
            found[sample] = tensors
        return {name: torch.stack([sample[name] for sample in found]).to(device) for name in names}  # type: ignore[index]
