"""The epoch a dataset draws its augmentation for, shared with the loader's worker processes.

A DataLoader with persistent workers hands each worker its copy of the dataset once, when the first
epoch starts. An epoch kept as a plain attribute therefore stays, in the workers, at the epoch the
run started in, whatever ``set_epoch`` later sets in the training process: every later epoch
replayed the first one's augmentation, and a resumed run drew another stream than the run it
continues. The number lives in shared memory instead, so a worker reads the epoch the training loop
set. The loop sets it before it starts an epoch's iterator, and a worker is only sent that epoch's
indices afterwards, so no worker reads it mid-change.
"""

from __future__ import annotations

from typing import Any

import torch


class SharedEpoch:
    """An integer in shared memory: written by the training process, read by its loader workers."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = torch.zeros((), dtype=torch.int64).share_memory_()
        self.set(epoch)

    def get(self) -> int:
        return int(self._value)

    def set(self, epoch: int) -> None:
        self._value.fill_(int(epoch))


class EpochStreams:
    """What a training dataset whose augmentation is keyed by the epoch needs: ``set_epoch``,
    the epoch its workers see, and the epoch whose stream is drawn (``augment.draws``). The
    dataset sets ``self._epoch = SharedEpoch()`` and has a ``config`` with ``augment``."""

    _epoch: SharedEpoch
    config: Any

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (before creating the epoch's iterator)."""
        self._epoch.set(epoch)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    @property
    def augment_epoch(self) -> int:
        """The epoch whose augmentation stream is drawn (0 for every epoch with ``augment.draws: once``)."""
        return self.epoch if self.config.augment.draws == "every_epoch" else 0
