"""``bridgeta bench cost``: the paper's Table 3 analog, what each method deploys and what it trains.

Inference: every distillation method deploys the baseline network itself (``bridgeta export``
checks the keys and shapes), so the student's parameters, MACs, latency and peak memory are
measured once per architecture and listed for every method, next to the teacher that is *not*
deployed. Latency is the median of ``--repeats`` forward passes after ``--warmup`` passes, batch
1, at the preset's input size (6 cameras, a 340k-point LiDAR sweep stack for LiDAR models),
under ``torch.inference_mode``. Each measurement runs in a fresh process so that peak memory is
its own: on CPU the peak resident set above the resident set before the first forward, on CUDA
``torch.cuda.max_memory_allocated``. On CUDA the variants are fp32 and bf16 autocast, each with
``torch.compile`` off and on; on CPU fp32 eager, and bf16 autocast eager where the CPU computes
bf16 natively (AVX512-BF16 or AMX; emulated bf16 is slower than fp32).

Deployed runtimes: the student of each pair as deployed (:class:`DeployedStudent`, images and
camera geometry in, logits out, batch 1, the reference rig) under PyTorch eager, PyTorch with
``torch.compile`` and onnxruntime (CPU, the file ``bridgeta export --format onnx`` writes), each in
a fresh process with the same thread count, reported as ratios to PyTorch eager measured in the
same run. The ONNX file is exported in a process of its own first (tracing must not set the
onnxruntime process's peak memory), which also records its parity: the largest absolute logit
difference between onnxruntime and PyTorch on the timed inputs (``parity_max_abs``).

Training: with ``--dataroot`` and ``--teacher``, ``bench train-cost`` adds the step time and
peak memory of baseline, direct and BridgeTA training as ratios to the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bridgeta.bench.isolated import peak_resident_bytes, resident_bytes, run_isolated
from bridgeta.provenance import environment, write_json

# (student, teacher) architectures; the first is what the CPU protocol trains, the second the paper's.
# MonoTAKD deploys its own student (the tiny-c network plus the residual branch, SAM and FFM),
# taught by the tiny pair's teacher, so its pair lists no teacher of its own.
# TinyBEV's pair is the multi-task one: a compact camera student with every head and its wider
# fusion teacher (the paper's claim is about that ratio: -78 % parameters, 5x the speed).
PAIRS = {"tiny": ("tiny-c", "tiny-lc"), "bevfusion": ("bevfusion-c", "bevfusion-lc"),
         "monotakd": ("distill/tiny-c-monotakd", None), "tinybev": ("tiny-c-tinybev", "tiny-lc-tinybev")}
METHODS = ("baseline", "direct", "feature_kd", "logit_kd", "bridgeta")
# Who deploys each pair's student: every method above deploys the baseline network itself.
DEPLOYED_BY = {"tiny": METHODS, "bevfusion": METHODS, "monotakd": ("monotakd",),
               "tinybev": ("baseline", "tinybev_s1", "tinybev_s2", "tinybev_s3", "tinybev_bridgeta")}
RUNTIMES = ("pytorch", "pytorch-compile", "onnxruntime")
# A pair whose deployed student is not the baseline network, and the pair whose student is that
# baseline: MonoTAKD's residual branch, SAM and FFM run at inference, on top of tiny-c (the other
# side of BridgeTA's zero inference overhead, its Table 3).
BASELINE_OF = {"monotakd": "tiny"}


def _time(run_once: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run_once()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - started)
    return times


def measure_latency(preset: str, device: str, precision: str, compile_model: bool, warmup: int, repeats: int) -> dict:
    """One (preset, device, precision, compile) cell, measured in this process."""
    import torch

    from bridgeta.config import load_config
    from bridgeta.models.bev_model import build_model
    from bridgeta.models.cost import measure_model_cost, model_reference_inputs

    config = load_config(preset)
    model = build_model(config).eval()
    torch.manual_seed(0)
    inputs = model_reference_inputs(config.model)
    target = torch.device(device)
    model, inputs = model.to(target), inputs.to(target)
    forward = torch.compile(model) if compile_model else model
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

    def run_once() -> None:
        with torch.inference_mode(), torch.autocast(target.type, dtype=dtype, enabled=dtype is not None):
            forward(inputs)
        if target.type == "cuda":
            torch.cuda.synchronize()

    before = resident_bytes()
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = _time(run_once, warmup, repeats)
    peak = (
        torch.cuda.max_memory_allocated()
        if target.type == "cuda"
        else peak_resident_bytes() - before
    )
    # Counted after timing: the flop counter's own allocations must not set the process's peak.
    cost = measure_model_cost(model.cpu())
    return {
        "preset": preset,
        "device": torch.cuda.get_device_name() if target.type == "cuda" else "cpu",
        "precision": precision,
        "compile": compile_model,
        "params": cost.params,
        "macs": cost.macs,
        "latency_ms": 1000 * statistics.median(times),
        "latency_ms_min": 1000 * min(times),
        "repeats": repeats,
        "peak_memory_bytes": peak,
        "threads": torch.get_num_threads(),
    }


def _deployed_student(preset: str):
    """The seeded student of ``preset`` as deployed, and its reference-rig inputs by name."""
    import torch

    from bridgeta.config import load_config
    from bridgeta.engine.deploy import reference_arrays
    from bridgeta.models.bev_model import build_model
    from bridgeta.models.deploy import DeployedStudent

    config = load_config(preset)
    torch.manual_seed(0)
    wrapper = DeployedStudent(build_model(config).eval()).eval()
    return config, wrapper, reference_arrays(wrapper.specs)


def export_deployed(preset: str, out: Path) -> dict:
    """Write the deployed ONNX file of ``preset``'s seeded student; its onnxruntime parity."""
    from bridgeta.engine.deploy import export_onnx
    from bridgeta.engine.model_file import save_model_file

    config, wrapper, _ = _deployed_student(preset)
    source = save_model_file(out.with_suffix(".safetensors"), wrapper.model, config)
    exported = export_onnx(source, out)  # verified on the same reference arrays the timing uses
    return {"preset": preset, "onnx": str(out), "parity_max_abs": exported.parity_max_abs}


