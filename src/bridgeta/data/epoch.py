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
