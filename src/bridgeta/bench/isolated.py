"""Measurements that need a process of their own, so that peak memory is theirs alone.

A benchmark re-invokes its own module with ``--one ...``; the child prints one JSON line last on
stdout, which :func:`run_isolated` returns. Peak resident memory (``ru_maxrss``) only ever grows
over a process's life, which is why each measurement gets a fresh process.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def resident_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """This process's peak resident set so far (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_isolated(module: str, arguments: Sequence[str], what: str) -> dict:
    """``python -m module *arguments`` in a fresh process; its last stdout line, parsed as JSON."""
    done = subprocess.run([sys.executable, "-m", module, *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
