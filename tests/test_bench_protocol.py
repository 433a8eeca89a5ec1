"""The staged cpu protocol end to end on a tiny world: pretraining, teacher and baselines with
validation curves, the fair sweep, test seeds at the chosen lambda, and the fields tools read."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from bridgeta.bench import accuracy
from bridgeta.bench import distill as bench_distill
from bridgeta.config import load_config
from bridgeta.engine.logging import read_metrics
from engine_helpers import SMALL_TINY_C, SMALL_TINY_LC


def _preset() -> accuracy.AccuracyPreset:
    protocol = bench_distill.Protocol(
        student_steps=2, teacher_steps=2, curve_points=2, teacher_seeds=1,
        student_overrides=tuple(SMALL_TINY_C), teacher_overrides=tuple(SMALL_TINY_LC),
    )
    return replace(
        accuracy.PRESETS["cpu"], protocol=protocol, methods=("baseline", "direct", "bridgeta", "monotakd"),
        seeds={"baseline": 2, "direct": 2, "bridgeta": 1}, default_seeds=1, pretrain_steps=2,
        lambdas=(0.0, 1.0), sweep_seeds=1, scratch=("baseline",),
    )


def test_staged_protocol_end_to_end(engine_world, tmp_path, monkeypatch):
    preset = _preset()
    out, work = tmp_path / "results" / "accuracy", tmp_path / "work"
    result = accuracy.run_staged("test", out, work, engine_world, preset=preset)

    protocol = result["protocol"]
    assert protocol["test_scenes"] == 1 and protocol["student_steps"] == 2
    assert protocol["pretrained"] == str(work / "backbone" / "backbone.safetensors")
    # Every camera branch starts from the pretrained backbone, except the scratch baselines.
    runs = work / "runs"
    for run in ("tiny-lc-seed0", "tiny-c-seed0", f"tiny-c-bridgeta-lam{protocol['lambdas']['bridgeta']:g}-seed0"):
        stored = load_config(str(runs / run / "config.yaml"))
        assert stored.model.camera.backbone.pretrained == protocol["pretrained"], run
    assert load_config(str(runs / "scratch" / "tiny-c-seed0" / "config.yaml")).model.camera.backbone.pretrained is None

    # Curves: validation at every step // curve_points steps, for seed 0 of teacher and baseline.
    assert [step for step, _ in result["convergence"]["baseline"]] == [1, 2]
    assert [step for step, _ in result["convergence"]["teacher"]] == [1, 2]

    # The sweep: both methods at both lambdas on the validation towns; direct's lambda 0 is the
    # baseline's own run, BridgeTA's lambda 0 trains its TA.
    sweep = json.loads((tmp_path / "results" / "distill_sweep.json").read_text())
    points = {(p["method"], p["lambda"]): p for p in sweep["points"]}
    assert set(points) == {(m, lam) for m in ("bridgeta", "direct", "monotakd") for lam in (0.0, 1.0)}
    assert points[("direct", 0.0)]["runs"] == ["tiny-c-seed0"]
    assert points[("bridgeta", 0.0)]["runs"] == ["tiny-c-bridgeta-lam0-seed0"]
    assert 0.0 <= points[("bridgeta", 1.0)]["assistant_val_miou"] <= 1.0
    assert points[("direct", 1.0)]["assistant_val_miou"] is None
    for method, lam in sweep["chosen"].items():
        best = max(p["val_miou"] for p in sweep["points"] if p["method"] == method)
        assert points[(method, lam)]["val_miou"] == best

    # The table: seeds per method, paired deltas against the same seeds, the TA's own mIoU.
    table = result["table"]
    assert table["baseline"]["seeds"] == [0, 1] and table["direct"]["seeds"] == [0, 1]
    assert table["bridgeta"]["seeds"] == [0] and table["teacher"]["seeds"] == [0]
    assert table["baseline_scratch"]["seeds"] == [0]  # default_seeds
    by_seed = {r["seed"]: r["test"]["miou"] for r in result["runs"]["baseline"]}
    deltas = [r["test"]["miou"] - by_seed[r["seed"]] for r in result["runs"]["direct"]]
    assert table["direct"]["paired_vs_baseline"]["mean"] == pytest.approx(sum(deltas) / 2)
    assert table["direct"]["paired_vs_baseline"]["n"] == 2
    assert table["bridgeta"]["paired_vs_direct"]["n"] == 1
    assert 0.0 <= table["bridgeta"]["assistant_val_miou"]["mean"] <= 1.0
    assert set(result["learned_classes"]) <= set(table["teacher"]["iou"])
    # MonoTAKD learns through its assistant, trained in stage 1 from the same backbone.
    assert table["assistant"]["seeds"] == [0] and table["monotakd"]["seeds"] == [0]
    monotakd = load_config(str(runs / result["runs"]["monotakd"][0]["run"] / "config.yaml"))
    assert monotakd.distill.monotakd.assistant == str(runs / "tiny-c-assistant-seed0")
    assert result["camera_fusion_ratio"] == pytest.approx(table["baseline"]["miou"]["mean"] / table["teacher"]["miou"]["mean"])
    assert (out / "table.md").read_text().startswith("| method |")

    # --summary reads what has finished, trains nothing and leaves results.json alone.
    before = (out / "results.json").read_text()
    partial = accuracy.run_staged("test", out, work, engine_world, preset=preset, summary=True)
    assert partial["finished"]["bridgeta"] == [0] and partial["finished"]["baseline"] == [0, 1]
    assert partial["table"]["bridgeta"]["miou"] == table["bridgeta"]["miou"]
    assert (out / "results.json").read_text() == before and (out / "partial.json").is_file()
    with pytest.raises(FileNotFoundError, match="no benchmark world there yet"):  # it never generates one
        accuracy.run("cpu", None, tmp_path / "none", tmp_path / "nowork", None, summary=True)
    assert not (tmp_path / "nowork").exists()
    empty = accuracy.run_staged("test", tmp_path / "none", tmp_path / "nowork", engine_world, preset=preset, summary=True)
    assert empty["finished"] == {} and empty["table"] == {}
    assert not (tmp_path / "nowork" / "runs").exists()

    # A second call reuses every finished run: nothing trains again.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("bridgeta.engine.trainer.train", refuse)
    again = accuracy.run_staged("test", out, work, engine_world, preset=preset)
    assert again["table"]["bridgeta"]["miou"] == table["bridgeta"]["miou"]
    assert again["reproducibility"] == {}

    # --reproduce: seed 0 of each headline method trained again beside the first.
    monkeypatch.undo()
    checked = accuracy.run_staged("test", out, work, engine_world, preset=preset, reproduce=True)
    repro = checked["reproducibility"]
    assert set(repro) == {"baseline", "direct", "bridgeta", "monotakd"}
    assert (runs / "tiny-c-seed0-rerun" / "model.safetensors").is_file()
    for method, row in repro.items():
        assert row["delta"] == pytest.approx(row["rerun"] - row["table"])
        assert row["rerun_trained_by"]["commit"]

    # A --methods list without the baseline leaves its scratch rows out.
    subset = accuracy.run_staged("test", out, work, engine_world, preset=preset, methods=("monotakd",), summary=True)
    assert "baseline_scratch" not in subset["finished"] and subset["finished"]["monotakd"] == [0]
    # Its sweep (one tuned method of the preset's three) is written beside its table, not over the preset's.
    assert {p["method"] for p in json.loads((out / "partial_sweep.json").read_text())["points"]} == {"monotakd"}
    assert {p["method"] for p in json.loads((tmp_path / "results" / "partial_sweep.json").read_text())["points"]} == {
        "bridgeta", "direct", "monotakd"}

    # A new machine: the work directory is gone, the ledger (OUT/runs) was kept. The table comes
    # back from the records alone, nothing trains, and the backbone is pretrained again to its
    # recorded digest.
    assert (out / "runs" / "scratch" / "tiny-c-seed0" / "weights.json").is_file()
    shutil.rmtree(work)
    monkeypatch.setattr("bridgeta.engine.trainer.train", refuse)
    restored = accuracy.run_staged("test", out, work, engine_world, preset=preset)
    for method in ("teacher", "baseline", "baseline_scratch", "bridgeta", "monotakd", "assistant"):
        assert restored["table"][method]["miou"] == table[method]["miou"], method
    assert restored["convergence"] == result["convergence"]
    assert not (runs / "tiny-lc-seed0" / "model.safetensors").exists()  # no dependent had to train


def test_lambda_scales_each_methods_recipe_weights():
    recipe = load_config("distill/tiny-c-bridgeta").distill.weights
    full = bench_distill.scaled_weights("bridgeta", 0.5, "distill/tiny-c-bridgeta")
    assert full == pytest.approx({"fld": 0.5 * recipe.fld, "dld": 0.5 * recipe.dld, "lld": 0.5 * recipe.lld,
                                  "lld_aux": 0.5 * recipe.lld_aux})
    assert bench_distill.scaled_weights("direct", 0.5, "distill/tiny-c-bridgeta") == full
    # feature_kd is FLD alone; logit_kd's Bernoulli KL starts from the CrossKD term's weight.
    assert bench_distill.scaled_weights("feature_kd", 2.0, "distill/tiny-c-bridgeta") == pytest.approx(
        {"fld": 2 * recipe.fld, "dld": 0.0, "lld": 0.0, "lld_aux": 0.0})
    assert bench_distill.scaled_weights("logit_kd", 2.0, "distill/tiny-c-bridgeta") == pytest.approx(
        {"fld": 0.0, "dld": 0.0, "lld": 2 * recipe.lld_aux, "lld_aux": 0.0})


def test_lambda_zero_without_an_assistant_is_the_baseline_run(tmp_path):
    protocol = bench_distill.Protocol(student_steps=10, teacher_seeds=1)
    for method in ("direct", "feature_kd", "logit_kd"):
        assert bench_distill.run_name(method, 2, protocol, 0.0) == "tiny-c-seed2"
        assert bench_distill.method_config(method, tmp_path, 2, protocol, 0.0) == \
            bench_distill.method_config("baseline", tmp_path, 2, protocol)
    assert bench_distill.run_name("bridgeta", 2, protocol, 0.0) == "tiny-c-bridgeta-lam0-seed2"
    # One teacher teaches every seed.
    _, overrides = bench_distill.method_config("bridgeta", tmp_path, 3, protocol, 1.0)
    assert f"distill.teacher={tmp_path / 'tiny-lc-seed0'}" in overrides


def test_paired_deltas_use_the_seeds_both_have():
    def run(seed, miou):
        return {"seed": seed, "test": {"miou": miou}}

    stats = bench_distill.paired([run(0, 0.30), run(1, 0.20), run(2, 0.50)], [run(0, 0.25), run(1, 0.21)])
    assert stats["n"] == 2
    assert stats["mean"] == pytest.approx((0.05 - 0.01) / 2)
    assert stats["std"] == pytest.approx(0.0424264, rel=1e-5)
    # Each seed's own difference, in seed order whatever the runs' order, only where both rows have the seed.
    assert list(stats["per_seed"]) == ["0", "1"]
    shuffled = bench_distill.paired([run(2, 0.50), run(1, 0.20), run(0, 0.30)], [run(1, 0.21), run(0, 0.25)])
    assert list(shuffled["per_seed"]) == ["0", "1"] and shuffled["per_seed"]["1"] == pytest.approx(-0.01)
    assert stats["per_seed"]["0"] == pytest.approx(0.05) and stats["per_seed"]["1"] == pytest.approx(-0.01)


def test_last_quarter_gain_reads_the_point_at_three_quarters():
    curve = [[100, 0.10], [200, 0.15], [300, 0.18], [400, 0.185]]
    assert accuracy.last_quarter_gain(curve) == pytest.approx(0.005)
    assert accuracy.last_quarter_gain([[400, 0.2]]) is None


def _jobs_square(x: int) -> int:
    return x * x


def _jobs_fail(x: int) -> int:
    raise RuntimeError(f"bad {x}")


def test_jobs_run_side_by_side_and_a_failure_waits_for_the_others(tmp_path):
    from bridgeta.bench.jobs import Job, run_jobs

    jobs = [Job(_jobs_square, (i,), log=tmp_path / f"{i}.log", label=str(i)) for i in range(3)]
    assert run_jobs(jobs, workers=2) == [0, 1, 4]
    assert run_jobs(jobs, workers=1) == [0, 1, 4]
    mixed = [Job(_jobs_fail, (7,), log=tmp_path / "fail.log", label="fail"), *jobs]
    with pytest.raises(RuntimeError, match="1 of 4 runs failed; first: fail: bad 7"):
        run_jobs(mixed, workers=2)
    assert "RuntimeError: bad 7" in (tmp_path / "fail.log").read_text()


def _fabricated_protocol_results() -> dict:
    def run(seed, miou, night=0.1):
        return {"seed": seed, "train": {"step_time_s": 0.5}, "test": {
            "miou": miou, "miou_at_0.5": miou / 2, "iou": {"drivable_area": miou + 0.2, "divider": 0.05},
            "by_condition": {"day": {"miou": miou}, "night": {"miou": night}}, "by_range": {"0-20": {"miou": miou}}}}

    runs = {
        "teacher": [run(0, 0.40)],
        "baseline": [run(0, 0.20), run(1, 0.22)],
        "baseline_scratch": [run(0, 0.15), run(1, 0.16)],
        "direct": [run(0, 0.21), run(1, 0.24)],
        "bridgeta": [{**run(0, 0.25), "assistant_val": {"miou": 0.33}}, {**run(1, 0.25), "assistant_val": {"miou": 0.31}}],
    }
    env = {"date": "2026-12-01 12:00 UTC", "commit": "abc1234", "torch": "2.13.0", "device": "cpu", "cpu_threads": 2}
    return {
        "environment": env, "preset": {"name": "cpu"}, "learned_classes": bench_distill.learned_classes(runs),
        "protocol": {"train_scenes": 18, "val_scenes": 6, "test_scenes": 6, "student_steps": 800, "teacher_steps": 1600,
                     "lambdas": {"direct": 0.3, "bridgeta": 1.0}},
        "camera_fusion_ratio": 0.5,
        "convergence": {"baseline": [[400, 0.18], [600, 0.195], [800, 0.2]], "teacher": [[800, 0.3], [1600, 0.38]]},
        "convergence_last_quarter_gain": {"baseline": 0.005, "teacher": 0.08},
        "pretraining": {"steps": 1000, "train_images": 4320,
                        "eval": {"pixel_accuracy": 0.88, "miou": 0.4, "iou": {f"c{i}": 0.4 for i in range(13)}}},
        "runs": runs, "table": bench_distill.aggregate(runs),
    }


def test_learned_classes_are_those_the_teacher_gets_above_ten_percent():
    results = _fabricated_protocol_results()
    assert results["learned_classes"] == ["drivable_area"]  # teacher: 0.60 and 0.05
    assert results["table"]["bridgeta"]["miou_learned"]["mean"] == pytest.approx(0.45)


def test_rendered_protocol_and_paired_tables():
    from bridgeta.report import render_accuracy, render_protocol

    results = _fabricated_protocol_results()
    text = render_protocol(results)
    assert "| scenes (train / val / test) | 18 / 6 / 6 |" in text
    assert "| camera/fusion ratio (baseline / teacher test mIoU) | 0.50 |" in text
    assert "| baseline val mIoU gain over the last quarter | +0.5 points |" in text
    assert "pretrained − random backbone | +5.5 points" in text
    assert "| baseline val mIoU curve (step: %) | 400: 18.0, 600: 19.5, 800: 20.0 |" in text
    assert "| backbone pretraining (1000 steps, 4320 train images) | val pixel accuracy 88.0 %, val mIoU 40.0 % (13 classes) |" in text
    table = render_accuracy(results)
    rows = {line.split(" | ")[0].strip("| `"): line for line in table.splitlines() if line.startswith("| `")}
    # bridgeta: +5.0 and +3.0 over the baseline seeds, +4.0 and +1.0 over direct's.
    assert "| 2 | 1 | 45.0 ± 0.0 | +4.0 ± 1.4 (n=2) | +2.5 ± 2.1 (n=2) | 32.0 ± 1.4 |" in rows["bridgeta"]
    assert "| 0.3 |" in rows["direct"] and rows["teacher"].endswith("| – | – | – |")


def test_the_protocol_table_gives_the_baseline_by_schedule():
    from bridgeta.report import render_protocol

    results = _fabricated_protocol_results()
    assert "by schedule" not in render_protocol(results)
    steps = results["protocol"]["student_steps"]
    baseline = results["table"]["baseline"]["miou"]
    results["table"]["baseline_x4"] = {"miou": {"mean": baseline["mean"] + 0.05, "std": 0.01, "n": 2},
                                       "paired_vs_baseline": {"mean": 0.05, "std": 0.002, "n": 2}}
    results["table"]["baseline_long"] = {"miou": {"mean": baseline["mean"] + 0.03, "std": 0.0, "n": 2},
                                         "paired_vs_baseline": {"mean": 0.03, "std": 0.001, "n": 2}}
    row = next(line for line in render_protocol(results).splitlines() if "by schedule" in line)
    # In schedule order whatever the table's order: 1x, 2x, 4x, each paired with the 1x baseline.
    assert row.endswith(f"| {steps}: {100 * baseline['mean']:.1f} ± {100 * baseline['std']:.1f}, "
                        f"{2 * steps}: {100 * baseline['mean'] + 3:.1f} ± 0.0 (Δ +3.0 ± 0.1, n=2), "
                        f"{4 * steps}: {100 * baseline['mean'] + 5:.1f} ± 1.0 (Δ +5.0 ± 0.2, n=2) |")


def test_training_seconds_count_each_step_once_after_a_resume():
    from bridgeta.engine.logging import training_seconds

    rows = [{"step": 10, "step_time_s": 1.0}, {"step": 20, "step_time_s": 2.0},
            {"step": 20, "eval": {"miou": 0.1}},
            # killed after step 30, resumed from the checkpoint at 20: 30 is logged again, faster
            {"step": 30, "step_time_s": 9.0}, {"step": 30, "step_time_s": 3.0}, {"step": 40, "step_time_s": 1.0}]
    assert training_seconds(rows) == pytest.approx(10 * 1.0 + 10 * 2.0 + 10 * 3.0 + 10 * 1.0)
    assert training_seconds([]) == 0.0


def test_the_protocol_table_gives_the_training_time():
    from bridgeta.report import render_protocol

    results = {**_fabricated_protocol_results(), "budget": {"runs": 40, "train_hours": 5.25, "pretrain_hours": 0.1,
                                                           "run_hours": {}}}
    assert "| training time so far (logged step times of 40 runs; evaluation not counted) | 5.2 h, plus 6 min" \
        in render_protocol(results)


def test_ablations_of_a_family_that_chose_lambda_zero_run_at_its_best_positive_lambda():
    points = [{"method": "bridgeta", "lambda": lam, "val_miou": v} for lam, v in ((0.0, 0.30), (0.3, 0.29), (1.0, 0.295), (3.0, 0.2))]
    points += [{"method": "monotakd", "lambda": lam, "val_miou": v} for lam, v in ((0.0, 0.1), (1.0, 0.3))]
    methods = ("baseline", "direct", "bridgeta", "fixed_epsilon", "fld", "monotakd", "monotakd_no_sam",
               "baseline_long", "baseline_x4", "assistant")
    # BridgeTA chose 0: its teacher terms are off, so fixed eps* would be BridgeTA itself. Its
    # ablations take its best lambda > 0 (1, not 0.3), and BridgeTA at that lambda partners them.
    lambdas = accuracy.ablation_lambdas(methods, {"bridgeta": 0.0, "direct": 0.3, "monotakd": 1.0}, points)
    assert lambdas == {"fixed_epsilon": 1.0, "fld": 1.0, "bridgeta_kd": 1.0, "monotakd_no_sam": 1.0}
    # The longer baselines and the TA have no teacher weights: no lambda (their runs keep their names).
    # A family with a lambda > 0 keeps it for its ablations, and gets no partner row.
    assert accuracy.ablation_lambdas(methods, {"bridgeta": 0.3, "monotakd": 1.0}, points) == {
        "fixed_epsilon": 0.3, "fld": 0.3, "monotakd_no_sam": 1.0}
    # A sweep still running (nothing chosen): nothing to take.
    assert accuracy.ablation_lambdas(methods, {}, points)["fixed_epsilon"] is None
    # Until then a summary leaves the weighted rows out, not the longer baselines.
    cpu = accuracy.PRESETS["cpu"]
    assert [m for m in methods if accuracy.awaits_lambda(m, {"direct": 0.3}, cpu)] == [
        "bridgeta", "fixed_epsilon", "fld", "monotakd", "monotakd_no_sam"]
    assert not accuracy.awaits_lambda("bridgeta", {}, replace(cpu, lambdas=()))


def test_rendered_fair_sweep_marks_each_methods_choice():
    from bridgeta.report import render_distill_sweep

    env = {"date": "2026-12-01 12:00 UTC", "commit": "abc1234", "torch": "2.13.0", "device": "cpu", "cpu_threads": 2}
    points = [{"method": m, "lambda": lam, "val_miou": v, "val_miou_std": 0.01}
              for m, lam, v in [("direct", 0.0, 0.20), ("direct", 1.0, 0.22), ("bridgeta", 0.0, 0.21), ("bridgeta", 1.0, 0.19)]]
    sweep = {"kind": "fair", "environment": env, "lambdas": [0.0, 1.0], "seeds": 2, "points": points,
             "protocol": {"student_steps": 800}, "chosen": {"direct": 1.0, "bridgeta": 0.0}}
    text = render_distill_sweep(sweep)
    assert "| `direct` | 20.0 ± 1.0 | **22.0 ± 1.0** | 1 |" in text
    assert "| `bridgeta` | **21.0 ± 1.0** | 19.0 ± 1.0 | 0 |" in text


def _jobs_sleep_and_report_parent(path: str) -> None:
    import os
    import time

    with open(path, "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(60)


def test_a_killed_benchmark_takes_its_workers_with_it(tmp_path):
    """Workers get the parent-death signal: killing the benchmark does not leave runs training."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys; sys.path[:0] = %r\n"
        "from bridgeta.bench.jobs import Job, run_jobs\n"
        "import test_bench_protocol as t\n"
        "run_jobs([Job(t._jobs_sleep_and_report_parent, (%r,)), Job(t._jobs_sleep_and_report_parent, (%r,))], 2)\n"
    ) % (sys.path, str(tmp_path / "a"), str(tmp_path / "b"))
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not ((tmp_path / "a").is_file() and (tmp_path / "b").is_file()) and time.time() < deadline:
        time.sleep(0.2)
    workers = [int((tmp_path / name).read_text()) for name in ("a", "b")]
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in workers if _alive(pid)]
    assert not alive


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its reaper is dead
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_monotakd_rows_scale_their_own_weights_and_keep_ablated_terms_off(tmp_path):
    from bridgeta.distill.monotakd import assistant_config

    protocol = bench_distill.Protocol(student_steps=10, teacher_seeds=1)
    recipe = load_config("distill/tiny-c-monotakd").distill.monotakd
    preset, overrides = bench_distill.method_config("monotakd", tmp_path, 1, protocol, 3.0)
    config = load_config(preset, ["data.dataroot=/d", *overrides])
    settings = config.distill.monotakd
    assert (settings.imd, settings.cmrd, settings.logit) == pytest.approx((3 * recipe.imd, 3 * recipe.cmrd, 3 * recipe.logit))
    assert settings.assistant == str(tmp_path / "tiny-c-assistant-seed0")
    preset, overrides = bench_distill.method_config("monotakd_imd_only", tmp_path, 0, protocol, 3.0)
    ablated = load_config(preset, ["data.dataroot=/d", *overrides])
    assert ablated.distill.monotakd.cmrd == 0 and ablated.distill.monotakd.logit == 0
    assert ablated.distill.monotakd.imd == pytest.approx(3 * recipe.imd) and ablated.model.residual is None
    # The bench's assistant is the one train-assistant derives from the recipe, imitating the
    # benchmark's own teacher: the one its MonoTAKD students learn from.
    preset, overrides = bench_distill.method_config("assistant", tmp_path, 0, protocol)
    trained = load_config(preset, ["data.dataroot=/d", *overrides])
    schedule = ["train.epochs=10000", "train.max_steps=10"]
    derived = assistant_config(load_config("distill/tiny-c-monotakd", ["data.dataroot=/d", *schedule]),
                               teacher=config.distill.teacher)
    assert config.distill.teacher == str(tmp_path / "tiny-lc-seed0")
    assert trained.model == derived.model and trained.distill == derived.distill and trained.train == derived.train
    assert trained.distill.method == "feature_kd" and trained.distill.teacher == config.distill.teacher
    assert trained.distill.weights.fld == recipe.assistant_imitation
    # assistant_imitation = 0 (through the protocol's overrides too) is the label-only TA.
    label_only = replace(protocol, student_overrides=("distill.monotakd.assistant_imitation=0",))
    preset, overrides = bench_distill.method_config("assistant", tmp_path, 0, label_only)
    assert load_config(preset, ["data.dataroot=/d", *overrides]).distill is None


