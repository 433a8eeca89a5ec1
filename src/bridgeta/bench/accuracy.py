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
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bridgeta.bench.distill import (
    LONGER_BASELINES, LONGER_METHODS, METHODS, STAGE_AFTER, TUNED_METHODS, Protocol, aggregate, is_baseline_point, is_monotakd, is_tinybev,
    learned_classes, method_job, paired, prepare_inputs, run_name, stage_depth, train_method,
)
from bridgeta.bench.distill import run as run_methods
from bridgeta.bench.jobs import run_jobs
from bridgeta.distill.output_cache import OUTPUT_CACHE_ENV
from bridgeta.provenance import environment, write_json


@dataclass(frozen=True)
class AccuracyPreset:
    scenes: int
    duration: float
    world: str  # synth preset: sensor resolution and town size
    protocol: Protocol
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(m for m in METHODS if m != "teacher"))
    # Seeds per method (``default_seeds`` for the others); ``--seeds`` caps them all.
    seeds: dict[str, int] = field(default_factory=dict)
    default_seeds: int = 2
    # Backbone pretraining (``bridgeta pretrain-backbone``) steps, once per world; 0: none.
    pretrain_steps: int = 0
    # The fair sweep on the validation towns (bench distill-sweep): each tuned method gets these
    # lambdas (scales of its recipe weights) and ``sweep_seeds`` seeds each; empty: no sweep,
    # every method trains with the recipe's weights.
    lambdas: tuple[float, ...] = ()
    sweep_seeds: int = 2
    # Methods trained without the pretrained backbone too (suffix ``_scratch``, ``default_seeds``
    # seeds), for the effect of pretraining; only when the method is among those run (a
    # ``--methods`` list for other rows leaves them out).
    scratch: tuple[str, ...] = ()


# The methods whose seed 0 ``--reproduce`` trains a second time.
REPRODUCED = ("baseline", "direct", "bridgeta", "monotakd")
# A checkpoint every 200 steps, so a killed run loses minutes, not an epoch.
RESUMABLE = ("train.checkpoint_every=200",)
# The cpu tables' augmentation regime: each sample's augmentation drawn once, as epoch 0's. Every
# run their ledgers recorded trained so (a loader defect kept the first epoch's stream in the
# workers, data/epoch.py), and the runs still to train must form one protocol with them.
ONCE = (*RESUMABLE, "data.augment.draws=once")
CPU_METHODS = ("baseline", "direct", "feature_kd", "logit_kd", "bridgeta", "fixed_epsilon",
               "monotakd", "monotakd_imd_only", "monotakd_cmrd_only", "monotakd_no_sam", "monotakd_no_ffm",
               "monotakd_shared", "baseline_long", "baseline_x4", "direct_long", "bridgeta_long")
# Ablation and control rows: 2 seeds each (seeds 0 and 1, paired with every headline method's).
# baseline_long is the control of MonoTAKD's headline row (3 seeds), so it gets the default 3:
# with 2, MonoTAKD's delta against the baseline of its steps would read one seed fewer than its mIoU.
_ABLATION_SEEDS = {m: 2 for m in CPU_METHODS
                   if m != "baseline_long"
                   and (m in ("fixed_epsilon", *LONGER_BASELINES, *LONGER_METHODS) or m.startswith("monotakd_"))}

