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

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from bridgeta.bench.baselines import _mean_std, train_and_evaluate
from bridgeta.bench.jobs import Job
from bridgeta.config import load_config
from bridgeta.distill.monotakd import assistant_overrides
from bridgeta.provenance import environment, write_json


@dataclass(frozen=True)
class Protocol:
    """Who teaches whom, and on which schedule, for every method of one comparison."""

    teacher: str = "tiny-lc"
    student: str = "tiny-c"
    recipe: str = "distill/tiny-c-bridgeta"  # BridgeTA's recipe; the other methods override it
    monotakd_recipe: str = "distill/tiny-c-monotakd"  # MonoTAKD's, for its rows and its assistant
    # TinyBEV's stage recipes are ``<tinybev_recipe>-s1`` .. ``-s3``; the three stages share the
    # student's step budget (``tinybev_stage_steps``), so S3 ends as long trained as the baseline.
    tinybev_recipe: str = "distill/tiny-c-tinybev"
    epochs: int | None = None  # None: each preset's own recipe
    teacher_epochs: int | None = None
    # Fixed numbers of optimiser steps (``train.max_steps``; the cosine schedule spans them), in
    # place of ``epochs``: a schedule that does not change when the world grows.
    student_steps: int | None = None
    teacher_steps: int | None = None
    # The backbone file every camera branch, teacher and students, starts from (``bridgeta
    # pretrain-backbone``); None: random initialisation.
    pretrained: str | None = None
    # Validation points over training for seed 0 of the teacher and the baseline, the runs whose
    # convergence the benchmark reports (0: none).
    curve_points: int = 0
    # Teachers trained: None, one per seed (student seed s learns from teacher seed s); 1, the
    # seed-0 teacher teaches every seed, as one released teacher would.
    teacher_seeds: int | None = None
    # Config overrides for every student run (methods included) and for the teacher.
    student_overrides: tuple[str, ...] = ()
    teacher_overrides: tuple[str, ...] = ()
    # Where ``teacher`` is wider than the student (TinyBEV's pair), the teacher of the methods
    # that take no adapters (BridgeTA's row, ``tinybev_bridgeta``): a fusion preset with the
    # student's widths, trained on the teacher's schedule with these overrides. Its run is named
    # like any teacher's (``<preset>-seed<s>``), so the detection table's teacher on the same
    # work directory and schedule is reused.
    aligned_teacher: str | None = None
    aligned_teacher_overrides: tuple[str, ...] = ()


# An epoch bound that never binds when a protocol counts steps.
_STEP_EPOCHS = 10_000


