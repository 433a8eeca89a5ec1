"""Methods x seeds on one protocol: the engine of ``bridgeta bench accuracy`` and the demo.

A :class:`Protocol` names the teacher and student presets, BridgeTA's recipe and the schedule.
For every seed ``s`` the teacher and the baseline train, and each distillation method trains the
same student from the seed-``s`` teacher with BridgeTA's recipe and one setting changed:
``direct`` (the paper's w/o TA), ``feature_kd``, ``logit_kd``, ``bridgeta``, the other rows of
its Table 4 (``fld``, ``fld_dld``, ``fld_dld_lld_base``) and the fixed-epsilon ablation
(``fixed_epsilon``). Everything is evaluated on the test towns, on which no choice was made (the
loss weights come from ``bench distill-sweep`` on the validation towns). Runs live in
``<runs>/<name>-seed<s>`` and are reused when finished (with the same config) or resumed.

Reported per method: mean ± std over seeds of mIoU, per-class IoU, mIoU per condition and per
distance band, and "gap closed" = (student - baseline) / (teacher - baseline) in mIoU, per seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bridgeta.bench.baselines import _mean_std, train_and_evaluate
from bridgeta.provenance import environment, write_json


@dataclass(frozen=True)
class Protocol:
    """Who teaches whom, and on which schedule, for every method of one comparison."""

    teacher: str = "tiny-lc"
    student: str = "tiny-c"
    recipe: str = "distill/tiny-c-bridgeta"  # BridgeTA's recipe; the other methods override it
    epochs: int | None = None  # None: each preset's own recipe
    teacher_epochs: int | None = None


# method -> overrides of the BridgeTA recipe (None: not a distillation run). The rows of the
# paper's Table 4 are BridgeTA with fewer levels; "direct" is its "w/o TA" row.
METHODS: dict[str, tuple[str, ...] | None] = {
    "teacher": None,
    "baseline": None,
    "direct": ("distill.method=direct",),
    "feature_kd": ("distill.method=feature_kd",),
    "logit_kd": ("distill.method=logit_kd",),
    "bridgeta": (),
    "fld": ("distill.levels=[fld]",),
    "fld_dld": ("distill.levels=[fld, dld]",),
    "fld_dld_lld_base": ("distill.levels=[fld, dld, lld]", "distill.lld_aux=false"),
    "fixed_epsilon": ("distill.epsilon=fixed", "distill.epsilon_fixed=1.0"),
    # The corrections' ablations (docs/distill.md): what the TA alone does, and each switch.
    "ta_seg_only": ("distill.levels=[]",),
    "ta_no_grad_to_student": ("distill.ta_grad_to_student=false",),
    "ta_mutual": ("distill.ta_mutual=true",),
    "ta_from_teacher": ("distill.ta_init=teacher",),
    "epsilon_narrow": ("distill.epsilon_range=[0.5, 2.0]",),
}
DEFAULT_METHODS = ("baseline", "direct", "bridgeta")


def run_name(method: str, seed: int, protocol: Protocol = Protocol()) -> str:
    """Run directory name; teacher and baseline keep the preset names ``bench baselines`` uses."""
    if method == "teacher":
        return f"{protocol.teacher}-seed{seed}"
    if method == "baseline":
        return f"{protocol.student}-seed{seed}"
    return f"{protocol.student}-{method}-seed{seed}"


def method_config(method: str, runs_dir: Path, seed: int, protocol: Protocol) -> tuple[str, list[str]]:
    """(preset or recipe, overrides) that train ``method`` for ``seed`` under ``protocol``."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    if method == "teacher":
        epochs = protocol.teacher_epochs or protocol.epochs
        return protocol.teacher, [f"train.epochs={epochs}"] if epochs else []
    schedule = [f"train.epochs={protocol.epochs}"] if protocol.epochs else []
    if method == "baseline":
        return protocol.student, schedule
    teacher = runs_dir / run_name("teacher", seed, protocol)
    name = f"name={protocol.student}-{method}"
    return protocol.recipe, [name, *schedule, *METHODS[method], f"distill.teacher={teacher}"]


def train_method(method: str, dataroot: Path, runs_dir: Path, seed: int, protocol: Protocol = Protocol()) -> dict:
    preset, overrides = method_config(method, runs_dir, seed, protocol)
    return train_and_evaluate(preset, dataroot, runs_dir / run_name(method, seed, protocol), seed, overrides)


def aggregate(runs: dict[str, list[dict]]) -> dict:
    """Mean ± std over seeds per method, plus the share of the teacher-baseline gap closed."""
    table = {}
    for method, results in runs.items():
        tests = [r["test"] for r in results]
        table[method] = {
            "seeds": [r["seed"] for r in results],
            "miou": _mean_std([t["miou"] for t in tests]),
            "miou_at_0.5": _mean_std([t["miou_at_0.5"] for t in tests]),
            "iou": {c: _mean_std([t["iou"][c] for t in tests]) for c in tests[0]["iou"]},
            "by_condition": {
                k: _mean_std([t["by_condition"][k]["miou"] for t in tests]) for k in tests[0]["by_condition"]
            },
            "by_range": {k: _mean_std([t["by_range"][k]["miou"] for t in tests]) for k in tests[0]["by_range"]},
            "step_time_s": _mean_std([r["train"].get("step_time_s") for r in results]),
        }
    if "teacher" in runs and "baseline" in runs:
        teacher = {r["seed"]: r["test"]["miou"] for r in runs["teacher"]}
        baseline = {r["seed"]: r["test"]["miou"] for r in runs["baseline"]}
        for method, results in runs.items():
            closed = [
                (r["test"]["miou"] - baseline[r["seed"]]) / (teacher[r["seed"]] - baseline[r["seed"]])
                for r in results
                if r["seed"] in teacher and r["seed"] in baseline and teacher[r["seed"]] != baseline[r["seed"]]
            ]
            table[method]["gap_closed"] = _mean_std(closed)
    return table


def run(
    dataroot: Path,
    runs_dir: Path,
    out: Path,
    seeds: int,
    methods: Sequence[str],
    protocol: Protocol = Protocol(),
    metadata: dict | None = None,
) -> dict:
    """Train and evaluate ``methods`` (plus teacher and baseline) for ``seeds`` seeds; write and
    return the results, with ``metadata`` (e.g. the benchmark preset) merged in."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown} (known: {', '.join(METHODS)})")
    started = environment()
    order = list(dict.fromkeys(["teacher", "baseline", *methods]))
    runs: dict[str, list[dict]] = {method: [] for method in order}
    for seed in range(seeds):
        for method in order:
            print(f"-- {method}, seed {seed}", flush=True)
            runs[method].append(train_method(method, dataroot, runs_dir, seed, protocol))
    result = {
        "environment": started,
        "dataroot": str(dataroot),
        "protocol": asdict(protocol),
        "epochs": protocol.epochs,
        "runs": runs,
        "table": aggregate(runs),
        **(metadata or {}),
    }
    write_json(out, result)
    return result