def test_the_long_baseline_is_the_baseline_for_as_many_steps_as_monotakds_assistant_and_student(tmp_path):
    protocol = bench_distill.Protocol(student_steps=10, teacher_seeds=1, student_overrides=("train.checkpoint_every=5",))
    baseline = load_config(*_with_dataroot(bench_distill.method_config("baseline", tmp_path, 1, protocol)))
    long = load_config(*_with_dataroot(bench_distill.method_config("baseline_long", tmp_path, 1, protocol)))
    assistant = load_config(*_with_dataroot(bench_distill.method_config("assistant", tmp_path, 1, protocol)))
    student = load_config(*_with_dataroot(bench_distill.method_config("monotakd", tmp_path, 1, protocol, 1.0)))
    assert long.train.max_steps == assistant.train.max_steps + student.train.max_steps == 20
    assert long.train.checkpoint_every == 5  # the protocol's student overrides, resumable
    assert replace(long, name=baseline.name, train=replace(long.train, max_steps=10)) == baseline
    assert bench_distill.run_name("baseline_long", 1, protocol) == "tiny-c-baseline_long-seed1"
    # Four times the schedule: the same network and recipe, the steps (and the curve) stretched.
    x4 = load_config(*_with_dataroot(bench_distill.method_config("baseline_x4", tmp_path, 1, protocol)))
    assert x4.train.max_steps == 40 and x4.name == "tiny-c-x4"
    assert replace(x4, name=baseline.name, train=replace(x4.train, max_steps=10)) == baseline
    assert "baseline_x4" in accuracy.CPU_METHODS and accuracy.PRESETS["cpu"].seeds["baseline_x4"] == 2
    # A protocol counted in epochs doubles the epochs: the preset's own when it sets none.
    epochs = bench_distill.Protocol()
    doubled = load_config(*_with_dataroot(bench_distill.method_config("baseline_long", tmp_path, 0, epochs)))
    assert doubled.train.epochs == 2 * load_config("tiny-c").train.epochs


