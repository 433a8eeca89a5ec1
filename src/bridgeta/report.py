"""Results files and the docs rendered from them.

Numbers in ``docs/`` are never typed by hand: a command writes a JSON results file (with the
machine, date, torch version and commit it was measured on), and ``bridgeta report render``
rewrites the marked sections of the docs from those files. A marked section is the text between
``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from bridgeta.config import list_presets, load_config
from bridgeta.files import atomic_write_text
from bridgeta.provenance import environment

# Reported figures for the BridgeTA paper's camera-only baseline (its Table 3).
PAPER_BASELINE = {"params_m": 31.8, "gflops": 456.6, "latency_ms": 61.6}


def measure_model_zoo(presets: list[str] | None = None) -> dict:
    from bridgeta.models.bev_model import build_model
    from bridgeta.models.cost import measure_model_cost

    models = {}
    for name in presets or list_presets():
        config = load_config(name)
        cost = measure_model_cost(build_model(config))
        models[name] = {"description": config.description, **cost.as_dict()}
    return {"environment": environment(), "models": models}


def render_model_zoo(results: dict) -> str:
    env = results["environment"]
    lines = [
        "| preset | params (M) | GMACs | GFLOPs (2×MACs) | input |",
        "|---|---:|---:|---:|---|",
    ]
    for name, model in results["models"].items():
        lines.append(
            f"| `{name}` | {model['params'] / 1e6:.2f} | {model['macs'] / 1e9:.1f} | "
            f"{2 * model['macs'] / 1e9:.1f} | {model['input']} |"
        )
    lines.append(
        f"| BridgeTA paper, Table 3 baseline | {PAPER_BASELINE['params_m']} | – | "
        f"{PAPER_BASELINE['gflops']} | 6×256×704 (reported) |"
    )
    lines.append("")
    lines.append("Against the paper's baseline (31.8 M parameters, 456.6 GFLOPs):")
    lines.append("")
    for name in ("bevfusion-c", "bevfusion-c-r18"):
        model = results["models"].get(name)
        if model is None:
            continue
        params_m, gflops = model["params"] / 1e6, 2 * model["macs"] / 1e9
        lines.append(
            f"- `{name}`: {params_m:.1f} M parameters ({params_m / PAPER_BASELINE['params_m']:.2f}× "
            f"the paper's), {gflops:.0f} GFLOPs ({gflops / PAPER_BASELINE['gflops']:.2f}× the paper's); "
            f"image backbone {model['blocks']['camera_encoder.backbone']['params'] / 1e6:.1f} M, "
            f"BEV decoder {model['blocks']['decoder.backbone']['params'] / 1e6:.1f} M parameters."
        )
    lines.append("")
    lines.append("Per block (params M / GMACs):")
    lines.append("")
    names = list(results["models"])
    blocks: list[str] = []
    for model in results["models"].values():
        blocks += [b for b in model["blocks"] if b not in blocks]
    lines.append("| block | " + " | ".join(f"`{n}`" for n in names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for block in blocks:
        cells = []
        for name in names:
            entry = results["models"][name]["blocks"].get(block)
            cells.append("" if entry is None else f"{entry['params'] / 1e6:.2f} / {entry['macs'] / 1e9:.2f}")
        lines.append(f"| {block} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Measured with `bridgeta report model-zoo` on {env['date']}, commit `{env['commit']}`, "
        f"torch {env['torch']}."
    )
    return "\n".join(lines)


def render_bev_pool(results: dict) -> str:
    lines = [
        "| device | threads | frustum points (kept) | fast fwd+bwd (ms) | cumsum reference fwd+bwd (ms) | speed-up | plan (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        lines.append(
            f"| {run['device']} | {run.get('threads', '')} | {run['num_points']:,} ({run['num_kept']:,}) | "
            f"{run['fast_ms']:.1f} | {run['reference_ms']:.1f} | {run['speedup']:.2f}× | "
            f"{run['plan_ms']:.1f} |"
        )
    env = results["environment"]
    lines.append("")
    lines.append(
        f"Measured with `bridgeta bench bev-pool --out results/bev_pool.json` on {env['date']}, "
        f"commit `{env['commit']}`, torch {env['torch']}."
    )
    return "\n".join(lines)


def render_data_throughput(results: dict) -> str:
    generation = results["generation"]
    lines = [
        f"Generation (`tiny` world, {generation['scenes']} scenes of {generation['scene_duration_s']:.0f} s, "
        f"6 cameras + LiDAR + {generation['lidar_sweeps'] // max(generation['samples'], 1)} sweeps per keyframe): "
        f"**{generation['samples_per_s']:.2f} samples/s**; `data prepare`: "
        f"{generation['prepare_samples_per_s']:.0f} samples/s.",
        "",
        "| preset | loader, 0 workers (samples/s) | loader, 2 workers (samples/s) | training step (samples/s) | loader / training |",
        "|---|---:|---:|---:|---:|",
    ]
    for preset, entry in results["presets"].items():
        loader = entry["loader_samples_per_s"]
        training = entry["training"]["samples_per_s"]
        lines.append(
            f"| `{preset}` | {loader['0']:.1f} | {loader['2']:.1f} | {training:.1f} | "
            f"{max(loader['0'], loader['2']) / training:.0f}× |"
        )
    env = results["environment"]
    lines.append("")
    lines.append(
        f"Measured with `bridgeta bench data` (batch {next(iter(results['presets'].values()))['training']['batch_size']}) "
        f"on {env['date']}, commit `{env['commit']}`, torch {env['torch']}, {env['cpu_threads']} CPU threads."
    )
    return "\n".join(lines)


def _cell(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    return f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"


def _comparison_rows(table: dict, names: list[str], miou_title: str, classes_first: bool) -> list[str]:
    """A Markdown table with one column per name: mIoU, mIoU@0.5, per class, condition, range."""
    first = table[names[0]]
    lines = ["| | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---:|" * len(names)]
    classes = [(f"IoU {c}", lambda r, c=c: r["iou"][c]) for c in first["iou"]]
    groups = [(f"mIoU {k}", lambda r, k=k: r["by_condition"][k]) for k in first["by_condition"]]
    groups += [(f"mIoU {k} m", lambda r, k=k: r["by_range"][k]) for k in first["by_range"]]
    rows = [(miou_title, lambda r: r["miou"]), ("mIoU @0.5", lambda r: r["miou_at_0.5"])]
    rows += classes + groups if classes_first else groups + classes
    for title, pick in rows:
        lines.append(f"| {title} | " + " | ".join(_cell(pick(table[n])) for n in names) + " |")
    return lines


def render_baselines(results: dict) -> str:
    table = results["table"]
    names = list(table)
    lines = _comparison_rows(table, names, "mIoU (iou@max)", classes_first=True)
    steps = [table[n]["step_time_s"] for n in names]
    lines.append(
        "| training step (s, batch 2) | "
        + " | ".join("–" if s["mean"] is None else f"{s['mean']:.2f}" for s in steps)
        + " |"
    )
    env = results["environment"]
    seeds = sorted({seed for n in names for seed in table[n]["seeds"]})
    lines.append("")
    lines.append(
        f"IoU in %, mean ± standard deviation over seeds {seeds}, on the test towns. Measured with "
        f"`bridgeta bench baselines` on {env['date']}, commit `{env['commit']}`, torch {env['torch']}, "
        f"{env['cpu_threads']} CPU threads."
    )
    return "\n".join(lines)


def _measured(results: dict, command: str) -> str:
    """Where a table's figures come from: the command that wrote its results file (as recorded
    there; ``command``, the renderer's generic form, for files that predate the record)."""
    env = results["environment"]
    recorded = env.get("command") or ""
    command = recorded if recorded.startswith("bridgeta ") else command
    text = (
        f"Measured with `{command}` on {env['date']}, commit `{env['commit']}`, torch {env['torch']}, "
        f"{env['device']}{_capability(env)}, {env['cpu_threads']} CPU threads."
    )
    trained = results.get("trained_on")  # a summary of a ledger's records, read on another machine
    if trained and (trained.get("cpu_capability"), trained.get("native_bf16")) != (
            env.get("cpu_capability"), env.get("native_bf16")):
        text += (f" The runs it reads trained on another machine type, {_capability(trained).strip(' ()')} "
                 "(the ledger's machine.json).")
    return text


