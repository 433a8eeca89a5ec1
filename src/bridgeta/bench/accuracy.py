"""``bridgeta bench accuracy``: every method on one protocol, several seeds, the synthetic test towns.

A preset fixes the world, the teacher and student architectures, the schedule and the methods:

* ``cpu``: the demo's world (10 scenes of 20 s, train/val/test in different towns), ``tiny-lc``
  teacher (3 epochs) and ``tiny-c`` students (2 epochs each): teacher, baseline, ``direct`` (w/o
  TA), ``feature_kd``, ``logit_kd``, ``bridgeta``, the other rows of BridgeTA's Table 4 and the
  fixed-epsilon ablation. About 40 minutes per seed on 2 CPU cores, so 2 seeds fit in 2 hours.
  ``bridgeta demo`` runs seed 0 of its first four methods with the same settings, so
  ``--work runs/demo`` reuses a finished demo.
* ``gpu``: a larger world rendered at the default sensor resolution and the ``gpu-lc`` teacher /
  ``gpu-c`` student pair (``bevfusion-c`` widths at a reduced input resolution); each training
  run is sized to fit in about 5 minutes on one H100. Generate the world on the GPU machine.

Writes ``OUT/results.json`` and ``OUT/table.md`` (mean ± std per class, mIoU, night mIoU,
far-range mIoU, gap closed = (student - baseline) / (teacher - baseline)); runs live under
``WORK/runs`` and are resumed or skipped when finished, the world under ``WORK/world``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bridgeta.bench.distill import METHODS, Protocol
from bridgeta.bench.distill import run as run_methods


@dataclass(frozen=True)
class AccuracyPreset:
    scenes: int
    duration: float
    world: str  # synth preset: sensor resolution and town size
    protocol: Protocol
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(m for m in METHODS if m != "teacher"))


PRESETS = {
    "cpu": AccuracyPreset(scenes=10, duration=20.0, world="tiny", protocol=Protocol(epochs=2, teacher_epochs=3)),
    "gpu": AccuracyPreset(
        scenes=30,
        duration=20.0,
        world="default",
        protocol=Protocol(
            teacher="gpu-lc", student="gpu-c", recipe="distill/gpu-c-bridgeta", epochs=6, teacher_epochs=6
        ),
    ),
}


def ensure_world(work: Path, preset: AccuracyPreset, seed: int = 0) -> Path:
    """The preset's world under ``work/world``: generated and prepared once, then reused."""
    from bridgeta.data.prepare import prepare_dataroot
    from bridgeta.data.synth.generate import VERSION, generate_dataroot

    dataroot = work / "world"
    if not (dataroot / VERSION).exists():  # no complete world: what a killed generation left is replaced
        generate_dataroot(dataroot, preset.scenes, seed=seed, preset=preset.world, duration=preset.duration, force=True)
    prepare_dataroot(dataroot, VERSION, progress=False)
    return dataroot


def format_markdown(result: dict) -> str:
    """Methods as rows: per-class IoU, mIoU, night, far range and gap closed, mean ± std in %."""
    table = result["table"]
    first = next(iter(table.values()))
    classes = list(first["iou"])
    far = list(first["by_range"])[-1]
    header = ["method", *classes, "mIoU", "night mIoU", f"mIoU {far} m", "gap closed"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]

    def cell(entry: dict) -> str:
        return "–" if entry.get("mean") is None else f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"

    for method, row in table.items():
        closed = row.get("gap_closed", {})
        closed_text = "–" if closed.get("mean") is None else f"{closed['mean']:+.2f} ± {closed['std']:.2f}"
        cells = [f"`{method}`", *(cell(row["iou"][c]) for c in classes), f"**{cell(row['miou'])}**",
                 cell(row["by_condition"].get("night", {})), cell(row["by_range"][far]), closed_text]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(preset_name: str, seeds: int, out: Path, work: Path, dataroot: Path | None,
        methods: Sequence[str] | None = None) -> dict:
    preset = PRESETS[preset_name]
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    dataroot = dataroot or ensure_world(work, preset)
    result = run_methods(
        dataroot, work / "runs", out / "results.json", seeds, methods or preset.methods, preset.protocol,
        metadata={"preset": {"name": preset_name, **asdict(preset)}},
    )
    (out / "table.md").write_text(format_markdown(result) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bridgeta bench accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), required=True)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True, help="results directory (results.json, table.md)")
    parser.add_argument("--work", type=Path, default=None, help="world and runs (default: OUT)")
    parser.add_argument("--dataroot", type=Path, default=None, help="use this prepared world instead of WORK/world")
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {', '.join(METHODS)}")
    args = parser.parse_args(argv)
    result = run(args.preset, args.seeds, args.out, args.work or args.out, args.dataroot, args.methods)
    print(format_markdown(result))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'table.md'}")
    return 0