def test_longer_distillation_rows_are_their_method_on_twice_the_steps_paired_with_the_long_baseline(tmp_path):
    from bridgeta.report import render_accuracy, render_partial

    protocol = bench_distill.Protocol(student_steps=10, teacher_seeds=1)
    for method in ("direct", "bridgeta"):
        short = load_config(*_with_dataroot(bench_distill.method_config(method, tmp_path, 1, protocol, 0.3)))
        long = load_config(*_with_dataroot(bench_distill.method_config(f"{method}_long", tmp_path, 1, protocol, 0.3)))
        assert long.train.max_steps == 20 and long.distill.weights == short.distill.weights
        assert replace(long, name=short.name, train=replace(long.train, max_steps=10)) == short
    # direct_long takes direct's lambda; bridgeta_long, whose family chose 0, its best lambda > 0.
    points = [{"method": "bridgeta", "lambda": lam, "val_miou": v} for lam, v in ((0.0, 0.3), (0.3, 0.29), (1.0, 0.2))]
    lambdas = accuracy.ablation_lambdas(("direct_long", "bridgeta_long", "baseline_long"),
                                        {"bridgeta": 0.0, "direct": 1.0}, points)
    assert lambdas == {"direct_long": 1.0, "bridgeta_long": 0.3, "bridgeta_kd": 0.3}
    assert accuracy.ablation_lambdas(("direct_long",), {"direct": 0.0}, points) == {"direct_long": 0.0}
    # ... which is baseline_long itself, reused rather than trained again under another name.
    assert bench_distill.run_name("direct_long", 1, protocol, 0.0) == "tiny-c-baseline_long-seed1"
    assert (bench_distill.method_config("direct_long", tmp_path, 1, protocol, 0.0)
            == bench_distill.method_config("baseline_long", tmp_path, 1, protocol))
    with pytest.raises(ValueError, match="unknown method 'bridgeta_kd'"):  # before anything trains
        accuracy.run_staged("cpu", tmp_path / "out", tmp_path / "work", tmp_path / "world", methods=("bridgeta_kd",))
    assert not (tmp_path / "work").exists()

    def run(seed, miou):
        return {"seed": seed, "train": {}, "test": {"miou": miou, "miou_at_0.5": miou, "iou": {"drivable_area": miou},
                                                    "by_condition": {"night": {"miou": miou}},
                                                    "by_range": {"35-50": {"miou": miou}}}}

    table = bench_distill.aggregate({"baseline": [run(0, 0.10), run(1, 0.12)],
                                     "baseline_long": [run(0, 0.16), run(1, 0.17)],
                                     "direct_long": [run(0, 0.18), run(1, 0.18)],
                                     "monotakd": [run(0, 0.15), run(1, 0.16)],
                                     "assistant": [run(0, 0.3)]})
    same = table["direct_long"]["paired_vs_same_schedule"]
    assert same["reference"] == "baseline_long" and same["mean"] == pytest.approx(0.015) and same["n"] == 2
    assert table["direct_long"]["paired_vs_baseline"]["mean"] == pytest.approx(0.07)
    assert "paired_vs_same_schedule" not in table["baseline_long"] and "paired_vs_same_schedule" not in table["baseline"]
    results = _fabricated_protocol_results()
    text = render_accuracy({**results, "table": table, "learned_classes": ["drivable_area"],
                            "protocol": {**results["protocol"], "student_steps": 800}})
    assert "| `direct_long` | 1600 | 2 | 18.0 ± 0.0 | +1.5 ± 0.7 (n=2) vs `baseline_long` |" in text
    # A benchmark still running: its finished rows, each with the steps of its camera network.
    partial = render_partial({**results, "table": table, "protocol": {**results["protocol"], "student_steps": 800}})
    assert "| `monotakd` | 2 | 1600 | 15.5 ± 0.7 | +4.5 ± 0.7 (n=2) | -1.0 ± 0.0 (n=2) vs `baseline_long` |" in partial
    assert "| `baseline` | 2 | 800 | 11.0 ± 1.4 | – | – |" in partial and "--summary" in partial
    assert "| `assistant` | 1 | – | 30.0 ± 0.0 | – | – |" in partial  # the TA lifts with LiDAR depth
    # MonoTAKD's camera network trains twice too: its TA's schedule, then its student's.
    assert "| `monotakd` | 800 + 800 | 2 | 15.5 ± 0.7 | -1.0 ± 0.0 (n=2) vs `baseline_long` |" in text


