"""Finished benchmark runs kept beside their results: a benchmark that outlives its machine.

A benchmark's work directory (the world, every run's weights and checkpoints) lives on one
machine, and a 2-core protocol needs more hours than one machine is kept. The ledger is the part
of each finished run that the tables read, small enough to commit with the results:
``config.yaml``, ``metrics.jsonl`` (curves, step times, the gap), every ``eval_*.json``, and the
digest of the run's weights (``weights.json``). A run whose record is in the ledger is not trained
again: its record is copied back into its run directory and read like a finished run.

Weights are not kept (tens of MB a run). Where a later run needs them (a teacher, MonoTAKD's TA,
a TinyBEV stage's predecessor), the input is trained again from its recorded config, and its new
weights must have the recorded digest: training is deterministic on one machine type, commit and
thread count (``docs/results.md``), so a match proves the runs recorded against the first
training learned from the same network. A mismatch is an error naming the run: mixing runs of two
different teachers in one table would pair unlike things. The world and the pretrained backbone
are regenerated the same way and checked against their recorded digests.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from bridgeta.provenance import write_json

DIGEST_FILE = "weights.json"
# The machine type a ledger's world, backbone and inputs were made on (machine_signature).
MACHINE_FILE = "machine.json"
# What a finished run's record holds besides eval_*.json (and the digest of its weights).
RECORDED_FILES = ("config.yaml", "metrics.jsonl")


class LedgerMismatch(RuntimeError):
    """A run, world or backbone made again differs from what the ledger recorded of it."""


def weights_digest(path: Path) -> str:
    """sha256 over a safetensors file's tensors (names, dtypes, shapes and bytes, in name order),
    not its metadata: the embedded config names paths, which another machine may spell otherwise."""
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as handle:
        for name in sorted(handle.keys()):
            tensor = handle.get_tensor(name).contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def recorded_digest(record: Path) -> str | None:
    path = record / DIGEST_FILE
    return json.loads(path.read_text())["sha256"] if path.is_file() else None


def is_recorded(record: Path, splits: list[str]) -> bool:
    """Whether ``record`` holds a finished run evaluated on every split of ``splits``."""
    return recorded_digest(record) is not None and all((record / f"eval_{s}.json").is_file() for s in splits)


def _record_files(directory: Path) -> list[Path]:
    return [*(directory / name for name in RECORDED_FILES), *sorted(directory.glob("eval_*.json"))]


def restore(record: Path, run_dir: Path) -> None:
    """Copy a record's files into ``run_dir`` where it lacks them (a file already there is the
    run's own and is kept)."""
    if recorded_digest(record) is None:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    for source in _record_files(record):
        target = run_dir / source.name
        if source.is_file() and not target.exists():
            shutil.copy2(source, target)


def check_weights(model_file: Path, record: Path) -> None:
    """Raise :class:`LedgerMismatch` when ``model_file``'s tensors are not the recorded ones."""
    expected = recorded_digest(record)
    if expected is None or not model_file.is_file():
        return
    actual = weights_digest(model_file)
    if actual != expected:
        raise LedgerMismatch(
            f"{model_file} has other weights than the ledger's record of this run ({record / DIGEST_FILE}: "
            f"sha256 {expected[:12]}, here {actual[:12]}): this machine, commit or thread count does not "
            "reproduce the recorded training, so the recorded runs are not comparable with new ones. "
            f"Finish the table where it was started, or move {record.parent} aside to start it again")


def needs_training(run_dir: Path, record: Path | None, splits: list[str]) -> bool:
    """Whether a run has neither its weights here nor a record evaluated on every split."""
    return not (run_dir / "model.safetensors").is_file() and not (record is not None and is_recorded(record, splits))


def save(run_dir: Path, record: Path) -> None:
    """Record a finished run: its small files and its weights' digest. A run already recorded
    only gains the files its record lacks (a new split's evaluation): the record stays the run
    the table read, even where an input was trained again on another machine (same weights,
    other step times)."""
    model_file = run_dir / "model.safetensors"
    if not model_file.is_file():
        return
    check_weights(model_file, record)
    recorded = recorded_digest(record) is not None
    record.mkdir(parents=True, exist_ok=True)
    for source in _record_files(run_dir):
        if source.is_file() and not (recorded and (record / source.name).exists()):
            shutil.copy2(source, record / source.name)
    if not recorded:  # last: a record with a digest is complete
        write_json(record / DIGEST_FILE, {"sha256": weights_digest(model_file), "file": model_file.name})


def machine_signature() -> dict:
    """What decides whether this machine makes a recorded world and input again bit for bit,
    besides the commit and the thread count: the architecture, the SIMD level torch dispatches
    its kernels to (``AVX512``, ``AVX2``...), and whether the CPU has native bf16, which decides
    what ``precision: auto`` trains in (bf16 or fp32, bridgeta.precision). The world's rays are
    cast by Embree, which picks its code by instruction set too: an AVX2 machine renders another
    world than an AVX-512 one."""
    import platform

    import torch

    from bridgeta.precision import cpu_has_native_bf16

    return {"machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": cpu_has_native_bf16()}


def check_machine(ledger: Path) -> None:
    """Refuse, before any world is generated, to continue a ledger recorded on another machine
    type (its ``machine.json``): the world, backbone and inputs made here would differ, and that
    would only show after the world's generation. A new ledger (no ``world.json`` yet) records
    this machine; one from before ``machine.json`` existed is left to the digests."""
    path = ledger / MACHINE_FILE
    here = machine_signature()
    if path.is_file():
        recorded = json.loads(path.read_text())
        if {key: recorded.get(key) for key in here} != here:
            def describe(signature: dict) -> str:
                bf16 = {True: ", native bf16", False: ", no native bf16"}.get(signature.get("native_bf16"), "")
                return f"({signature.get('machine')}, {signature.get('cpu_capability')}{bf16})"

            raise LedgerMismatch(
                f"{ledger} records runs made on a machine of type {describe(recorded)} ({path}), and this one "
                f"is {describe(here)}: it would generate another world and train other weights, so no run made "
                f"here can join them. Continue this benchmark on a machine of type {describe(recorded)}, or "
                f"move {ledger} aside to start it again here")
        return
    if not (ledger / "world.json").is_file():
        write_json(path, here)


def tree_digest(root: Path, patterns: tuple[str, ...]) -> str:
    """sha256 over the relative paths and contents of the files under ``root`` matching ``patterns``."""
    digest = hashlib.sha256()
    files = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    for path in files:
        digest.update(f"{path.relative_to(root).as_posix()}|".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_or_record(ledger: Path, name: str, digest: str, what: str) -> None:
    """Compare ``digest`` (of the world, or the backbone) with the ledger's ``<name>.json``, or
    record it there the first time."""
    path = ledger / f"{name}.json"
    if path.is_file():
        expected = json.loads(path.read_text())["sha256"]
        if expected != digest:
            raise LedgerMismatch(
                f"{what} differs from the one the ledger's runs were trained on ({path}: sha256 "
                f"{expected[:12]}, here {digest[:12]}): finish the table where it was started, or move "
                f"{ledger} aside to start it again")
        return
    write_json(path, {"sha256": digest, "of": what})