def measure_deployed(preset: str, runtime: str, onnx_file: str | None, warmup: int, repeats: int) -> dict:
    """One deployed runtime of ``preset``'s student on the CPU, measured in this process.

    Peak memory is the peak resident set above the one after loading (weights and inputs in
    place), as for the PyTorch rows of :func:`measure_latency`; the onnxruntime process never
    builds the PyTorch model, so its peak is onnxruntime's own.
    """
    import torch

    from bridgeta.engine.deploy import OnnxStudent, reference_arrays
    from bridgeta.models.deploy import input_names

    if runtime == "onnxruntime":
        if onnx_file is None:
            raise ValueError("the onnxruntime runtime needs --onnx FILE (written by export_deployed)")
        session = OnnxStudent(onnx_file, threads=torch.get_num_threads())
        arrays = {name: value.numpy() for name, value in reference_arrays(session.specs).items()}

        def run_once() -> None:
            session.run(arrays)
    else:
        _, wrapper, arrays = _deployed_student(preset)
        forward = torch.compile(wrapper) if runtime == "pytorch-compile" else wrapper
        inputs = tuple(arrays[name] for name in input_names(wrapper.specs))

        def run_once() -> None:
            with torch.inference_mode():
                forward(*inputs)

    before = resident_bytes()
    times = _time(run_once, warmup, repeats)
    return {
        "preset": preset,
        "runtime": runtime,
        "device": "cpu",
        "precision": "fp32",
        "latency_ms": 1000 * statistics.median(times),
        "latency_ms_min": 1000 * min(times),
        "repeats": repeats,
        "peak_memory_bytes": peak_resident_bytes() - before,
        "threads": torch.get_num_threads(),
    }


