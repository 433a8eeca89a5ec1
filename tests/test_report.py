"""Docs tables are rendered from results files, never typed: the renderer and its errors."""

import json

import pytest

from bridgeta.provenance import environment, write_json
from bridgeta.report import render_docs

BEV_POOL = {
    "environment": {"date": "2026-01-01 00:00 UTC", "commit": "abc1234", "torch": "2.13.0", "device": "cpu", "cpu_threads": 2},
    "runs": [
        {"device": "cpu", "threads": 2, "num_points": 1000, "num_kept": 800, "fast_ms": 10.0,
         "reference_ms": 80.0, "speedup": 8.0, "plan_ms": 1.5}
    ],
}


def test_marked_section_is_replaced_and_the_rest_kept(tmp_path):
    results, docs = tmp_path / "results", tmp_path / "docs"
    docs.mkdir()
    write_json(results / "bev_pool.json", BEV_POOL)
    doc = docs / "page.md"
    doc.write_text("intro\n<!-- results:bev-pool -->\nstale 1.0x\n<!-- /results:bev-pool -->\noutro\n")
    assert render_docs(results, docs) == ["page.md:bev-pool"]
    text = doc.read_text()
    assert "stale" not in text and "8.00×" in text and "commit `abc1234`" in text
    assert text.startswith("intro\n") and text.endswith("outro\n")
    render_docs(results, docs)  # idempotent
    assert doc.read_text() == text


def test_missing_results_file_names_the_command(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("<!-- results:model-zoo -->\n<!-- /results:model-zoo -->\n")
    with pytest.raises(FileNotFoundError, match="model_zoo.json; run its command first"):
        render_docs(tmp_path / "results", tmp_path / "docs")


ENV_WITHOUT_CAPABILITY = {"date": "2026-01-01 00:00 UTC", "commit": "abc1234", "torch": "2.13.0", "device": "cpu",
                          "cpu_threads": 2}


def test_environment_and_atomic_json(tmp_path):
    env = environment()
    assert {"date", "commit", "torch", "cpu_threads", "cpu_capability"} <= set(env)
    from bridgeta.report import _measured

    bf16 = "native bf16" if env["native_bf16"] else "no native bf16"
    assert f"cpu (CPU {env['cpu_capability']}, {bf16}), 2 CPU threads" in _measured(
        {"environment": {**env, "device": "cpu", "cpu_threads": 2}}, "x")
    assert "cpu, 2 CPU threads" in _measured({"environment": {**ENV_WITHOUT_CAPABILITY}}, "x")
    write_json(tmp_path / "a" / "r.json", {"x": 1})
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"x": 1}
    assert not (tmp_path / "a" / "r.json.tmp").exists()


def test_a_table_names_the_command_its_results_file_recorded(tmp_path, monkeypatch):
    """The recorded command line (with its --out, --methods...) replaces the renderer's generic one."""
    argv = ["bench", "accuracy", "--preset", "cpu", "--summary", "--out", "my results", "--methods", "monotakd"]
    monkeypatch.setattr("sys.argv", ["/venv/bin/bridgeta", *argv])
    command = environment()["command"]
    assert command == "bridgeta bench accuracy --preset cpu --summary --out 'my results' --methods monotakd"
    partial = {"environment": {**BEV_POOL["environment"], "command": command}, "protocol": {"student_steps": 800},
               "preset": {"name": "cpu"}, "table": {"teacher": {"seeds": [0], "miou": {"mean": 0.5, "std": 0.0, "n": 1}}}}
    results, docs = tmp_path / "results", tmp_path / "docs"
    docs.mkdir()
    write_json(results / "accuracy-cpu" / "partial.json", partial)
    (docs / "page.md").write_text("<!-- results:accuracy-cpu-partial -->\n<!-- /results:accuracy-cpu-partial -->\n")
    render_docs(results, docs)
    assert f"Measured with `{command}` on" in (docs / "page.md").read_text()
    del partial["environment"]["command"]  # a file written before commands were recorded: the generic form
    write_json(results / "accuracy-cpu" / "partial.json", partial)
    render_docs(results, docs)
    assert "Measured with `bridgeta bench accuracy --preset cpu --summary` on" in (docs / "page.md").read_text()


