"""Parameter and MAC counts, measured by PyTorch's own ``torch.utils.flop_counter``.

No hand-written formulas: the counter sees every matmul/convolution the forward pass really
executes. It counts a multiply-accumulate as 2 FLOPs, so MACs = FLOPs / 2. Operations it does not
model (scatter/index-add in BEV pooling, element-wise ops, softmax) are not counted, the same
convention as the GFLOPs usually published for BEV models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bridgeta.config import ModelConfig
from bridgeta.models.bev_model import BEVModel
from bridgeta.models.types import BEVInputs
from bridgeta.rig import reference_inputs

# Points per sample for LiDAR models: 10 sweeps of a 34k-point nuScenes LIDAR_TOP scan.
REFERENCE_POINTS_PER_SAMPLE = 340_000


@dataclass
class BlockCost:
    name: str
    params: int
    macs: int


@dataclass
class ModelCost:
    params: int
    macs: int
    blocks: list[BlockCost] = field(default_factory=list)
    input_description: str = ""

    def as_dict(self) -> dict:
        return {
            "params": self.params,
            "macs": self.macs,
            "input": self.input_description,
            "blocks": {b.name: {"params": b.params, "macs": b.macs} for b in self.blocks},
        }


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _blocks(model: BEVModel) -> list[tuple[str, nn.Module]]:
    """The architecture's main blocks, in data-flow order."""
    blocks: list[tuple[str, nn.Module]] = []
    if model.camera_encoder is not None:
        for part in ("backbone", "neck", "vtransform"):
            blocks.append((f"camera_encoder.{part}", getattr(model.camera_encoder, part)))
    if model.lidar_encoder is not None:
        blocks.append(("lidar_encoder", model.lidar_encoder))
    if model.fuser is not None:
        blocks.append(("fuser", model.fuser))
    if model.residual_branch is not None:
        blocks.append(("residual_branch", model.residual_branch))
    if model.feature_fusion is not None:
        blocks.append(("feature_fusion", model.feature_fusion))
    blocks += [
        ("decoder.backbone", model.decoder.backbone),
        ("decoder.neck", model.decoder.neck),
        ("head", model.head),
    ]
    if model.object_head is not None:
        blocks.append(("object_head", model.object_head))
    return blocks


def model_reference_inputs(config: ModelConfig, batch_size: int = 1) -> BEVInputs:
    """Random inputs of the size ``config`` consumes: its cameras and image size, and a
    nuScenes-sized LiDAR sweep stack when it reads LiDAR (what costs are measured on)."""
    camera = config.camera
    return reference_inputs(
        batch_size,
        tuple(camera.image_size) if camera is not None else None,
        num_cameras=camera.num_cameras if camera is not None else 1,
        with_lidar=config.lidar is not None,
        points_per_sample=REFERENCE_POINTS_PER_SAMPLE,
    )


@torch.no_grad()
def measure_model_cost(model: BEVModel, batch_size: int = 1) -> ModelCost:
    """Params and MACs of one forward pass at the model's configured input size."""
    config = model.config
    image_size = tuple(config.camera.image_size) if config.camera is not None else None
    num_cameras = config.camera.num_cameras if config.camera is not None else 0
    inputs = model_reference_inputs(config, batch_size)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, depth=None)
        with counter:
            model(inputs)
    finally:
        model.train(was_training)

    flop_counts = counter.get_flop_counts()
    root = type(model).__name__
    blocks = []
    for name, module in _blocks(model):
        flops = sum(flop_counts.get(f"{root}.{name}", {}).values())
        blocks.append(BlockCost(name, count_parameters(module), int(flops) // 2))

    parts = []
    if image_size is not None:
        parts.append(f"{num_cameras}x3x{image_size[0]}x{image_size[1]} images")
    if config.lidar is not None:
        parts.append(f"{REFERENCE_POINTS_PER_SAMPLE} LiDAR points")
    return ModelCost(
        params=count_parameters(model),
        macs=int(counter.get_total_flops()) // 2,
        blocks=blocks,
        input_description=f"batch {batch_size}: " + ", ".join(parts),
    )


def format_cost(name: str, cost: ModelCost) -> str:
    lines = [
        f"model {name}  ({cost.input_description})",
        f"{'block':<26}{'params (M)':>12}{'GMACs':>10}",
    ]
    for block in cost.blocks:
        lines.append(f"{block.name:<26}{block.params / 1e6:>12.2f}{block.macs / 1e9:>10.2f}")
    lines.append(f"{'total':<26}{cost.params / 1e6:>12.2f}{cost.macs / 1e9:>10.2f}")
    return "\n".join(lines)