def test_ablations_are_paired_with_the_run_they_ablate_and_the_ta_is_no_student():
    """An ablation's delta against its method at the same lambda: MonoTAKD's partner row where
    MonoTAKD chose 0 (its ablations run at the best lambda > 0), BridgeTA itself where it chose
    that lambda; none against a run of another lambda. MonoTAKD's TA gets no student deltas;
    MonoTAKD is also paired with BridgeTA, the method the issue compares it with."""
    from bridgeta.report import render_accuracy, render_partial

    def run(seed, miou):
        return {"seed": seed, "train": {}, "test": {"miou": miou, "miou_at_0.5": miou, "iou": {"drivable_area": miou},
                                                    "by_condition": {"night": {"miou": miou}},
                                                    "by_range": {"35-50": {"miou": miou}}}}

    runs = {"teacher": [run(0, 0.5)], "baseline": [run(0, 0.10), run(1, 0.12)], "assistant": [run(0, 0.3)],
            "monotakd": [run(0, 0.15), run(1, 0.16)], "monotakd_kd": [run(0, 0.14), run(1, 0.15)],
            "monotakd_no_sam": [run(0, 0.13), run(1, 0.13)], "bridgeta": [run(0, 0.11), run(1, 0.13)],
            "fixed_epsilon": [run(0, 0.13), run(1, 0.12)], "fld": [run(0, 0.12)]}
    lambdas = {"monotakd": 0.0, "monotakd_kd": 0.3, "monotakd_no_sam": 0.3, "bridgeta": 1.0,
               "fixed_epsilon": 1.0, "fld": 3.0}
    table = bench_distill.aggregate(runs)
    accuracy.add_family_pairs(table, runs, lambdas)
    no_sam = table["monotakd_no_sam"]["paired_vs_family"]
    assert no_sam["reference"] == "monotakd_kd" and no_sam["mean"] == pytest.approx(-0.015) and no_sam["n"] == 2
    fixed = table["fixed_epsilon"]["paired_vs_family"]
    assert fixed["reference"] == "bridgeta" and fixed["per_seed"] == pytest.approx({"0": 0.02, "1": -0.01})
    assert "paired_vs_family" not in table["fld"]  # another lambda than BridgeTA's: not its ablation
    for row in ("monotakd", "monotakd_kd", "bridgeta", "baseline", "assistant", "teacher"):
        assert "paired_vs_family" not in table[row]
    assert not any(k.startswith("paired_vs_") for k in table["assistant"]) and "gap_closed" not in table["assistant"]
    # MonoTAKD head to head with BridgeTA, per seed; no other row has a rival
    rival = table["monotakd"]["paired_vs_rival"]
    assert rival["reference"] == "bridgeta" and rival["per_seed"] == pytest.approx({"0": 0.04, "1": 0.03})
    assert [m for m, row in table.items() if "paired_vs_rival" in row] == ["monotakd"]
    results = _fabricated_protocol_results()
    protocol = {**results["protocol"], "student_steps": 800}
    partial = render_partial({**results, "table": table, "protocol": protocol})
    assert "| `monotakd_no_sam` | 2 | 1600 | 13.0 ± 0.0 | +2.0 ± 1.4 (n=2) | – | -1.5 ± 0.7 (n=2) vs `monotakd_kd` |" in partial
    assert "| `assistant` | 1 | – | 30.0 ± 0.0 | – | – | – |" in partial
    head_to_head = "| `monotakd` | 2 | 15.5 ± 0.7 | 12.0 ± 1.4 | +3.5 ± 0.7 (n=2) vs `bridgeta` |"
    assert head_to_head in partial
    text = render_accuracy({**results, "table": table, "learned_classes": ["drivable_area"], "protocol": protocol})
    assert "| `fixed_epsilon` | 2 | 12.5 ± 0.7 | +0.5 ± 2.1 (n=2) vs `bridgeta` |" in text
    assert head_to_head in text


