"""The distillation benchmarks' bookkeeping: aggregation, gap closed, run reuse, sweep selection."""

from __future__ import annotations

import json

import pytest

from bridgeta.bench import distill as bench_distill
from bridgeta.bench import distill_sweep
from bridgeta.bench.baselines import _check_same_run
from bridgeta.bench.train_cost import format_table
from bridgeta.config import load_config, to_dict


def _result(seed: int, miou: float, night: float) -> dict:
    return {
        "seed": seed,
        "train": {"step_time_s": 0.5},
        "test": {
            "miou": miou,
            "miou_at_0.5": miou / 2,
            "iou": {"drivable_area": miou + 0.1, "divider": miou - 0.1},
            "by_condition": {"day": {"miou": miou}, "night": {"miou": night}},
            "by_range": {"0-20": {"miou": miou}},
        },
    }


def test_aggregate_means_stds_and_gap_closed():
    runs = {
        "teacher": [_result(0, 0.40, 0.40), _result(1, 0.36, 0.30)],
        "baseline": [_result(0, 0.10, 0.05), _result(1, 0.16, 0.06)],
        "bridgeta": [_result(0, 0.25, 0.10), _result(1, 0.16, 0.08)],
    }
    table = bench_distill.aggregate(runs)
    assert table["bridgeta"]["miou"]["mean"] == pytest.approx(0.205)
    assert table["bridgeta"]["miou"]["std"] == pytest.approx(0.0636396, rel=1e-5)  # sample std of 0.25, 0.16
    assert table["bridgeta"]["by_condition"]["night"]["mean"] == pytest.approx(0.09)
    assert table["bridgeta"]["iou"]["divider"]["mean"] == pytest.approx(0.105)
    # seed 0 closes (0.25-0.10)/(0.40-0.10) = 0.5 of the gap, seed 1 (0.16-0.16)/(0.36-0.16) = 0.
    assert table["bridgeta"]["gap_closed"]["mean"] == pytest.approx(0.25)
    assert table["baseline"]["gap_closed"]["mean"] == pytest.approx(0.0)
    assert table["teacher"]["gap_closed"]["mean"] == pytest.approx(1.0)


def test_run_names_reuse_the_baselines_layout():
    assert bench_distill.run_name("teacher", 1) == "tiny-lc-seed1"
    assert bench_distill.run_name("baseline", 0) == "tiny-c-seed0"
    assert bench_distill.run_name("bridgeta", 0) == "tiny-c-bridgeta-seed0"


def test_every_method_is_the_bridgeta_recipe_with_one_setting_changed(tmp_path):
    protocol = bench_distill.Protocol(epochs=2, teacher_epochs=3, aligned_teacher="tiny-lc-mt")
    runs = tmp_path / "runs"
    configs = {}
    for method in bench_distill.METHODS:
        if bench_distill.is_tinybev(method):  # its stages split a step budget: refused on epochs
            with pytest.raises(ValueError, match="share the student's step budget"):
                bench_distill.method_config(method, runs, 1, protocol)
            continue
        preset, overrides = bench_distill.method_config(method, runs, 1, protocol)
        configs[method] = load_config(preset, ["data.dataroot=/data", *overrides])
    assert configs["teacher"].train.epochs == 3 and configs["teacher"].model.lidar is not None
    assert configs["baseline"].distill is None and configs["baseline"].train.epochs == 2
    full = configs["bridgeta"].distill
    assert full.method == "bridgeta" and full.levels == ("fld", "dld", "lld") and full.lld_aux
    assert full.teacher == str(runs / "tiny-lc-seed1")  # student seed s learns from teacher seed s
    expected = {
        "direct": {"method": "direct"},
        "feature_kd": {"method": "feature_kd"},
        "logit_kd": {"method": "logit_kd"},
        "fld": {"levels": ("fld",)},
        "fld_dld": {"levels": ("fld", "dld")},
        "fld_dld_lld_base": {"lld_aux": False},
        "fixed_epsilon": {"epsilon": "fixed"},
        "ta_seg_only": {"levels": ()},
        "ta_no_grad_to_student": {"ta_grad_to_student": False},
        "ta_mutual": {"ta_mutual": True},
        "ta_from_teacher": {"ta_init": "teacher"},
        "epsilon_narrow": {"epsilon_range": (0.5, 2.0)},
    }
    for method, changed in expected.items():
        distill = configs[method].distill
        differing = {k for k in vars(full) if getattr(distill, k) != getattr(full, k)}
        assert differing == set(changed), method
        assert all(getattr(distill, k) == v for k, v in changed.items()), method
        assert configs[method].model == configs["baseline"].model  # the same student network
        assert configs[method].train == configs["bridgeta"].train
        assert configs[method].name == f"tiny-c-{method}"


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown methods.*'nope'"):
        bench_distill.run(tmp_path, tmp_path / "runs", tmp_path / "out.json", 1, ["nope"])