def _capability(env: dict) -> str:
    """`` (CPU AVX2, no native bf16)``: the CPU's SIMD level and bf16 where the results file
    records them (files from before they were recorded: nothing)."""
    if not env.get("cpu_capability"):
        return ""
    bf16 = {True: ", native bf16", False: ", no native bf16"}.get(env.get("native_bf16"), "")
    return f" (CPU {env['cpu_capability']}{bf16})"


def render_distill(results: dict,
                   methods: tuple[str, ...] = ("baseline", "direct", "bridgeta", "bridgeta_kd", "teacher")) -> str:
    """Teacher, baseline, direct and BridgeTA side by side (methods as columns) from an
    accuracy benchmark's results; with BridgeTA's partner row (``bridgeta_kd``, its teacher
    terms on) where the protocol has one."""
    table = results["table"]
    names = [n for n in methods if n in table]
    first = table[names[0]]
    lines = _comparison_rows(table, names, "**mIoU** (iou@max)", classes_first=False)
    if "gap_closed" in first:
        cells = []
        for n in names:
            entry = table[n]["gap_closed"]
            cells.append("–" if entry["mean"] is None else f"{entry['mean']:+.2f} ± {entry['std']:.2f}")
        lines.append("| gap closed (student − baseline) / (teacher − baseline) | " + " | ".join(cells) + " |")
    seeds = sorted({seed for n in names for seed in table[n]["seeds"]})
    protocol = results.get("protocol", {})
    if protocol.get("student_steps"):
        schedule = f"teacher {protocol.get('teacher_steps')} steps, students {protocol['student_steps']} steps"
    elif protocol.get("epochs"):
        schedule = f"teacher {protocol.get('teacher_epochs')} epochs, students {protocol.get('epochs')} epochs"
    else:
        schedule = "the presets' recipes"
    lines += ["", f"IoU in %, mean ± standard deviation over seeds {seeds}, test towns, {schedule}. "
              + _measured(results, "bridgeta bench accuracy --preset cpu")]
    return "\n".join(lines)


