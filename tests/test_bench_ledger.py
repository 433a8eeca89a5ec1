"""The benchmark ledger: finished runs recorded beside the results are reused on a machine that
has lost their weights, inputs are trained again to their recorded digests, and a record of
another config or of other weights is refused."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from bridgeta.bench import distill as bench_distill
from bridgeta.bench import ledger
from engine_helpers import SMALL_TINY_C, SMALL_TINY_LC

REPO = Path(__file__).resolve().parents[1]

PROTOCOL = bench_distill.Protocol(student_steps=2, teacher_steps=2, teacher_seeds=1,
                                  student_overrides=tuple(SMALL_TINY_C), teacher_overrides=tuple(SMALL_TINY_LC))


def _refuse_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr("bridgeta.engine.trainer.train", refuse)


def test_recorded_runs_are_reused_without_weights_and_inputs_come_back_to_their_digest(engine_world, tmp_path, monkeypatch):
    runs, book = tmp_path / "work" / "runs", tmp_path / "results" / "runs"
    first = bench_distill.train_method("direct", engine_world, runs, 0, PROTOCOL, 1.0, ("val", "test"), ledger=book)
    teacher = bench_distill.run_name("teacher", 0, PROTOCOL)
    student = bench_distill.run_name("direct", 0, PROTOCOL, 1.0)
    # The student trained its teacher first; both are recorded, without weights.
    for name in (teacher, student):
        assert ledger.is_recorded(book / name, ["val", "test"]), name
        assert {p.name for p in (book / name).iterdir()} >= {"config.yaml", "metrics.jsonl", "weights.json", "eval_test.json"}
        assert not list((book / name).glob("*.safetensors"))
    assert ledger.recorded_digest(book / student) == ledger.weights_digest(runs / student / "model.safetensors")

    # A new machine: no work directory. The recorded run is read back, nothing trains.
    shutil.rmtree(tmp_path / "work")
    _refuse_training(monkeypatch)
    again = bench_distill.train_method("direct", engine_world, runs, 0, PROTOCOL, 1.0, ("val", "test"), ledger=book)
    assert again["test"] == first["test"] and again["val"] == first["val"]
    assert (runs / student / "metrics.jsonl").is_file() and not (runs / teacher).exists()
    # Summary mode reads it too.
    assert bench_distill.train_method("direct", engine_world, runs, 0, PROTOCOL, 1.0, ("val", "test"),
                                      read_only=True, ledger=book)["test"] == first["test"]
    # An unrecorded split needs the weights: training starts (refused here) instead of a silent gap.
    with pytest.raises(AssertionError, match="trained again"):
        bench_distill.train_method("direct", engine_world, runs, 0, PROTOCOL, 1.0, ("val", "test", "train"), ledger=book)
    # Before runs train side by side (--jobs > 1), the inputs of those that will train get their
    # weights in this process; a recorded run's inputs are left alone.
    bench_distill.prepare_inputs("direct", engine_world, runs, 0, PROTOCOL, 1.0, ("val", "test"), ledger=book)
    assert not (runs / teacher / "model.safetensors").exists()
    monkeypatch.undo()
    teacher_record = (book / teacher / "metrics.jsonl").read_bytes()
    second = bench_distill.run_name("direct", 1, PROTOCOL, 1.0)
    bench_distill.prepare_inputs("direct", engine_world, runs, 1, PROTOCOL, 1.0, ("val", "test"), ledger=book)
    assert (runs / teacher / "model.safetensors").is_file() and not (runs / second).exists()

    # A new run that learns from the recorded teacher trains the teacher again first, and the
    # teacher's new weights are the recorded ones (training is deterministic here).
    assert ledger.weights_digest(runs / teacher / "model.safetensors") == ledger.recorded_digest(book / teacher)
    bench_distill.train_method("direct", engine_world, runs, 1, PROTOCOL, 1.0, ("val", "test"), ledger=book)
    assert ledger.is_recorded(book / second, ["val", "test"])
    # The teacher's record is still the run the first student read (not the retraining's step times).
    assert (book / teacher / "metrics.jsonl").read_bytes() == teacher_record
    assert (runs / teacher / "metrics.jsonl").read_bytes() != teacher_record


def test_a_teacher_that_trains_to_other_weights_than_recorded_is_refused(engine_world, tmp_path):
    runs, book = tmp_path / "work" / "runs", tmp_path / "results" / "runs"
    bench_distill.train_method("teacher", engine_world, runs, 0, PROTOCOL, None, ("val",), ledger=book)
    record = book / bench_distill.run_name("teacher", 0, PROTOCOL)
    (record / ledger.DIGEST_FILE).write_text(json.dumps({"sha256": "0" * 64, "file": "model.safetensors"}))
    before = (record / ledger.DIGEST_FILE).read_text()
    shutil.rmtree(runs)
    with pytest.raises(ledger.LedgerMismatch, match="other weights than the ledger's record"):
        bench_distill.train_method("teacher", engine_world, runs, 0, PROTOCOL, None, ("val",), ledger=book,
                                   weights_needed=True)
    assert (record / ledger.DIGEST_FILE).read_text() == before  # the record is never overwritten


def test_a_record_of_another_config_is_refused_before_training(engine_world, tmp_path, monkeypatch):
    runs, book = tmp_path / "work" / "runs", tmp_path / "results" / "runs"
    bench_distill.train_method("teacher", engine_world, runs, 0, PROTOCOL, None, ("val",), ledger=book)
    shutil.rmtree(runs)
    _refuse_training(monkeypatch)
    longer = replace(PROTOCOL, teacher_steps=3)
    with pytest.raises(ValueError, match="records a run with a different config"):
        bench_distill.train_method("teacher", engine_world, runs, 0, longer, None, ("val",), ledger=book)


def test_world_and_backbone_digests_are_recorded_once_then_checked(tmp_path):
    world = tmp_path / "world"
    (world / "samples").mkdir(parents=True)
    (world / "samples" / "a.bin").write_bytes(b"abc")
    (world / "cache.npy").write_bytes(b"not generated")
    book = tmp_path / "runs"
    digest = ledger.tree_digest(world, ("samples/**/*",))
    ledger.check_or_record(book, "world", digest, "the world")
    (world / "cache.npy").write_bytes(b"prepared again")  # outside the patterns: no change
    ledger.check_or_record(book, "world", ledger.tree_digest(world, ("samples/**/*",)), "the world")
    (world / "samples" / "a.bin").write_bytes(b"abd")
    with pytest.raises(ledger.LedgerMismatch, match="the world differs"):
        ledger.check_or_record(book, "world", ledger.tree_digest(world, ("samples/**/*",)), "the world")


def test_a_ledger_of_another_machine_type_is_refused_before_a_world_is_generated(tmp_path, monkeypatch):
    from bridgeta.bench import accuracy

    here = ledger.machine_signature()
    assert set(here) == {"machine", "cpu_capability", "native_bf16"} and here["machine"] and here["cpu_capability"]
    book = tmp_path / "out" / "runs"
    ledger.check_machine(book)  # a new ledger records this machine
    assert json.loads((book / ledger.MACHINE_FILE).read_text()) == here
    ledger.check_machine(book)  # and goes on here
    other = "AVX2" if here["cpu_capability"] != "AVX2" else "AVX512"
    (book / ledger.MACHINE_FILE).write_text(json.dumps({**here, "cpu_capability": other}))
    generated = []
    monkeypatch.setattr(accuracy, "ensure_world", lambda *args, **kwargs: generated.append(args))
    with pytest.raises(ledger.LedgerMismatch, match=rf"type \({here['machine']}, {other}") as refusal:
        accuracy.run("cpu", None, tmp_path / "out", tmp_path / "work", None)
    assert str(book) in str(refusal.value) and not generated
    # The same SIMD level without the same bf16 trains in another precision: refused too.
    (book / ledger.MACHINE_FILE).write_text(json.dumps({**here, "native_bf16": not here["native_bf16"]}))
    with pytest.raises(ledger.LedgerMismatch, match="native bf16"):
        ledger.check_machine(book)
    # A ledger from before machine.json (digests only) is left to its digests: nothing recorded.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "world.json").write_text(json.dumps({"sha256": "0" * 64}))
    ledger.check_machine(legacy)
    assert not (legacy / ledger.MACHINE_FILE).exists()


def test_a_summary_reads_a_ledger_without_a_world(tmp_path, monkeypatch):
    from bridgeta.bench import accuracy

    calls = []
    monkeypatch.setattr(accuracy, "run_staged", lambda *args, **kwargs: calls.append(kwargs) or {"finished": {}})
    work, out = tmp_path / "work", tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="no benchmark world there yet"):
        accuracy.run("cpu", None, out, work, None, summary=True)
    (out / "runs").mkdir(parents=True)  # a committed ledger, on a machine without the world
    accuracy.run("cpu", None, out, work, None, summary=True)
    assert calls == [{"reproduce": False, "summary": True, "ledger": None}]
    assert not work.exists()  # nothing generated


@pytest.mark.parametrize("preset, ledger, method, seed", [
    ("cpu", "p4", "baseline", 1), ("cpu", "p4", "teacher", 0), ("cpu", "p4", "bridgeta", 1),
    ("cpu-mt", "mt", "baseline", 2), ("cpu-mt", "mt", "bridgeta", 0), ("cpu-tinybev", "mt", "aligned_teacher", 0),
])
def test_the_committed_ledgers_runs_are_the_runs_their_preset_trains_now(preset, ledger, method, seed):
    """A record the bench reuses must be what the preset would train today (matches_stored):
    a change to a preset or a config default that alters training shows up here, not as a ledger
    silently mixing two protocols (the augmentation regime: data.augment.draws, data/epoch.py)."""
    from bridgeta.bench import accuracy
    from bridgeta.config import load_config, matches_stored

    chosen = accuracy.PRESETS[preset]
    assert "data.augment.draws=once" in chosen.protocol.student_overrides
    runs = Path(f"runs/{ledger}/runs")
    protocol = replace(chosen.protocol, pretrained=f"runs/{ledger}/backbone/backbone.safetensors")
    scale = 1.0 if preset == "cpu" and method in bench_distill.TUNED_METHODS else None
    name = bench_distill.run_name(method, seed, protocol, scale)
    record = REPO / "results" / "ledger" / ledger / name
    if not record.is_dir():
        pytest.skip(f"{record} is not in this checkout")
    config_name, overrides = bench_distill.method_config(method, runs, seed, protocol, scale)
    config = load_config(config_name, [f"data.dataroot=runs/{ledger}/world", f"train.seed={seed}", *overrides])
    assert matches_stored(record / "config.yaml", config)
    assert not matches_stored(record / "config.yaml", load_config(config_name, [
        f"data.dataroot=runs/{ledger}/world", f"train.seed={seed}", *overrides, "data.augment.draws=every_epoch"]))


def test_a_recorded_run_trained_again_uses_the_output_cache_as_its_record_did(tmp_path):
    from bridgeta.bench.baselines import _cache_as_recorded

    def record(name: str, output_cache) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "eval_val.json").write_text(json.dumps({"train": {"steps": 3, "output_cache": output_cache}}))
        return folder

    assert _cache_as_recorded(None) is None and _cache_as_recorded(tmp_path / "absent") is None
    assert _cache_as_recorded(record("without", None)) is False  # recorded before, or without, a cache
    assert _cache_as_recorded(record("with", {"root": "c", "hits": 2, "misses": 4})) is None