def test_a_run_directory_with_another_config_is_not_reused(tmp_path):
    import yaml

    run_dir = tmp_path / "tiny-c-seed0"
    run_dir.mkdir()
    trained = load_config("tiny-c", ["data.dataroot=/data", "train.epochs=2"])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(trained)))
    _check_same_run(run_dir, trained)  # the same config is fine
    with pytest.raises(ValueError, match="tiny-c-seed0 holds a run with a different config"):
        _check_same_run(run_dir, load_config("tiny-c", ["data.dataroot=/data", "train.epochs=3"]))


def test_sweep_gives_every_method_the_same_points_and_picks_the_best_mean(tmp_path, monkeypatch):
    from bridgeta.bench import jobs

    scores = {("direct", 0.0): [0.20, 0.22], ("direct", 1.0): [0.25, 0.19], ("direct", 3.0): [0.23, 0.22],
              ("bridgeta", 0.0): [0.21, 0.21], ("bridgeta", 1.0): [0.24, 0.22], ("bridgeta", 3.0): [0.10, 0.30]}
    seen = []

    def fake_run_jobs(job_list, workers):
        results = []
        for job in job_list:
            method, _, _, seed, _, scale, splits, _suffix = job.args
            assert splits == ("val",)  # the sweep never reads the test towns
            seen.append((method, scale, seed, job.label))
            results.append({"val": {"miou": scores[(method, scale)][seed], "by_condition": {"night": {"miou": 0.1}}}})
        return results

    monkeypatch.setattr(jobs, "run_jobs", fake_run_jobs)
    protocol = bench_distill.Protocol(student_steps=10, teacher_seeds=1)
    result = distill_sweep.run(tmp_path, tmp_path / "runs", tmp_path / "sweep.json", protocol,
                               ["bridgeta", "direct"], (0.0, 1.0, 3.0), seeds=2)
    # Means: direct 0.21 / 0.22 / 0.225, bridgeta 0.21 / 0.23 / 0.20.
    assert result["chosen"] == {"bridgeta": 1.0, "direct": 3.0}
    assert len(seen) == 12 and {s for _, _, s, _ in seen} == {0, 1}
    assert ("direct", 0.0, 1, "tiny-c-seed1") in seen  # lambda 0 without a TA: the baseline's run
    point = next(p for p in result["points"] if p["method"] == "direct" and p["lambda"] == 1.0)
    assert point["val_miou"] == pytest.approx(0.22) and point["val_miou_per_seed"] == [0.25, 0.19]
    assert (tmp_path / "sweep.json").is_file()


def test_train_cost_table_shows_ratios():
    result = {"methods": {
        "baseline": {"step_time_s": 0.5, "step_time_ratio": 1.0, "peak_memory_bytes": 2**30, "memory_ratio": 1.0},
        "bridgeta": {"step_time_s": 1.25, "step_time_ratio": 2.5, "peak_memory_bytes": 3 * 2**29, "memory_ratio": 1.5},
    }}
    lines = format_table(result).splitlines()
    assert lines[2].split() == ["bridgeta", "1.250", "2.50", "1536", "1.50"]


ENV = {"date": "2026-11-21 12:00 UTC", "commit": "abc1234", "torch": "2.13.0", "device": "cpu", "cpu_threads": 2}


def _accuracy_result() -> dict:
    runs = {
        "teacher": [_result(0, 0.40, 0.40), _result(1, 0.36, 0.30)],
        "baseline": [_result(0, 0.10, 0.05), _result(1, 0.16, 0.06)],
        "direct": [_result(0, 0.20, 0.07), _result(1, 0.18, 0.07)],
        "bridgeta": [_result(0, 0.25, 0.10), _result(1, 0.16, 0.08)],
    }
    return {"environment": ENV, "protocol": {"epochs": 2, "teacher_epochs": 3}, "preset": {"name": "cpu"},
            "table": bench_distill.aggregate(runs)}