def _with_dataroot(config: tuple[str, list[str]]) -> tuple[str, list[str]]:
    preset, overrides = config
    return preset, ["data.dataroot=/d", *overrides]


def test_the_monotakd_assistant_trains_after_the_teacher_it_imitates(tmp_path, monkeypatch):
    """Stage 1 trains its jobs side by side: the TA, which reads the teacher's model file, must
    wait for a wave of its own."""
    waves = []

    class Stop(Exception):
        pass

    def record(jobs, workers=1):
        waves.append([job.label for job in jobs])
        if len(waves) == 2:  # stage 1 is done: nothing after it matters here
            raise Stop
        return [None] * len(jobs)

    monkeypatch.setattr(accuracy, "run_jobs", record)
    # Nothing trains here, so the teacher the TA's inputs check finds is never there: the parent's
    # input preparation before a side-by-side wave (bench/ledger.py) is not what this test is about.
    monkeypatch.setattr(accuracy, "prepare_inputs", lambda *args, **kwargs: None)
    preset = replace(accuracy.PRESETS["cpu"], protocol=bench_distill.Protocol(student_steps=2, teacher_steps=2, teacher_seeds=1),
                     methods=("baseline", "monotakd"), seeds={}, default_seeds=1, pretrain_steps=0, lambdas=(), scratch=())
    with pytest.raises(Stop):
        accuracy.run_staged("test", tmp_path / "out", tmp_path / "work", tmp_path / "world", jobs=2, preset=preset)
    assert "tiny-lc-seed0" in waves[0] and not any("assistant" in label for label in waves[0])
    assert waves[1] == ["tiny-c-assistant-seed0"]


