"""``bridgeta plot-gap``: the representation gap ||R^S - R^T|| per level over training (Figure 5).

Reads the ``<level>/gap_l2`` diagnostics that distillation runs log to ``metrics.jsonl`` (every
``train.log_every`` steps, averaged over the window) and draws one panel per level with one
line per run, so a BridgeTA run and its w/o-TA twin can be compared at a glance. The same
drawing shows BridgeTA's ``<level>/epsilon`` (eps* per level over training), and
:func:`plot_validation_curves` the validation mIoU over training of plain runs.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from bridgeta.engine.logging import METRICS_FILE, read_metrics
from bridgeta.files import atomic_path

LEVELS = ("fld", "dld", "lld")
LEVEL_TITLES = {"fld": "FLD: fused / camera BEV", "dld": "DLD: decoded BEV", "lld": "LLD: logits"}


# What a panel shows: the logged per-level key, the y label and the figure's title.
QUANTITIES = {
    "gap_l2": ("||R^S - R^T|| (L2 per cell)", "Representation gap between student and teacher during distillation"),
    "epsilon": ("eps* (Young weight, log scale)", "BridgeTA's eps* per level during distillation"),
}


def read_gap_curves(run_dir: str | Path, quantity: str = "gap_l2") -> dict[str, list[tuple[int, float]]]:
    """``{level: [(step, value), ...]}`` of ``<level>/<quantity>`` in one run's log; levels the
    run did not log are absent."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(run_dir):
        for level in LEVELS:
            value = row.get(f"{level}/{quantity}")
            if isinstance(value, (int, float)):
                curves.setdefault(level, []).append((int(row["step"]), float(value)))
    if not curves:
        raise ValueError(
            f"{Path(run_dir) / METRICS_FILE} has no '<level>/{quantity}' values: only distillation runs "
            "(bridgeta distill) log them"
        )
    return curves


def run_label(run_dir: str | Path) -> str:
    """``<dir name> (<method>)`` from the run's config, e.g. ``tiny-c-direct-seed0 (direct)``."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    method = None
    if config_path.is_file():
        distill = (yaml.safe_load(config_path.read_text()) or {}).get("distill") or {}
        method = distill.get("method")
    return f"{run_dir.name} ({method})" if method else run_dir.name


def plot_gap(
    run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None, quantity: str = "gap_l2"
) -> Path:
    """Draw every run's ``quantity`` curves (``QUANTITIES``) into one PNG with a panel per level;
    returns its path. Runs that did not log it (``direct`` has no eps*) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise ValueError("plot-gap needs at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    names = labels or [run_label(run) for run in run_dirs]
    if quantity == "gap_l2":
        runs = [read_gap_curves(run) for run in run_dirs]
    else:
        kept = [(run, name) for run, name in zip(run_dirs, names) if _logs(run, quantity)]
        if not kept:
            raise ValueError(f"none of the runs logs '<level>/{quantity}'")
        runs, names = [read_gap_curves(run, quantity) for run, _ in kept], [name for _, name in kept]
    ylabel, title = QUANTITIES[quantity]
    levels = [level for level in LEVELS if any(level in curves for curves in runs)]
    figure, axes = plt.subplots(1, len(levels), figsize=(4.5 * len(levels), 3.6), squeeze=False)
    for axis, level in zip(axes[0], levels):
        for curves, name in zip(runs, names):
            if level in curves:
                steps, values = zip(*curves[level])
                axis.plot(steps, values, label=name, linewidth=1.4)
        axis.set_title(LEVEL_TITLES[level], fontsize=10)
        axis.set_xlabel("optimiser step")
        axis.set_ylabel(ylabel)
        if quantity == "epsilon":
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title, fontsize=11)
    return _save(figure, out)


def _logs(run_dir: str | Path, quantity: str) -> bool:
    try:
        read_gap_curves(run_dir, quantity)
    except ValueError:
        return False
    return True


def plot_validation_curves(curves: dict[str, list[list[float]]], out: str | Path) -> Path:
    """``{label: [[step, val_miou], ...]}`` as one PNG (mIoU in %); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for label, curve in curves.items():
        if curve:
            steps, values = zip(*curve)
            axis.plot(steps, [100 * v for v in values], marker="o", label=label, linewidth=1.4)
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("validation mIoU (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title("Validation mIoU during training", fontsize=11)
    return _save(figure, out)


def _save(figure, out: str | Path) -> Path:
    """Write ``figure`` atomically in the format ``out``'s suffix names (PNG by default) and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    out = Path(out)
    with atomic_path(out) as temporary:
        figure.savefig(temporary, dpi=120, format=out.suffix.lstrip(".") or "png")
    plt.close(figure)
    return out