def test_a_summary_says_when_its_runs_trained_on_another_machine_type(tmp_path):
    """A summary reads a ledger's records on whatever machine runs it: the table names the
    machine type the runs trained on (the ledger's machine.json) when it is not the summary's."""
    from bridgeta.bench.accuracy import _write_summary
    from bridgeta.bench.accuracy import PRESETS
    from bridgeta.report import render_partial

    ledger = tmp_path / "ledger"
    ledger.mkdir()
    write_json(ledger / "machine.json", {"machine": "x86_64", "cpu_capability": "AVX512", "native_bf16": True})
    here = {**BEV_POOL["environment"], "cpu_capability": "AVX2", "native_bf16": False}
    runs = {"teacher": [{"seed": 0, "train": {}, "test": {"miou": 0.5, "miou_at_0.5": 0.5, "iou": {"drivable_area": 0.5},
                                                         "by_condition": {}, "by_range": {"0-20": {"miou": 0.5}}}}]}
    result = _write_summary(tmp_path / "out", here, tmp_path, PRESETS["cpu"].protocol, runs, tmp_path / "runs",
                            "cpu", ledger)
    assert result["trained_on"] == {"machine": "x86_64", "cpu_capability": "AVX512", "native_bf16": True}
    text = render_partial(result)
    assert "(CPU AVX2, no native bf16)" in text and "trained on another machine type, CPU AVX512, native bf16 (the ledger's" in text
    result["environment"] = {**here, "cpu_capability": "AVX512", "native_bf16": True}  # summarised on its own type
    assert "another machine type" not in render_partial(result)


def test_committed_docs_match_committed_results(tmp_path):
    """Every rendered section in docs/ is what its committed results file renders to."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    docs = root / "docs"
    shutil.copytree(docs, tmp_path / "docs")
    render_docs(root / "results", tmp_path / "docs")
    for page in docs.rglob("*.md"):
        relative = page.relative_to(docs)
        assert (tmp_path / "docs" / relative).read_text() == page.read_text(), (
            f"{relative}: run `bridgeta report render`"
        )


def test_deployed_cost_renders_rows_or_says_it_was_not_measured():
    from bridgeta.report import render_deployed_cost

    environment = {"date": "2026-01-01 00:00 UTC", "commit": "abc1234", "torch": "2.13.0", "device": "cpu",
                   "cpu_threads": 2}
    assert "Not measured yet" in render_deployed_cost({"environment": environment, "inference": []})
    rows = [
        {"preset": "tiny-c", "runtime": "pytorch", "latency_ms": 80.0, "latency_ratio": 1.0,
         "peak_memory_bytes": 50 * 2**20, "repeats": 5, "threads": 2},
        {"preset": "tiny-c", "runtime": "onnxruntime", "latency_ms": 40.0, "latency_ratio": 0.5,
         "peak_memory_bytes": 60 * 2**20, "repeats": 5, "threads": 2, "parity_max_abs": 7.5e-9},
    ]
    text = render_deployed_cost({"environment": environment, "deployed": rows})
    assert "| `tiny-c` | onnxruntime | 40.0 | 0.50 | 60 | 7.5e-09 |" in text and "commit `abc1234`" in text


def test_sections_in_subfolders_render_too(tmp_path):
    results, docs = tmp_path / "results", tmp_path / "docs"
    (docs / "methods").mkdir(parents=True)
    write_json(results / "bev_pool.json", BEV_POOL)
    page = docs / "methods" / "page.md"
    page.write_text("<!-- results:bev-pool -->\n<!-- /results:bev-pool -->\n")
    assert render_docs(results, docs) == ["methods/page.md:bev-pool"]
    assert "8.00×" in page.read_text()


def test_a_sections_links_point_from_the_folder_it_is_rendered_into():
    from pathlib import Path

    from bridgeta.report import relink

    body = "see [detection.md](detection.md#x), [web](https://a.b/c.md), [here](#anchor), [up](../README.md)"
    assert relink(body, Path(".")) == body
    assert relink(body, Path("methods")) == (
        "see [detection.md](../detection.md#x), [web](https://a.b/c.md), [here](#anchor), [up](../../README.md)"
    )


def test_every_relative_link_of_the_docs_and_readme_resolves():
    """Links between the committed docs (and the ones rendered sections write) name files that exist."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    broken = []
    for page in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if path and not re.match(r"[a-z]+:", path) and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(root)}: {target}")
    assert not broken, broken