def test_the_detection_table_has_map_nds_and_paired_nds():
    from bridgeta.bench.accuracy import format_detection_markdown

    def run(seed, miou, nds, ap_car, unclipped=None):
        detection = {"mAP": ap_car / 2, "NDS": nds, "per_class": {"car": {"AP": ap_car}, "pedestrian": {"AP": 0.0}},
                     "tp_errors": {"ATE": 0.5}, **({} if unclipped is None else {"mAP_unclipped": unclipped})}
        return {"seed": seed, "train": {}, "test": {"miou": miou, "miou_at_0.5": miou, "iou": {"drivable_area": miou},
                                                     "by_condition": {}, "by_range": {"0-20": {"miou": miou}},
                                                     "detection": detection}}

    runs = {"teacher": [run(0, 0.4, 0.5, 0.6)], "baseline": [run(0, 0.2, 0.2, 0.3, 0.02), run(1, 0.2, 0.3, 0.3, 0.04)],
            "bridgeta": [run(0, 0.2, 0.25, 0.4, 0.05), run(1, 0.2, 0.33, 0.4, 0.05)],
            # seed 0 evaluated before the unclipped AP existed: no cell and no delta, not seed 1's alone
            "direct": [run(0, 0.2, 0.2, 0.3), run(1, 0.2, 0.3, 0.3, 0.09)]}
    table = bench_distill.aggregate(runs)
    assert table["bridgeta"]["detection"]["paired_nds_vs_baseline"]["mean"] == pytest.approx(0.04)
    assert table["bridgeta"]["detection"]["NDS"]["n"] == 2
    assert table["bridgeta"]["detection"]["paired_map_unclipped_vs_baseline"]["mean"] == pytest.approx(0.02)
    # The teacher was evaluated before the unclipped AP existed: no cell, rather than a mean of the rest.
    assert table["teacher"]["detection"]["mAP_unclipped"]["mean"] is None
    text = format_detection_markdown({"table": table})
    row = next(line for line in text.splitlines() if line.startswith("| `bridgeta`"))
    assert "**20.0 ± 0.0**" in row and "+4.0 ± 1.4" in row and "40.0 ± 0.0" in row
    # unclipped mAP 5.0 ± 0.0, and its paired delta against the baseline +2.0 ± 1.4 (3 - 2 and 1)
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    assert cells[header.index("unclipped mAP")] == "5.0 ± 0.0"
    assert cells[header.index("Δ unclipped mAP vs baseline")] == "+2.0 ± 1.4"
    teacher_row = next(line for line in text.splitlines() if line.startswith("| `teacher`"))
    assert [c.strip() for c in teacher_row.strip("|").split("|")][header.index("unclipped mAP")] == "–"
    direct = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| `direct`")).strip("|").split("|")]
    assert direct[header.index("unclipped mAP")] == "–" and direct[header.index("Δ unclipped mAP vs baseline")] == "–"
    assert cells[header.index("Δ unclipped mAP vs `direct`")] == "–"
    assert table["direct"]["detection"]["paired_nds_vs_baseline"]["n"] == 2
    # The baseline is a reference row: no delta against `direct` (it would be direct's, negated).
    assert "paired_vs_direct" not in table["baseline"] and "paired_vs_baseline" not in table["baseline"]
    assert not any(key.startswith("paired_") for key in table["baseline"]["detection"])
    baseline = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| `baseline`")).strip("|").split("|")]
    assert all(baseline[header.index(name)] == "–" for name in header if name.startswith("Δ"))
    assert table["bridgeta"]["paired_vs_direct"]["n"] == 2
    assert format_detection_markdown({"table": bench_distill.aggregate({"baseline": [
        {**runs["baseline"][0], "test": {k: v for k, v in runs["baseline"][0]["test"].items() if k != "detection"}}]})}) is None


def test_tinybev_stages_share_the_budget_and_start_from_the_previous_stage(tmp_path):
    protocol = bench_distill.Protocol(teacher="tiny-lc-tinybev", student="tiny-c-tinybev", student_steps=800,
                                      teacher_seeds=1)
    assert [bench_distill.stage_depth(m) for m in ("baseline", "tinybev_s1", "tinybev_s2", "tinybev_s3")] == [0, 0, 1, 2]
    preset, overrides = bench_distill.method_config("tinybev_s3", tmp_path, 2, protocol)
    config = load_config(preset, ["data.dataroot=/d", *overrides])
    assert preset == "distill/tiny-c-tinybev-s3" and config.distill.tinybev.region
    assert config.train.max_steps == 268  # the last third of the student's budget, with its remainder
    assert [bench_distill.tinybev_stage_steps(f"tinybev_s{k}", 800) for k in (1, 2, 3)] == [266, 266, 268]
    # the tables' steps: each stage with the ones before it, S3 exactly the baseline's budget
    assert [bench_distill.trained_steps(m, 800) for m in ("baseline", "tinybev_s1", "tinybev_s2", "tinybev_s3")] == [
        800, 266, 532, 800]
    assert config.distill.tinybev.init_from == str(tmp_path / "tiny-c-tinybev-tinybev_s2-seed2")
    # and goes on to the samples S1 and S2 (266 steps each) had not reached
    assert config.train.data_start_step == 532
    with pytest.raises(ValueError, match="share the student's step budget"):
        bench_distill.method_config("tinybev_s2", tmp_path, 0, replace(protocol, student_steps=None, epochs=2))
    assert config.distill.teacher == str(tmp_path / "tiny-lc-tinybev-seed0")
    _, overrides = bench_distill.method_config("tinybev_s1", tmp_path, 2, protocol)
    first = load_config("distill/tiny-c-tinybev-s1", ["data.dataroot=/d", *overrides])
    assert first.distill.tinybev.init_from is None and first.train.data_start_step == 0
    # The staged baseline: the same chained runs on the stage recipes, without a distillation
    # term; each TinyBEV stage is paired with its run of the same stage.
    preset, overrides = bench_distill.method_config("baseline_s3", tmp_path, 2, protocol)
    staged = load_config(preset, ["data.dataroot=/d", *overrides])
    assert preset == "distill/tiny-c-tinybev-s3" and staged.train.data_start_step == 532
    assert staged.distill.tinybev.init_from == str(tmp_path / "tiny-c-tinybev-baseline_s2-seed2")
    tinybev = staged.distill.tinybev
    assert (tinybev.feature, tinybev.output, tinybev.region) == (0, 0, False) and staged.train.max_steps == 268
    assert [bench_distill.trained_steps(f"baseline_s{k}", 800) for k in (1, 2, 3)] == [266, 532, 800]
    assert [bench_distill.same_schedule_baseline(f"tinybev_s{k}") for k in (1, 2, 3)] == [
        "baseline_s1", "baseline_s2", "baseline_s3"]
    assert bench_distill.same_schedule_baseline("baseline_s3") is None
    assert bench_distill.run_inputs("baseline_s2", 2, None) == [("teacher", None, None), ("baseline_s1", 2, None)]
    # S3's terms without the stages: the baseline's schedule from the start, from no earlier run,
    # paired with the baseline alone.
    preset, overrides = bench_distill.method_config("tinybev_joint", tmp_path, 2, protocol)
    joint = load_config(preset, ["data.dataroot=/d", *overrides])
    assert preset == "distill/tiny-c-tinybev-s3" and joint.distill.tinybev.region
    assert joint.distill.tinybev.feature > 0 and joint.distill.tinybev.output > 0
    assert joint.train.max_steps == 800 and joint.train.data_start_step == 0
    assert joint.distill.tinybev.init_from is None and joint.distill.teacher == str(tmp_path / "tiny-lc-tinybev-seed0")
    _, baseline = bench_distill.method_config("baseline", tmp_path, 2, protocol)
    assert joint.train.optimizer == load_config("tiny-c-tinybev", ["data.dataroot=/d", *baseline]).train.optimizer
    assert bench_distill.run_inputs("tinybev_joint", 2, None) == [("teacher", None, None)]
    assert bench_distill.trained_steps("tinybev_joint", 800) == 800
    assert bench_distill.same_schedule_baseline("tinybev_joint") is None
    assert accuracy._family("tinybev_joint") is None  # its own weights, not BridgeTA's lambda


