"""Independent training runs side by side: ``jobs`` worker processes sharing the machine's cores.

Small CPU models use cores badly inside one run (their convolutions are too small to split well
across threads), so on a 2-core machine two single-threaded runs finish more work per hour than
one run on two threads; ``bench accuracy --jobs`` measures it (docs/results.md). Each run is a
call of a module-level function in its own spawned process with ``cores // jobs`` threads, its
output going to ``<log>`` rather than interleaving with the others. Step times measured this way
are not comparable with ``bench train-cost``'s (which runs alone), and are not reported as such.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Job:
    """``function(*args, **kwargs)``, its stdout/stderr in ``log`` when it runs in a worker."""

    function: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    log: Path | None = None
    label: str = ""


def _init_worker(threads: int) -> None:
    import torch

    _die_with_parent()
    torch.set_num_threads(threads)


def _die_with_parent() -> None:
    """A worker must not outlive a killed benchmark: it would keep training, unseen, on the
    cores the next benchmark measures with (Linux: the kernel's parent-death signal)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the signal was armed
        os._exit(1)


def _run_logged(job: Job) -> Any:
    if job.log is None:
        return job.function(*job.args, **job.kwargs)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            return job.function(*job.args, **job.kwargs)
        except BaseException:
            traceback.print_exc()
            raise


def run_jobs(jobs: Sequence[Job], workers: int = 1) -> list[Any]:
    """Results of ``jobs`` in order. ``workers`` = 1 runs them here, one after the other; more
    runs that many at once, each with ``cores // workers`` threads. A failed job does not stop
    the others; the first failure is raised once every job has ended."""
    if workers <= 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            if job.label:
                print(f"-- {job.label}", flush=True)
            results.append(job.function(*job.args, **job.kwargs))
        return results
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # no forked copies of threads or open files
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = [pool.submit(_run_logged, job) for job in jobs]
        for job in jobs:
            if job.label:
                print(f"-- queued {job.label}" + (f" (log: {job.log})" if job.log else ""), flush=True)
        results, failures = [], []
        for job, future in zip(jobs, futures):
            try:
                results.append(future.result())
                print(f"-- done {job.label}", flush=True)
            except Exception as exc:  # noqa: BLE001 - reported below, after the other jobs
                failures.append((job, exc))
                results.append(None)
                print(f"-- FAILED {job.label}: {exc}", file=sys.stderr, flush=True)
    if failures:
        job, exc = failures[0]
        raise RuntimeError(f"{len(failures)} of {len(jobs)} runs failed; first: {job.label}: {exc}") from exc
    return results