def _delta(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    return f"{100 * entry['mean']:+.1f} ± {100 * entry['std']:.1f} (n={entry['n']})"


def render_accuracy(results: dict) -> str:
    """Every method as a row (``bridgeta bench accuracy``); with the cpu protocol's fields, a
    second table of paired per-seed deltas, the learned-class mIoU, lambda and the TA's mIoU."""
    from bridgeta.bench.accuracy import format_markdown

    table = results["table"]
    seeds = sorted({seed for row in table.values() for seed in row["seeds"]})
    preset = results.get("preset", {}).get("name", "?")
    text = (format_markdown(results) + "\n\n" + f"IoU in %, mean ± standard deviation over seeds {seeds}, "
            f"test towns. " + _measured(results, f"bridgeta bench accuracy --preset {preset}"))
    from bridgeta.bench.accuracy import format_detection_markdown
    from bridgeta.bench.distill import camera_network_steps, is_monotakd

    detection = format_detection_markdown(results)
    if detection:
        text += ("\n\nObjects (nuScenes detection metric by the devkit, [detection.md](detection.md)), "
                 "in %, mean ± std over seeds; the unclipped mAP is the devkit's AP without its 10 % "
                 "precision and recall floors, a diagnostic for detectors the official mAP ties at 0, not "
                 "a nuScenes figure; Δ paired per seed, in points:\n\n" + detection)
    if "learned_classes" not in results:
        return text
    lambdas = results["protocol"].get("lambdas", {})
    lines = ["", "", "| method | seeds | λ (validation) | mIoU, learned classes | Δ mIoU vs baseline | Δ mIoU vs `direct` | TA val mIoU |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for method, row in table.items():
        lam = lambdas.get(method)
        lines.append(
            f"| `{method}` | {len(row['seeds'])} | {'–' if lam is None else f'{lam:g}'} | {_cell(row['miou_learned'])} | "
            f"{_delta(row.get('paired_vs_baseline'))} | {_delta(row.get('paired_vs_direct'))} | "
            f"{_cell(row.get('assistant_val_miou'))} |"
        )
    learned = ", ".join(f"`{c}`" for c in results["learned_classes"])
    lines += ["", f"Δ: per-seed test mIoU difference against the same seed of the reference, mean ± std "
              f"over the n seeds both have, in points. Learned classes: those with teacher test IoU "
              f"above 10 % ({learned}). λ: the scale of the method's recipe weights chosen on the "
              f"validation towns ([distill.md](distill.md)). TA val mIoU: BridgeTA's teacher assistant "
              f"(teacher LiDAR BEV + student camera BEV) on the validation towns."]
    ablations = [(m, row) for m, row in table.items() if "paired_vs_family" in row]
    if ablations:
        lines += ["", "Ablations, each paired per seed with the run it ablates (its method at the same λ):", "",
                  "| method | seeds | test mIoU | Δ mIoU vs the method it ablates |", "|---|---:|---:|---:|"]
        lines += [f"| `{method}` | {len(row['seeds'])} | {_cell(row['miou'])} | {_against(row['paired_vs_family'])} |"
                  for method, row in ablations]
    lines += _rivals_table(table)
    longer = [(m, row) for m, row in table.items() if "paired_vs_same_schedule" in row]
    if longer:
        steps = results["protocol"].get("student_steps")
        lines += ["", "Rows whose camera network trains for more than the student's steps, each paired per "
                  "seed with the baseline trained for as many (MonoTAKD's: its TA's steps, then its student's):", "",
                  "| method | steps | seeds | test mIoU | Δ mIoU vs the baseline of its steps |", "|---|---:|---:|---:|---:|"]
        for method, row in longer:
            reference = row["paired_vs_same_schedule"]
            times = camera_network_steps(method)
            if not steps:
                count = f"{times} ×"
            elif is_monotakd(method):
                count = f"{steps} + {steps}"
            else:
                count = str(times * steps)
            lines.append(f"| `{method}` | {count} | {len(row['seeds'])} | "
                         f"{_cell(row['miou'])} | {_delta(reference)} vs `{reference['reference']}` |")
    return text + "\n".join(lines)


def _steps_table(results: dict) -> list[str]:
    """Each row's seeds, steps, test mIoU and paired deltas against the baseline, against the
    baseline of its steps (the rows that train for other steps than the baseline: TinyBEV's
    stages, MonoTAKD, the longer schedules) and, for an ablation, against the run it ablates."""
    from bridgeta.bench.distill import TEACHER_ROLES, trained_steps

    steps = results.get("protocol", {}).get("student_steps")
    # The ablations' column only where there are ablations (paired_vs_family, bench/accuracy.py).
    ablations = any("paired_vs_family" in row for row in results["table"].values())
    lines = ["| method | seeds | steps | test mIoU | Δ mIoU vs baseline | Δ mIoU vs the baseline of its steps |"
             + (" Δ mIoU vs the method it ablates |" if ablations else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if ablations else "")]
    for method, row in results["table"].items():
        if method in (*TEACHER_ROLES, "assistant"):  # not camera students: no steps, no delta against one
            cells = ["–", _cell(row["miou"]), "–", "–"]
        else:
            cells = [str(trained_steps(method, steps)) if steps else "–", _cell(row["miou"]),
                     _delta(row.get("paired_vs_baseline")), _against(row.get("paired_vs_same_schedule"))]
        cells += [_against(row.get("paired_vs_family"))] if ablations else []
        lines.append(f"| `{method}` | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return lines


def _rivals_table(table: dict) -> list[str]:
    """The head-to-head rows (``paired_vs_rival``, bench/distill.py ``RIVALS``): each method
    against the other method it is compared with, per seed; [] where none ran."""
    rivals = [(m, row) for m, row in table.items() if "paired_vs_rival" in row]
    if not rivals:
        return []
    lines = ["", "Head to head, paired per seed with the other method each is compared with:", "",
             "| method | seeds | test mIoU | rival's test mIoU | Δ mIoU vs the rival |", "|---|---:|---:|---:|---:|"]
    for method, row in rivals:
        pair = row["paired_vs_rival"]
        lines.append(f"| `{method}` | {len(row['seeds'])} | {_cell(row['miou'])} | "
                     f"{_cell(table[pair['reference']]['miou'])} | {_against(pair)} |")
    return lines


def _against(pair: dict | None) -> str:
    """A paired delta that names its reference row, or – without one."""
    return f"{_delta(pair)} vs `{pair['reference']}`" if pair else "–"


def _whose_steps(results: dict) -> str:
    """What the steps column counts for the rows that train in parts."""
    whose = []
    if any(method.startswith("monotakd") for method in results["table"]):
        whose.append("MonoTAKD's: its TA's, then its student's")
    if any(method.startswith("tinybev_s") for method in results["table"]):
        whose.append("a TinyBEV stage's: its own, with the stages before it")
    return "Steps: of the camera network" + (f" ({'; '.join(whose)})" if whose else "") + ". "


def render_partial(results: dict) -> str:
    """The runs of a benchmark still running (``--summary``'s partial.json): each row's seeds,
    test mIoU and paired deltas against the baseline and against the baseline of its steps."""
    lines = _steps_table(results)
    preset = results.get("preset", {}).get("name", "?")
    lines += ["", "Test towns, mean ± std over the finished seeds; Δ paired per seed, in points. " + _whose_steps(results)
              + _measured(results, f"bridgeta bench accuracy --preset {preset} --summary")]
    lines += _rivals_table(results["table"])
    return "\n".join(lines)


def render_partial_detection(results: dict) -> str:
    """:func:`render_partial` of a multi-task benchmark still running, with the detection table
    of its finished runs (mAP, NDS, the unclipped mAP and their paired deltas) below."""
    from bridgeta.bench.accuracy import format_detection_markdown

    text = render_partial(results)
    detection = format_detection_markdown(results)
    if detection:
        text += ("\n\nObjects of the same runs (nuScenes detection metric by the devkit; the unclipped mAP is its AP "
                 "without the 10 % floors, [detection.md](detection.md)), in %, mean ± std over the finished "
                 "seeds; Δ paired per seed, in points:\n\n" + detection)
    return text


def render_partial_multitask(results: dict) -> str:
    """:func:`render_partial` of TinyBEV's multi-task benchmark still running, with the
    multi-task table of its finished runs below."""
    from bridgeta.bench.accuracy import format_multitask_markdown

    text = render_partial(results)
    table = format_multitask_markdown(results)
    if table:
        text += ("\n\nEvery task of the same runs: mAP, NDS, the unclipped mAP ([detection.md](detection.md)) and map "
                 "mIoU in %, minADE (at the true agents) and L2 in m, the collision rate in %; L2 and collision "
                 "averaged over 1, 2 and 3 s in UniAD's convention, and L2 at 3 s. Mean ± std over the finished "
                 "seeds; Δ paired per seed against the baseline. " + _planning_resolution(results) + "\n\n" + table)
    return text


def render_protocol(results: dict) -> str:
    """The cpu protocol's vital signs: data, schedule, convergence, camera/fusion ratio, pretraining."""
    protocol, table = results["protocol"], results["table"]
    gains = results.get("convergence_last_quarter_gain", {})

    def points(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:+.1f} points"

    lines = [
        "| | value |", "|---|---|",
        f"| scenes (train / val / test) | {protocol['train_scenes']} / {protocol['val_scenes']} / {protocol['test_scenes']} |",
        f"| student steps (batch 2) | {protocol['student_steps']} |",
        f"| teacher steps | {protocol['teacher_steps']} |",
        f"| camera/fusion ratio (baseline / teacher test mIoU) | {results['camera_fusion_ratio']:.2f} |",
        f"| baseline val mIoU gain over the last quarter | {points(gains.get('baseline'))} |",
        f"| teacher val mIoU gain over the last quarter | {points(gains.get('teacher'))} |",
    ]
    pretraining = results.get("pretraining")
    if pretraining and pretraining.get("eval"):
        evaluation = pretraining["eval"]
        lines.append(f"| backbone pretraining ({pretraining['steps']} steps, {pretraining.get('train_images', '?')} "
                     f"train images) | val pixel accuracy {100 * evaluation['pixel_accuracy']:.1f} %, "
                     f"val mIoU {100 * evaluation['miou']:.1f} % ({len(evaluation['iou'])} classes) |")
    if "baseline_scratch" in table:
        delta = table["baseline"]["miou"]["mean"] - table["baseline_scratch"]["miou"]["mean"]
        lines.append(f"| baseline test mIoU, pretrained − random backbone | {points(delta)} "
                     f"(pretrained {_cell(table['baseline']['miou'])}, random {_cell(table['baseline_scratch']['miou'])}) |")
    from bridgeta.bench.distill import LONGER_BASELINES

    longer = [(times, method) for method, times in LONGER_BASELINES.items() if method in table]
    if longer and protocol.get("student_steps"):
        steps = protocol["student_steps"]
        cells = [f"{steps}: {_cell(table['baseline']['miou'])}"] + [
            f"{times * steps}: {_cell(table[method]['miou'])} (Δ {_delta(table[method].get('paired_vs_baseline'))})"
            .replace(" (n=", ", n=").replace("))", ")")
            for times, method in sorted(longer)]
        lines.append(f"| baseline test mIoU by schedule (steps: %; Δ paired with the {steps}-step baseline, "
                     f"points) | {', '.join(cells)} |")
    budget = results.get("budget")
    if budget:
        lines.append(f"| training time so far (logged step times of {budget['runs']} runs; evaluation not counted) | "
                     f"{budget['train_hours']:.1f} h, plus {60 * budget['pretrain_hours']:.0f} min of backbone pretraining |")
    for method, row in results.get("reproducibility", {}).items():
        trained = (row.get("table_trained_by") or {}).get("commit", "?")
        again = (row.get("rerun_trained_by") or {}).get("commit", "?")
        lines.append(f"| `{method}` seed 0 trained again | {100 * row['table']:.2f} (commit `{trained}`) → "
                     f"{100 * row['rerun']:.2f} (commit `{again}`): {100 * row['delta']:+.2f} points |")
    curves = results.get("convergence", {})
    for role in ("baseline", "teacher"):
        curve = curves.get(role) or []
        text = ", ".join(f"{int(step)}: {100 * miou:.1f}" for step, miou in curve)
        lines.append(f"| {role} val mIoU curve (step: %) | {text or '–'} |")
    lines += ["", _measured(results, f"bridgeta bench accuracy --preset {results.get('preset', {}).get('name', '?')}")]
    return "\n".join(lines)


def render_cost(results: dict) -> str:
    """Deployed cost per architecture and variant (``bridgeta bench cost``)."""
    lines = ["| model | deployed by | device | precision | compile | params (M) | GMACs | latency (ms) | peak memory (MiB) |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    methods = ", ".join(results["methods"])
    for c in results["inference"]:
        if c["role"] != "student":
            deployed = "none (training only)"
        else:  # results measured before per-pair lists deployed every method's baseline network
            deployed = ", ".join(c["deployed_by"]) if c.get("deployed_by") else methods
        lines.append(
            f"| `{c['preset']}` | {deployed} | {c['device']} | {c['precision']} | {'on' if c['compile'] else 'off'} | "
            f"{c['params'] / 1e6:.2f} | {c['macs'] / 1e9:.2f} | {c['latency_ms']:.1f} | "
            f"{c['peak_memory_bytes'] / 2**20:.0f} |"
        )
    first = results["inference"][0]
    lines += ["", f"Batch 1, median of {first['repeats']} forward passes after warm-up, "
              f"{first['threads']} CPU threads on CPU. " + _measured(results, "bridgeta bench cost")]
    ratios = results.get("student_to_teacher") or {}
    if ratios:
        lines += ["", "Student against its teacher (eager, same run):", "",
                  "| pair | device, precision | params | MACs | latency | speed-up |", "|---|---|---:|---:|---:|---:|"]
        for pair, by_variant in ratios.items():
            for variant, r in by_variant.items():
                lines.append(f"| {pair} | {variant} | {r['params']:.2f}× | {r['macs']:.2f}× | {r['latency']:.2f}× | "
                             f"{r['speedup']:.2f}× |")
    from bridgeta.bench.cost import student_to_baseline

    # Results measured before this field existed: the same ratios, from their own cells.
    against_baseline = results.get("student_to_baseline") or student_to_baseline(results["inference"])
    if against_baseline:
        lines += ["", "A deployed student that is not the baseline network, against the baseline (eager, same run):", "",
                  "| pair | device, precision | baseline | params | MACs | latency | peak memory |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for pair, by_variant in against_baseline.items():
            for variant, r in by_variant.items():
                lines.append(f"| {pair} | {variant} | `{r['baseline']}` | {r['params']:.2f}× | {r['macs']:.2f}× | "
                             f"{r['latency']:.2f}× | {r['memory']:.2f}× |")
    return "\n".join(lines)


DEPLOYED_COST_COMMAND = "bridgeta bench cost --repeats 5"


def render_deployed_cost(results: dict) -> str:
    """The student as deployed under PyTorch eager, ``torch.compile`` and onnxruntime (``bench cost``)."""
    rows = results.get("deployed")
    if not rows:
        # Results measured before the deployed rows existed: say so rather than show stale numbers.
        return (f"Not measured yet: the committed results file has no deployed rows. Run "
                f"`{DEPLOYED_COST_COMMAND}` (add `--pairs` and `--out` for a pair's own file) on a quiet "
                f"CPU, then `bridgeta report render`.")
    lines = ["| model | runtime | latency (ms) | × PyTorch eager | peak memory (MiB) | parity max abs |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        ratio, parity = row.get("latency_ratio"), row.get("parity_max_abs")
        lines.append(
            f"| `{row['preset']}` | {row['runtime']} | {row['latency_ms']:.1f} | "
            f"{'–' if ratio is None else f'{ratio:.2f}'} | {row['peak_memory_bytes'] / 2**20:.0f} | "
            f"{'–' if parity is None else f'{parity:.1e}'} |"
        )
    first = rows[0]
    lines += ["", f"CPU, fp32, batch 1 on the reference nuScenes rig, median of {first['repeats']} forward "
              f"passes after warm-up, {first['threads']} threads; each runtime in its own process, ratios "
              f"from one run. Parity: largest absolute logit difference, onnxruntime vs PyTorch. "
              + _measured(results, DEPLOYED_COST_COMMAND)]
    return "\n".join(lines)


def render_distill_sweep(results: dict) -> str:
    """The validation-town sweep of the loss weights (``bridgeta bench distill-sweep``)."""
    if results.get("kind") == "fair":
        lambdas = results["lambdas"]
        lines = ["| method | " + " | ".join(f"λ = {lam:g}" for lam in lambdas) + " | chosen λ |",
                 "|---|" + "---:|" * (len(lambdas) + 1)]
        for method, lam in results["chosen"].items():
            cells = []
            for value in lambdas:
                point = next(p for p in results["points"] if p["method"] == method and p["lambda"] == value)
                cell = f"{100 * point['val_miou']:.1f} ± {100 * point['val_miou_std']:.1f}"
                cells.append(f"**{cell}**" if value == lam else cell)
            lines.append(f"| `{method}` | " + " | ".join(cells) + f" | {lam:g} |")
        protocol = results["protocol"]
        lines += ["", f"Validation mIoU in %, mean ± std over seeds {list(range(results['seeds']))}, every point "
                  f"{protocol['student_steps']} steps from the benchmark's own teacher; λ scales each "
                  f"method's recipe weights (λ = 0 without a TA is the baseline). "
                  + _measured(results, "bridgeta bench accuracy --preset cpu")]
        return "\n".join(lines)
    lines = ["| stage | λ1 = λ2 = λ3 | ε* clamp | val mIoU | val mIoU night |", "|---|---:|---|---:|---:|"]
    for point in results["points"]:
        night = point["val_miou_night"]
        low, high = point["epsilon_range"]
        lines.append(
            f"| {point['stage']} | {point['lambda']:g} | [{low:g}, {high:g}] | {100 * point['val_miou']:.1f} | "
            + ("–" if night is None else f"{100 * night:.1f}") + " |"
        )
    chosen = results["chosen"]
    lines += ["", f"Chosen: λ1 = λ2 = λ3 = {chosen['lambda']:g}, ε* clamped to "
              f"[{chosen['epsilon_range'][0]:g}, {chosen['epsilon_range'][1]:g}] (validation towns only; "
              f"{results['epochs']} epochs per point, seed {results['seed']}). "
              + _measured(results, "bridgeta bench distill-sweep")]
    return "\n".join(lines)


def render_partial_sweep(results: dict) -> str:
    """The fair sweep of a benchmark still running (``--summary``'s ``partial_sweep.json``): every
    point's validation mIoU per finished seed, and their mean where every seed has finished."""
    lambdas, seeds = results["lambdas"], results["seeds"]
    methods = list(dict.fromkeys(p["method"] for p in results["points"]))
    lines = ["| method | " + " | ".join(f"λ = {lam:g}" for lam in lambdas) + " |",
             "|---|" + "---:|" * len(lambdas)]
    for method in methods:
        cells = []
        for value in lambdas:
            point = next(p for p in results["points"] if p["method"] == method and p["lambda"] == value)
            per_seed = " / ".join(f"{100 * v:.1f}" for v in point["val_miou_per_seed"])
            if not per_seed:
                cells.append("–")
            elif len(point["val_miou_per_seed"]) == seeds:
                cells.append(f"{100 * point['val_miou']:.1f} ({per_seed})")
            else:
                cells.append(f"({per_seed})")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    chosen = results.get("chosen") or {}
    picked = ("Chosen so far: " + ", ".join(f"`{m}` λ = {lam:g}" for m, lam in chosen.items()) + ". ") if chosen else ""
    protocol = results["protocol"]
    lines += ["", f"Validation mIoU in %: the mean over seeds {list(range(seeds))} where all have finished, "
              f"each finished seed's in brackets, – where none has; every point {protocol['student_steps']} "
              "steps; λ scales each method's recipe weights (`direct` at λ = 0 is the baseline). A method's λ is "
              "chosen once all its points have finished. " + picked
              + _measured(results, "bridgeta bench accuracy --preset cpu --summary")]
    return "\n".join(lines)


def render_train_cost(results: dict) -> str:
    """Training step time and peak memory per method (``bridgeta bench train-cost``)."""
    lines = ["| method | step time (s) | × baseline | peak memory (MiB) | × baseline |", "|---|---:|---:|---:|---:|"]
    for method, row in results["methods"].items():
        lines.append(
            f"| `{method}` | {row['step_time_s']:.3f} | {row['step_time_ratio']:.2f} | "
            f"{row['peak_memory_bytes'] / 2**20:.0f} | {row['memory_ratio']:.2f} |"
        )
    device = next(iter(results["methods"].values()))["device"]
    memory = ("peak RSS of the training process above its RSS before training" if device == "cpu"
              else "torch.cuda.max_memory_allocated")
    untrained = [name.removeprefix("untrained ") for name in (results.get("teachers") or {}).values()
                 if name.startswith("untrained ")]
    teachers = (f"Teachers: freshly initialised {', '.join(f'`{n}`' for n in untrained)} (the architecture, not "
                "the weights, sets the cost). " if untrained else "")
    cached = {m: row["output_cache"] for m, row in results["methods"].items() if row.get("output_cache")}
    caches = ("`*_cached` rows read the frozen teacher's outputs back from an output cache that a first run of "
              "the same steps filled (" + ", ".join(f"`{m}`: {c['hits']} samples read, {c['misses']} computed"
                                                    for m, c in cached.items()) + "). ") if cached else ""
    lines += ["", f"Median over {results['steps']} optimiser steps each (loader waits included), memory = "
              f"{memory}; one invocation, so the ratios compare like with like. " + teachers + caches
              + _measured(results, "bridgeta bench train-cost")]
    return "\n".join(lines)


def render_precision(results: dict) -> str:
    """fp32 against the default precision on the validation towns (``bridgeta bench precision``)."""
    lines = ["| precision | settings | val mIoU (%) | step time (s) |", "|---|---|---:|---:|"]
    for name, settings in results["variants"].items():
        miou, step = results["val_miou"][name], results["step_time_s"][name]
        lines.append(
            f"| `{name}` | {', '.join(f'`{s}`' for s in settings) or 'defaults'} | "
            f"{100 * miou['mean']:.1f} ± {100 * (miou['std'] or 0):.1f} | {step['mean']:.3f} |"
        )
    delta = results["paired_delta_val_miou"]
    seeds = ", ".join(str(r["seed"]) for r in results["runs"]["default"])
    lines += ["", f"`{results['preset']}`, {results['epochs']} epochs, seeds [{seeds}], mean ± std over seeds; "
              f"paired difference (default − fp32) {100 * delta['mean']:+.1f} ± {100 * (delta['std'] or 0):.1f} "
              f"mIoU against a seed standard deviation of {100 * results['seed_std_val_miou']:.1f}. "
              + _measured(results, "bridgeta bench precision")]
    teacher = results.get("teacher")
    if teacher:
        lines += ["", f"Frozen teacher (`distill.teacher_precision`), {teacher['split']} towns: mIoU "
                  f"{100 * teacher['miou']['fp32']:.2f} in fp32, {100 * teacher['miou']['bf16']:.2f} in bf16 "
                  f"autocast; |sigmoid(L_bf16) − sigmoid(L_fp32)| over every cell and class: mean "
                  f"{teacher['mean_abs_probability_difference']:.1e}, max "
                  f"{teacher['max_abs_probability_difference']:.1e}."]
    return "\n".join(lines)


def _planning_resolution(results: dict) -> str:
    """How many test samples the planning figures score (the same for every row), and so what
    one collision weighs in the collision column; empty when the runs do not say."""
    counts = {row.get("planning_samples") for row in results["table"].values() if "planning" in row}
    if len(counts) != 1 or None in counts:
        return ""
    count = counts.pop()
    return (f"Planning scores the {count} test samples with a whole 3 s future, so one collision at one "
            f"horizon moves the collision column (the mean of the three horizons) by {100 / (3 * count):.2f} %, "
            f"and a paired collision delta is a handful of samples. ")


def render_multitask(results: dict) -> str:
    """TinyBEV's multi-task table (``bridgeta bench accuracy --preset cpu-tinybev``)."""
    from bridgeta.bench.accuracy import format_multitask_markdown

    table = format_multitask_markdown(results)
    if table is None:
        return "No row of these results has planning figures: not a multi-task benchmark."
    seeds = sorted({seed for row in results["table"].values() for seed in row["seeds"]})
    preset = results.get("preset", {}).get("name", "?")
    # The stages train for a third and two thirds of the baseline's steps: each row's steps,
    # and its map delta against the baseline of as many steps, come first.
    steps = ("\n".join(_steps_table(results)) + "\n\nMap mIoU of the test towns in %, mean ± std over seeds; Δ paired "
             "per seed, in points. " + _whose_steps(results) + "Every task of the same runs:\n\n")
    return (steps + table + "\n\n" + f"mAP, NDS, the unclipped mAP (the devkit's AP without its 10 % floors, [detection.md](detection.md)) "
            f"and map mIoU in %, minADE (detection-free, at the true agents) and "
            f"L2 in m, the collision rate in %. L2 and collision are UniAD's convention (the value at "
            f"each horizon), averaged over 1, 2 and 3 s (`l2@mean`, `collision@mean`), and L2 at 3 s; the ST-P3/VAD "
            f"averages are in the results file as `l2_avg@...` and `collision_avg@...`. The constant-velocity "
            f"line is the path the ego's status alone gives, where every planner starts "
            f"([methods/tinybev.md](methods/tinybev.md)). Mean ± std over "
            f"seeds {seeds}, test towns; Δ: paired per seed against the baseline. " + _planning_resolution(results)
            + _measured(results, f"bridgeta bench accuracy --preset {preset}"))


RENDERERS: dict[str, tuple[str, Callable[[dict], str]]] = {
    # section name -> (results file, renderer); a renderer's links are relative to docs/ (relink)
    "model-zoo": ("model_zoo.json", render_model_zoo),
    "bev-pool": ("bev_pool.json", render_bev_pool),
    "data-throughput": ("data_throughput.json", render_data_throughput),
    "baselines": ("baselines.json", render_baselines),
    "distill": ("accuracy-cpu/results.json", render_distill),
    "accuracy-cpu": ("accuracy-cpu/results.json", render_accuracy),
    "accuracy-protocol": ("accuracy-cpu/results.json", render_protocol),
    "accuracy-cpu-partial": ("accuracy-cpu/partial.json", render_partial),
    "accuracy-cpu-monotakd-partial": ("accuracy-cpu-monotakd/partial.json", render_partial),
    # The same protocol measured again from its world up on AVX2 machines, in a ledger of its own
    # (scripts/cpu-benchmarks.sh with SUFFIX=-avx2): the AVX-512 ledger cannot continue there
    "accuracy-cpu-monotakd-avx2": ("accuracy-cpu-monotakd-avx2/results.json", render_accuracy),
    "accuracy-cpu-monotakd-avx2-partial": ("accuracy-cpu-monotakd-avx2/partial.json", render_partial),
    "accuracy-cpu-monotakd-avx2-sweep": ("accuracy-cpu-monotakd-avx2/partial_sweep.json", render_partial_sweep),
    "accuracy-mt": ("accuracy-mt/results.json", render_accuracy),
    "accuracy-mt-partial": ("accuracy-mt/partial.json", render_partial_detection),
    "accuracy-tinybev": ("accuracy-tinybev/results.json", render_multitask),
    "accuracy-tinybev-partial": ("accuracy-tinybev/partial.json", render_partial_multitask),
    "cost": ("cost.json", render_cost),
    # TinyBEV's pair alone (``bench cost --pairs tinybev``): its presets changed after cost.json
    "cost-tinybev": ("cost-tinybev.json", render_cost),
    "deployed-cost": ("cost.json", render_deployed_cost),
    "deployed-cost-tinybev": ("cost-tinybev.json", render_deployed_cost),
    "distill-sweep": ("distill_sweep.json", render_distill_sweep),
    "train-cost": ("train_cost.json", render_train_cost),
    "train-cost-tinybev": ("train_cost_tinybev.json", render_train_cost),
    "train-cost-cache": ("train_cost_cache.json", render_train_cost),
    "precision": ("precision.json", render_precision),
}


# A Markdown link to a file: ``[text](target)`` with no scheme and no leading ``/`` or ``#``.
_FILE_LINK = re.compile(r"(\]\()(?![a-z]+:|/|#)([^)\s]+\))")


def relink(body: str, folder: Path) -> str:
    """A section's links, which renderers write relative to ``docs/``, made relative to the
    doc's ``folder`` (below ``docs/``) the section is rendered into."""
    if folder == Path("."):
        return body
    up = "../" * len(folder.parts)
    return _FILE_LINK.sub(lambda m: m.group(1) + up + m.group(2), body)


def render_docs(results_dir: Path, docs_dir: Path) -> list[str]:
    """Rewrite every marked section of the docs (``docs/**/*.md``); returns the sections rendered.
    A section whose results file is missing is an error naming both."""
    rendered = []
    for doc in sorted(docs_dir.rglob("*.md")):
        text = doc.read_text()
        original = text
        for name, (filename, renderer) in RENDERERS.items():
            pattern = re.compile(
                rf"(<!-- results:{re.escape(name)} -->\n)(.*?)(<!-- /results:{re.escape(name)} -->)",
                re.DOTALL,
            )
            if not pattern.search(text):
                continue
            source = results_dir / filename
            if not source.is_file():
                raise FileNotFoundError(f"{doc}: section '{name}' needs {source}; run its command first")
            body = relink(renderer(json.loads(source.read_text())), doc.parent.relative_to(docs_dir))
            text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text)
            rendered.append(f"{doc.relative_to(docs_dir)}:{name}")
        if text != original:
            atomic_write_text(doc, text)
    return rendered
