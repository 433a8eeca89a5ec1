"""The main job on the embedded default.

Until the training engine exists, the demo runs the largest end-to-end path there is: it
generates a small synthetic world in nuScenes format, prepares it (labels cached once), draws one
sample, measures every preset's parameters and MACs, then fits the tiny fusion teacher and the
tiny camera-only model to one real training batch (the "overfit one batch" sanity check) with
the real loader, focal loss and map metric, and writes a table, ``results.json`` and pictures.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bridgeta.config import list_presets, load_config
from bridgeta.data.cache import LabelCache
from bridgeta.data.dataset import BEVMapDataset, DataConfig, collate_bev
from bridgeta.data.prepare import prepare_dataroot
from bridgeta.data.show import render_sample_picture
from bridgeta.data.synth.generate import VERSION, generate_dataroot
from bridgeta.losses import map_segmentation_loss
from bridgeta.metrics import MapMetric
from bridgeta.models.bev_model import build_model
from bridgeta.models.cost import measure_model_cost

log = logging.getLogger(__name__)


def overfit_one_batch(dataroot: Path, preset: str, steps: int, batch_size: int = 2, seed: int = 0) -> dict:
    """Fit ``preset`` to one (un-augmented) training batch; report loss and mIoU on that batch."""
    torch.manual_seed(seed)
    config = load_config(preset)
    model = build_model(config)
    image_size = tuple(config.model.camera.image_size) if config.model.camera else (0, 0)
    dataset = BEVMapDataset(
        DataConfig(dataroot=str(dataroot)), image_size, model.output_grid, model.classes,
        train=False, modalities=model.modalities, split="train",
    )
    inputs, labels, _ = collate_bev([dataset[i] for i in range(batch_size)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    model.train()
    losses = []
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=f"overfit {preset}", unit="step"):
        terms = map_segmentation_loss(model(inputs).logits, labels, model.classes)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    step_time = (time.perf_counter() - start) / steps

    model.eval()
    metric = MapMetric(model.classes)
    with torch.no_grad():
        probabilities = model(inputs).logits.sigmoid()
    metric.update(probabilities, labels)
    scores = metric.compute()
    return {
        "preset": preset,
        "steps": steps,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "step_time_s": step_time,
        "miou": scores["miou"],
        "iou": scores["iou"],
        "probabilities": probabilities[0],
        "labels": labels[0],
    }


def save_picture(results: list[dict], classes: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 1 + len(results)
    fig, axes = plt.subplots(rows, len(classes), figsize=(2.2 * len(classes), 2.3 * rows))
    panels = [("label", results[0]["labels"].float())]
    panels += [(r["preset"], r["probabilities"]) for r in results]
    for row, (title, maps) in enumerate(panels):
        for col, name in enumerate(classes):
            ax = axes[row, col]
            # (X, Y) -> image with forward (X) up and left (Y) to the left.
            ax.imshow(maps[col].flip(0, 1).numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
            if col == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out_dir: Path, steps: int = 60, scenes: int = 6, duration: float = 8.0) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    dataroot = out_dir / "world"
    print(f"== synthetic world: {scenes} scenes of {duration:.0f} s in separate train/val/test towns ==")
    if (dataroot / VERSION).exists():
        print(f"reusing {dataroot}")
    else:
        world = generate_dataroot(dataroot, scenes, seed=0, preset="tiny", duration=duration)
        print(f"{world.samples} samples, {world.sweeps} LiDAR sweeps, {world.annotations} boxes, "
              f"{world.seconds:.0f} s ({world.samples_per_second:.1f} samples/s)")
    cache_dir = prepare_dataroot(dataroot, VERSION, progress=False)
    cache = LabelCache(cache_dir)
    sample_picture = render_sample_picture(cache, len(cache) // 2, out_dir / "sample.png")
    print(f"samples per split {cache.meta['counts']}; picture of one sample: {sample_picture}")

    print("\n== model zoo: parameters and MACs at each preset's input size ==")
    costs = {}
    for name in tqdm(list_presets(), desc="measuring presets", unit="preset"):
        cost = measure_model_cost(build_model(load_config(name)))
        costs[name] = {"params": cost.params, "macs": cost.macs, "input": cost.input_description}
    print(f"{'preset':<18}{'params (M)':>12}{'GMACs':>10}  input")
    for name, cost in costs.items():
        print(f"{name:<18}{cost['params'] / 1e6:>12.2f}{cost['macs'] / 1e9:>10.2f}  {cost['input']}")

    print(f"\n== overfit one real training batch ({steps} steps): loader, focal loss, map metric ==")
    fits = [overfit_one_batch(dataroot, name, steps) for name in ("tiny-lc", "tiny-c")]
    print(f"{'preset':<10}{'loss first':>12}{'loss last':>12}{'mIoU':>8}{'s/step':>9}")
    for fit in fits:
        print(
            f"{fit['preset']:<10}{fit['loss_first']:>12.4f}{fit['loss_last']:>12.4f}"
            f"{fit['miou']:>8.3f}{fit['step_time_s']:>9.2f}"
        )
    classes = load_config("tiny-c").model.head.classes
    picture = out_dir / "overfit_one_batch.png"
    save_picture(fits, classes, picture)

    results = {
        "world": {"dataroot": str(dataroot), "samples_per_split": cache.meta["counts"]},
        "presets": costs,
        "overfit_one_batch": [
            {k: v for k, v in fit.items() if k not in ("probabilities", "labels")} for fit in fits
        ],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out_dir / 'results.json'}, {sample_picture} and {picture}")
    return results