def run_deployed(pairs: Sequence[str], runtimes: Sequence[str], warmup: int, repeats: int) -> list[dict]:
    """Every runtime of every pair's student, each in its own process; latency ratios to eager."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bridgeta-cost-") as work:
        for pair in pairs:
            preset = PAIRS[pair][0]
            parity = {}
            arguments = ["--warmup", str(warmup), "--repeats", str(repeats)]
            if "onnxruntime" in runtimes:
                onnx_file = str(Path(work) / f"{preset}.onnx")
                print(f"-- {preset}: ONNX export and parity", flush=True)
                parity = run_isolated("bridgeta.bench.cost", ["--export", preset, "--onnx", onnx_file],
                                      f"ONNX export of {preset}")
                arguments += ["--onnx", onnx_file]
            measured = {}
            for runtime in runtimes:
                print(f"-- {preset} deployed with {runtime} on cpu", flush=True)
                measured[runtime] = run_isolated(
                    "bridgeta.bench.cost", ["--deployed", preset, "--runtime", runtime, *arguments],
                    f"{preset} with {runtime}",
                )
            eager = measured.get("pytorch")
            for runtime, row in measured.items():
                row = {"pair": pair, **row}
                if eager is not None:
                    row["latency_ratio"] = row["latency_ms"] / eager["latency_ms"]
                    row["memory_ratio"] = row["peak_memory_bytes"] / max(eager["peak_memory_bytes"], 1)
                if runtime == "onnxruntime":
                    row["parity_max_abs"] = parity["parity_max_abs"]
                rows.append(row)
    return rows


def variants(device: str) -> list[tuple[str, bool]]:
    if device == "cuda":
        return [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]
    from bridgeta.precision import cpu_has_native_bf16

    # bf16 only where the CPU computes it natively (emulated bf16 is slower than fp32).
    return [("fp32", False), ("bf16", False)] if cpu_has_native_bf16() else [("fp32", False)]


def run(pairs: Sequence[str], devices: Sequence[str], warmup: int, repeats: int, out: Path,
        dataroot: Path | None = None, teacher: str | None = None, train_steps: int = 30,
        runtimes: Sequence[str] = RUNTIMES) -> dict:
    started = environment()
    cells = []
    for pair in pairs:
        for role, preset in zip(("student", "teacher"), PAIRS[pair]):
            if preset is None:
                continue
            for device in devices:
                for precision, compile_model in variants(device):
                    arguments = [
                        "--one", preset, "--device", device, "--precision", precision,
                        "--warmup", str(warmup), "--repeats", str(repeats),
                    ] + (["--compile"] if compile_model else [])
                    print(f"-- {preset} ({role}) on {device}, {precision}, compile {compile_model}", flush=True)
                    cell = run_isolated("bridgeta.bench.cost", arguments, f"{preset} on {device}")
                    deployed_by = list(DEPLOYED_BY[pair]) if role == "student" else []
                    cells.append({"pair": pair, "role": role, "deployed_by": deployed_by, **cell})
    result = {"environment": started, "methods": list(METHODS), "inference": cells,
              "student_to_teacher": student_to_teacher(cells), "student_to_baseline": student_to_baseline(cells)}
    if runtimes:
        result["deployed"] = run_deployed(pairs, runtimes, warmup, repeats)
    if dataroot is not None and teacher is not None:
        from bridgeta.bench.train_cost import run as train_cost_run

        result["training"] = train_cost_run(dataroot, train_steps, out.with_name("train_cost.json"),
                                            teachers={"teacher": teacher})
    write_json(out, result)
    return result


def student_to_teacher(cells: Sequence[dict]) -> dict[str, dict]:
    """Per pair with a teacher, per device and precision (eager): the student's parameters, MACs
    and latency as fractions of its teacher's, measured in the same run."""
    out: dict[str, dict] = {}
    for student in cells:
        if student["role"] != "student" or student["compile"]:
            continue
        teacher = next((c for c in cells if c["pair"] == student["pair"] and c["role"] == "teacher"
                        and c["device"] == student["device"] and c["precision"] == student["precision"]
                        and not c["compile"]), None)
        if teacher is None:
            continue
        device = "cpu" if student["device"] == "cpu" else "cuda"
        out.setdefault(student["pair"], {})[f"{device}-{student['precision']}"] = {
            "params": student["params"] / teacher["params"],
            "macs": student["macs"] / teacher["macs"],
            "latency": student["latency_ms"] / teacher["latency_ms"],
            "speedup": teacher["latency_ms"] / student["latency_ms"],
        }
    return out