PRESETS = {
    # The paper's regime on 2 CPU cores (docs/results.md): a 30-scene world (6 test scenes: day,
    # night and rain), pretrained backbones, students on a fixed step budget (and the baseline
    # on 2x and 4x of it: the budget is below what the network can learn), every method's
    # weights chosen on validation with the same budget, 5 seeds for the headline methods.
    "cpu": AccuracyPreset(
        scenes=30, duration=20.0, world="tiny",
        protocol=Protocol(student_steps=800, teacher_steps=1600, curve_points=8, teacher_seeds=1,
                          student_overrides=ONCE, teacher_overrides=ONCE),
        methods=CPU_METHODS,
        seeds={"baseline": 5, "direct": 5, "bridgeta": 5, **_ABLATION_SEEDS},
        default_seeds=3,
        pretrain_steps=1000,
        lambdas=(0.0, 0.3, 1.0, 3.0),
        sweep_seeds=2,
        scratch=("baseline",),
    ),
    # The detection table (docs/detection.md): the multi-task pair, tiny-lc-mt teacher and tiny-c-mt
    # students, on the cpu protocol's schedule in towns with busy streets ("tiny-traffic": in the
    # cpu world nearly every vehicle is parked); recipe weights, 3 seeds.
    "cpu-mt": AccuracyPreset(
        scenes=30, duration=20.0, world="tiny-traffic",
        protocol=Protocol(teacher="tiny-lc-mt", student="tiny-c-mt", student_steps=800, teacher_steps=1600,
                          curve_points=8, teacher_seeds=1,
                          student_overrides=(*ONCE, "model.heads.object={classes: [car, truck, bus, pedestrian], "
                                             "nms_radius: [2.0, 3.46, 3.16, 0.42], head_channels: 32}"),
                          teacher_overrides=ONCE),
        methods=("baseline", "direct", "bridgeta"),
        default_seeds=3,
        pretrain_steps=1000,
    ),
    # The multi-task table of TinyBEV (docs/methods/tinybev.md): the tiny-lc-tinybev teacher
    # (every head, wider), the compact tiny-c-tinybev student without distillation, the three
    # stages, each from the previous one, sharing the student's step budget, and BridgeTA on the
    # same student from a teacher of its widths (no adapters), and the staged baseline (the
    # student without distillation in the stages' three chained runs: the control for their
    # restarts); 3 seeds; cpu-mt's world.
    "cpu-tinybev": AccuracyPreset(
        scenes=30, duration=20.0, world="tiny-traffic",
        protocol=Protocol(teacher="tiny-lc-tinybev", student="tiny-c-tinybev", student_steps=800,
                          teacher_steps=1600, curve_points=8, teacher_seeds=1,
                          student_overrides=ONCE, teacher_overrides=ONCE,
                          # BridgeTA's row: cpu-mt's teacher (the same run when both share WORK_MT)
                          aligned_teacher="tiny-lc-mt", aligned_teacher_overrides=ONCE),
        methods=("baseline", "tinybev_s1", "tinybev_s2", "tinybev_s3", "tinybev_bridgeta",
                 "baseline_s1", "baseline_s2", "baseline_s3"),
        default_seeds=3,
        pretrain_steps=1000,
    ),
    # What the demo runs (its seed 0 of baseline, direct and BridgeTA): a schedule sized so that
    # the whole demo, install included, fits in 20 minutes on the slowest 2-core machine we have
    # measured (AVX2, fp32 training): 10 scenes of 16 s, the teacher 2 epochs, each student one,
    # recipe weights, the warm-up shortened with the schedule (the presets' 50 steps would be half
    # of a student's 96).
    "demo": AccuracyPreset(
        scenes=10, duration=16.0, world="tiny",
        protocol=Protocol(epochs=1, teacher_epochs=2, student_overrides=("train.optimizer.warmup_steps=10",),
                          teacher_overrides=("train.optimizer.warmup_steps=20",)),
    ),
    "gpu": AccuracyPreset(
        scenes=30,
        duration=20.0,
        world="default",
        protocol=Protocol(
            teacher="gpu-lc", student="gpu-c", recipe="distill/gpu-c-bridgeta", epochs=6, teacher_epochs=6
        ),
    ),
}


# What the synthetic world's generator writes (the prepared label cache aside): the tables, the
# maps, the sensor files and the per-pixel camera labels.
WORLD_FILES = ("v1.0-*/*.json", "maps/**/*", "samples/**/*", "sweeps/**/*", "camera_labels/**/*")
# Beside them (outside the digest): the synth preset, scenes, duration and seed the world was made with.
WORLD_MARKER = "bridgeta_bench_world.json"


def ensure_world(work: Path, preset: AccuracyPreset, seed: int = 0, ledger: Path | None = None) -> Path:
    """The preset's world under ``work/world``: generated and prepared once, then reused. With a
    ``ledger``, the world must be the one its recorded runs were trained on (its digest)."""
    from bridgeta.bench import ledger as run_ledger
    from bridgeta.data.prepare import prepare_dataroot
    from bridgeta.data.synth.generate import VERSION, generate_dataroot

    dataroot = work / "world"
    # What the world was generated as: bench presets with other worlds (cpu: tiny, cpu-mt:
    # tiny-traffic) must not share a work directory, and only a ledger's digest would tell.
    made_as = {"synth_preset": preset.world, "scenes": preset.scenes, "duration": preset.duration, "seed": seed}
    marker = dataroot / WORLD_MARKER
    if not (dataroot / VERSION).exists():  # no complete world: what a killed generation left is replaced
        generate_dataroot(dataroot, preset.scenes, seed=seed, preset=preset.world, duration=preset.duration, force=True)
    elif marker.exists() and (recorded := json.loads(marker.read_text())) != made_as:
        raise ValueError(f"{marker}: the world in {dataroot} was generated as {json.dumps(recorded)}, this preset "
                         f"needs {json.dumps(made_as)}; use another --work for it")
    if ledger is not None:
        run_ledger.check_or_record(ledger, "world", run_ledger.tree_digest(dataroot, WORLD_FILES), f"the world {dataroot}")
    if not marker.exists():  # worlds from before the marker are named by the ledger's digest alone
        marker.write_text(json.dumps(made_as) + "\n")
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


