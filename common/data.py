"""The data pipeline's entry point: ``prepare`` the split, ``load_cache`` it, iterate a ``DeviceLoader``.

    python common/data.py prepare --root data [--url URL | --zip FILE] [--val_fraction 0.2] [--seed 42]

Preparation lives in ``data_prepare`` (download and extraction in ``data_fetch``), the decode-once
cache in ``data_cache``, augmentation in ``augment``; this module re-exports their public names and
holds the loader, which serves batches from the uint8 cache with all per-epoch work on the device.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys
import threading
import weakref
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

if __package__ in (None, ""):  # run as `python common/data.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from common.augment import crop_flip, one_thread, resize_crops, sample_crops, sample_flips, to_float
from common.config import add_dataclass_args, cli_main, from_namespace
from common.data_cache import CachedSplit, decode_image, load_cache, open_rgb
from common.data_fetch import DATASET_URL, DataError
from common.data_prepare import prepare

__all__ = ["DATASET_URL", "CachedSplit", "DataError", "DeviceLoader",
           "decode_image", "load_cache", "open_rgb", "prepare"]

# The cache stays on the GPU only if this much memory is still free afterwards (model, activations).
GPU_MARGIN_BYTES = 4 << 30
GPU_MARGIN_FRACTION = 0.25


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit generator seed that depends only on (seed, epoch)."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def fits_on_gpu(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` fit on the GPU with the margin to spare. Memory PyTorch has cached but not
    allocated (an earlier loader or sweep trial) is free to us, though ``mem_get_info`` counts it as used."""
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return nbytes + max(GPU_MARGIN_BYTES, int(GPU_MARGIN_FRACTION * total)) <= free