def test_the_multitask_section_renders_the_tinybev_table():
    from bridgeta.report import render_multitask

    def run(seed, value):
        test = {"miou": value, "miou_at_0.5": value, "iou": {"drivable_area": value}, "by_condition": {},
                "by_range": {"0-20": {"miou": value}},
                "detection": {"mAP": value, "NDS": value, "per_class": {"car": {"AP": value}}, "tp_errors": {"ATE": 0.5}},
                "motion": {"minADE": 1.0 + value, "minFDE": 2.0, "miss_rate_all_steps": 0.5, "miss_rate_fde": 0.25,
                           "agents": 3, "complete_agents": 2},
                "planning": {"l2@mean": 2.0 - value, "l2_avg@mean": 1.0, "collision@mean": 0.1,
                             "collision_avg@mean": 0.05}}
        return {"seed": seed, "train": {}, "test": test}

    from bridgeta.bench.distill import aggregate

    runs = {"baseline": [run(0, 0.2), run(1, 0.2)], "tinybev_s3": [run(0, 0.3), run(1, 0.3)]}
    text = render_multitask({"environment": BEV_POOL["environment"], "table": aggregate(runs),
                             "preset": {"name": "cpu-tinybev"}})
    assert "| `tinybev_s3` |" in text and "--preset cpu-tinybev" in text and "commit `abc1234`" in text
    assert "+10.0 ± 0.0" in text  # the paired NDS delta, in points
    # its row of the every-task table (the steps table's comes first)
    row = next(line for line in text.splitlines() if line.startswith("| `tinybev_s3`") and line.count("|") > 10)
    # UniAD's L2 averaged over 1-2-3 s (1.70 m), its paired delta (-0.10 m), the collision rate in %.
    assert "| 1.70 ± 0.00 |" in row and "| -0.10 ± 0.00 |" in row and "| 10.0 ± 0.0 |" in row
    assert "`l2@mean`" in text and "`l2_avg@...`" in text  # the text says which convention is shown
    # Each row's steps first: S3 trains the baseline's whole budget (800 of 800 steps).
    steps = render_multitask({"environment": BEV_POOL["environment"], "table": aggregate(runs),
                              "preset": {"name": "cpu-tinybev"}, "protocol": {"student_steps": 800}})
    assert "| `tinybev_s3` | 2 | 800 | 30.0 ± 0.0 | +10.0 ± 0.0 (n=2) | – |" in steps
    assert steps.index("| method | seeds | steps |") < steps.index("| method | mAP |")
    assert "Planning scores" not in text  # these runs do not say how many samples they scored
    for results in runs.values():
        for r in results:
            r["test"]["planning"]["samples"] = 200
    text = render_multitask({"environment": BEV_POOL["environment"], "table": aggregate(runs),
                             "preset": {"name": "cpu-tinybev"}})
    assert ("Planning scores the 200 test samples with a whole 3 s future, so one collision at one horizon moves "
            "the collision column (the mean of the three horizons) by 0.17 %") in text


def test_a_running_multi_task_benchmark_shows_its_detection_rows():
    from bridgeta.bench.distill import aggregate
    from bridgeta.report import render_partial_detection

    def run(seed, nds, unclipped):
        detection = {"mAP": 0.0, "NDS": nds, "mAP_unclipped": unclipped, "per_class": {"car": {"AP": 0.0}},
                     "tp_errors": {"ATE": 1.0}}
        return {"seed": seed, "train": {}, "test": {"miou": 0.1, "miou_at_0.5": 0.1, "iou": {"drivable_area": 0.1},
                                                     "by_condition": {}, "by_range": {"0-20": {"miou": 0.1}},
                                                     "detection": detection}}

    results = {"table": aggregate({"baseline": [run(0, 0.0, 0.01), run(1, 0.0, 0.02)],
                                   "direct": [run(0, 0.0, 0.03)]}),
               "protocol": {"student_steps": 800}, "preset": {"name": "cpu-mt"}, "environment": ENV_WITHOUT_CAPABILITY}
    text = render_partial_detection(results)
    assert "| `direct` | 1 | 800 |" in text and "Objects of the same runs" in text
    direct = next(line for line in text.splitlines() if line.startswith("| `direct`") and "**" in line)
    assert "3.0 ± 0.0" in direct and "+2.0 ± 0.0" in direct  # its unclipped mAP, and paired on seed 0
    # No detection figures (a map-only benchmark): the partial table alone.
    plain = {**results, "table": {m: {k: v for k, v in row.items() if k != "detection"} for m, row in results["table"].items()}}
    assert "Objects" not in render_partial_detection(plain)


