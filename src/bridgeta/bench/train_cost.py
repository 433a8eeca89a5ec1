"""``bridgeta bench train-cost``: what distillation costs at training time, relative to the baseline.

Each method of a pair trains the same student for ``--steps`` optimiser steps with the real
trainer, in a fresh process of its own so that peak memory is its own: on CPU the process's peak
resident set (``ru_maxrss``) minus its resident set just before training (interpreter, torch,
nothing of the run), on CUDA ``torch.cuda.max_memory_allocated``. Step time is the median over the
steps, loader waits included (what a user waits for). All methods are measured in one
invocation, on one machine, so the ratios are comparable; within a pair the deployed student is
the same network for every method, so inference cost does not change (``bridgeta bench cost``).

Pairs (``--pair``):

* ``tiny``: the camera-only baseline, ``direct`` = w/o TA, ``bridgeta``, and the baseline and
  BridgeTA in plain fp32, against the default precision.
* ``tinybev``: the multi-task student (``tiny-c-tinybev``) without distillation, TinyBEV's three
  stages (the wider ``tiny-lc-tinybev`` teacher's forward pass and the adapters) and BridgeTA on
  the same student (from ``tiny-lc-mt``, the teacher of its widths).
* ``cache``: ``direct`` and BridgeTA with and without the output cache
  (:mod:`bridgeta.distill.output_cache`), every row in the cpu tables' regime (augmentation drawn
  once, the default precision). A ``*_cached`` row first trains its steps once to fill the cache
  (in the same process, same seed, so the same batches), then measures a second run that reads
  every teacher output back.

A teacher not given is a freshly initialised network of the pair's teacher preset: the step
time and memory depend on its architecture, not its weights, so the cost can be measured before
any teacher is trained.
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

_ONCE = ("data.augment.draws=once",)  # the cpu tables' regime, where the output cache hits
# pair -> method -> (preset, overrides, the teacher it reads: a key of TEACHERS[pair], or None).
# ``*_fp32`` rows are the same runs in plain fp32 (the trainer's CPU default before bf16
# autocast), so the precision speed-up is a ratio measured in the same run.
METHODS: dict[str, dict[str, tuple[str, tuple[str, ...], str | None]]] = {
    "tiny": {
        "baseline": ("tiny-c", (), None),
        "baseline_fp32": ("tiny-c", ("train.precision=fp32",), None),
        "direct": ("distill/tiny-c-direct", (), "teacher"),
        "bridgeta": ("distill/tiny-c-bridgeta", (), "teacher"),
        "bridgeta_fp32": ("distill/tiny-c-bridgeta", ("train.precision=fp32", "distill.teacher_precision=fp32"),
                          "teacher"),
    },
    "cache": {
        "baseline": ("tiny-c", _ONCE, None),
        "direct": ("distill/tiny-c-direct", _ONCE, "teacher"),
        "direct_cached": ("distill/tiny-c-direct", _ONCE, "teacher"),
        "bridgeta": ("distill/tiny-c-bridgeta", _ONCE, "teacher"),
        "bridgeta_cached": ("distill/tiny-c-bridgeta", _ONCE, "teacher"),
    },
    "tinybev": {
        "baseline": ("tiny-c-tinybev", (), None),
        "tinybev_s1": ("distill/tiny-c-tinybev-s1", (), "teacher"),
        "tinybev_s2": ("distill/tiny-c-tinybev-s2", (), "teacher"),
        "tinybev_s3": ("distill/tiny-c-tinybev-s3", (), "teacher"),
        "tinybev_bridgeta": ("distill/tiny-c-tinybev-bridgeta", (), "aligned_teacher"),
    },
}
# pair -> teacher role -> the preset of the teacher a method of that role reads (bench accuracy's).
TEACHERS: dict[str, dict[str, str]] = {
    "tiny": {"teacher": "tiny-lc"},
    "cache": {"teacher": "tiny-lc"},
    "tinybev": {"teacher": "tiny-lc-tinybev", "aligned_teacher": "tiny-lc-mt"},
}


def untrained_teacher(preset: str, dataroot: Path, folder: Path) -> str:
    """A freshly initialised ``preset`` written as a model file in ``folder``: a teacher for a cost
    measurement (its architecture, not its weights, sets the cost)."""
    from bridgeta.config import load_config
    from bridgeta.engine.model_file import save_model_file
    from bridgeta.models.bev_model import build_model

    config = load_config(preset, [f"data.dataroot={dataroot}"])
    path = folder / f"untrained-{preset}.safetensors"
    save_model_file(path, build_model(config.model), config)
    return str(path)


def measure_one(preset: str, dataroot: str, teacher: str | None, steps: int, overrides: Sequence[str],
                cached: bool = False) -> dict:
    """Train ``preset`` for ``steps`` steps in this process; step time and peak memory. ``cached``:
    with an output cache, filled by a first run of the same steps, then measured on a second."""
    import os

    import torch

    from bridgeta.config import load_config
    from bridgeta.distill.output_cache import OUTPUT_CACHE_ENV
    from bridgeta.engine.trainer import train

    os.environ.pop(OUTPUT_CACHE_ENV, None)  # a row without a cache has none (this process is the row's own)

    settings = [f"data.dataroot={dataroot}", f"train.max_steps={steps}", f"train.log_every={steps}", *overrides]
    if teacher is not None and preset.startswith("distill/"):
        settings.append(f"distill.teacher={teacher}")
    config = load_config(preset, settings)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = resident_bytes()
    with tempfile.TemporaryDirectory() as out:
        cache = Path(out) / "output-cache" if cached else None
        if cache is not None:
            train(config, Path(out) / "fill", output_cache=cache)
        summary = train(config, Path(out) / "run", output_cache=cache)
    peak_rss = peak_resident_bytes()
    return {
        "preset": preset,
        "steps": summary["steps"],
        "output_cache": summary.get("output_cache"),
        "step_time_s": summary["step_time_s"],
        "device": "cuda" if cuda else "cpu",
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss - before,
        "peak_rss_bytes": peak_rss,
        "rss_before_bytes": before,
    }


def run(dataroot: Path, steps: int, out: Path, overrides: Sequence[str] = (), pair: str = "tiny",
        teachers: dict[str, str] | None = None) -> dict:
    """Every method of ``pair``, ``steps`` steps each; ``teachers``: role -> run directory or model
    file (a role not given: an untrained teacher of its preset, recorded as such)."""
    if pair not in METHODS:
        raise ValueError(f"unknown pair '{pair}' (known: {', '.join(METHODS)})")
    teachers = teachers or {}
    unknown = sorted(set(teachers) - set(TEACHERS[pair]))
    if unknown:
        raise ValueError(f"pair '{pair}' reads no teacher '{unknown[0]}' (its teachers: {', '.join(TEACHERS[pair])})")
    started = environment()
    methods = {}
    with tempfile.TemporaryDirectory() as scratch:
        used, recorded = {}, {}  # role -> what the runs read; -> what the results file names
        for role, preset in TEACHERS[pair].items():
            given = teachers.get(role)
            used[role] = given or untrained_teacher(preset, dataroot, Path(scratch))
            recorded[role] = given or f"untrained {preset}"
        for method, (preset, own, role) in METHODS[pair].items():
            arguments = ["--one", preset, "--dataroot", str(dataroot), "--steps", str(steps)]
            if role is not None:
                arguments += ["--teacher", used[role]]
            if method.endswith("_cached"):
                arguments.append("--cached")
            for override in (*own, *overrides):
                arguments += ["--set", override]
            print(f"-- {method}: {steps} steps of {preset}", flush=True)
            methods[method] = run_isolated("bridgeta.bench.train_cost", arguments, f"{method} ({preset})")
    base = methods["baseline"]
    for row in methods.values():
        row["step_time_ratio"] = row["step_time_s"] / base["step_time_s"]
        row["memory_ratio"] = row["peak_memory_bytes"] / base["peak_memory_bytes"]
    result = {"environment": started, "pair": pair, "dataroot": str(dataroot), "teacher": recorded["teacher"],
              "teachers": recorded, "steps": steps, "overrides": list(overrides), "methods": methods}
    write_json(out, result)
    return result


def format_table(result: dict) -> str:
    width = max(len(m) for m in ["method", *result["methods"]]) + 2
    lines = [f"{'method':<{width}}{'step (s)':>10}{'x baseline':>12}{'memory (MiB)':>14}{'x baseline':>12}"]
    for method, row in result["methods"].items():
        lines.append(
            f"{method:<{width}}{row['step_time_s']:>10.3f}{row['step_time_ratio']:>12.2f}"
            f"{row['peak_memory_bytes'] / 2**20:>14.0f}{row['memory_ratio']:>12.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bridgeta bench train-cost", description=__doc__.splitlines()[0])
    parser.add_argument("--dataroot", required=True, type=Path)
    parser.add_argument("--pair", choices=sorted(METHODS), default="tiny", help="which methods (default: tiny)")
    parser.add_argument("--teacher", default=None,
                        help="teacher run directory or model file (default: an untrained teacher of the pair's preset)")
    parser.add_argument("--aligned-teacher", default=None,
                        help="tinybev: BridgeTA's teacher of the student's widths (default: an untrained tiny-lc-mt)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every method (e.g. train.batch_size=4)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default: results/train_cost.json; results/train_cost_<pair>.json for another pair)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one method, JSON on stdout
    parser.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)  # internal: with --one
    args = parser.parse_args(argv)
    if args.one is not None:
        row = measure_one(args.one, str(args.dataroot), args.teacher, args.steps, args.overrides, args.cached)
        print(json.dumps(row))
        return 0
    # Bad input fails here, naming the path, before any method trains.
    if not any(args.dataroot.glob("v1.0-*")):
        parser.error(f"--dataroot {args.dataroot}: no nuScenes tables (v1.0-*/) there")
    if args.aligned_teacher is not None and "aligned_teacher" not in TEACHERS[args.pair]:
        parser.error(f"--aligned-teacher: pair '{args.pair}' has no aligned teacher (only tinybev)")
    from bridgeta.engine.evaluate import resolve_model_file

    teachers = {role: path for role, path in (("teacher", args.teacher), ("aligned_teacher", args.aligned_teacher))
                if path is not None}
    for role, path in teachers.items():
        try:
            resolve_model_file(path)
        except (FileNotFoundError, ValueError) as exc:
            parser.error(f"--{role.replace('_', '-')} {path}: {exc}")
    out = args.out or Path("results") / ("train_cost.json" if args.pair == "tiny" else f"train_cost_{args.pair}.json")
    result = run(args.dataroot, args.steps, out, args.overrides, args.pair, teachers)
    print(format_table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