def gather_rows(rows: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``rows[index]`` for a 2-D tensor, into ``out`` if given.

    On CPU numpy's take is used: torch's index_select copies uint8 rows about 10x slower (measured
    with torch 2.14 on a 2-core EPYC: 13 ms against 0.4 ms for 64 rows of 224x224x3). Its default
    mode copies through a temporary when given ``out`` (1.4 ms); bounds are checked here instead."""
    if rows.device.type != "cpu":
        return torch.index_select(rows, 0, index, out=out)
    index = index.numpy()
    if len(index) and (index.min() < 0 or index.max() >= len(rows)):
        raise IndexError(f"row index out of range [0, {len(rows)}): {index.min()}..{index.max()}")
    taken = np.take(rows.numpy(), index, axis=0, out=None if out is None else out.numpy(), mode="clip")
    return out if out is not None else torch.from_numpy(taken)


def share_out(work: Callable[[int, int], None], n: int, threads: int) -> None:
    """``work(start, stop)`` over ``threads`` contiguous ranges of ``range(n)``, the first in this thread,
    the others on helper threads, each with one intra-op thread and this thread's inference mode;
    returns when all are done, raising the first error, if any.

    Whole ranges per thread, not torch's intra-op threads: a 64-image batch at 224 is 64 small ops
    per stage, and OpenMP's threads, which spin for a while after each parallel op, kept a helper
    thread from its core (2-core EPYC, torch 2.14: 14.5-15.2 ms per batch with torch's two threads
    for the whole-batch stages and two resize threads, 13.4-13.7 ms with one resize thread, 10.7-10.9
    ms with every stage shared out this way)."""
    threads = max(1, min(threads, n))
    bounds = [n * k // threads for k in range(threads + 1)]
    ranges = list(zip(bounds[:-1], bounds[1:]))
    inference = torch.is_inference_mode_enabled()  # thread-local: the helpers take the caller's

    def one(start: int, stop: int) -> None:
        with one_thread(), torch.inference_mode(inference):
            work(start, stop)

    pending = [_helper_threads(threads - 1, os.getpid()).submit(one, start, stop) for start, stop in ranges[1:]]
    try:
        one(*ranges[0])
    finally:
        futures.wait(pending)  # the buffers stay in use until every helper is done, error or not
    for task in pending:
        task.result()


@functools.lru_cache(maxsize=None)
def _helper_threads(count: int, pid: int) -> ThreadPoolExecutor:
    """``count`` helper threads, started at once, each set to one intra-op thread; one pool per process
    (``pid``: a forked child has none of its parent's threads).

    Torch keeps the intra-op thread count per thread (OpenMP), read on a thread's first parallel op
    from a process-wide value that ``torch.set_num_threads`` also writes: each helper reads it, then
    sets its own to one, and the caller's value is written back once every helper has done so."""
    threads = torch.get_num_threads()
    started = threading.Barrier(count + 1)

    def start() -> None:
        torch.get_num_threads()  # take the inherited setting now, so that it cannot replace the 1 below
        torch.set_num_threads(1)
        started.wait()

    pool = ThreadPoolExecutor(count, thread_name_prefix="DeviceLoader", initializer=start)
    for _ in range(count):  # no thread is idle while they wait at the barrier: each task starts a new one
        pool.submit(lambda: None)
    started.wait()
    torch.set_num_threads(threads)
    return pool


class HostBuffers:
    """Float32 batch buffers on the CPU, each handed out again once nothing refers to it any more.

    A fresh 38 MB batch (64 images at 224) costs about 9,000 page faults when it is first written;
    writing into a buffer that is already mapped made the uint8 to float conversion 2x faster (2-core
    EPYC, torch 2.14: 2.0 ms against 4.3 ms). A buffer is handed out as a tensor over a numpy view of
    it; the view lives exactly as long as some tensor shares that memory (the tensor's storage holds
    it), so a weak reference to the view says whether the consumer still holds the batch, any slice
    of it, or its autograd graph. Up to ``keep`` buffers are kept; beyond that, batches are new.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.slots: list[tuple[np.ndarray, weakref.ref]] = []

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 tensor of ``shape`` over memory nobody else refers to (contents undefined)."""
        free = [i for i, (array, handed_out) in enumerate(self.slots) if array.shape == shape and handed_out() is None]
        if not free and len(self.slots) >= self.keep:
            return torch.from_numpy(np.empty(shape, dtype=np.float32))
        slot = free[0] if free else len(self.slots)
        array = self.slots[slot][0] if free else np.empty(shape, dtype=np.float32)
        view = array.view()
        self.slots[slot:slot + 1] = [(array, weakref.ref(view))]  # replaces the slot, or appends one
        return torch.from_numpy(view)


class DeviceLoader:
    """Batches ``(x, y)`` from a uint8 ``[N, S, S, 3]`` array: ``x`` float32 ``[B, 3, S, S]`` normalised on
    ``device``, ``y`` int64. Training shuffles and drops the last partial batch; evaluation yields every
    sample once, the last batch padded to full size with label -1. Shuffling and augmentation depend only
    on (seed, epoch); with ``world_size`` > 1 each rank gets a disjoint share with equal batch counts.

    On CUDA the whole array moves to the GPU when it fits with a margin; otherwise each batch is
    gathered into pinned host memory and copied ahead, one batch early, on a side stream. On the CPU
    each batch is shared out by image over ``threads`` threads (default: torch's intra-op thread
    count), every stage with one intra-op thread, into buffers reused once the consumer lets go of
    them; the batches do not depend on ``threads``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: str | torch.device,
                 *, train: bool, augment: bool = False, seed: int = 0, mean: Sequence[float], std: Sequence[float],
                 channels_last: bool = True, rank: int = 0, world_size: int = 1, threads: int | None = None):
        images, labels = torch.as_tensor(images), torch.as_tensor(labels)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be a uint8 [N, S, S, 3] array, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if augment and not train:
            raise ValueError("augment=True applies to training loaders only; evaluation must see the images as they are")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values with std > 0, got mean={mean} std={std}")
        self.device = torch.device(device)
        self.batch_size, self.train, self.augment, self.seed = batch_size, train, augment, seed
        self.channels_last, self.rank, self.world_size = channels_last, rank, world_size
        self.threads = torch.get_num_threads() if threads is None else threads
        self.epoch = 0
        self.size = images.shape[1]
        self.images, self.prefetch = self._place(images)
        # One row per image: a gather is then one memcpy per image.
        self.rows = self.images.reshape(len(self.images), -1)
        self.labels = labels.to(self.device, torch.int64)
        # (x/255 - mean)/std = x*scale - shift, one fused pass over the batch seen as rows of one image
        # row (S pixels x 3 channels, the channels_last order) with scale and shift repeated to match:
        # a dense broadcast. A [1, 3, 1, 1] broadcast over the channels_last batch takes a strided path
        # (CPU, 64 images at 224, one thread: 2.2 ms against 17.5 ms for mul_ and sub_ that way).
        std_t, mean_t = torch.tensor(std, dtype=torch.float64), torch.tensor(mean, dtype=torch.float64)
        self.scale = (1.0 / (255.0 * std_t)).float().repeat(self.size).to(self.device)
        self.shift = (-mean_t / std_t).float().repeat(self.size).to(self.device)
        # CPU batches are built by threads into reused buffers; other devices run whole-batch ops. The
        # tests switch this off on the CPU to run the device path (its kernel is chosen by device).
        self.host_batches = self.device.type == "cpu"
        self.buffers = HostBuffers()

    def _place(self, images: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(where batches are gathered from, whether they need copying to the device)."""
        if self.device.type == "cpu":
            return images, False
        if self.device.type == "cuda" and not fits_on_gpu(images.nbytes, self.device):
            return images, True
        return images.to(self.device), False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.labels)
        if self.train:
            return n // (self.batch_size * self.world_size)
        per_rank = -(-n // self.world_size)
        return -(-per_rank // self.batch_size)

    def _plan(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's sample indices ``[batches, B]`` (-1 = padding) and, when augmenting, crops and flips."""
        n, batches, b = len(self.labels), len(self), self.batch_size
        if not self.train:
            per_rank = -(-n // self.world_size)
            start, stop = min(self.rank * per_rank, n), min((self.rank + 1) * per_rank, n)
            indices = torch.full((batches * b,), -1, dtype=torch.int64)
            indices[:stop - start] = torch.arange(start, stop)
            return indices.view(batches, b), None, None
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=generator)
        # Rank r takes positions r, r + W, r + 2W, ... of the epoch's permutation: disjoint shards.
        positions = torch.arange(self.rank, batches * b * self.world_size, self.world_size)
        indices = order[positions].view(batches, b)
        if not self.augment:
            return indices, None, None
        # Parameters for every position of the permutation, so each sample's crop does not depend on
        # how many ranks share the epoch.
        crops = sample_crops(n, self.size, self.size, generator)[positions].view(batches, b, 4)
        flips = sample_flips(n, generator)[positions].view(batches, b)
        return indices, crops.to(self.device), flips.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices, crops, flips = self._plan()
        host_indices = indices
        indices = indices.to(self.device)
        if self.host_batches:
            yield from self._cpu_batches(indices, crops, flips)
            return
        if self.prefetch:
            batches = self._prefetched(host_indices)
        else:
            shape = (self.batch_size, self.size, self.size, 3)
            batches = (gather_rows(self.rows, i.clamp(min=0)).view(shape) for i in indices)
        for step, raw in enumerate(batches):
            x = crop_flip(raw, crops[step], flips[step], self.size) if crops is not None else to_float(raw)
            self._normalise_(x)
            yield self._formatted(x), self._labels(indices[step])

    def _cpu_batches(self, indices: torch.Tensor, crops: torch.Tensor | None,
                     flips: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each batch is shared out over ``threads`` threads by image: gather from the cache, crop and
        resize (uint8), convert to float into a reused buffer and normalise."""
        shape = (self.batch_size, self.size, self.size, 3)
        gathered = torch.empty(shape, dtype=torch.uint8)  # refilled for every batch
        resized = torch.empty(shape, dtype=torch.uint8) if crops is not None else None
        for step, index in enumerate(indices):
            x = self.buffers.take(shape)  # float [B, S, S, 3]

            def work(start: int, stop: int) -> None:
                raw = gathered[start:stop]
                gather_rows(self.rows, index[start:stop].clamp(min=0), out=raw.view(stop - start, -1))
                if crops is not None:
                    raw = resize_crops(raw, crops[step, start:stop], flips[step, start:stop], self.size,
                                       out=resized[start:stop])
                self._normalise_(to_float(raw, out=x[start:stop]))

            share_out(work, len(index), self.threads)
            yield self._formatted(x.permute(0, 3, 1, 2)), self._labels(index)

    def _labels(self, index: torch.Tensor) -> torch.Tensor:
        """The labels of a batch's samples; -1 where the batch is padded (index -1)."""
        return torch.where(index >= 0, self.labels[index.clamp(min=0)], -1)

    def _prefetched(self, indices: torch.Tensor) -> Iterator[torch.Tensor]:
        """uint8 batches on the GPU, each copied from pinned memory on a side stream one batch ahead."""
        stream = torch.cuda.Stream(self.device)
        shape = (self.batch_size, self.size, self.size, 3)
        pinned = [torch.empty(shape, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        copied: list[torch.cuda.Event | None] = [None, None]

        def start_copy(step: int) -> tuple[torch.Tensor, torch.cuda.Event]:
            slot = step % 2
            if copied[slot] is not None:
                copied[slot].synchronize()  # the buffer's previous copy must finish before we overwrite it
            gather_rows(self.rows, indices[step].clamp(min=0), out=pinned[slot].view(len(pinned[slot]), -1))
            with torch.cuda.stream(stream):
                batch = pinned[slot].to(self.device, non_blocking=True)
                copied[slot] = torch.cuda.Event()
                copied[slot].record(stream)
            return batch, copied[slot]

        pending = start_copy(0) if len(indices) else None
        for step in range(len(indices)):
            batch, ready = pending
            if step + 1 < len(indices):
                pending = start_copy(step + 1)
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(ready)
            batch.record_stream(consumer)  # allocated on the side stream, used on this one
            yield batch

    def _normalise_(self, x: torch.Tensor) -> None:
        """In place, float ``[B, 3, S, S]`` with channels_last strides, values in [0, 255]."""
        rows = x.permute(0, 2, 3, 1).view(-1, self.size * 3)
        torch.addcmul(self.shift, rows, self.scale, out=rows)

    def _formatted(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)


@dataclass
class PrepareConfig:
    root: str = field(default="data", metadata={"help": "data folder: the original and the split go here"})
    url: str = field(default=DATASET_URL, metadata={"help": "where to download the archive from"})
    zip: str | None = field(default=None, metadata={"help": "use this already downloaded archive instead"})
    val_fraction: float = field(default=0.2, metadata={"help": "stratified fraction of train/ held out for validation"})
    seed: int = field(default=42, metadata={"help": "seed of the train/val split"})


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="iNaturalist-12K data preparation")
    commands = parser.add_subparsers(dest="command", required=True)
    add_dataclass_args(commands.add_parser("prepare", help="download, extract, validate and split the dataset"),
                       PrepareConfig, "prepare")
    return parser


def config_from_args(argv: list[str] | None = None) -> PrepareConfig:
    config = from_namespace(PrepareConfig, get_args_parser().parse_args(argv))
    if config.zip is not None and config.url != DATASET_URL:
        raise ValueError("give either --url or --zip, not both")
    return config


def main(argv: list[str] | None = None) -> int:
    return cli_main(config_from_args, lambda config: prepare(
        config.root, url=config.url, zip_path=config.zip, val_fraction=config.val_fraction, seed=config.seed), argv)


if __name__ == "__main__":
    sys.exit(main())