# TinyBEV's stage recipes with no distillation term (the staged baseline's runs).
_NO_TINYBEV_TERMS = ("distill.tinybev.feature=0", "distill.tinybev.output=0", "distill.tinybev.region=false")
# method -> overrides of the BridgeTA recipe (None: not a distillation run). The rows of the
# paper's Table 4 are BridgeTA with fewer levels; "direct" is its "w/o TA" row.
METHODS: dict[str, tuple[str, ...] | None] = {
    "teacher": None,
    "baseline": None,
    # The baseline trained for twice the student's schedule: as many steps of the camera network
    # as MonoTAKD's TA plus its student (the TA has the student's schedule). Its row separates
    # what MonoTAKD gains from its start at the TA's weights from what more training would give.
    "baseline_long": None,
    # The baseline for four times the student's schedule: with baseline_long, whether the
    # protocol's schedule has reached what the student network can learn (docs/results.md).
    "baseline_x4": None,
    "direct": ("distill.method=direct",),
    # Two distillation methods on twice the student's schedule, against baseline_long: whether
    # a teacher's terms help once the student trains longer (docs/results.md).
    "direct_long": ("distill.method=direct",),
    "bridgeta_long": (),
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
    # MonoTAKD (on its own recipe, Protocol.monotakd_recipe) and a row per component
    # (docs/methods/monotakd.md); "assistant" is its camera TA, trained like a preset.
    "assistant": None,
    "monotakd": (),
    "monotakd_imd_only": ("distill.monotakd.cmrd=0", "distill.monotakd.logit=0", "model.residual=null"),
    "monotakd_cmrd_only": ("distill.monotakd.imd=0", "distill.monotakd.logit=0"),
    "monotakd_no_sam": ("model.residual.sam=false",),
    "monotakd_no_ffm": ("model.residual.ffm=false",),
    "monotakd_shared": ("distill.monotakd.ta_source=shared",),
    # TinyBEV's stages (docs/methods/tinybev.md): each its own recipe, each later stage starting
    # from the same seed's previous stage (``STAGE_AFTER``).
    "tinybev_s1": (),
    "tinybev_s2": (),
    "tinybev_s3": (),
    # The student without distillation, trained in the same three chained runs (each its own
    # warm-up, cosine decay and fresh optimiser, from the previous one's weights and data
    # position): the control that tells the stages' distillation from their restarts. Each
    # stage's row is paired with it (``same_schedule_baseline``).
    **{f"baseline_s{stage}": _NO_TINYBEV_TERMS for stage in (1, 2, 3)},
    # S3's terms (features, outputs, region weights) over the baseline's one schedule from the
    # start, with no stages: the control for the other side of the staged rows. With the staged
    # baseline it splits what the restarts cost from what the teacher's terms give or take.
    "tinybev_joint": (),
    # BridgeTA on TinyBEV's student, every head of it (``<tinybev_recipe>-bridgeta``): BridgeTA has
    # no adapters, so it learns from ``Protocol.aligned_teacher`` ("aligned_teacher", a teacher
    # row of its own) and distills the map and object heads; motion, occupancy and planning learn
    # from their labels alone.
    "aligned_teacher": None,
    "tinybev_bridgeta": (),
}
# The baseline on a multiple of the student's schedule (same recipe, warm-up and cosine decay
# stretched over the longer run).
LONGER_BASELINES = {"baseline_long": 2, "baseline_x4": 4}
# Distillation methods on a longer schedule: (the method they are, the multiple). Each is paired
# with the baseline of its own schedule (``paired_vs_same_schedule``).
LONGER_METHODS = {"direct_long": ("direct", 2), "bridgeta_long": ("bridgeta", 2)}


def schedule_times(method: str) -> int:
    """How many times the student's schedule ``method`` trains for (1 for most rows)."""
    return LONGER_BASELINES.get(method) or LONGER_METHODS.get(method, (method, 1))[1]


def camera_network_steps(method: str) -> int:
    """How many student schedules the deployed camera network has trained for: a MonoTAKD
    student starts from its TA, the same network trained on the student's schedule first."""
    return 2 if is_monotakd(method) else schedule_times(method)


def tinybev_stage(method: str) -> int | None:
    """Which of TinyBEV's three chained runs ``method`` is (``tinybev_s<n>`` and the staged
    baseline's ``baseline_s<n>``), or None for every other method."""
    for family in ("tinybev_s", "baseline_s"):
        if method.startswith(family) and method.removeprefix(family).isdigit():
            return int(method.removeprefix(family))
    return None


def tinybev_stage_steps(method: str, student_steps: int) -> int:
    """The steps of one TinyBEV stage: a third of the student's budget each, the last stage
    taking the remainder, so S1 + S2 + S3 train exactly as long as the baseline."""
    stage = tinybev_stage(method)
    assert stage is not None, method
    share = student_steps // TINYBEV_STAGES
    return share if stage < TINYBEV_STAGES else student_steps - share * (TINYBEV_STAGES - 1)


def trained_steps(method: str, student_steps: int) -> int:
    """How many optimiser steps the deployed camera network has taken, its earlier stages and
    MonoTAKD's TA included: the ``steps`` of the tables."""
    if is_tinybev(method):
        return sum(tinybev_stage_steps(f"tinybev_s{stage}", student_steps)
                   for stage in range(1, tinybev_stage(method) + 1))
    return camera_network_steps(method) * student_steps