def test_accuracy_markdown_has_a_row_per_method_with_far_range_and_gap_closed():
    from bridgeta.bench.accuracy import format_markdown

    lines = format_markdown(_accuracy_result()).splitlines()
    assert lines[0] == ("| method | drivable_area | divider | mIoU | night mIoU | mIoU 0-20 m | gap closed |")
    rows = {line.split(" | ")[0].strip("| `"): line for line in lines[2:]}
    assert set(rows) == {"teacher", "baseline", "direct", "bridgeta"}
    assert "**20.5 ± 6.4**" in rows["bridgeta"] and rows["bridgeta"].endswith("| +0.25 ± 0.35 |")
    assert "9.0 ± 1.4" in rows["bridgeta"]  # night


def test_rendered_sections_name_the_command_and_commit():
    from bridgeta.report import render_accuracy, render_distill, render_distill_sweep, render_train_cost

    distill = render_distill(_accuracy_result())
    assert distill.splitlines()[0] == "| | `baseline` | `direct` | `bridgeta` | `teacher` |"
    assert "teacher 3 epochs, students 2 epochs" in distill and "commit `abc1234`" in distill
    # A step-counted protocol with BridgeTA's partner row: the column and the schedule in steps.
    stepped = _accuracy_result()
    stepped["protocol"] = {"student_steps": 800, "teacher_steps": 1600}
    stepped["table"]["bridgeta_kd"] = stepped["table"]["bridgeta"]
    stepped_text = render_distill(stepped)
    assert stepped_text.splitlines()[0] == "| | `baseline` | `direct` | `bridgeta` | `bridgeta_kd` | `teacher` |"
    assert "teacher 1600 steps, students 800 steps" in stepped_text
    assert "bench accuracy --preset cpu" in render_accuracy(_accuracy_result())
    sweep = {"environment": ENV, "epochs": 2, "seed": 0,
             "points": [{"stage": "scale", "lambda": 0.01, "epsilon_range": [0.01, 100.0],
                         "val_miou": 0.123, "val_miou_night": None}],
             "chosen": {"lambda": 0.01, "epsilon_range": [0.01, 100.0], "val_miou": 0.123}}
    text = render_distill_sweep(sweep)
    assert "| scale | 0.01 | [0.01, 100] | 12.3 | – |" in text and "λ1 = λ2 = λ3 = 0.01" in text
    cost = {"environment": ENV, "steps": 30, "methods": {
        "baseline": {"step_time_s": 0.4, "step_time_ratio": 1.0, "peak_memory_bytes": 2**30,
                     "memory_ratio": 1.0, "device": "cpu"}}}
    assert "| `baseline` | 0.400 | 1.00 | 1024 | 1.00 |" in render_train_cost(cost)


def test_accuracy_bench_runs_its_preset_protocol_and_the_demo_is_its_seed_zero(tmp_path, monkeypatch):
    from bridgeta import demo
    from bridgeta.bench import accuracy

    calls = {}

    def fake_run_methods(dataroot, runs_dir, out, seeds, methods, protocol, metadata):
        calls.update(dataroot=dataroot, runs_dir=runs_dir, seeds=seeds, methods=tuple(methods), protocol=protocol)
        return {"environment": ENV, "protocol": {}, "table": _accuracy_result()["table"], **metadata}

    monkeypatch.setattr(accuracy, "run_methods", fake_run_methods)
    result = accuracy.run("demo", 2, tmp_path / "out", tmp_path / "work", dataroot=tmp_path / "world")
    assert calls["runs_dir"] == tmp_path / "work" / "runs" and calls["seeds"] == 2
    assert calls["protocol"] == accuracy.PRESETS["demo"].protocol
    assert set(calls["methods"]) == set(bench_distill.METHODS) - {"teacher"}  # every method and ablation
    assert result["preset"]["name"] == "demo"
    assert (tmp_path / "out" / "table.md").read_text().startswith("| method |")
    # The demo trains with the demo preset's world and schedule, so the benchmark can reuse its runs.
    assert demo.CPU is accuracy.PRESETS["demo"] and set(demo.STUDENTS) <= set(calls["methods"])


