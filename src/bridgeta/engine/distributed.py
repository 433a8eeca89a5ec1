"""Process-group setup from the torchrun environment, and the few collectives training needs.

``torchrun --nproc_per_node N ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the
rendezvous address) for every process; :func:`init_distributed` reads them and joins the group
(``nccl`` on CUDA, ``gloo`` on CPU). Without them, or with ``WORLD_SIZE=1``, training runs as a
single process and every helper here is a no-op, so the trainer has one code path.

Every helper takes the :class:`DistributedContext` instead of querying ``torch.distributed``
globals, which keeps "is this distributed?" decided in one place.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


@dataclass
class DistributedContext:
    """Where this process sits in the job. ``owns_group``: :func:`cleanup` destroys the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and logs, so N processes do not write N copies."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed() -> DistributedContext:
    """Join the process group that torchrun describes, or describe a single process.

    An already initialised group (a caller that set it up itself) is reused and left for that
    caller to destroy. Each process uses ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
    """
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return DistributedContext(
            dist.get_rank(), dist.get_world_size(), local_rank, _default_device(local_rank)
        )
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1 or "RANK" not in os.environ:
        return DistributedContext(device=_default_device(0))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _default_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # device_id binds NCCL communicators to this process's GPU at creation (no lazy guessing).
    dist.init_process_group(
        backend, rank=rank, world_size=world_size, device_id=device if device.type == "cuda" else None
    )
    log.info("process group: rank %d of %d, %s, backend %s", rank, world_size, device, backend)
    return DistributedContext(rank, world_size, local_rank, device, owns_group=True)


def wrap_model(model: nn.Module, ctx: DistributedContext) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model`` itself.

    Callers keep their reference to the bare ``model`` for saving and evaluation: the wrapper is
    only used for the training forward pass, so no ``.module.`` prefix reaches a state dict.
    BatchNorm stays per-process (as in BEVFusion); DDP broadcasts rank 0's running statistics
    before every forward, so all ranks (and the saved model) carry rank 0's.
    """
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Sum ``tensor`` over processes in place (counts, loss sums); returns it for chaining."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Mean of ``tensor`` over processes, in place (floating tensors only)."""
    return all_reduce_sum(tensor, ctx).div_(ctx.world_size)


def all_gather_bytes(data: bytes, ctx: DistributedContext) -> list[bytes]:
    """Every process's ``data``, in rank order, on every process (sizes may differ).

    Built from two tensor all-gathers (lengths, then zero-padded payloads) rather than
    ``all_gather_object``, which pickles.
    """
    if not ctx.distributed:
        return [data]
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.long, device=ctx.device)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    lengths = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=ctx.device)
    padded[: payload.numel()] = payload.to(ctx.device)
    chunks = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(chunks, padded)
    return [chunk[:length].cpu().numpy().tobytes() for chunk, length in zip(chunks, lengths)]


def barrier(ctx: DistributedContext) -> None:
    if ctx.distributed:
        dist.barrier()


def cleanup(ctx: DistributedContext, finished: bool = True) -> None:
    """Destroy the process group if :func:`init_distributed` created it.

    After a finished run every rank first waits at a barrier: a rank that tore down its gloo
    connections while its peer was still writing the last outputs was seen to abort (``terminate
    called without an active exception``, SIGABRT) in a 2-process CPU run. After a failure
    (``finished=False``) there is no barrier, since the peers may be blocked in another collective
    and would wait out the group's timeout; torchrun stops them when this rank exits.
    """
    if ctx.owns_group and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