def same_schedule_baseline(method: str) -> str | None:
    """The baseline a row trained for more than the student's schedule is paired with: the one
    trained for as many steps (``baseline_long`` for MonoTAKD and the 2x rows); a TinyBEV stage's
    is the staged baseline's run of that stage (as many steps, in the same chained runs)."""
    if method.startswith("tinybev_s"):  # the staged baseline's run of the same stage
        return f"baseline_s{tinybev_stage(method)}"
    times = camera_network_steps(method)
    if times == 1 or method in LONGER_BASELINES:
        return None
    return next((b for b, t in LONGER_BASELINES.items() if t == times), None)


# The run a staged method starts from: train it first, with the same seed.
STAGE_AFTER = {"tinybev_s2": "tinybev_s1", "tinybev_s3": "tinybev_s2",
               "baseline_s2": "baseline_s1", "baseline_s3": "baseline_s2"}
TINYBEV_STAGES = 3
# The planning figures of TinyBEV's table: L2 and the collision rate in UniAD's convention (at
# each horizon), averaged over 1, 2 and 3 s, and L2 at 3 s, the figure TinyBEV's abstract gives
# (bridgeta/motion_metrics.py).
MULTITASK_PLANNING = ("l2@mean", "l2@3s", "collision@mean")
DEFAULT_METHODS = ("baseline", "direct", "bridgeta")


# Methods whose loss-weight scale lambda is chosen on validation (bench distill-sweep), and what
# lambda = 1 means for each: BridgeTA's recipe weights. ``direct`` and the Table 4 rows use that
# vector; ``feature_kd`` is the FLD level alone (its lambda_1); ``logit_kd`` is a Bernoulli KL on
# the logits, the same loss as BridgeTA's CrossKD term, so it starts from that term's weight.
TUNED_METHODS = ("bridgeta", "direct", "feature_kd", "logit_kd", "monotakd")
# Methods without a teacher assistant: their lambda = 0 objective is the baseline's.
_NO_ASSISTANT = ("direct", "feature_kd", "logit_kd")


def scaled_weights(method: str, scale: float, recipe: str) -> dict[str, float]:
    """The loss weights of ``method`` at ``scale`` times its lambda = 1 weights (see above):
    ``distill.weights`` keys, or for MonoTAKD ``distill.monotakd`` keys (imd, cmrd, logit)."""
    if is_monotakd(method):
        settings = load_config(recipe).distill.monotakd
        return {name: scale * getattr(settings, name) for name in ("imd", "cmrd", "logit")}
    base = load_config(recipe).distill.weights
    if method == "feature_kd":
        weights = {"fld": base.fld, "dld": 0.0, "lld": 0.0, "lld_aux": 0.0}
    elif method == "logit_kd":
        weights = {"fld": 0.0, "dld": 0.0, "lld": base.lld_aux, "lld_aux": 0.0}
    else:
        weights = {"fld": base.fld, "dld": base.dld, "lld": base.lld, "lld_aux": base.lld_aux}
    return {level: scale * value for level, value in weights.items()}


# Table rows that are teachers: no paired deltas against a student.
TEACHER_ROLES = ("teacher", "aligned_teacher")


def is_monotakd(method: str) -> bool:
    return method == "monotakd" or method.startswith("monotakd_")


def is_tinybev(method: str) -> bool:
    """TinyBEV's staged runs: its stages and the staged baseline's (on the stage recipes)."""
    return tinybev_stage(method) is not None


def stage_depth(method: str) -> int:
    """How many runs must finish before ``method`` can start (0 for every unstaged method)."""
    depth = 0
    while method in STAGE_AFTER:
        method, depth = STAGE_AFTER[method], depth + 1
    return depth


def is_baseline_point(method: str, scale: float | None) -> bool:
    """lambda = 0 of a method without a TA is the baseline itself (its run is reused)."""
    return scale == 0 and method in _NO_ASSISTANT


def _as_baseline(method: str, scale: float | None) -> tuple[str, float | None]:
    """A longer row of a method without a TA at lambda = 0 is the baseline of its schedule."""
    if scale == 0 and method in LONGER_METHODS and LONGER_METHODS[method][0] in _NO_ASSISTANT:
        return same_schedule_baseline(method), None
    return method, scale