def test_cost_measures_the_deployed_student_like_info_does():
    from bridgeta.bench.cost import format_table as cost_table
    from bridgeta.bench.cost import measure_latency
    from bridgeta.models.bev_model import build_model
    from bridgeta.models.cost import measure_model_cost

    cell = measure_latency("tiny-c", "cpu", "fp32", False, warmup=1, repeats=2)
    reference = measure_model_cost(build_model(load_config("tiny-c")))
    assert (cell["params"], cell["macs"]) == (reference.params, reference.macs)
    assert cell["latency_ms"] > 0 and cell["latency_ms_min"] <= cell["latency_ms"] and cell["repeats"] == 2
    row = cost_table({"inference": [{"role": "student", **cell}]}).splitlines()[1].split()
    assert row[:5] == ["tiny-c", "student", "cpu", "fp32", "False"]
    assert float(row[5]) == pytest.approx(reference.params / 1e6, abs=0.01)


def test_cost_gives_the_student_as_a_fraction_of_its_teacher():
    from bridgeta.bench.cost import student_to_teacher
    from bridgeta.report import render_cost

    def cell(role, params, macs, ms, compile_model=False):
        return {"pair": "tinybev", "role": role, "preset": role, "device": "cpu", "precision": "fp32",
                "compile": compile_model, "params": params, "macs": macs, "latency_ms": ms,
                "peak_memory_bytes": 2**20, "repeats": 3, "threads": 2, "deployed_by": []}

    cells = [cell("student", 22e6, 5e9, 20.0), cell("teacher", 100e6, 40e9, 100.0), cell("student", 22e6, 5e9, 1.0, True)]
    ratios = student_to_teacher(cells)
    assert ratios == {"tinybev": {"cpu-fp32": {"params": 0.22, "macs": 0.125, "latency": 0.2, "speedup": 5.0}}}
    table = render_cost({"environment": ENV, "methods": [], "inference": cells, "student_to_teacher": ratios})
    assert "| tinybev | cpu-fp32 | 0.22× | 0.12× | 0.20× | 5.00× |" in table


def test_cost_gives_monotakds_deployed_student_as_a_multiple_of_the_baseline():
    from bridgeta.bench.cost import format_table, student_to_baseline
    from bridgeta.report import render_cost

    def cell(pair, role, preset, params, macs, ms, memory, precision="fp32", compile_model=False):
        return {"pair": pair, "role": role, "preset": preset, "device": "cpu", "precision": precision,
                "compile": compile_model, "params": params, "macs": macs, "latency_ms": ms,
                "peak_memory_bytes": memory, "repeats": 3, "threads": 2, "deployed_by": []}

    cells = [cell("tiny", "student", "tiny-c", 10e6, 4e9, 80.0, 50 * 2**20),
             cell("tiny", "teacher", "tiny-lc", 11e6, 6e9, 190.0, 160 * 2**20),
             cell("monotakd", "student", "distill/tiny-c-monotakd", 11e6, 6e9, 120.0, 75 * 2**20),
             cell("monotakd", "student", "distill/tiny-c-monotakd", 11e6, 6e9, 60.0, 75 * 2**20, compile_model=True),
             cell("monotakd", "student", "distill/tiny-c-monotakd", 11e6, 6e9, 90.0, 70 * 2**20, precision="bf16")]
    ratios = student_to_baseline(cells)
    # Eager only, and only where the baseline was measured in the same variant (no bf16 tiny-c here).
    assert ratios == {"monotakd": {"cpu-fp32": {"baseline": "tiny-c", "params": 1.1, "macs": 1.5, "latency": 1.5,
                                                "memory": 1.5}}}
    row = "| monotakd | cpu-fp32 | `tiny-c` | 1.10× | 1.50× | 1.50× | 1.50× |"
    assert row in render_cost({"environment": ENV, "methods": [], "inference": cells, "student_to_baseline": ratios})
    # Results written before the field existed get the same row from their cells.
    assert row in render_cost({"environment": ENV, "methods": [], "inference": cells})
    assert "student / baseline" in format_table({"inference": cells, "student_to_baseline": ratios})