def test_a_running_tinybev_benchmark_shows_its_finished_rows_on_every_task():
    from bridgeta.bench.distill import aggregate
    from bridgeta.report import render_partial_multitask

    def run(seed, value, planning=True):
        test = {"miou": value, "miou_at_0.5": value, "iou": {"drivable_area": value}, "by_condition": {},
                "by_range": {"0-20": {"miou": value}},
                "detection": {"mAP": 0.0, "NDS": value, "mAP_unclipped": value / 10, "per_class": {"car": {"AP": 0.0}},
                              "tp_errors": {"ATE": 1.0}},
                "motion": {"minADE": 1.0 + value, "minFDE": 2.0, "miss_rate_all_steps": 0.5, "miss_rate_fde": 0.25}}
        if planning:
            test["planning"] = {"l2@mean": 2.0 - value, "l2@3s": 3.0 - value, "collision@mean": 0.1}
        return {"seed": seed, "train": {}, "test": test}

    # the teacher and the baseline's seed 0 and 1 finished, S1's seed 0 alone so far
    runs = {"teacher": [run(0, 0.5)], "baseline": [run(0, 0.2), run(1, 0.2)], "tinybev_s1": [run(0, 0.3)]}
    results = {"table": aggregate(runs), "protocol": {"student_steps": 800}, "preset": {"name": "cpu-tinybev"},
               "environment": ENV_WITHOUT_CAPABILITY}
    text = render_partial_multitask(results)
    # S1 trains a third of the student's budget (its steps), S2 and S3 go on from it
    assert "| `tinybev_s1` | 1 | 266 |" in text and "Every task of the same runs" in text
    row = next(line for line in text.splitlines() if line.startswith("| `tinybev_s1`") and "| 266 |" not in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| method | mAP")).strip("|").split("|")]
    assert cells[header.index("Δ mIoU")] == "+10.0 ± 0.0" and cells[header.index("L2 (m)")] == "1.70 ± 0.00"
    assert cells[header.index("Δ minADE")] == "+0.10 ± 0.00"
    # Rows without planning figures (a map-only benchmark): the partial table alone.
    plain = {**results, "table": aggregate({m: [run(r["seed"], r["test"]["miou"], planning=False) for r in rs]
                                           for m, rs in runs.items()})}
    assert "Every task" not in render_partial_multitask(plain)


def test_a_running_sweep_shows_each_finished_seed_and_the_mean_only_when_all_have():
    from bridgeta.report import render_partial_sweep

    def point(method, lam, per_seed):
        mean = sum(per_seed) / len(per_seed) if per_seed else None
        return {"method": method, "lambda": lam, "val_miou_per_seed": per_seed, "val_miou": mean,
                "seeds": list(range(len(per_seed)))}

    results = {
        "environment": environment(), "lambdas": [0.0, 1.0], "seeds": 2, "chosen": {"direct": 0.0},
        "protocol": {"student_steps": 800},
        "points": [point("direct", 0.0, [0.15, 0.17]), point("direct", 1.0, []),
                   point("monotakd", 0.0, [0.2]), point("monotakd", 1.0, [])],
    }
    text = render_partial_sweep(results)
    assert "| `direct` | 16.0 (15.0 / 17.0) | – |" in text
    assert "| `monotakd` | (20.0) | – |" in text  # one seed of two: no mean yet
    assert "Chosen so far: `direct` λ = 0." in text
