"""The main job on the embedded default: ``bridgeta demo``.

Generates a small synthetic world in nuScenes format (train, validation and test in different
towns), prepares its labels, trains the tiny LiDAR-camera fusion teacher, then three camera-only
students on one schedule: the baseline (no teacher), the paper's "w/o TA" direct distillation
and BridgeTA. Every model is evaluated on the test towns; the demo writes a table,
``results.json``, the representation-gap figure and pictures. Finished runs are reused, so an
interrupted demo continues where it stopped.

World and schedule are those of ``bridgeta bench accuracy --preset demo`` (the demo is its seed 0
for the baseline, direct and BridgeTA, so ``--work`` pointing at the demo reuses these runs),
far shorter than the presets' own recipes so that the whole job, install included, fits in 20
minutes on 2 CPU cores of the slowest machine we measured (AVX2, fp32 training). It shows the
pipeline, not a comparison: the benchmark's ``cpu`` preset is the long protocol (docs/results.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from bridgeta.bench.accuracy import PRESETS
from bridgeta.bench.distill import Protocol, run_name, train_method
from bridgeta.data.cache import LabelCache
from bridgeta.data.prepare import prepare_dataroot
from bridgeta.data.show import render_sample_picture
from bridgeta.data.synth.generate import VERSION, generate_dataroot
from bridgeta.engine.logging import read_metrics, training_diagnostics
from bridgeta.engine.model_file import export_student
from bridgeta.models.cost import measure_model_cost
from bridgeta.provenance import environment

# Methods of `bridgeta bench accuracy`, in the table's order; the teacher comes last.
STUDENTS = ("baseline", "direct", "bridgeta")
# The demo accuracy preset's world and schedule: the demo is its seed 0 for these methods.
CPU = PRESETS["demo"]


def _epochs(count: int) -> str:
    return f"{count} epoch" + ("" if count == 1 else "s")


def format_table(results: dict[str, dict]) -> str:
    names = list(results)
    classes = list(next(iter(results.values()))["iou"])
    lines = [f"{'IoU (test towns)':<18}" + "".join(f"{n:>12}" for n in names)]
    for name in classes:
        lines.append(f"{name:<18}" + "".join(f"{results[m]['iou'][name]:>12.3f}" for m in names))
    lines.append(f"{'mIoU':<18}" + "".join(f"{results[m]['miou']:>12.3f}" for m in names))
    for condition in ("day", "night", "rain"):
        cells = []
        for m in names:
            value = results[m]["by_condition"][condition]["miou"]
            cells.append(f"{value:>12.3f}" if value is not None else f"{'-':>12}")
        lines.append(f"{'mIoU ' + condition:<18}" + "".join(cells))
    for band in results[names[0]]["by_range"]:
        cells = [f"{results[m]['by_range'][band]['miou']:>12.3f}" for m in names]
        lines.append(f"{'mIoU ' + band + ' m':<18}" + "".join(cells))
    return "\n".join(lines)


def run_demo(
    out_dir: Path,
    scenes: int = CPU.scenes,
    duration: float = CPU.duration,
    seed: int = 0,
    epochs: int | None = None,
    teacher_epochs: int | None = None,
) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    started = environment()
    # Wall seconds per phase of this invocation (a phase whose outputs were reused takes ~0).
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        """Record the wall seconds since the previous phase ended as ``phase``'s."""
        seconds[phase] = time.perf_counter() - clock - sum(seconds.values())

    dataroot = out_dir / "world"
    runs_dir = out_dir / "runs"
    print(f"== 1/5 synthetic world: {scenes} scenes of {duration:.0f} s, train/val/test in different towns ==")
    if (dataroot / VERSION).exists():
        print(f"reusing {dataroot}")
    else:
        # No complete world: whatever a killed generation left in the demo's own folder is replaced.
        world = generate_dataroot(dataroot, scenes, seed=seed, preset=CPU.world, duration=duration, force=True)
        print(f"{world.samples} samples, {world.sweeps} LiDAR sweeps, {world.annotations} boxes, "
              f"{world.seconds:.0f} s ({world.samples_per_second:.1f} samples/s)")
    cache = LabelCache(prepare_dataroot(dataroot, VERSION, progress=False))
    sample_picture = render_sample_picture(cache, len(cache) // 2, out_dir / "sample.png")
    print(f"samples per split {cache.meta['counts']}; one sample drawn in {sample_picture}")

    lap("world")
    protocol = replace(
        CPU.protocol,
        epochs=epochs or CPU.protocol.epochs,
        teacher_epochs=teacher_epochs or CPU.protocol.teacher_epochs,
    )
    print(f"\n== 2/5 teacher: {protocol.teacher} (LiDAR + camera), {_epochs(protocol.teacher_epochs)} "
          "on the train towns ==")
    runs = {"teacher": train_method("teacher", dataroot, runs_dir, seed, protocol)}
    lap("teacher")
    print(f"\n== 3/5 camera-only {protocol.student} students, {_epochs(protocol.epochs)} each: "
          "baseline, direct (w/o TA), BridgeTA ==")
    for method in STUDENTS:
        print(f"-- {method}")
        runs[method] = train_method(method, dataroot, runs_dir, seed, protocol)
        lap(method)

    print("\n== 4/5 deployed cost: the exported students are the baseline network ==")
    costs = _deployed_costs(out_dir, runs_dir, seed, protocol)
    print(f"{'model':<10}{'params (M)':>12}{'GMACs':>10}  tensors")
    for role, cost in costs.items():
        print(f"{role:<10}{cost['params'] / 1e6:>12.3f}{cost['macs'] / 1e9:>10.3f}  {cost['tensors']}")

    print("\n== 5/5 evaluation on the test towns ==")
    order = [*STUDENTS, "teacher"]
    tests = {role: runs[role]["test"] for role in order}
    table = format_table(tests)
    print(table)
    (out_dir / "table.txt").write_text(table + "\n")
    pictures = _prediction_pictures(out_dir, runs_dir, cache, seed, protocol)
    gap = _gap_figure(out_dir, runs_dir, seed, protocol)
    diagnostics = {
        role: training_diagnostics(read_metrics(runs_dir / run_name(role, seed, protocol)))
        for role in STUDENTS
        if role != "baseline"
    }
    for role, summary in diagnostics.items():
        shares = ", ".join(f"{name} {100 * value:.0f}%" for name, value in summary["shares"].items())
        epsilon = ", ".join(
            f"{level} {e['min']:.2f}-{e['max']:.2f}" for level, e in summary["epsilon"].items()
        )
        print(f"{role}: loss shares (last quarter) {shares}" + (f"; eps* {epsilon}" if epsilon else ""))

    results = {
        "world": {"dataroot": str(dataroot), "samples_per_split": cache.meta["counts"]},
        "schedule": {"teacher_epochs": protocol.teacher_epochs, "student_epochs": protocol.epochs},
        "models": {role: runs[role] for role in order},
        "deployed_cost": costs,
        # Per distillation run: loss shares over the last quarter of training, eps* range per level.
        "diagnostics": diagnostics,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "environment": started,
    }
    lap("evaluation")
    seconds["total"] = sum(seconds.values())
    results["seconds"] = seconds
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    print("wall time: " + ", ".join(f"{phase} {value / 60:.1f} min" for phase, value in seconds.items()))
    print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'table.txt'}, {gap}, {sample_picture}, "
          + ", ".join(str(p) for p in pictures))
    return results