def student_to_baseline(cells: Sequence[dict]) -> dict[str, dict]:
    """Per pair of ``BASELINE_OF``, per device and precision (eager): its deployed student's
    parameters, MACs, latency and peak memory as multiples of the baseline network's, measured in
    the same run (pairs whose baseline was not measured are left out)."""
    out: dict[str, dict] = {}
    for student in cells:
        if student["role"] != "student" or student["compile"] or student["pair"] not in BASELINE_OF:
            continue
        baseline = next((c for c in cells if c["pair"] == BASELINE_OF[student["pair"]] and c["role"] == "student"
                         and c["device"] == student["device"] and c["precision"] == student["precision"]
                         and not c["compile"]), None)
        if baseline is None:
            continue
        device = "cpu" if student["device"] == "cpu" else "cuda"
        out.setdefault(student["pair"], {})[f"{device}-{student['precision']}"] = {
            "baseline": baseline["preset"],
            "params": student["params"] / baseline["params"],
            "macs": student["macs"] / baseline["macs"],
            "latency": student["latency_ms"] / baseline["latency_ms"],
            "memory": student["peak_memory_bytes"] / baseline["peak_memory_bytes"],
        }
    return out


def format_table(result: dict) -> str:
    # The preset column is as wide as its longest name (tiny-c-tinybev ran into the role column).
    names = [c["preset"] for c in result["inference"]] + [r["preset"] for r in result.get("deployed") or []]
    width = max([len("preset"), *map(len, names)]) + 2
    lines = [f"{'preset':<{width}}{'role':<9}{'device':<10}{'prec':<6}{'compile':<8}{'params M':>9}"
             f"{'GMACs':>9}{'ms':>10}{'MiB':>8}"]
    for c in result["inference"]:
        device = "cpu" if c["device"] == "cpu" else "cuda"
        lines.append(
            f"{c['preset']:<{width}}{c['role']:<9}{device:<10}{c['precision']:<6}{str(c['compile']):<8}"
            f"{c['params'] / 1e6:>9.2f}{c['macs'] / 1e9:>9.2f}{c['latency_ms']:>10.1f}"
            f"{c['peak_memory_bytes'] / 2**20:>8.0f}"
        )
    for title, ratios, keys in (("student / teacher", result.get("student_to_teacher"), ("params", "macs", "latency")),
                                ("student / baseline", result.get("student_to_baseline"),
                                 ("params", "macs", "latency", "memory"))):
        if ratios:
            lines += ["", f"{title:<20}{'variant':<12}" + "".join(f"{k:>9}" for k in keys)]
            for pair, by_variant in ratios.items():
                for variant, r in by_variant.items():
                    lines.append(f"{pair:<20}{variant:<12}" + "".join(f"{r[k]:>8.2f}x" for k in keys))
    if result.get("deployed"):
        lines += ["", f"{'preset':<{width}}{'runtime':<17}{'ms':>10}{'x eager':>9}{'MiB':>8}{'parity':>10}"]
        for row in result["deployed"]:
            ratio = row.get("latency_ratio")
            parity = row.get("parity_max_abs")
            lines.append(
                f"{row['preset']:<{width}}{row['runtime']:<17}{row['latency_ms']:>10.1f}"
                f"{'' if ratio is None else f'{ratio:.2f}':>9}{row['peak_memory_bytes'] / 2**20:>8.0f}"
                f"{'' if parity is None else f'{parity:.1e}':>10}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bridgeta bench cost", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dataroot", type=Path, default=None, help="with --teacher: also measure training cost")
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("results/cost.json"))
    parser.add_argument("--runtimes", nargs="*", default=list(RUNTIMES), choices=list(RUNTIMES),
                        help="deployed-student runtimes on the CPU (none: skip the deployed rows)")
    # internal: one measurement in this process, JSON on stdout
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deployed", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--export", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--runtime", default="pytorch", choices=list(RUNTIMES), help=argparse.SUPPRESS)
    parser.add_argument("--onnx", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        row = measure_latency(args.one, args.device, args.precision, args.compile, args.warmup, args.repeats)
        print(json.dumps(row))
        return 0
    if args.export is not None:
        print(json.dumps(export_deployed(args.export, Path(args.onnx))))
        return 0
    if args.deployed is not None:
        print(json.dumps(measure_deployed(args.deployed, args.runtime, args.onnx, args.warmup, args.repeats)))
        return 0
    if args.devices is None:
        import torch

        args.devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    result = run(args.pairs, args.devices, args.warmup, args.repeats, args.out,
                 args.dataroot, args.teacher, args.train_steps, args.runtimes)
    print(format_table(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
