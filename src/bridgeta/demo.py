"""The main job on the embedded default: ``bridgeta demo``.

Generates a small synthetic world in nuScenes format (train, validation and test in different
towns), prepares its labels, trains the tiny LiDAR-camera fusion teacher and the tiny camera-only
baseline with their preset recipes, evaluates both on the test towns, and writes a table,
``results.json`` and pictures. Distillation joins it in its own issue.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from bridgeta.bench.baselines import train_and_evaluate
from bridgeta.config import list_presets, load_config
from bridgeta.data.cache import LabelCache
from bridgeta.data.prepare import prepare_dataroot
from bridgeta.data.show import render_sample_picture
from bridgeta.data.synth.generate import VERSION, generate_dataroot
from bridgeta.models.bev_model import build_model
from bridgeta.models.cost import measure_model_cost

MODELS = (("teacher", "tiny-lc"), ("camera-only", "tiny-c"))


def format_table(results: dict[str, dict]) -> str:
    names = list(results)
    classes = list(next(iter(results.values()))["iou"])
    lines = [f"{'IoU (test towns)':<18}" + "".join(f"{n:>14}" for n in names)]
    for name in classes:
        lines.append(f"{name:<18}" + "".join(f"{results[m]['iou'][name]:>14.3f}" for m in names))
    lines.append(f"{'mIoU':<18}" + "".join(f"{results[m]['miou']:>14.3f}" for m in names))
    for condition in ("day", "night", "rain"):
        cells = []
        for m in names:
            value = results[m]["by_condition"][condition]["miou"]
            cells.append(f"{value:>14.3f}" if value is not None else f"{'-':>14}")
        lines.append(f"{'mIoU ' + condition:<18}" + "".join(cells))
    for band in results[names[0]]["by_range"]:
        cells = [f"{results[m]['by_range'][band]['miou']:>14.3f}" for m in names]
        lines.append(f"{'mIoU ' + band + ' m':<18}" + "".join(cells))
    return "\n".join(lines)


def run_demo(
    out_dir: Path, scenes: int = 10, duration: float = 20.0, seed: int = 0, epochs: int | None = None
) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    dataroot = out_dir / "world"
    print(f"== 1/4 synthetic world: {scenes} scenes of {duration:.0f} s, train/val/test in different towns ==")
    if (dataroot / VERSION).exists():
        print(f"reusing {dataroot}")
    else:
        world = generate_dataroot(dataroot, scenes, seed=seed, preset="tiny", duration=duration)
        print(f"{world.samples} samples, {world.sweeps} LiDAR sweeps, {world.annotations} boxes, "
              f"{world.seconds:.0f} s ({world.samples_per_second:.1f} samples/s)")
    cache = LabelCache(prepare_dataroot(dataroot, VERSION, progress=False))
    sample_picture = render_sample_picture(cache, len(cache) // 2, out_dir / "sample.png")
    print(f"samples per split {cache.meta['counts']}; one sample drawn in {sample_picture}")

    print("\n== 2/4 model zoo: parameters and MACs at each preset's input size ==")
    costs = {}
    for name in tqdm(list_presets(), desc="measuring presets", unit="preset"):
        cost = measure_model_cost(build_model(load_config(name)))
        costs[name] = {"params": cost.params, "macs": cost.macs, "input": cost.input_description}
    print(f"{'preset':<18}{'params (M)':>12}{'GMACs':>10}  input")
    for name, cost in costs.items():
        print(f"{name:<18}{cost['params'] / 1e6:>12.2f}{cost['macs'] / 1e9:>10.2f}  {cost['input']}")

    print("\n== 3/4 training on the train towns (preset recipes) ==")
    overrides = [f"train.epochs={epochs}"] if epochs else []
    runs = {}
    for role, preset in MODELS:
        print(f"-- {role}: {preset}")
        # Same layout as `bridgeta bench baselines --runs DIR/runs`, which then reuses these runs.
        runs[role] = train_and_evaluate(preset, dataroot, out_dir / "runs" / f"{preset}-seed{seed}", seed, overrides)

    print("\n== 4/4 evaluation on the test towns ==")
    tests = {role: run["test"] for role, run in runs.items()}
    table = format_table(tests)
    print(table)
    (out_dir / "table.txt").write_text(table + "\n")
    pictures = _prediction_pictures(out_dir, cache, seed)

    results = {
        "world": {"dataroot": str(dataroot), "samples_per_split": cache.meta["counts"]},
        "models": {role: {"preset": preset, **runs[role]} for role, preset in MODELS},
        "presets": costs,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'table.txt'}, {sample_picture}, "
          + ", ".join(str(p) for p in pictures))
    return results


def _prediction_pictures(out_dir: Path, cache: LabelCache, seed: int) -> list[Path]:
    """Prediction vs ground truth of every model on one day and one night test sample."""
    from bridgeta.engine.viz import render_prediction

    test = [i for i in range(len(cache)) if cache.record(i)["split"] == "test"]
    pictures = []
    for condition in ("day", "night"):
        matching = [i for i in test if cache.record(i)["condition"] == condition]
        if not matching:
            continue
        token = cache.tokens[matching[len(matching) // 2]]
        for role, preset in MODELS:
            path = out_dir / f"prediction_{role}_{condition}.png"
            run = out_dir / "runs" / f"{preset}-seed{seed}"
            pictures.append(render_prediction(run, None, None, token, path, split="test"))
    return pictures