def _deployed_costs(out_dir: Path, runs_dir: Path, seed: int, protocol: Protocol) -> dict[str, dict]:
    """Export each student (as ``bridgeta export`` does) and measure what is deployed.

    MACs are counted once per architecture: the exports are checked to be the baseline network.
    """
    costs: dict[str, dict] = {}
    measured: dict[str, tuple[int, int]] = {}
    for role in (*STUDENTS, "teacher"):
        run = runs_dir / run_name(role, seed, protocol)
        path, model = export_student(run, out_dir / "deploy" / f"{role}.safetensors")
        architecture = repr(model.config)
        if architecture not in measured:
            cost = measure_model_cost(model)
            measured[architecture] = (cost.params, cost.macs)
        params, macs = measured[architecture]
        costs[role] = {"file": str(path), "params": params, "macs": macs, "tensors": len(model.state_dict())}
    return costs


def _gap_figure(out_dir: Path, runs_dir: Path, seed: int, protocol: Protocol) -> Path:
    from bridgeta.engine.gap_plot import plot_gap

    distilled = [role for role in STUDENTS if role != "baseline"]
    return plot_gap(
        [runs_dir / run_name(role, seed, protocol) for role in distilled],
        out_dir / "representation_gap.png",
        labels=distilled,
    )


def _prediction_pictures(
    out_dir: Path, runs_dir: Path, cache: LabelCache, seed: int, protocol: Protocol
) -> list[Path]:
    """Prediction vs ground truth of the baseline, BridgeTA and the teacher on one day and one
    night test sample (``bridgeta viz`` draws any other run)."""
    from bridgeta.engine.viz import render_prediction

    test = [i for i in range(len(cache)) if cache.record(i)["split"] == "test"]
    pictures = []
    for condition in ("day", "night"):
        matching = [i for i in test if cache.record(i)["condition"] == condition]
        if not matching:
            continue
        token = cache.tokens[matching[len(matching) // 2]]
        for role in ("baseline", "bridgeta", "teacher"):
            path = out_dir / f"prediction_{role}_{condition}.png"
            run = runs_dir / run_name(role, seed, protocol)
            pictures.append(render_prediction(run, None, None, token, path, split="test"))
    return pictures
