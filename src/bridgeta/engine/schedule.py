"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr_ratio * lr``.

The schedule is stepped once per *optimiser* step (not per micro-batch, not per epoch), so its
shape does not depend on gradient accumulation or on the number of processes. BEVFusion uses the
same shape (mmcv's linear warm-up + ``CosineAnnealing`` with ``min_lr_ratio=1e-3``).
"""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate for the update that follows ``step`` completed updates.

    Warm-up: ``(step + 1) / warmup_steps``, so the first update already moves the weights (a zero
    learning rate would waste it). Then cosine from 1 to ``min_lr_ratio`` over the remaining
    ``total_steps - warmup_steps`` updates; past ``total_steps`` it stays at ``min_lr_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule(LRScheduler):
    """:func:`lr_factor` as a torch LR scheduler (``last_epoch`` counts optimiser steps).

    The schedule's settings are configuration, not state: :meth:`state_dict` leaves them out, so a
    run resumed with a longer ``total_steps`` (more epochs) follows the new schedule from the
    restored step instead of the one it was started with.
    """

    _SETTINGS = ("warmup_steps", "total_steps", "min_lr_ratio")

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
    ) -> None:
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer)

    def factor(self) -> float:
        return lr_factor(self.last_epoch, self.warmup_steps, self.total_steps, self.min_lr_ratio)

    def get_lr(self) -> list[float]:
        factor = self.factor()
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for name in self._SETTINGS:
            state.pop(name, None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step count, then set the optimiser's rates from *this* schedule's settings."""
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in self._SETTINGS})
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs
