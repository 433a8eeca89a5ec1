"""Where a measurement came from (machine, date, torch, commit), and writing its results file.

A low-level module: the engine (checkpoints), the benchmarks and the docs renderer
(:mod:`bridgeta.report`) all write results through it, so none of them has to import another.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from bridgeta.files import atomic_write_text


def command_line() -> str:
    """This process's command as a user would type it (``bridgeta ...`` for the CLI, however it
    was started), so a results file says exactly what wrote it."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    program = "bridgeta" if name in ("bridgeta", "__main__.py") else name
    return shlex.join([program, *sys.argv[1:]])


def environment() -> dict:
    """Where and when a measurement was taken."""
    from bridgeta.precision import cpu_has_native_bf16

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        # Code changed since the commit means the numbers belong to no commit: say so.
        if git("status", "--porcelain", "--untracked-files=no", "--", ":/src"):
            commit += "-dirty"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "command": command_line(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        # The SIMD level torch's CPU kernels dispatch to (AVX512, AVX2...) and native bf16, which
        # decides what precision "auto" trains in: which machines reproduce a run bit for bit
        # (bench/ledger.py).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
    }


def write_json(path: Path, payload: dict) -> None:
    """Write atomically so an interrupted command never leaves a half-written results file."""
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
