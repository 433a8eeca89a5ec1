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
from collections.abc import Sequence
from pathlib import Path

import yaml

from bridgeta.config import load_config, parse_config, to_dict
from bridgeta.provenance import environment, write_json

BASELINE_PRESETS = ("tiny-lc", "tiny-c", "tiny-l")


def train_and_evaluate(
    preset: str,
    dataroot: str | Path,
    run_dir: Path,
    seed: int,
    overrides: Sequence[str] = (),
    split: str = "test",
) -> dict:
    """Train ``preset`` (unless already done) and evaluate it on ``split``; returns both.

    ``preset`` may be a distillation recipe (its teacher set in ``overrides``); the result is
    stored as ``run_dir/eval_<split>.json`` with the result under the key ``split``.
    """
    from bridgeta.engine.evaluate import evaluate_checkpoint
    from bridgeta.engine.trainer import train

    config = load_config(preset, [f"data.dataroot={dataroot}", f"train.seed={seed}", *overrides])
    _check_same_run(run_dir, config)
    result_path = run_dir / f"eval_{split}.json"
    if result_path.is_file() and (run_dir / "model.safetensors").is_file():
        return json.loads(result_path.read_text())
    # The run directory holds this config (checked above): continue it, or restart one that was
    # stopped before its first checkpoint.
    resume = (run_dir / "checkpoints" / "latest").is_file()
    summary = train(config, run_dir, resume=resume, force=not resume)
    evaluation = evaluate_checkpoint(run_dir / "model.safetensors", split=split)
    result = {"preset": preset, "seed": seed, "overrides": list(overrides), "train": _jsonable(summary), split: evaluation}
    write_json(result_path, result)
    return result


def _check_same_run(run_dir: Path, config) -> None:
    """Refuse to reuse or resume a run directory that was trained with another config."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    # Parsed, so keys a run of an older version did not write compare at their defaults.
    stored = to_dict(parse_config(yaml.safe_load(saved.read_text()), str(saved)))
    if stored != to_dict(config):
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