def format_detection_markdown(result: dict) -> str | None:
    """The detection table of a multi-task benchmark (mAP, NDS, AP per class, the unclipped mAP,
    paired NDS and unclipped-mAP deltas), or None when no row has detection figures."""
    rows = {m: r["detection"] for m, r in result["table"].items() if "detection" in r}
    if not rows:
        return None
    classes = list(next(iter(rows.values()))["per_class_ap"])

    def cell(entry: dict | None, scale: float = 100.0, signed: bool = False) -> str:
        if not entry or entry.get("mean") is None:
            return "–"
        sign = "+" if signed else ""
        return f"{scale * entry['mean']:{sign}.1f} ± {scale * entry['std']:.1f}"

    header = ["method", "mAP", "NDS", *(f"AP {c}" for c in classes), "unclipped mAP", "Δ NDS vs baseline",
              "Δ NDS vs `direct`", "Δ unclipped mAP vs baseline", "Δ unclipped mAP vs `direct`"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for method, row in rows.items():
        cells = [f"`{method}`", f"**{cell(row['mAP'])}**", f"**{cell(row['NDS'])}**",
                 *(cell(row["per_class_ap"][c]) for c in classes), cell(row.get("mAP_unclipped")),
                 cell(row.get("paired_nds_vs_baseline"), signed=True), cell(row.get("paired_nds_vs_direct"), signed=True),
                 cell(row.get("paired_map_unclipped_vs_baseline"), signed=True),
                 cell(row.get("paired_map_unclipped_vs_direct"), signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_multitask_markdown(result: dict) -> str | None:
    """TinyBEV's table: per method mAP, NDS, the unclipped mAP (docs/detection.md), map mIoU, minADE, and L2 and the collision rate in
    UniAD's convention averaged over 1, 2 and 3 s (``l2@mean``, ``collision@mean``: the column
    TinyBEV's figures compare with) and L2 at 3 s (``l2@3s``, the issue's column), then the paired
    deltas against the baseline; None when no row has planning figures."""
    rows = {m: r for m, r in result["table"].items() if "planning" in r}
    if not rows:
        return None

    def cell(entry: dict | None, scale: float = 1.0, digits: int = 2, signed: bool = False) -> str:
        if not entry or entry.get("mean") is None:
            return "–"
        return f"{scale * entry['mean']:{'+' if signed else ''}.{digits}f} ± {scale * entry['std']:.{digits}f}"

    header = ["method", "mAP", "NDS", "unclipped mAP", "map mIoU", "minADE (m)", "L2 (m)", "L2@3s (m)", "collision (%)",
              "Δ NDS", "Δ unclipped mAP", "Δ mIoU", "Δ minADE", "Δ L2", "Δ L2@3s", "Δ collision"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for method, row in rows.items():
        detection = row.get("detection", {})
        paired = row.get("paired_multitask_vs_baseline", {})
        cells = [f"`{method}`", cell(detection.get("mAP"), 100, 1), cell(detection.get("NDS"), 100, 1),
                 cell(detection.get("mAP_unclipped"), 100, 1), cell(row["miou"], 100, 1), cell(row.get("motion", {}).get("minADE")),
                 cell(row["planning"].get("l2@mean")), cell(row["planning"].get("l2@3s")),
                 cell(row["planning"].get("collision@mean"), 100, 1),
                 cell(paired.get("NDS"), 100, 1, True), cell(paired.get("mAP_unclipped"), 100, 1, True),
                 cell(paired.get("mIoU"), 100, 1, True),
                 cell(paired.get("minADE"), signed=True), cell(paired.get("l2@mean"), signed=True),
                 cell(paired.get("l2@3s"), signed=True), cell(paired.get("collision@mean"), 100, 1, True)]
        lines.append("| " + " | ".join(cells) + " |")
    # The path the ego's status alone gives (the planners' prior): the same test samples for every
    # row, so one line, from the baseline's runs (or the first row's).
    reference = rows.get("baseline", next(iter(rows.values())))["planning"]
    if "constant_velocity/l2@mean" in reference:
        cells = ["constant velocity (ego status, no network)", *["–"] * 5,
                 *(cell(reference.get(f"constant_velocity/{k}"), *scale) for k, scale in
                   (("l2@mean", ()), ("l2@3s", ()), ("collision@mean", (100, 1)))), *["–"] * 7]
        lines.append("| " + " | ".join(cells) + " |")
    staged = {m: r["paired_multitask_vs_same_schedule"] for m, r in rows.items() if "paired_multitask_vs_same_schedule" in r}
    if staged:
        # Each stage is its own run (warm-up, cosine decay, fresh optimiser): its gain over the
        # baseline mixes the distillation with the restarts, which the staged baseline has too.
        lines += ["", "Against the baseline trained in the same chained stages (the same runs without the "
                  "distillation terms); Δ paired per seed:", "",
                  "| method | against | Δ NDS | Δ unclipped mAP | Δ mIoU | Δ mIoU per seed | Δ minADE | Δ L2 | Δ L2@3s | Δ collision |",
                  "|---|---|" + "---:|" * 8]
        for method, paired in staged.items():
            per_seed = (paired.get("mIoU") or {}).get("per_seed") or {}
            cells = [f"`{method}`", f"`{paired['reference']}`", cell(paired.get("NDS"), 100, 1, True),
                     cell(paired.get("mAP_unclipped"), 100, 1, True), cell(paired.get("mIoU"), 100, 1, True),
                     "; ".join(f"{seed}: {100 * delta:+.1f}" for seed, delta in per_seed.items()) or "–",
                     cell(paired.get("minADE"), signed=True), cell(paired.get("l2@mean"), signed=True),
                     cell(paired.get("l2@3s"), signed=True), cell(paired.get("collision@mean"), 100, 1, True)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def backbone_file(work: Path) -> Path:
    """Where the world's pretrained image backbone lives (``ensure_backbone`` writes it)."""
    from bridgeta.engine.pretrain import BACKBONE_FILE

    return work / "backbone" / BACKBONE_FILE


def ensure_backbone(work: Path, dataroot: Path, preset: AccuracyPreset, ledger: Path | None = None) -> Path:
    """The world's pretrained image backbone under ``work/backbone``: trained once, then reused.
    With a ``ledger``, it must be the one its recorded runs started from (its digest)."""
    from bridgeta.bench import ledger as run_ledger
    from bridgeta.config import load_config
    from bridgeta.engine.pretrain import pretrain_backbone

    path = backbone_file(work)
    if not path.is_file():  # a killed pretraining left no backbone: run it again
        config = load_config(preset.protocol.student, [
            *preset.protocol.student_overrides, f"data.dataroot={dataroot}",
            f"pretrain.max_steps={preset.pretrain_steps}", "pretrain.epochs=1000",
        ])
        print(f"== pretraining the {preset.protocol.student} image backbone ({preset.pretrain_steps} steps)", flush=True)
        pretrain_backbone(config, path.parent, force=True)
    if ledger is not None:
        run_ledger.check_or_record(ledger, "backbone", run_ledger.weights_digest(path), f"the pretrained backbone {path}")
    return path


def _capped(count: int, cap: int | None) -> int:
    return min(count, cap) if cap else count


# The row that partners a family's ablations when the family's chosen lambda is 0.
PARTNERS = {"bridgeta": "bridgeta_kd", "monotakd": "monotakd_kd"}


def _family(method: str) -> str | None:
    """The tuned method whose weights an untuned variant takes (None for tuned methods, and for
    runs without teacher terms: the teachers, every baseline, MonoTAKD's TA)."""
    if (method in PARTNERS.values() or METHODS[method] is None or method in ("tinybev_bridgeta", "tinybev_joint", *TUNED_METHODS)
            or is_tinybev(method)):
        return None
    if method in LONGER_METHODS:
        return LONGER_METHODS[method][0]
    return "monotakd" if is_monotakd(method) else "bridgeta"


def ablation_lambdas(methods: Sequence[str], chosen: dict[str, float | None], points: list[dict]) -> dict[str, float | None]:
    """The lambda of each untuned variant (an ablation such as ``fixed_epsilon`` or
    ``monotakd_no_sam``), and of its family's partner row.

    A variant takes its family's chosen lambda. When that is 0, the family's teacher terms are
    off, and an ablation that changes or removes one of them would be the family itself: it
    then runs at the family's best lambda > 0 on the validation sweep instead, and the family at
    that lambda joins the table as ``PARTNERS[family]`` (``bridgeta_kd``), the run the ablation
    is compared with (and Figure 5's BridgeTA curve). A family's longer-schedule row
    (``bridgeta_long``) follows the same rule: the question it answers is whether the teacher's
    terms help with more steps, which needs them on."""
    out: dict[str, float | None] = {}
    for method in methods:
        family = _family(method)
        if family is None:
            continue
        lam = chosen.get(family)
        if lam == 0 and family in PARTNERS:
            positive = [p for p in points if p["method"] == family and p["lambda"] > 0]
            if positive:
                lam = max(positive, key=lambda p: p["val_miou"])["lambda"]
                out[PARTNERS[family]] = lam
        out[method] = lam
    return out


def add_family_pairs(table: dict, runs: dict[str, list[dict]], lambdas: dict[str, float | None]) -> None:
    """Each ablation row's paired deltas against the run it ablates (``paired_vs_family``): its
    family's partner row (``monotakd_kd``, where the family chose lambda 0 and the ablations run
    at its best lambda > 0), else the family itself, and only at the ablation's own lambda.
    The longer-schedule rows are not ablations: their pair is the baseline of their steps."""
    for method, results in runs.items():
        family = _family(method) if method in METHODS else None  # roles such as baseline_scratch are rows of their own
        if family is None or method in LONGER_METHODS or method not in table:
            continue
        partner = PARTNERS.get(family)
        reference = partner if partner in runs else family
        if reference not in runs or lambdas.get(reference) is None or lambdas.get(reference) != lambdas.get(method):
            continue
        table[method]["paired_vs_family"] = {"reference": reference, **paired(results, runs[reference])}


def awaits_lambda(method: str, chosen: dict[str, float | None], preset: AccuracyPreset) -> bool:
    """Whether ``method``'s runs wait for the sweep: a summary leaves such a method out while its
    lambda is not chosen. The rows without teacher weights (the longer baselines) never wait."""
    return bool(preset.lambdas) and chosen.get(method) is None and METHODS.get(method) is not None


def seeds_of(method: str, preset: AccuracyPreset, cap: int | None) -> int:
    return _capped(preset.seeds.get(method, preset.default_seeds), cap)


def _curve(run_dir: Path) -> list[list[float]]:
    """``[[step, val_miou], ...]`` from a run's periodic validation (metrics.jsonl); [] before it starts."""
    from bridgeta.engine.logging import METRICS_FILE, read_metrics

    if not (run_dir / METRICS_FILE).is_file():
        return []
    return [[row["step"], row["eval"]["miou"]] for row in read_metrics(run_dir) if "eval" in row]


def _convergence(runs_dir: Path, protocol: Protocol) -> dict[str, list[list[float]]]:
    """The validation curves of seed 0 of the baseline and the teacher."""
    return {"baseline": _curve(runs_dir / run_name("baseline", 0, protocol)),
            "teacher": _curve(runs_dir / run_name("teacher", 0, protocol))}


def last_quarter_gain(curve: list[list[float]]) -> float | None:
    """Validation mIoU gained over the last quarter of the steps (end minus the point at 3/4)."""
    if len(curve) < 2:
        return None
    final_step, final = curve[-1]
    before = [miou for step, miou in curve if step <= 0.75 * final_step]
    return final - before[-1] if before else None


def run_staged(preset_name: str, out: Path, work: Path, dataroot: Path, jobs: int = 1,
               seed_cap: int | None = None, methods: Sequence[str] | None = None,
               sweep_out: Path | None = None, preset: AccuracyPreset | None = None,
               until: str = "test", reproduce: bool = False, summary: bool = False,
               ledger: Path | None = None) -> dict:
    """The cpu protocol: pretraining, teacher and baselines, the validation sweep, then the test
    seeds of every method at its chosen lambda. Every run is reused when finished. ``until``
    "sweep" stops after the sweep and returns its result. ``reproduce`` trains seed 0 of each
    headline method again (``REPRODUCED``, same config, a ``-rerun`` run) and reports how far it
    lands from the table's run: what a seed's figure is worth across commits and machines.
    ``summary`` trains nothing: it reads the runs finished so far and writes ``partial.json``
    (and the sweep's points so far to ``partial_sweep.json``) for a benchmark still running.
    ``ledger`` (default ``out/runs``) records every finished run, and a run recorded there is
    not trained again (bench/ledger.py): commit it with the results, and the benchmark goes on
    where it stopped on any machine that reproduces its world, backbone and teachers."""
    from bridgeta.bench import distill_sweep
    from bridgeta.engine.logging import read_metrics, training_diagnostics

    preset = preset or PRESETS[preset_name]
    methods = tuple(methods or preset.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:  # before any training, not after the sweep
        raise ValueError(f"unknown method '{unknown[0]}' (known: {', '.join(METHODS)})")
    unstaged = [m for m in methods if m in STAGE_AFTER and STAGE_AFTER[m] not in methods]
    if unstaged:  # a later stage starts from its previous stage's run, which must be trained too
        raise ValueError(f"--methods {unstaged[0]} needs {STAGE_AFTER[unstaged[0]]} (the stage it starts from)")
    started = environment()
    runs_dir = work / "runs"
    ledger = ledger or out / "runs"
    protocol = preset.protocol
    if summary:
        def execute(job_list):
            return [train_method(*job.args, **job.kwargs, read_only=True) for job in job_list]
    else:
        def execute(job_list):
            if jobs > 1:  # inputs first, here on every core, then the runs side by side (bench/ledger.py)
                for job in job_list:
                    prepare_inputs(*job.args, **job.kwargs)
            return run_jobs(job_list, jobs)
    if preset.pretrain_steps:
        backbone = backbone_file(work) if summary else ensure_backbone(work, dataroot, preset, ledger)
        protocol = replace(protocol, pretrained=str(backbone))
    sweep_seeds = _capped(preset.sweep_seeds, seed_cap)
    baseline_seeds = max(seeds_of("baseline", preset, seed_cap), sweep_seeds)
    teachers = protocol.teacher_seeds or max(seeds_of(m, preset, seed_cap) for m in methods)

    # Stage 1: the teacher(s) and the baselines (evaluated on val too: lambda = 0 of the sweep).
    print("== stage 1: teacher and baselines", flush=True)
    stage1 = [("teacher", method_job("teacher", s, dataroot, runs_dir, protocol, None, ("val", "test"), ledger=ledger))
              for s in range(teachers)]
    if "tinybev_bridgeta" in methods:  # its teacher has the student's widths (Protocol.aligned_teacher)
        stage1 += [("aligned_teacher", method_job("aligned_teacher", s, dataroot, runs_dir, protocol, None, ("val", "test"),
                                                  ledger=ledger))
                   for s in range(teachers)]
    stage1 += [("baseline", method_job("baseline", s, dataroot, runs_dir, protocol, None, ("val", "test"), ledger=ledger))
               for s in range(baseline_seeds)]
    scratch = replace(protocol, pretrained=None)
    scratch_seeds = _capped(preset.default_seeds, seed_cap)
    for method in (m for m in preset.scratch if m in methods):  # a --methods list without it: none
        stage1 += [(f"{method}_scratch", method_job(method, s, dataroot, runs_dir / "scratch", scratch, None, ("val", "test"),
                                                     ledger=ledger / "scratch"))
                   for s in range(scratch_seeds)]
    results1 = execute([job for _, job in stage1])
    if any(is_monotakd(m) for m in methods):
        # MonoTAKD's camera TA, one per teacher, in a second wave: it imitates that teacher's
        # fused BEV (distill.monotakd.assistant_imitation), so the teacher must have finished.
        assistants = [("assistant", method_job("assistant", s, dataroot, runs_dir, protocol, None, ("val", "test"), ledger=ledger))
                      for s in range(teachers)]
        stage1 += assistants
        results1 += execute([job for _, job in assistants])

    # Stage 2: the sweep on the validation towns; every tuned method gets the same points.
    chosen: dict[str, float | None] = {m: None for m in methods}
    tuned = [m for m in TUNED_METHODS if m in methods]
    sweep = None
    if preset.lambdas and tuned:
        print("== stage 2: loss weights on the validation towns", flush=True)
        # The preset's sweep sits beside the results folders (results/distill_sweep.json); a
        # --methods list that tunes fewer methods writes its own beside its table instead.
        every_tuned = [m for m in TUNED_METHODS if m in preset.methods]
        sweep_path = sweep_out or (out.parent if tuned == every_tuned else out) / "distill_sweep.json"
        sweep = distill_sweep.run(
            dataroot, runs_dir, sweep_path.with_name("partial_sweep.json") if summary else sweep_path, protocol,
            tuned, preset.lambdas, sweep_seeds, jobs, execute=execute, ledger=ledger,
        )
        chosen.update(sweep["chosen"])
        if until == "sweep":
            return sweep
        for method, lam in ablation_lambdas(methods, chosen, sweep["points"]).items():
            chosen[method] = lam

    # Stage 3: every method's seeds at its chosen lambda, evaluated on the test towns.
    print("== stage 3: test seeds", flush=True)
    stage3 = [(m, method_job(m, s, dataroot, runs_dir, protocol, chosen[m], ("val", "test"), ledger=ledger))
              for m in methods if m != "baseline" and not (summary and awaits_lambda(m, chosen, preset))
              for s in range(seeds_of(m, preset, seed_cap))]
    # The partner of a family's ablations, where the family chose lambda = 0 (see
    # ablation_lambdas): the family itself at its ablations' lambda, as many seeds as they have.
    # Its first seeds are the sweep's own runs, so they only get evaluated on the test towns.
    for family, partner in PARTNERS.items():
        if partner in chosen:
            ablations = [m for m in methods if _family(m) == family]
            stage3 += [(partner, method_job(family, s, dataroot, runs_dir, protocol, chosen[partner], ("val", "test"),
                                            ledger=ledger))
                       for s in range(max(seeds_of(m, preset, seed_cap) for m in ablations))]
    # In waves: a staged method (TinyBEV's S2, S3) starts once its previous stage has finished.
    results3: list = [None] * len(stage3)
    for depth in sorted({stage_depth(m) for m, _ in stage3}):
        wave = [i for i, (m, _) in enumerate(stage3) if stage_depth(m) == depth]
        for i, result in zip(wave, execute([stage3[i][1] for i in wave])):
            results3[i] = result

    reproducibility = {}
    if reproduce and not summary:
        print("== reproducibility: seed 0 of the headline methods, trained again", flush=True)
        headline = [m for m in REPRODUCED if m in methods]
        again = execute([method_job(m, 0, dataroot, runs_dir, protocol, chosen.get(m), ("test",), "-rerun", ledger)
                         for m in headline])
        for method, rerun in zip(headline, again):
            first = next(r for (role, _), r in zip(stage1 + stage3, results1 + results3)
                         if role == method and r["seed"] == 0)
            reproducibility[method] = {
                "table": first["test"]["miou"], "rerun": rerun["test"]["miou"],
                "delta": rerun["test"]["miou"] - first["test"]["miou"],
                "table_trained_by": (first.get("train") or {}).get("environment"),
                "rerun_trained_by": (rerun.get("train") or {}).get("environment"),
            }

    runs: dict[str, list[dict]] = {}
    reported_baselines = seeds_of("baseline", preset, seed_cap)
    for (role, job), result in zip(stage1 + stage3, results1 + results3):
        if result is None:  # a summary: not finished yet
            continue
        if role == "baseline" and result["seed"] >= reported_baselines:
            continue  # trained for the sweep only
        runs.setdefault(role, []).append({**result, "run": job.label})
    if summary:
        return _write_summary(out, started, dataroot, protocol, runs, runs_dir, preset_name, ledger, chosen)
    table = aggregate(runs)
    add_family_pairs(table, runs, chosen)
    splits = json.loads((dataroot / "bridgeta_splits.json").read_text())
    convergence = _convergence(runs_dir, protocol)
    diagnostics = {}
    for method in ("direct", "bridgeta", "fixed_epsilon", "bridgeta_kd"):
        if method in chosen:  # the methods run, and a partner row
            run_dir = runs_dir / run_name(_run_method(method), 0, protocol, chosen[method])
            diagnostics[method] = training_diagnostics(read_metrics(run_dir))
    result = {
        "environment": started,
        "dataroot": str(dataroot),
        "protocol": {
            **asdict(protocol),
            "test_scenes": len(splits["test"]),
            "val_scenes": len(splits["val"]),
            "train_scenes": len(splits["train"]),
            "jobs": jobs,
            "lambdas": {m: chosen[m] for m in (*methods, *PARTNERS.values()) if m != "baseline" and m in chosen},
        },
        "epochs": protocol.epochs,
        "learned_classes": learned_classes(runs),
        "convergence": convergence,
        "convergence_last_quarter_gain": {k: last_quarter_gain(v) for k, v in convergence.items()},
        "camera_fusion_ratio": _camera_fusion_ratio(table),
        "diagnostics": diagnostics,
        "pretraining": _pretraining(protocol),
        "budget": _budget(work, protocol),
        "reproducibility": reproducibility,
        "runs": runs,
        "table": table,
        "preset": {"name": preset_name, **asdict(preset)},
    }
    result["figures"] = _figures(out, runs_dir, protocol, chosen, methods, convergence)
    write_json(out / "results.json", result)
    extra = [t for t in (format_detection_markdown(result), format_multitask_markdown(result)) if t]
    (out / "table.md").write_text(format_markdown(result) + "\n" + "".join(f"\n{t}\n" for t in extra))
    return result


def _run_method(role: str) -> str:
    """The method that trains a table row's runs (a partner row's is its family)."""
    return next((family for family, partner in PARTNERS.items() if partner == role), role)


def _camera_fusion_ratio(table: dict) -> float:
    """Baseline over teacher test mIoU: where the camera student stands (the paper's is 0.90)."""
    return table["baseline"]["miou"]["mean"] / table["teacher"]["miou"]["mean"]


def _pretraining(protocol: Protocol) -> dict | None:
    """What ``pretrain-backbone`` reported for the protocol's backbone (steps, seconds, and its
    per-pixel metrics on the validation towns), or None without pretraining."""
    if not protocol.pretrained:
        return None
    path = Path(protocol.pretrained).parent / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    keep = ("steps", "epochs", "seconds", "train_images", "first_loss", "final_loss", "eval", "environment")
    return {k: summary[k] for k in keep if k in summary}


def _budget(work: Path, protocol: Protocol) -> dict:
    """What the protocol has cost so far: the optimiser-step time of every run under
    ``work/runs`` (teacher, TAs, sweep, test seeds, reruns, scratch baselines; evaluation not
    counted), and the backbone's pretraining. Step times of runs that shared the CPU with other
    jobs are longer than alone."""
    from bridgeta.engine.logging import read_metrics, training_seconds

    per_run = {}
    for metrics in sorted((work / "runs").rglob("metrics.jsonl")):
        per_run[str(metrics.parent.relative_to(work / "runs"))] = training_seconds(read_metrics(metrics.parent))
    pretrain = (_pretraining(protocol) or {}).get("seconds") or 0.0
    return {"runs": len(per_run), "train_hours": sum(per_run.values()) / 3600, "pretrain_hours": pretrain / 3600,
            "run_hours": {name: seconds / 3600 for name, seconds in per_run.items()}}


def _write_summary(out: Path, started: dict, dataroot: Path, protocol: Protocol, runs: dict[str, list[dict]],
                   runs_dir: Path, preset_name: str, ledger: Path | None = None,
                   lambdas: dict[str, float | None] | None = None) -> dict:
    """``partial.json``: the table over the runs finished so far, and the curves. ``environment``
    is where the summary was computed; ``trained_on``, the ledger's machine type, is where its
    runs trained (a summary reads the committed records on any machine)."""
    from bridgeta.bench.ledger import MACHINE_FILE

    convergence = _convergence(runs_dir, protocol)
    result = {
        "environment": started,
        "partial": True,
        "dataroot": str(dataroot),
        "protocol": asdict(protocol),
        "convergence": convergence,
        "convergence_last_quarter_gain": {k: last_quarter_gain(v) for k, v in convergence.items()},
        "finished": {role: [r["seed"] for r in results] for role, results in runs.items()},
        "pretraining": _pretraining(protocol),
        "budget": _budget(runs_dir.parent, protocol),
        "table": aggregate(runs) if runs else {},
        "preset": {"name": preset_name},
    }
    add_family_pairs(result["table"], runs, lambdas or {})
    machine = ledger / MACHINE_FILE if ledger is not None else None
    if machine is not None and machine.is_file():
        recorded = json.loads(machine.read_text())
        result["trained_on"] = {k: recorded[k] for k in ("machine", "cpu_capability", "native_bf16") if k in recorded}
    if "baseline" in result["table"] and "teacher" in result["table"]:
        result["camera_fusion_ratio"] = _camera_fusion_ratio(result["table"])
    write_json(out / "partial.json", result)
    return result


def _figures(out: Path, runs_dir: Path, protocol: Protocol, chosen: dict, methods: Sequence[str],
             convergence: dict) -> dict[str, str]:
    """Figure 5 (the gap per level), eps* per level and the validation curves, from seed 0."""
    from bridgeta.engine.gap_plot import plot_gap, plot_validation_curves

    figures = {}
    if any(convergence.values()):  # a protocol without curve points draws none
        figures["convergence"] = plot_validation_curves(convergence, out / "convergence.png")
    # A method whose chosen lambda is 0 without a TA is the baseline run: it logs no gap. Where
    # BridgeTA chose 0, its curve is its partner's (the teacher terms on, the ablation's lambda).
    bridgeta = "bridgeta_kd" if "bridgeta_kd" in chosen else "bridgeta"
    distilled = [m for m in ("direct", bridgeta, "fixed_epsilon")
                 if m in chosen and not is_baseline_point(_run_method(m), chosen[m])]
    if distilled:
        dirs = [runs_dir / run_name(_run_method(m), 0, protocol, chosen[m]) for m in distilled]
        figures["gap"] = plot_gap(dirs, out / "representation_gap.png", labels=list(distilled))
        if bridgeta in distilled or "fixed_epsilon" in distilled:
            figures["epsilon"] = plot_gap(dirs, out / "epsilon.png", labels=list(distilled), quantity="epsilon")
    return {name: path.name for name, path in figures.items()}


def run(preset_name: str, seeds: int | None, out: Path, work: Path, dataroot: Path | None,
        methods: Sequence[str] | None = None, jobs: int = 1, reproduce: bool = False, summary: bool = False,
        ledger: Path | None = None) -> dict:
    preset = PRESETS[preset_name]
    out.mkdir(parents=True, exist_ok=True)
    staged = bool(preset.lambdas or preset.pretrain_steps or preset.seeds)
    if summary:  # reads what exists: it neither generates nor prepares a world
        dataroot = dataroot or work / "world"
        recorded = staged and (ledger or out / "runs").is_dir()  # a ledger's runs need no world
        if not (dataroot / "bridgeta_splits.json").is_file() and not recorded:
            raise FileNotFoundError(f"{dataroot}: no benchmark world there yet (nothing has run): --summary "
                                    "reads a benchmark's finished runs and trains nothing")
    else:
        if staged:  # a ledger from another machine type: say so now, not after generating a world
            from bridgeta.bench.ledger import check_machine

            check_machine(ledger or out / "runs")
        work.mkdir(parents=True, exist_ok=True)
        dataroot = dataroot or ensure_world(work, preset, ledger=(ledger or out / "runs") if staged else None)
    if staged:
        return run_staged(preset_name, out, work, dataroot, jobs, seeds, methods, reproduce=reproduce, summary=summary,
                          ledger=ledger)
    result = run_methods(
        dataroot, work / "runs", out / "results.json", seeds or preset.default_seeds, methods or preset.methods,
        preset.protocol, metadata={"preset": {"name": preset_name, **asdict(preset)}},
    )
    (out / "table.md").write_text(format_markdown(result) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bridgeta bench accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), required=True)
    parser.add_argument("--seeds", type=int, default=None, help="at most this many seeds per method (default: the preset's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained side by side, each on cores/jobs threads")
    parser.add_argument("--out", type=Path, required=True, help="results directory (results.json, table.md)")
    parser.add_argument("--work", type=Path, default=None, help="world and runs (default: OUT)")
    parser.add_argument("--dataroot", type=Path, default=None, help="use this prepared world instead of WORK/world")
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {', '.join(METHODS)}")
    parser.add_argument("--reproduce", action="store_true",
                        help="cpu protocol: train seed 0 of the headline methods again and report the difference")
    parser.add_argument("--ledger", type=Path, default=None,
                        help="staged presets: the finished runs' records, reused on any machine (default: OUT/runs)")
    parser.add_argument("--summary", action="store_true",
                        help="cpu protocol: train nothing; OUT/partial.json over the runs finished so far")
    parser.add_argument("--output-cache", default=None, metavar="DIR",
                        help="where distillation runs keep their frozen teacher's (and TA's) outputs per sample "
                        "(bridgeta/distill/output_cache.py; exact): default WORK/output-cache, 'none' to run "
                        "them on every batch")
    args = parser.parse_args(argv)
    cache = args.output_cache or str((args.work or args.out) / "output-cache")
    if cache.lower() != "none" and not args.summary:
        os.environ[OUTPUT_CACHE_ENV] = str(Path(cache).resolve())  # the runs' spawned workers inherit it
    result = run(args.preset, args.seeds, args.out, args.work or args.out, args.dataroot, args.methods, args.jobs,
                 args.reproduce, args.summary, args.ledger)
    if args.summary:
        print(json.dumps({"finished": result["finished"], "convergence": result["convergence"]}, indent=1))
        print(format_markdown(result) if result["table"] else "no finished runs yet")
        print(f"wrote {args.out / 'partial.json'}")
        return 0
    print(format_markdown(result))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'table.md'}")
    return 0
