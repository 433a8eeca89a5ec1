"""Training metrics: a JSON-lines file, TensorBoard scalars and a progress bar, on rank 0 only.

``metrics.jsonl`` holds one JSON object per line (``{"step": 10, "epoch": 0, "lr": ..., ...}``)
so a run can be plotted or compared with nothing but ``json``; TensorBoard events (``tb/``) show
the same scalars live. Every line is flushed when written, so a killed run keeps what it logged.

A resumed run first drops the lines (and TensorBoard events) logged after the checkpoint it
resumes from: the steps it is about to redo would otherwise appear twice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bridgeta.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"


def flatten_scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested mapping as ``{"a/b": value}`` (strings and None left out)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _plain(value: Any) -> Any:
    """JSON-native copy: tensors and numpy numbers (as an evaluation may return) become Python."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors of any shape
        return _plain(value.tolist())
    return value


def _finite_or_text(value: Any) -> Any:
    """JSON has no NaN/Infinity; write them as strings so every line stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_or_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_text(v) for v in value]
    return value


def _row_step(line: str) -> float:
    """The step of a metrics line; infinite for a line torn by a kill mid-write (so it is dropped)."""
    try:
        return json.loads(line).get("step", math.inf)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


class MetricsLogger:
    """Appends rows to ``out_dir/metrics.jsonl`` and scalars to ``out_dir/tb``; inert off rank 0.

    ``resume_step``: the step the run starts from. Rows with a later step are removed from the
    file and TensorBoard purges its later events (``0``: a fresh run clears a previous attempt's);
    ``None`` keeps everything.
    """

    def __init__(self, out_dir: Path, is_main: bool, resume_step: int | None = None) -> None:
        self.enabled = is_main
        self.path = Path(out_dir) / METRICS_FILE
        self._file = None
        self._writer = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _row_step(line) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
        # TensorBoard pulls in a lot; import it only in the process that writes.
        from torch.utils.tensorboard import SummaryWriter

        purge_step = resume_step + 1 if resume_step is not None else None
        self._writer = SummaryWriter(str(Path(out_dir) / TENSORBOARD_DIR), purge_step=purge_step)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Write ``{"step": step, **values}`` as one line and its numeric leaves as scalars.

        ``epoch`` is kept in the line but not plotted (TensorBoard's x axis is the step).
        """
        if not self.enabled:
            return
        row = _plain({"step": step, **values})
        self._file.write(json.dumps(_finite_or_text(row)) + "\n")
        self._file.flush()
        for tag, value in flatten_scalars(row).items():
            if tag not in ("step", "epoch"):
                self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train") -> tqdm:
    """A tqdm bar over optimiser steps with ETA; a silent stand-in when ``enabled`` is false.

    ``initial`` is the resumed step, so the ETA covers only the steps still to run.
    """
    return tqdm(
        total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True
    )


def training_seconds(rows: list[dict[str, Any]]) -> float:
    """The optimiser-step time of a run, from its ``metrics.jsonl`` rows: each logged window's
    mean ``step_time_s`` times the steps since the previous window. A resumed run logs the steps
    after its checkpoint again; the last logging of a step counts, so this is the time of the
    kept trajectory (without evaluation, and without the steps a kill threw away)."""
    windows = {int(r["step"]): float(r["step_time_s"]) for r in rows if "step_time_s" in r and "step" in r}
    seconds, previous = 0.0, 0
    for step in sorted(windows):
        seconds += (step - previous) * windows[step]
        previous = step
    return seconds


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``, in order; errors name the file and line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: not a training run directory")
    rows = []
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc})") from None
    return rows


def training_diagnostics(rows: list[dict[str, Any]], levels: tuple[str, ...] = ("fld", "dld", "lld")) -> dict[str, Any]:
    """What a distillation run's log says about its loss balance and its eps*.

    ``shares``: each loss group's share of the total (``share/*``), averaged over the last quarter
    of the training log rows (the regime the run ends in, not its start-up); ``epsilon``: per
    level, min / median / max of the logged eps* over the whole run. Rows without training terms
    (evaluation rows) are skipped; levels the run did not log are absent.
    """
    training = [row for row in rows if "loss" in row]
    if not training:
        return {"shares": {}, "epsilon": {}, "rows": 0}
    tail = training[-max(1, len(training) // 4):]
    keys = sorted({key for row in tail for key in row if key.startswith("share/")})
    shares = {key.removeprefix("share/"): sum(row.get(key, 0.0) for row in tail) / len(tail) for key in keys}
    epsilon = {}
    for level in levels:
        values = sorted(row[f"{level}/epsilon"] for row in training if f"{level}/epsilon" in row)
        if values:
            epsilon[level] = {"min": values[0], "median": values[len(values) // 2], "max": values[-1]}
    return {"shares": shares, "epsilon": epsilon, "rows": len(training)}