def run_name(method: str, seed: int, protocol: Protocol = Protocol(), scale: float | None = None) -> str:
    """Run directory name; teacher and baseline keep the preset names ``bench baselines`` uses.

    ``scale``: the method's loss weights scaled by lambda (``scaled_weights``), named ``-lam<l>``.
    """
    method, scale = _as_baseline(method, scale)
    if method == "teacher":
        return f"{protocol.teacher}-seed{seed}"
    if method == "aligned_teacher":
        return f"{_aligned_teacher(protocol)}-seed{seed}"
    if method == "baseline" or is_baseline_point(method, scale):
        return f"{protocol.student}-seed{seed}"
    lam = "" if scale is None else f"-lam{scale:g}"
    return f"{protocol.student}-{method}{lam}-seed{seed}"


def teacher_seed(seed: int, protocol: Protocol) -> int:
    """The seed of the teacher that student seed ``seed`` learns from."""
    return 0 if protocol.teacher_seeds == 1 else seed


def _schedule(steps: int | None, epochs: int | None) -> list[str]:
    if steps:
        return [f"train.epochs={_STEP_EPOCHS}", f"train.max_steps={steps}"]
    return [f"train.epochs={epochs}"] if epochs else []


def _aligned_teacher(protocol: Protocol) -> str:
    if not protocol.aligned_teacher:
        raise ValueError("this protocol has no aligned teacher (Protocol.aligned_teacher), which "
                         "tinybev_bridgeta learns from: BridgeTA takes no adapters")
    return protocol.aligned_teacher


