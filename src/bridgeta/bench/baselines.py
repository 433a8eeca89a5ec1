"""``bridgeta bench baselines``: fusion teacher vs camera-only vs LiDAR-only, several seeds.

Each (preset, seed) is trained on the train towns with its preset's recipe and evaluated on the
test towns; finished runs (a ``model.safetensors`` and an ``eval_test.json``) are skipped, so an
interrupted benchmark resumes where it stopped. Results: mean and standard deviation over seeds
of mIoU overall, per class, at night and per distance band, plus training step time and loader
throughput against it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from bridgeta.bench import ledger
from bridgeta.config import load_config, matches_stored
from bridgeta.provenance import environment, write_json

BASELINE_PRESETS = ("tiny-lc", "tiny-c", "tiny-l")


def train_and_evaluate(
    preset: str,
    dataroot: str | Path,
    run_dir: Path,
    seed: int,
    overrides: Sequence[str] = (),
    split: str | Sequence[str] = "test",
    read_only: bool = False,
    record: Path | None = None,
    weights_needed: bool = False,
    before_training: Callable[[], None] | None = None,
) -> dict | None:
    """Train ``preset`` (unless already done) and evaluate it on ``split`` (one or several); returns both.

    ``preset`` may be a distillation recipe (its teacher set in ``overrides``). Each split's result
    is stored as ``run_dir/eval_<split>.json`` with the evaluation under the key ``split``; a
    finished run (its ``model.safetensors``) is not trained again, and a split already evaluated
    is read back. With ``train.eval_every_steps`` set, the run validates while it trains (its
    curve is in ``metrics.jsonl``). A BridgeTA run also evaluates its teacher assistant on the
    validation split (``eval_assistant_val.json``, under ``assistant_val``). ``read_only`` trains
    and evaluates nothing: the stored result of a run finished and evaluated on every split, or
    None (``bench accuracy --summary``).

    ``record``: the run's place in a benchmark's ledger (:mod:`bridgeta.bench.ledger`). A run
    recorded there with every split is finished without its weights (they are trained again,
    and must have the recorded digest, only when ``weights_needed``: another run reads them);
    a run finished here is recorded. ``before_training`` runs just before a training starts
    (the benchmark makes sure the run's inputs, a teacher or a TA, have their weights).
    """
    from bridgeta.engine.evaluate import evaluate_assistant, evaluate_checkpoint, evaluate_checkpoint_model
    from bridgeta.engine.trainer import train

    splits = [split] if isinstance(split, str) else list(split)
    config = load_config(preset, [f"data.dataroot={dataroot}", f"train.seed={seed}", *overrides])
    if record is not None and (record / "config.yaml").is_file() and not matches_stored(record / "config.yaml", config):
        raise ValueError(f"{record} records a run with a different config (see its config.yaml) than "
                         f"{run_dir} would train: move the record aside, or keep the benchmark's settings")
    if record is not None:
        ledger.restore(record, run_dir)
    _check_same_run(run_dir, config)
    model_file = run_dir / "model.safetensors"
    untrained = ledger.needs_training(run_dir, record, splits)
    if read_only and (untrained or not all((run_dir / f"eval_{n}.json").is_file() for n in splits)):
        return None
    summary = None
    if untrained or (weights_needed and not model_file.is_file()):
        if before_training is not None:
            before_training()
        # The run directory holds this config (checked above): continue it, or restart one that
        # was stopped before its first checkpoint.
        resume = (run_dir / "checkpoints" / "latest").is_file()
        evaluate_fn = evaluate_checkpoint_model if config.train.eval_every_steps else None
        trained_by = environment()  # the code that trains (a resumed run: the code that finished it)
        summary = _jsonable(train(config, run_dir, resume=resume, force=not resume, evaluate_fn=evaluate_fn,
                                  output_cache=_cache_as_recorded(record)))
        summary["environment"] = trained_by
    if record is not None:
        ledger.check_weights(model_file, record)
    result: dict = {"preset": preset, "seed": seed, "overrides": list(overrides)}
    for name in splits:
        path = run_dir / f"eval_{name}.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            result.setdefault("train", stored.get("train"))
            result[name] = stored[name]
            continue
        stored = {**result, "train": summary or result.get("train") or _stored_train(run_dir),
                  name: evaluate_checkpoint(model_file, split=name)}
        write_json(path, stored)
        result.setdefault("train", stored["train"])
        result[name] = stored[name]
    if config.distill is not None and config.distill.method == "bridgeta":
        path = run_dir / "eval_assistant_val.json"
        if not path.is_file() and not read_only and model_file.is_file():
            write_json(path, {"assistant_val": evaluate_assistant(model_file, split="val")})
        if path.is_file():
            result["assistant_val"] = json.loads(path.read_text())["assistant_val"]
    if record is not None and not read_only:
        ledger.save(run_dir, record)
    return result


def _cache_as_recorded(record: Path | None) -> bool | None:
    """A recorded run trained again (its weights are another run's input, and must come back to
    their digest) trains as it was recorded: without the output cache if its record used none
    (``train.output_cache``), since the cache runs the frozen models one sample at a time. Any
    other run: None, the trainer's default (``BRIDGETA_OUTPUT_CACHE``)."""
    stored = _stored_train(record) if record is not None else None
    if stored is None:
        return None
    return None if stored.get("output_cache") else False


def _stored_train(run_dir: Path) -> dict | None:
    """The training summary an earlier evaluation of this run stored, if any."""
    for path in sorted(run_dir.glob("eval_*.json")):
        train = json.loads(path.read_text()).get("train")
        if train is not None:
            return train
    return None


def _check_same_run(run_dir: Path, config) -> None:
    """Refuse to reuse or resume a run directory that was trained with another config."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    if not matches_stored(saved, config):
        raise ValueError(
            f"{run_dir} holds a run with a different config (see its config.yaml): delete it or "
            "choose another output directory"
        )


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _mean_std(values: list[float | None]) -> dict:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": statistics.fmean(present),
        "std": statistics.stdev(present) if len(present) > 1 else 0.0,
        "n": len(present),
    }


def aggregate(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds for each preset."""
    table = {}
    for preset in dict.fromkeys(r["preset"] for r in runs):
        mine = [r for r in runs if r["preset"] == preset]
        tests = [r["test"] for r in mine]
        classes = list(tests[0]["iou"])
        table[preset] = {
            "seeds": [r["seed"] for r in mine],
            "miou": _mean_std([t["miou"] for t in tests]),
            "miou_at_0.5": _mean_std([t["miou_at_0.5"] for t in tests]),
            "iou": {c: _mean_std([t["iou"][c] for t in tests]) for c in classes},
            "by_condition": {
                k: _mean_std([t["by_condition"][k]["miou"] for t in tests]) for k in tests[0]["by_condition"]
            },
            "by_range": {k: _mean_std([t["by_range"][k]["miou"] for t in tests]) for k in tests[0]["by_range"]},
            "step_time_s": _mean_std([r["train"].get("step_time_s") for r in mine]),
        }
    return table


def run(dataroot: Path, out: Path, runs_dir: Path, seeds: int, presets: Sequence[str]) -> dict:
    started = environment()  # the code that trains is the code of the commit at the start
    runs = [
        train_and_evaluate(preset, dataroot, runs_dir / f"{preset}-seed{seed}", seed)
        for seed in range(seeds)
        for preset in presets
    ]
    result = {"environment": started, "dataroot": str(dataroot), "runs": runs, "table": aggregate(runs)}
    write_json(out, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bridgeta bench baselines", description=__doc__.splitlines()[0])
    parser.add_argument("--dataroot", required=True, type=Path, help="prepared dataroot (bridgeta synth + data prepare)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=list(BASELINE_PRESETS))
    parser.add_argument("--runs", type=Path, default=Path("runs/baselines"), help="where runs are kept (resumable)")
    parser.add_argument("--out", type=Path, default=Path("results/baselines.json"))
    args = parser.parse_args(argv)
    result = run(args.dataroot, args.out, args.runs, args.seeds, args.presets)
    for preset, row in result["table"].items():
        m, night = row["miou"], row["by_condition"].get("night", {})
        night_text = f"{night['mean']:.3f}" if night.get("mean") is not None else "-"
        print(f"{preset:<8} mIoU {m['mean']:.3f} ± {m['std']:.3f}  night {night_text}  (seeds {row['seeds']})")
    print(f"wrote {args.out}")
    return 0