def test_cost_deployed_rows_time_each_runtime_and_record_onnx_parity(tmp_path, monkeypatch):
    """The deployed student under PyTorch and onnxruntime (torch.compile is left to the benchmark:
    compiling takes minutes on CI's CPU), and the rows a run assembles: ratios and parity."""
    from bridgeta.bench import cost

    exported = cost.export_deployed("tiny-c", tmp_path / "tiny-c.onnx")
    assert exported["parity_max_abs"] < 1e-4
    for runtime in ("pytorch", "onnxruntime"):
        row = cost.measure_deployed("tiny-c", runtime, exported["onnx"], warmup=0, repeats=1)
        assert row["runtime"] == runtime and row["latency_ms"] > 0 and row["repeats"] == 1

    def fake_isolated(module, arguments, what):
        assert module == "bridgeta.bench.cost"
        if arguments[0] == "--export":
            return {"preset": arguments[1], "onnx": arguments[3], "parity_max_abs": 3e-8}
        runtime = arguments[arguments.index("--runtime") + 1]
        latency = {"pytorch": 100.0, "pytorch-compile": 80.0, "onnxruntime": 50.0}[runtime]
        return {"preset": arguments[1], "runtime": runtime, "latency_ms": latency, "peak_memory_bytes": 2**20,
                "repeats": 1, "threads": 1}

    monkeypatch.setattr(cost, "run_isolated", fake_isolated)
    rows = cost.run_deployed(["tiny"], cost.RUNTIMES, warmup=0, repeats=1)
    assert [(r["runtime"], r["latency_ratio"]) for r in rows] == [
        ("pytorch", 1.0), ("pytorch-compile", 0.8), ("onnxruntime", 0.5)
    ]
    assert [r.get("parity_max_abs") for r in rows] == [None, None, 3e-8]
    table = cost.format_table({"inference": [], "deployed": rows})
    assert "onnxruntime" in table and "3.0e-08" in table


def test_train_cost_of_the_tinybev_pair_reads_each_rows_teacher_untrained_when_none_is_given(engine_world, tmp_path,
                                                                                            monkeypatch):
    """Every TinyBEV row trains against an untrained tiny-lc-tinybev, BridgeTA's against an
    untrained tiny-lc-mt (the teacher of the student's widths), the baseline against none; the
    results file says the teachers were untrained. The measurement itself is faked (training is
    what the other engine tests check); the teacher files are real."""
    from bridgeta.bench import train_cost
    from bridgeta.engine.model_file import load_model_file

    seen = {}

    def in_process(module, arguments, what):
        settings = dict(zip(arguments[::2], arguments[1::2]))
        teacher = settings.get("--teacher")
        seen[settings["--one"]] = None if teacher is None else load_model_file(teacher)[1].name
        step = 2.0 if teacher else 1.0
        return {"preset": settings["--one"], "steps": 1, "step_time_s": step, "device": "cpu",
                "peak_memory_bytes": int(step * 2**20)}

    monkeypatch.setattr(train_cost, "run_isolated", in_process)
    result = train_cost.run(engine_world, 1, tmp_path / "cost.json", pair="tinybev")
    assert seen == {"tiny-c-tinybev": None, "distill/tiny-c-tinybev-s1": "tiny-lc-tinybev",
                    "distill/tiny-c-tinybev-s2": "tiny-lc-tinybev", "distill/tiny-c-tinybev-s3": "tiny-lc-tinybev",
                    "distill/tiny-c-tinybev-bridgeta": "tiny-lc-mt"}
    assert list(result["methods"]) == ["baseline", "tinybev_s1", "tinybev_s2", "tinybev_s3", "tinybev_bridgeta"]
    assert result["teachers"] == {"teacher": "untrained tiny-lc-tinybev", "aligned_teacher": "untrained tiny-lc-mt"}
    assert result["methods"]["baseline"]["step_time_ratio"] == 1.0
    assert result["methods"]["tinybev_s3"]["step_time_ratio"] == result["methods"]["tinybev_s3"]["memory_ratio"] == 2.0
    assert json.loads((tmp_path / "cost.json").read_text())["pair"] == "tinybev"
    from bridgeta.report import render_train_cost

    text = render_train_cost({**result, "environment": ENV})
    assert "| `tinybev_s3` | 2.000 | 2.00 | 2 | 2.00 |" in text
    assert "freshly initialised `tiny-lc-tinybev`, `tiny-lc-mt`" in text
    with pytest.raises(ValueError, match="reads no teacher 'aligned_teacher'"):
        train_cost.run(engine_world, 1, tmp_path / "other.json", pair="tiny", teachers={"aligned_teacher": "x"})


def test_train_cost_refuses_a_missing_teacher_before_training(tmp_path, capsys):
    from bridgeta.bench import train_cost

    (tmp_path / "v1.0-trainval").mkdir()
    with pytest.raises(SystemExit):
        train_cost.main(["--dataroot", str(tmp_path), "--pair", "tinybev", "--teacher", str(tmp_path / "nowhere")])
    assert f"--teacher {tmp_path / 'nowhere'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cost.main(["--dataroot", str(tmp_path / "empty"), "--pair", "tinybev"])
    assert "no nuScenes tables" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))