def test_bridgeta_on_the_tinybev_student_learns_from_the_detection_tables_teacher(tmp_path):
    """BridgeTA takes no adapters: its row in TinyBEV's table reads a teacher of the student's
    widths, the cpu-mt table's own teacher run (the same config, so the run is reused)."""
    tinybev, mt = accuracy.PRESETS["cpu-tinybev"].protocol, accuracy.PRESETS["cpu-mt"].protocol
    assert "tinybev_bridgeta" in accuracy.PRESETS["cpu-tinybev"].methods
    assert bench_distill.run_name("aligned_teacher", 0, tinybev) == bench_distill.run_name("teacher", 0, mt)
    assert (bench_distill.method_config("aligned_teacher", tmp_path, 0, tinybev)
            == bench_distill.method_config("teacher", tmp_path, 0, mt))
    preset, overrides = bench_distill.method_config("tinybev_bridgeta", tmp_path, 2, tinybev)
    config = load_config(preset, ["data.dataroot=/d", *overrides])
    assert preset == "distill/tiny-c-tinybev-bridgeta" and config.distill.method == "bridgeta"
    assert config.distill.teacher == str(tmp_path / "tiny-lc-mt-seed0") and config.train.max_steps == 800
    # The recipe is BridgeTA's, on TinyBEV's student with every head.
    recipe = load_config(preset, ["data.dataroot=/d"])
    assert recipe.distill == load_config("distill/tiny-c-bridgeta", ["data.dataroot=/d"]).distill
    assert recipe.model == load_config("tiny-c-tinybev", ["data.dataroot=/d"]).model
    for method in ("tinybev_bridgeta", "aligned_teacher"):  # a protocol without one
        with pytest.raises(ValueError, match="no aligned teacher"):
            bench_distill.method_config(method, tmp_path, 0, mt)


