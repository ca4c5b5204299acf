"""The data pipeline's entry point: ``prepare`` the split (``data_prepare``, ``data_fetch``), ``load_cache``
it (``data_cache``), iterate a ``DeviceLoader``: batches from the uint8 cache, per-epoch work on the device.

    python common/data.py prepare --root data [--url URL | --zip FILE | --source DIR] [--val_fraction 0.2]
                                  [--seed 42] [--test_fraction 0.2]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from pathlib import Path
from typing import Iterator, Sequence

if __package__ in (None, ""):  # run as `python common/data.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.augment import crop_flip, sample_crops, sample_flips
from common.config import add_dataclass_args, cli_main, from_namespace
from common.data_cache import decode_image, load_cache, split_changes, split_digests
from common.data_fetch import DATASET_URL, DataError
from common.data_prepare import PrepareConfig, prepare

__all__ = ["DataError", "decode_image", "load_cache", "prepare", "split_changes", "split_digests"]

# The cache stays on the GPU only if this much memory is still free afterwards (model, activations).
GPU_MARGIN_BYTES = 4 << 30
GPU_MARGIN_FRACTION = 0.25


def fits_on_gpu(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` fit on the device with the margin to spare: PyTorch's cached but unallocated
    memory counts as free, a per-process memory fraction (a sweep worker) as the GPU. CPU and MPS: always."""
    if device.type not in ("cuda", "xpu"):
        return True
    memory = getattr(torch, device.type)  # torch.cuda and torch.xpu answer alike
    (free, total), allocated = memory.mem_get_info(device), memory.memory_allocated(device)
    if device.type == "cuda":
        total = int(total * torch.cuda.get_per_process_memory_fraction(device))
    free = min(free + memory.memory_reserved(device) - allocated, total - allocated)
    return nbytes + max(GPU_MARGIN_BYTES, int(GPU_MARGIN_FRACTION * total)) <= free


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``[N, H, W, 3]`` pixels in [0, 255] -> the model input: float ``[N, 3, H, W]``, (x/255 - mean)/std."""
    mean, std = (torch.as_tensor(v, dtype=torch.float32, device=images.device) for v in (mean, std))
    return torch.addcmul(-mean / std, images.float(), 1 / (255 * std)).permute(0, 3, 1, 2)


class DeviceLoader:
    """Batches ``(x, y)`` from a uint8 ``[N, S, S, 3]`` array: ``x`` float32 ``[B, 3, S, S]`` normalised on
    ``device``, ``y`` int64. Training shuffles and drops the last partial batch; evaluation yields every
    sample once, the last batch padded with label -1. Shuffles and crops are a pure function of (seed,
    epoch); each of ``world_size`` ranks gets a disjoint share with as many batches. The array lives on the
    device when it fits (``fits_on_gpu``), else each batch goes through pinned memory (``prefetch``)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        device: str | torch.device,
        *,
        train: bool,
        augment: bool = False,
        seed: int = 0,
        mean: Sequence[float],
        std: Sequence[float],
        channels_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        images, labels = torch.as_tensor(images), torch.as_tensor(labels)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, S, S, 3], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1] or not 0 <= rank < world_size or batch_size < 1:
            got = f"{len(labels)} labels, {len(images)} images, rank {rank}/{world_size}"
            raise ValueError(f"DeviceLoader: {got}, batch_size {batch_size}")
        self.device, self.size, self.epoch = torch.device(device), images.shape[1], 0
        self.batch_size, self.train, self.augment, self.seed = batch_size, train, augment, seed
        self.channels_last, self.rank, self.world_size = channels_last, rank, world_size
        self.prefetch = not fits_on_gpu(images.nbytes, self.device)
        self.images = images if self.prefetch else images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32, device=self.device) for v in (mean, std))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:  # training drops the last partial batch, evaluation pads it
        n, b, ranks = len(self.labels), self.batch_size, self.world_size
        return n // (b * ranks) if self.train else math.ceil(math.ceil(n / ranks) / b)

    def _plan(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's sample indices ``[batches, B]`` (-1: padding) and, when augmenting, crops and flips."""
        n, batches, b = len(self.labels), len(self), self.batch_size
        if not self.train:
            per_rank = -(-n // self.world_size)
            start, stop = min(self.rank * per_rank, n), min((self.rank + 1) * per_rank, n)
            indices = torch.full((batches * b,), -1, dtype=torch.int64)
            indices[: stop - start] = torch.arange(start, stop)
            return indices.view(batches, b), None, None
        # A well-mixed 63-bit seed that depends only on (seed, epoch).
        digest = hashlib.sha256(f"{self.seed}:{self.epoch}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
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
        on_device = indices.to(self.device)
        if self.prefetch:
            batches = self._prefetched(indices)
        else:  # index_select: 9x faster than [] on the CPU
            batches = (self.images.index_select(0, i.clamp(min=0)) for i in on_device)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for step, pixels in enumerate(batches):
            if crops is not None:
                pixels = crop_flip(pixels, crops[step], flips[step], self.size)
            x = normalise(pixels, self.mean, self.std).contiguous(memory_format=memory_format)
            index = on_device[step]
            yield x, torch.where(index >= 0, self.labels[index.clamp(min=0)], -1)  # label -1 marks padding

    def _prefetched(self, indices: torch.Tensor) -> Iterator[torch.Tensor]:
        """uint8 batches gathered into pinned host memory and copied one batch ahead (in stream order): the
        host gathers the next batch while the device works. Pinned blocks are reused once copied."""
        shape, pin, pending = (indices.shape[1], *self.images.shape[1:]), self.device.type != "cpu", None
        for index in indices:
            host = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
            torch.index_select(self.images, 0, index.clamp(min=0), out=host)
            batch = host.to(self.device, non_blocking=True)
            if pending is not None:
                yield pending
            pending = batch
        if pending is not None:
            yield pending


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="iNaturalist-12K data preparation")
    subparsers = parser.add_subparsers(dest="command", required=True)
    about = "download, extract, validate and split the data; again: refresh from its source, moving no image"
    add_dataclass_args(subparsers.add_parser("prepare", help=about), PrepareConfig, "prepare")
    return parser


def config_from_args(argv: list[str] | None = None) -> PrepareConfig:
    config = from_namespace(PrepareConfig, get_args_parser().parse_args(argv))
    if sum([config.zip is not None, config.url != DATASET_URL, config.source is not None]) > 1:
        raise ValueError("give one of --source (your own folders), --zip or --url (the archive)")
    return config


def main(argv: list[str] | None = None) -> int:
    return cli_main(config_from_args, lambda config: prepare(refresh=True, **vars(config)), argv)


if __name__ == "__main__":
    sys.exit(main())
