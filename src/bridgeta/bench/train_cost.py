"""``bridgeta bench train-cost``: what distillation costs at training time, relative to the baseline.

Each method (the camera-only baseline, ``direct`` = w/o TA, ``bridgeta``, and the baseline and
BridgeTA in plain fp32, against the default precision) trains the same student
for ``--steps`` optimiser steps with the real trainer, in a fresh process of its own so that peak
memory is its own: on CPU the process's peak resident set (``ru_maxrss``) minus its resident set
just before training (interpreter, torch, nothing of the run), on CUDA
``torch.cuda.max_memory_allocated``. Step time is the median over the steps, loader waits
included (what a user waits for). All methods are measured in one invocation, on one machine, so
the ratios are comparable; the deployed student is the same network for all three, so inference
cost does not change (``bridgeta info``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bridgeta.bench.isolated import peak_resident_bytes, resident_bytes, run_isolated
from bridgeta.provenance import environment, write_json

# name -> (preset, overrides). ``*_fp32`` rows are the same runs in plain fp32 (the trainer's CPU
# default before bf16 autocast), so the precision speed-up is a ratio measured in the same run.
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "baseline": ("tiny-c", ()),
    "baseline_fp32": ("tiny-c", ("train.precision=fp32",)),
    "direct": ("distill/tiny-c-direct", ()),
    "bridgeta": ("distill/tiny-c-bridgeta", ()),
    "bridgeta_fp32": ("distill/tiny-c-bridgeta", ("train.precision=fp32", "distill.teacher_precision=fp32")),
}


def measure_one(preset: str, dataroot: str, teacher: str | None, steps: int, overrides: Sequence[str]) -> dict:
    """Train ``preset`` for ``steps`` steps in this process; step time and peak memory."""
    import torch

    from bridgeta.config import load_config
    from bridgeta.engine.trainer import train

    settings = [f"data.dataroot={dataroot}", f"train.max_steps={steps}", f"train.log_every={steps}", *overrides]
    if teacher is not None and preset.startswith("distill/"):
        settings.append(f"distill.teacher={teacher}")
    config = load_config(preset, settings)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = resident_bytes()
    with tempfile.TemporaryDirectory() as out:
        summary = train(config, Path(out))
    peak_rss = peak_resident_bytes()
    return {
        "preset": preset,
        "steps": summary["steps"],
        "step_time_s": summary["step_time_s"],
        "device": "cuda" if cuda else "cpu",
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss - before,
        "peak_rss_bytes": peak_rss,
        "rss_before_bytes": before,
    }


def run(dataroot: Path, teacher: str, steps: int, out: Path, overrides: Sequence[str] = ()) -> dict:
    started = environment()
    methods = {}
    for method, (preset, own) in METHODS.items():
        arguments = ["--one", preset, "--dataroot", str(dataroot), "--teacher", teacher, "--steps", str(steps)]
        for override in (*own, *overrides):
            arguments += ["--set", override]
        print(f"-- {method}: {steps} steps of {preset}", flush=True)
        methods[method] = run_isolated("bridgeta.bench.train_cost", arguments, f"{method} ({preset})")
    base = methods["baseline"]
    for row in methods.values():
        row["step_time_ratio"] = row["step_time_s"] / base["step_time_s"]
        row["memory_ratio"] = row["peak_memory_bytes"] / base["peak_memory_bytes"]
    result = {"environment": started, "dataroot": str(dataroot), "teacher": teacher, "steps": steps,
              "overrides": list(overrides), "methods": methods}
    write_json(out, result)
    return result


def format_table(result: dict) -> str:
    lines = [f"{'method':<10}{'step (s)':>10}{'x baseline':>12}{'memory (MiB)':>14}{'x baseline':>12}"]
    for method, row in result["methods"].items():
        lines.append(
            f"{method:<10}{row['step_time_s']:>10.3f}{row['step_time_ratio']:>12.2f}"
            f"{row['peak_memory_bytes'] / 2**20:>14.0f}{row['memory_ratio']:>12.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bridgeta bench train-cost", description=__doc__.splitlines()[0])
    parser.add_argument("--dataroot", required=True, type=Path)
    parser.add_argument("--teacher", required=True, help="teacher run directory or model file")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every method (e.g. train.batch_size=4)")
    parser.add_argument("--out", type=Path, default=Path("results/train_cost.json"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one method, JSON on stdout
    args = parser.parse_args(argv)
    if args.one is not None:
        row = measure_one(args.one, str(args.dataroot), args.teacher, args.steps, args.overrides)
        print(json.dumps(row))
        return 0
    result = run(args.dataroot, args.teacher, args.steps, args.out, args.overrides)
    print(format_table(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
