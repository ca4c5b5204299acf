"""torchrun support: the process group and the few collectives the run needs (under a plain launch,
one process, and nothing to do).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

# How long the other ranks wait for rank 0 to download, extract, validate and decode the dataset. NCCL's
# own timeout (10 minutes by default) would abort them during a first run's download.
DATA_WAIT = timedelta(hours=3)
# Every collective's timeout: long enough for all ranks compiling a large Part B model at once.
COLLECTIVE_WAIT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_main = property(lambda self: self.rank == 0)
    enabled = property(lambda self: self.world_size > 1)


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_type == "cuda"
    if cuda and local_rank >= (gpus := torch.cuda.device_count()):
        started = os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)
        what = f"torchrun started {started} processes here but {gpus} CUDA GPU(s) are visible"
        raise ValueError(f"{what}; use --nproc_per_node {gpus} (one process per GPU)")
    if not dist.is_initialized():
        device_id = torch.device("cuda", local_rank) if cuda else None
        if cuda:
            torch.cuda.set_device(device_id)
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_WAIT, device_id=device_id)
    return DistInfo(rank, world_size, local_rank)


@contextlib.contextmanager
def process_group(device_type: str) -> Iterator[DistInfo]:
    """``init_distributed`` for the block, the group destroyed after it (sweeps run trials in one process)."""
    info = init_distributed(device_type)
    try:
        yield info
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()
            _long_wait_group.cache_clear()


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process; readable before the process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


@functools.lru_cache(maxsize=1)
def _long_wait_group():
    """Made by every rank on its first long wait, in the same order (new_group is collective)."""
    return dist.new_group(backend="gloo", timeout=DATA_WAIT)


def all_gather_object(value, info: DistInfo, *, long_wait: bool = False) -> list:
    """Every rank's ``value``, in rank order (``[value]`` for one process). With ``long_wait`` the
    ranks may wait up to ``DATA_WAIT`` for each other, on a CPU (gloo) group of their own."""
    if not info.enabled:
        return [value]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, value, group=_long_wait_group() if long_wait else None)
    return gathered


def broadcast_tensors(tensors, info: DistInfo) -> None:
    """Overwrite each tensor with rank 0's, in place (through a contiguous copy: channels_last weights)."""
    for tensor in tensors if info.enabled else []:
        buffer = tensor.contiguous()
        dist.broadcast(buffer, src=0)
        if buffer is not tensor:
            tensor.copy_(buffer)
