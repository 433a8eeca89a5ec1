"""The main job on the embedded default.

Until the synthetic world and the training engine exist, the demo runs the largest end-to-end
path the foundation has: it measures every preset's parameters and MACs, then fits the tiny
fusion teacher and the tiny camera-only model to one fixed batch (the "overfit one batch" sanity
check) with the real focal loss and map metric, and writes a table, ``results.json`` and a
picture of labels vs predictions.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bridgeta.config import list_presets, load_config
from bridgeta.geometry import BEVGrid
from bridgeta.losses import map_segmentation_loss
from bridgeta.metrics import MapMetric
from bridgeta.models.bev_model import build_model
from bridgeta.models.cost import measure_model_cost
from bridgeta.rig import reference_inputs

log = logging.getLogger(__name__)


def toy_map_labels(grid: BEVGrid, classes: tuple[str, ...], batch_size: int) -> torch.Tensor:
    """A fixed intersection-like layout in BEV: ``(B, K, X, Y)`` booleans, (C, X, Y) per sample."""
    x = grid.cell_centers("x")[:, None]
    y = grid.cell_centers("y")[None, :]
    road = (y.abs() < 7) | (x.abs() < 7)
    layers = {
        "drivable_area": road,
        "ped_crossing": (x > 8) & (x < 12) & (y.abs() < 7),
        "walkway": ((y.abs() > 7) & (y.abs() < 10)) & ~(x.abs() < 7),
        "stop_line": (x > 12) & (x < 13) & (y < 0) & (y > -7),
        "carpark_area": (x < -25) & (x > -45) & (y > 15) & (y < 35),
        "divider": ((y.abs() < 0.6) & (x.abs() > 7)) | ((x.abs() < 0.6) & (y.abs() > 7)),
    }
    labels = torch.stack([layers[name].expand(grid.shape) for name in classes])
    return labels.unsqueeze(0).expand(batch_size, -1, -1, -1).clone()


def overfit_one_batch(preset: str, steps: int, batch_size: int = 1, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    config = load_config(preset)
    model = build_model(config)
    camera = config.model.camera
    inputs = reference_inputs(
        batch_size,
        tuple(camera.image_size) if camera else None,
        num_cameras=camera.num_cameras if camera else 1,
        with_lidar=config.model.lidar is not None,
        points_per_sample=20_000,
    )
    labels = toy_map_labels(model.output_grid, model.classes, batch_size)
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


def run_demo(out_dir: Path, steps: int = 60) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    print("== model zoo: parameters and MACs at each preset's input size ==")
    costs = {}
    for name in tqdm(list_presets(), desc="measuring presets", unit="preset"):
        cost = measure_model_cost(build_model(load_config(name)))
        costs[name] = {"params": cost.params, "macs": cost.macs, "input": cost.input_description}
    print(f"{'preset':<18}{'params (M)':>12}{'GMACs':>10}  input")
    for name, cost in costs.items():
        print(f"{name:<18}{cost['params'] / 1e6:>12.2f}{cost['macs'] / 1e9:>10.2f}  {cost['input']}")

    print(f"\n== overfit one fixed batch ({steps} steps): focal loss and map metric end to end ==")
    fits = [overfit_one_batch(name, steps) for name in ("tiny-lc", "tiny-c")]
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
        "presets": costs,
        "overfit_one_batch": [
            {k: v for k, v in fit.items() if k not in ("probabilities", "labels")} for fit in fits
        ],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out_dir / 'results.json'} and {picture}")
    return results