def test_the_multitask_table_has_every_task_and_paired_deltas():
    from bridgeta.bench.accuracy import format_multitask_markdown

    def run(seed, miou, nds, ade, l2, collision):
        test = {"miou": miou, "miou_at_0.5": miou, "iou": {"drivable_area": miou}, "by_condition": {},
                "by_range": {"0-20": {"miou": miou}},
                "detection": {"mAP": nds / 2, "NDS": nds, "mAP_unclipped": nds / 5, "per_class": {"car": {"AP": nds}},
                              "tp_errors": {"ATE": 0.5}},
                "motion": {"minADE": ade, "minFDE": 2 * ade, "miss_rate_all_steps": 0.5, "miss_rate_fde": 0.25,
                           "agents": 10, "complete_agents": 8, "matched_to": "ground-truth agents"},
                "planning": {"l2@1s": l2 / 3, "l2@2s": l2 / 2, "l2@3s": l2, "l2@mean": l2,
                             "l2_avg@3s": l2 / 2, "l2_avg@mean": l2 / 3, "collision@1s": 0.0,
                             "collision@2s": collision / 2, "collision@3s": collision, "collision@mean": collision,
                             "collision_avg@mean": collision / 2, "logged_collision@3s": 0.0, "samples": 5,
                             # The ego status' own path: the same for every method on a seed's samples.
                             "constant_velocity": {"l2@mean": 4.0 + seed, "l2@3s": 6.0, "collision@mean": 0.02}}}
        return {"seed": seed, "train": {}, "test": test}

    runs = {"baseline": [run(0, 0.2, 0.2, 2.0, 3.0, 0.1), run(1, 0.2, 0.3, 2.2, 3.2, 0.1)],
            "tinybev_s3": [run(0, 0.25, 0.3, 1.5, 2.5, 0.05), run(1, 0.2, 0.3, 1.9, 3.0, 0.1)]}
    table = bench_distill.aggregate(runs)
    paired = table["tinybev_s3"]["paired_multitask_vs_baseline"]
    assert paired["minADE"]["mean"] == pytest.approx(-0.4) and paired["l2@mean"]["mean"] == pytest.approx(-0.35)
    assert paired["collision@mean"]["mean"] == pytest.approx(-0.025) and paired["NDS"]["n"] == 2
    assert paired["l2@3s"]["mean"] == pytest.approx(-0.35)
    assert paired["mAP_unclipped"]["mean"] == pytest.approx(0.01)  # (0.3 - 0.2) / 5 on seed 0, 0 on seed 1
    # Every figure of both conventions is kept, counts and labels are not.
    planning, motion = table["tinybev_s3"]["planning"], table["tinybev_s3"]["motion"]
    assert {"l2@3s", "l2_avg@3s", "l2_avg@mean", "collision_avg@mean", "logged_collision@3s"} <= set(planning)
    assert "samples" not in planning and set(motion) == {"minADE", "minFDE", "miss_rate_all_steps", "miss_rate_fde"}
    text = format_multitask_markdown({"table": table})
    row = next(line for line in text.splitlines() if line.startswith("| `tinybev_s3`"))
    assert "1.70 ± 0.28" in row and "-0.40 ± 0.14" in row and "-2.5 ± 3.5" in row
    # L2 (mean of 1-3 s) and L2@3s: here equal by construction, each with its paired delta.
    assert row.count("2.75 ± 0.35") == 2 and row.count("-0.35 ± 0.21") == 2
    header = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[header.index("unclipped mAP")] == "6.0 ± 0.0" and cells[header.index("Δ unclipped mAP")] == "+1.0 ± 1.4"
    assert "paired_multitask_vs_baseline" not in table["baseline"]
    # One line for the constant-velocity reference, under L2, L2@3s and collision only.
    reference = next(line for line in text.splitlines() if line.startswith("| constant velocity"))
    cells = [c.strip() for c in reference.strip("|").split("|")]
    assert cells[header.index("L2 (m)")] == "4.50 ± 0.71" and cells[header.index("L2@3s (m)")] == "6.00 ± 0.00"
    assert cells[header.index("collision (%)")] == "2.0 ± 0.0" and cells[header.index("mAP")] == "–"
    assert len(cells) == len(header) and cells[header.index("Δ L2")] == "–"
    # A run evaluated before a figure existed blanks that figure's delta (as the detection
    # table does), not a delta over the other seed alone; the other figures keep theirs.
    older = run(1, 0.2, 0.3, 1.9, 3.0, 0.1)
    del older["test"]["detection"]["mAP_unclipped"]
    paired = bench_distill.aggregate({**runs, "tinybev_s2": [run(0, 0.25, 0.3, 1.5, 2.5, 0.05), older]})[
        "tinybev_s2"]["paired_multitask_vs_baseline"]
    assert paired["mAP_unclipped"]["mean"] is None and paired["NDS"]["n"] == 2
    # Against the staged baseline, a table of its own with the map deltas of every seed.
    staged = {**runs, "baseline_s3": [run(1, 0.18, 0.3, 2.0, 3.0, 0.1), run(0, 0.26, 0.2, 2.0, 3.0, 0.1)]}
    text = format_multitask_markdown({"table": bench_distill.aggregate(staged)})
    header = next(line for line in text.splitlines() if line.startswith("| method | against |"))
    header = [c.strip() for c in header.strip("|").split("|")]
    row = next(line for line in text.splitlines() if line.startswith("| `tinybev_s3` | `baseline_s3` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == len(header)
    assert cells[header.index("Δ mIoU per seed")] == "0: -1.0; 1: +2.0"
    assert cells[header.index("Δ mIoU")] == "+0.5 ± 2.1"


def test_staged_tinybev_end_to_end(engine_world, tmp_path):
    """Teacher, baseline and S1 -> S2 -> S3 of one seed: each stage starts from the finished one."""
    heads = ("model.heads.object={head_channels: 8}", "model.heads.motion={modes: 2, head_channels: 8}",
             "model.heads.plan={steps: 3, head_channels: 8, hidden: 16}")
    protocol = bench_distill.Protocol(
        teacher="tiny-lc-tinybev", student="tiny-c-tinybev", student_steps=3, teacher_steps=2, teacher_seeds=1,
        student_overrides=(*SMALL_TINY_C, *heads),
        teacher_overrides=(*SMALL_TINY_C, *heads, "model.lidar={pillar_channels: 8, channels: [16], out_channels: 16}",
                           "model.fuser={out_channels: 32}", "model.decoder.blocks=[[1,32,2],[1,32,1]]",
                           "model.decoder.out_channels=32"),
    )
    protocol = replace(protocol, aligned_teacher="tiny-lc-mt", aligned_teacher_overrides=(*SMALL_TINY_LC, heads[0]))
    preset = replace(accuracy.PRESETS["cpu-tinybev"], protocol=protocol, default_seeds=1, pretrain_steps=0)
    preset = replace(preset, methods=(*preset.methods, "tinybev_joint"))
    out, work = tmp_path / "results", tmp_path / "work"
    result = accuracy.run_staged("test", out, work, engine_world, preset=preset)
    runs = work / "runs"
    for stage, previous in ((2, "tinybev_s1"), (3, "tinybev_s2")):
        config = load_config(str(runs / f"tiny-c-tinybev-tinybev_s{stage}-seed0" / "config.yaml"))
        assert config.distill.tinybev.init_from == str(runs / f"tiny-c-tinybev-{previous}-seed0")
        assert config.train.max_steps == 1
    assert set(result["table"]) == {"teacher", "aligned_teacher", "baseline", "tinybev_s1", "tinybev_s2",
                                    "tinybev_s3", "tinybev_bridgeta", "baseline_s1", "baseline_s2", "baseline_s3",
                                    "tinybev_joint"}
    # S3's terms without the stages: the whole budget in one run, from no earlier stage.
    joint = load_config(str(runs / "tiny-c-tinybev-tinybev_joint-seed0" / "config.yaml"))
    assert joint.distill.tinybev.init_from is None and joint.train.max_steps == 3 and joint.distill.tinybev.region
    steps = [r for r in read_metrics(runs / "tiny-c-tinybev-tinybev_joint-seed0") if "loss" in r]
    assert {"kd/feature_fld", "kd/out_map", "kd/out_motion"} <= set(steps[-1])
    assert "paired_multitask_vs_baseline" in result["table"]["tinybev_joint"]
    assert "paired_multitask_vs_same_schedule" not in result["table"]["tinybev_joint"]
    # The staged baseline trains on its labels alone, through the same chain.
    staged = load_config(str(runs / "tiny-c-tinybev-baseline_s3-seed0" / "config.yaml"))
    assert staged.distill.tinybev.init_from == str(runs / "tiny-c-tinybev-baseline_s2-seed0")
    steps = [r for r in read_metrics(runs / "tiny-c-tinybev-baseline_s3-seed0") if "loss" in r]
    assert steps and not any(k.startswith("kd/") for r in steps for k in r)
    assert result["table"]["tinybev_s3"]["paired_multitask_vs_same_schedule"]["reference"] == "baseline_s3"
    assert "planning" in result["table"]["tinybev_s3"] and "motion" in result["table"]["tinybev_s3"]
    # BridgeTA distils the map and object heads of the same student, from the aligned teacher.
    bridgeta = load_config(str(runs / "tiny-c-tinybev-tinybev_bridgeta-seed0" / "config.yaml"))
    assert bridgeta.distill.teacher == str(runs / "tiny-lc-mt-seed0") and bridgeta.train.max_steps == 3
    steps = [r for r in read_metrics(runs / "tiny-c-tinybev-tinybev_bridgeta-seed0") if "loss" in r]
    assert {"kd/fld", "kd/lld", "kd/lld_object"} <= set(steps[-1])
    assert "paired_vs_baseline" not in result["table"]["aligned_teacher"]
    table = (out / "table.md").read_text()
    assert "| `tinybev_s3` |" in table and table.count("| `tinybev_bridgeta` |") == 3  # map, detection, multi-task
    assert "| `tinybev_s3` | `baseline_s3` |" in table  # the table against the staged baseline


def test_a_work_directory_keeps_the_world_it_was_generated_as(tmp_path, monkeypatch):
    """bench accuracy reuses WORK/world; a preset of another world (cpu-mt's tiny-traffic on the
    cpu preset's tiny world) is refused, naming the marker file, before anything trains."""
    import json as json_module
    from dataclasses import replace as replace_preset

    import bridgeta.data.prepare as prepare_module
    import bridgeta.data.synth.generate as generate_module
    from bridgeta.bench.accuracy import PRESETS, WORLD_MARKER, ensure_world

    generated = []

    def fake_generate(out, scenes, seed, preset, duration, force):
        generated.append(preset)
        (out / generate_module.VERSION).mkdir(parents=True)

    monkeypatch.setattr(generate_module, "generate_dataroot", fake_generate)
    monkeypatch.setattr(prepare_module, "prepare_dataroot", lambda *args, **kwargs: None)
    cpu, mt = PRESETS["cpu"], PRESETS["cpu-mt"]
    assert (cpu.world, mt.world) == ("tiny", "tiny-traffic")

    ensure_world(tmp_path / "cpu", cpu)
    ensure_world(tmp_path / "cpu", cpu)  # reused, not generated again
    assert generated == ["tiny"]
    marker = tmp_path / "cpu" / "world" / WORLD_MARKER
    assert json_module.loads(marker.read_text())["synth_preset"] == "tiny"
    with pytest.raises(ValueError, match=WORLD_MARKER):
        ensure_world(tmp_path / "cpu", mt)
    with pytest.raises(ValueError, match="generated as"):
        ensure_world(tmp_path / "cpu", replace_preset(cpu, scenes=cpu.scenes + 1))
    # A world from before the marker is taken as it is (a ledger checks its digest) and marked.
    (tmp_path / "old" / "world" / generate_module.VERSION).mkdir(parents=True)
    ensure_world(tmp_path / "old", mt)
    assert generated == ["tiny"]
    assert json_module.loads((tmp_path / "old" / "world" / WORLD_MARKER).read_text())["synth_preset"] == "tiny-traffic"


@pytest.mark.parametrize("preset_name", ["cpu", "cpu-mt", "cpu-tinybev"])
def test_every_run_of_a_staged_preset_has_a_valid_config(tmp_path, preset_name):
    # The runs are configured long before they train (the cpu protocol reaches MonoTAKD's
    # assistant after hours of teacher and baselines): every one must build now. A regression
    # test for the assistant, whose recipe was read with the presets' data overrides and no
    # dataroot, which stopped the cpu protocol at its first MonoTAKD run.
    preset = accuracy.PRESETS[preset_name]
    protocol = replace(preset.protocol, pretrained=str(tmp_path / "backbone.safetensors"))
    methods = ["teacher", *preset.methods, *(["assistant"] if "monotakd" in preset.methods else []),
               *(["aligned_teacher"] if protocol.aligned_teacher else [])]
    for method in methods:
        scale = 1.0 if method in bench_distill.TUNED_METHODS or accuracy._family(method) else None
        preset_or_recipe, overrides = bench_distill.method_config(method, tmp_path, 0, protocol, scale)
        config = load_config(preset_or_recipe, [f"data.dataroot={tmp_path}", *overrides])
        assert config.data.augment.draws == "once", method  # every run of a table draws alike