def method_config(
    method: str, runs_dir: Path, seed: int, protocol: Protocol, scale: float | None = None
) -> tuple[str, list[str]]:
    """(preset or recipe, overrides) that train ``method`` for ``seed`` under ``protocol``;
    ``scale``: its loss weights at lambda = ``scale`` (None: the recipe's)."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    method, scale = _as_baseline(method, scale)
    common = [f"model.camera.backbone.pretrained={protocol.pretrained}"] if protocol.pretrained else []

    def curve(steps: int | None) -> list[str]:
        if not (protocol.curve_points and steps and seed == 0):
            return []
        return ["train.eval_every=0", f"train.eval_every_steps={max(1, steps // protocol.curve_points)}"]

    if method in ("teacher", "aligned_teacher"):
        schedule = _schedule(protocol.teacher_steps, protocol.teacher_epochs or protocol.epochs)
        preset, overrides = ((protocol.teacher, protocol.teacher_overrides) if method == "teacher"
                             else (_aligned_teacher(protocol), protocol.aligned_teacher_overrides))
        return preset, [*overrides, *schedule, *common, *curve(protocol.teacher_steps)]
    times = schedule_times(method)
    student_steps = times * protocol.student_steps if protocol.student_steps else None
    student_epochs = None
    if not student_steps and (protocol.epochs or times > 1):  # counted in epochs: the preset's own when unset
        own = protocol.student if method in LONGER_BASELINES else protocol.recipe
        student_epochs = times * (protocol.epochs or load_config(own).train.epochs)
    schedule = [*protocol.student_overrides, *_schedule(student_steps, student_epochs)]
    if method == "baseline" or is_baseline_point(method, scale):
        return protocol.student, [*schedule, *common, *curve(protocol.student_steps)]
    if method in LONGER_BASELINES:
        return protocol.student, [f"name={protocol.student}-{'long' if times == 2 else f'x{times}'}",
                                  *schedule, *common, *curve(student_steps)]
    teacher = runs_dir / run_name("teacher", teacher_seed(seed, protocol), protocol)
    if method == "assistant":
        # MonoTAKD's TA: its student's camera network, LiDAR-depth lift, imitating the fused BEV
        # of the teacher its students learn from: the benchmark's own, so it trains after it
        # (run_staged's stage 1 in two waves, run's order).
        # Read for its network and MonoTAKD settings, which the protocol's overrides may change,
        # but without their data keys (the cpu presets' data.augment.draws): a data section
        # without its dataroot, which only the run gets, does not validate.
        model_and_method = [o for o in (*schedule, *common) if not o.startswith("data.")]
        recipe = load_config(protocol.monotakd_recipe, model_and_method)
        return protocol.monotakd_recipe, [f"name={protocol.student}-assistant", *schedule, *common,
                                          *assistant_overrides(recipe, str(teacher))]
    name = f"name={protocol.student}-{method}"
    if method == "tinybev_bridgeta":
        aligned = runs_dir / run_name("aligned_teacher", teacher_seed(seed, protocol), protocol)
        return (f"{protocol.tinybev_recipe}-bridgeta",
                [name, *schedule, *common, *METHODS[method], f"distill.teacher={aligned}"])
    if method == "tinybev_joint":  # S3's recipe, from the pretrained backbone, on the baseline's schedule
        return (f"{protocol.tinybev_recipe}-s3",
                [name, *schedule, *common, f"distill.teacher={teacher}"])
    if is_tinybev(method):
        if not protocol.student_steps:
            raise ValueError(f"{method}: TinyBEV's stages share the student's step budget; this protocol counts "
                             "epochs (set Protocol.student_steps)")
        stage_steps = tinybev_stage_steps(method, protocol.student_steps)
        schedule = [*protocol.student_overrides, *_schedule(stage_steps, protocol.epochs)]
        # A later stage starts from the previous stage's student and adapters, and goes on to
        # the samples it had not reached: S1 + S2 + S3 see the data the baseline's steps see.
        done = trained_steps(method, protocol.student_steps) - stage_steps
        start = ([f"distill.tinybev.init_from={runs_dir / run_name(STAGE_AFTER[method], seed, protocol, scale)}",
                  f"train.data_start_step={done}"] if method in STAGE_AFTER else [])
        return (f"{protocol.tinybev_recipe}-s{tinybev_stage(method)}",
                [name, *schedule, *common, *METHODS[method], *start, f"distill.teacher={teacher}"])
    recipe = protocol.monotakd_recipe if is_monotakd(method) else protocol.recipe
    weights = []
    if scale is not None:
        family = LONGER_METHODS.get(method, (method, 1))[0]
        tuned = family if family in TUNED_METHODS else ("monotakd" if is_monotakd(method) else "bridgeta")
        scaled = scaled_weights(tuned, scale, recipe)
        if is_monotakd(method):
            weights = [f"distill.monotakd.{k}={v:.6g}" for k, v in scaled.items()]
        else:
            pairs = ", ".join(f"{k}: {v:.6g}" for k, v in scaled.items())
            weights = [f"distill.weights={{{pairs}}}"]
        # An ablation that switches a term off keeps it off at every lambda.
        weights = [w for w in weights if w.split("=")[0] not in {o.split("=")[0] for o in METHODS[method]}]
    extra = []
    if is_monotakd(method):
        extra = [f"distill.monotakd.assistant={runs_dir / run_name('assistant', teacher_seed(seed, protocol), protocol)}"]
    return recipe, [name, *schedule, *common, *METHODS[method], *weights, *extra, f"distill.teacher={teacher}"]


def run_inputs(method: str, seed: int, scale: float | None) -> list[tuple[str, int | None, float | None]]:
    """The runs whose weights ``method``'s run reads, as (method, seed, scale); a seed of None is
    the teacher seed of ``seed`` (:func:`teacher_seed`). In dependency order."""
    method, scale = _as_baseline(method, scale)
    if (METHODS[method] is None and method != "assistant") or is_baseline_point(method, scale):
        return []  # teachers and baselines: the backbone only
    if method == "tinybev_bridgeta":
        return [("aligned_teacher", None, None)]
    inputs: list[tuple[str, int | None, float | None]] = [("teacher", None, None)]
    if is_monotakd(method):
        inputs.append(("assistant", None, None))
    if method in STAGE_AFTER:
        inputs.append((STAGE_AFTER[method], seed, scale))
    return inputs


def train_method(
    method: str, dataroot: Path, runs_dir: Path, seed: int, protocol: Protocol = Protocol(),
    scale: float | None = None, split: str | Sequence[str] = "test", suffix: str = "",
    read_only: bool = False, ledger: Path | None = None, weights_needed: bool = False,
) -> dict | None:
    """Train (or reuse) and evaluate one run; ``suffix`` names a second run of the same config
    (``-rerun``: the reproducibility check); ``read_only`` returns a finished run's stored result
    or None, training nothing (``--summary``). ``ledger``: the benchmark's record of finished
    runs (:mod:`bridgeta.bench.ledger`); a run recorded there is reused without its weights, and
    before a run trains, the runs it reads (:func:`run_inputs`) get theirs back, trained again
    to their recorded digests where this machine has lost them."""
    preset, overrides = method_config(method, runs_dir, seed, protocol, scale)
    name = run_name(method, seed, protocol, scale) + suffix
    if ledger is None:
        return train_and_evaluate(preset, dataroot, runs_dir / name, seed, overrides, split, read_only=read_only)
    return train_and_evaluate(preset, dataroot, runs_dir / name, seed, overrides, split, read_only=read_only,
                              record=ledger / name, weights_needed=weights_needed,
                              before_training=partial(_train_inputs, method, dataroot, runs_dir, seed, protocol, scale, ledger))


def _train_inputs(method: str, dataroot: Path, runs_dir: Path, seed: int, protocol: Protocol,
                  scale: float | None, ledger: Path) -> None:
    """The runs ``method``'s run reads get their weights: reused here, or trained again to their
    recorded digests (and, for an input that has inputs, theirs first)."""
    for input_method, input_seed, input_scale in run_inputs(method, seed, scale):
        input_seed = teacher_seed(seed, protocol) if input_seed is None else input_seed
        train_method(input_method, dataroot, runs_dir, input_seed, protocol, input_scale, ("val", "test"),
                     ledger=ledger, weights_needed=True)


def prepare_inputs(method: str, dataroot: Path, runs_dir: Path, seed: int, protocol: Protocol = Protocol(),
                   scale: float | None = None, split: str | Sequence[str] = "test", suffix: str = "",
                   ledger: Path | None = None) -> None:
    """:func:`train_method`'s arguments: where that run will train and reads runs whose weights
    this machine lacks, train them here first. Before runs train side by side (``--jobs`` > 1),
    so that workers neither train one input at once nor train it on fewer threads than it was
    recorded with (another digest)."""
    if ledger is None:
        return
    from bridgeta.bench.ledger import needs_training

    name = run_name(method, seed, protocol, scale) + suffix
    splits = [split] if isinstance(split, str) else list(split)
    if needs_training(runs_dir / name, ledger / name, splits):
        _train_inputs(method, dataroot, runs_dir, seed, protocol, scale, ledger)


def method_job(method: str, seed: int, dataroot: Path, runs_dir: Path, protocol: Protocol,
               scale: float | None, splits: Sequence[str], suffix: str = "", ledger: Path | None = None) -> Job:
    """:func:`train_method` as a :class:`~bridgeta.bench.jobs.Job`, logged to ``runs/logs/<run>.log``."""
    name = run_name(method, seed, protocol, scale) + suffix
    return Job(train_method, (method, dataroot, runs_dir, seed, protocol, scale, tuple(splits), suffix),
               kwargs={"ledger": ledger}, log=runs_dir / "logs" / f"{name}.log", label=name)


def paired(results: list[dict], reference: list[dict], key=lambda test: test["miou"]) -> dict:
    """Mean ± std over the seeds both have of the per-seed difference of a test figure
    (``key`` of the test result; mIoU by default), with each seed's difference under
    ``per_seed`` (keyed by the seed as text): with three seeds, whether a mean comes from every
    seed or from one is what a reader needs next."""
    by_seed = {r["seed"]: key(r["test"]) for r in reference}
    deltas = {r["seed"]: key(r["test"]) - by_seed[r["seed"]] for r in results if r["seed"] in by_seed}
    return {**_mean_std(list(deltas.values())), "per_seed": {str(seed): deltas[seed] for seed in sorted(deltas)}}


def paired_where_complete(results: list[dict], reference: list[dict], key) -> dict:
    """:func:`paired`, but only when every run of both rows has the figure (``key`` not None),
    as the figure's own cells: runs evaluated before a figure existed blank its delta rather
    than leave a delta over the other seeds alone."""
    if any(key(r["test"]) is None for r in (*results, *reference)):
        return _mean_std([])
    return paired(results, reference, key=key)


def learned_classes(runs: dict[str, list[dict]], threshold: float = 0.10) -> list[str]:
    """The classes the teacher learns: mean test IoU above ``threshold`` (all, without a teacher)."""
    if not runs.get("teacher"):
        return list(next(iter(runs.values()))[0]["test"]["iou"])
    tests = [r["test"]["iou"] for r in runs["teacher"]]
    return [c for c in tests[0] if statistics.fmean(t[c] for t in tests) > threshold]


# A headline row's rival: the other method it is compared with head to head, paired per seed
# (``paired_vs_rival``) beside the baseline and ``direct``. MonoTAKD's issue asks for it against
# BridgeTA: both teach through an assistant, one camera-only, one LiDAR-camera.
RIVALS = {"monotakd": "bridgeta"}


def _references(method: str, runs: dict[str, list[dict]]) -> list[str]:
    """The rows ``method`` gets paired deltas against: the baseline and ``direct`` where they ran,
    except for itself, the teachers, MonoTAKD's TA (it lifts with LiDAR depth: not a camera
    student) and the baseline (whose delta against ``direct`` would only repeat ``direct``'s own,
    negated)."""
    if method in (*TEACHER_ROLES, "assistant", "baseline"):
        return []
    return [reference for reference in ("baseline", "direct") if reference in runs and reference != method]


def aggregate(runs: dict[str, list[dict]]) -> dict:
    """Mean ± std over seeds per method, the share of the teacher-baseline gap closed, paired
    per-seed deltas against the baseline and ``direct`` (and against the baseline of a row's
    steps and its ``RIVALS`` entry, where they ran), and the mIoU over the classes the
    teacher learns (``miou_learned``)."""
    learned = learned_classes(runs)
    table = {}
    for method, results in runs.items():
        tests = [r["test"] for r in results]
        table[method] = {
            "seeds": [r["seed"] for r in results],
            "miou": _mean_std([t["miou"] for t in tests]),
            "miou_learned": _mean_std([statistics.fmean(t["iou"][c] for c in learned) for t in tests]),
            "miou_at_0.5": _mean_std([t["miou_at_0.5"] for t in tests]),
            "iou": {c: _mean_std([t["iou"][c] for t in tests]) for c in tests[0]["iou"]},
            "by_condition": {
                k: _mean_std([t["by_condition"][k]["miou"] for t in tests]) for k in tests[0]["by_condition"]
            },
            "by_range": {k: _mean_std([t["by_range"][k]["miou"] for t in tests]) for k in tests[0]["by_range"]},
            "step_time_s": _mean_std([r["train"].get("step_time_s") for r in results]),
        }
        detections = [t.get("detection") for t in tests]
        if all(d is not None for d in detections):
            table[method]["detection"] = {
                "mAP": _mean_std([d["mAP"] for d in detections]),
                "NDS": _mean_std([d["NDS"] for d in detections]),
                # Runs evaluated before the unclipped AP existed lack it: the cell stays empty then.
                "mAP_unclipped": _mean_std([d.get("mAP_unclipped") for d in detections]
                                           if all("mAP_unclipped" in d for d in detections) else []),
                "per_class_ap": {c: _mean_std([d["per_class"][c]["AP"] for d in detections if c in d["per_class"]])
                                 for c in detections[0]["per_class"]},
                "tp_errors": {k: _mean_std([d["tp_errors"][k] for d in detections]) for k in detections[0]["tp_errors"]},
            }
        motions = [t.get("motion") for t in tests]
        if all(m is not None for m in motions):
            # Every figure the runs share (counts and labels aside), whatever the metric's version named them.
            keys = [k for k, v in motions[0].items() if isinstance(v, float) and all(k in m for m in motions)]
            table[method]["motion"] = {k: _mean_std([m[k] for m in motions]) for k in keys}
        plans = [t.get("planning") for t in tests]
        if all(p is not None for p in plans):
            keys = [k for k in plans[0] if k.startswith(("l2", "L2@", "collision", "logged_collision"))
                    and all(k in p for p in plans)]
            table[method]["planning"] = {k: _mean_std([p[k] for p in plans]) for k in keys}
            counts = {p.get("samples") for p in plans}
            if len(counts) == 1 and None not in counts:  # the scored samples: the collision rate's resolution
                table[method]["planning_samples"] = counts.pop()
            if all("constant_velocity" in p for p in plans):  # the ego status' own path, the planner's prior
                table[method]["planning"].update({
                    f"constant_velocity/{k}": _mean_std([p["constant_velocity"][k] for p in plans])
                    for k in MULTITASK_PLANNING if all(k in p["constant_velocity"] for p in plans)})
        if any("assistant_val" in r for r in results):
            table[method]["assistant_val_miou"] = _mean_std([r.get("assistant_val", {}).get("miou") for r in results])
        if any("val" in r for r in results):
            table[method]["val_miou"] = _mean_std([r.get("val", {}).get("miou") for r in results])
        for reference in _references(method, runs):
            table[method][f"paired_vs_{reference}"] = paired(results, runs[reference])
        reference = same_schedule_baseline(method)
        if reference in runs:
            table[method]["paired_vs_same_schedule"] = {"reference": reference, **paired(results, runs[reference])}
        rival = RIVALS.get(method)
        if rival in runs:
            table[method]["paired_vs_rival"] = {"reference": rival, **paired(results, runs[rival])}
    for method, results in runs.items():  # the detection table's paired deltas (multi-task runs)
        if "detection" not in table[method]:
            continue
        for reference in _references(method, runs):
            if "detection" in table[reference]:
                for figure in ("NDS", "mAP", "mAP_unclipped"):
                    table[method]["detection"][f"paired_{figure.lower()}_vs_{reference}"] = paired_where_complete(
                        results, runs[reference], key=lambda test, figure=figure: test["detection"].get(figure))
    # The multi-task table's paired deltas against the baseline (TinyBEV's rows). The planning
    # figures are UniAD's mean over 1, 2 and 3 s, the column TinyBEV's figures compare with.
    multitask = {"NDS": lambda t: (t.get("detection") or {}).get("NDS"),
                 "mAP_unclipped": lambda t: (t.get("detection") or {}).get("mAP_unclipped"), "mIoU": lambda t: t["miou"],
                 "minADE": lambda t: (t.get("motion") or {}).get("minADE"),
                 **{key: (lambda t, key=key: (t.get("planning") or {}).get(key)) for key in MULTITASK_PLANNING}}
    for method, results in runs.items():
        if method in (*TEACHER_ROLES, "baseline") or "planning" not in table[method]:
            continue
        if "baseline" in runs:
            table[method]["paired_multitask_vs_baseline"] = {
                name: paired_where_complete(results, runs["baseline"], key) for name, key in multitask.items()}
        reference = same_schedule_baseline(method)
        if reference in runs:  # a TinyBEV stage against the staged baseline's run of its stage
            table[method]["paired_multitask_vs_same_schedule"] = {"reference": reference, **{
                name: paired_where_complete(results, runs[reference], key) for name, key in multitask.items()}}
    if "teacher" in runs and "baseline" in runs:
        teacher = {r["seed"]: r["test"]["miou"] for r in runs["teacher"]}
        baseline = {r["seed"]: r["test"]["miou"] for r in runs["baseline"]}
        for method, results in runs.items():
            if method == "assistant":  # the TA lifts with LiDAR depth: no camera student's gap
                continue
            closed = []
            for r in results:
                # With one teacher for every seed (Protocol.teacher_seeds = 1), it is seed 0's.
                t = teacher.get(r["seed"], teacher.get(0) if len(teacher) == 1 else None)
                b = baseline.get(r["seed"])
                if t is not None and b is not None and t != b:
                    closed.append((r["test"]["miou"] - b) / (t - b))
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
    # The teacher first (everything reads it), then MonoTAKD's TA before the rows that load it.
    assistant = ["assistant"] if any(is_monotakd(m) for m in methods) else []
    order = list(dict.fromkeys(["teacher", *assistant, "baseline", *methods]))
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
