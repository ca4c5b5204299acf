"""Data-path benchmark: the decode-once cache + DeviceLoader against ImageFolder + DataLoader.

Both sides serve the same generated 800x600 JPEGs at the same resolution with the same augmentation
(random resized crop, scale (0.25, 1), and horizontal flip) and batch size, in one process, one after
the other. The cache side's first epoch is reported separately (it also pages the cache file in, once
per run); its epoch rate is the median of the next ``epochs``. ImageFolder's is its second epoch, with
persistent workers (its steady state; the first pays for starting the workers). The cache side is also
timed without augmentation (what the resampling costs on the device), and for its one-time costs:
validating the files (``prepare``) and building the cache.
"""
from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.data import DeviceLoader, load_cache, prepare
from common.data_cache import parallel_map
from common.data_fetch import DATASET_DIR
from common.data_prepare import ImageFile, assign_splits
from common.device import resolve_device
from part_a.model import MEAN, STD  # the data the benchmark serves is the Part A model's, by design

CLASSES = ["Amphibia", "Animalia", "Arachnida", "Aves", "Fungi", "Insecta", "Mammalia", "Mollusca",
           "Plantae", "Reptilia"]
QUICK = dict(images=60, batch_size=8, epochs=2)
VAL_FRACTION = 0.01  # prepare needs a val split: this moves 1 image per class there (at least 1)


@dataclass
class DataBenchConfig:
    images: int = field(default=500, metadata={"help": "generated training images"})
    size: int = field(default=224, metadata={"help": "training resolution S"})
    batch_size: int = field(default=64, metadata={"help": "batch size of both loaders"})
    workers: int = field(default=2, metadata={"help": "DataLoader workers (the cache build uses all cores)"})
    epochs: int = field(default=5, metadata={"help": "cache epochs timed after the first; the median is reported"})
    device: str = field(default="auto", metadata={
        "help": "auto (the current accelerator, else cpu), cpu, cuda, mps, xpu"})
    quick: bool = field(default=False, metadata={"help": f"a seconds-long smoke run: {QUICK}"})
    work_dir: str | None = field(default=None, metadata={"help": "where to write the images (default: a temp folder)"})


def _photo_like(task: tuple[int, Path]) -> None:
    """An 800x600 JPEG with smooth structure and mild noise: it compresses and decodes like a photo."""
    seed, path = task
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((800, 600), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 8, (600, 800, 3)).astype(np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def generate(root: Path, n_train: int, n_test: int = len(CLASSES)) -> None:
    """``n_train`` training and ``n_test`` test images (prepare needs one per class) over 10 classes, in
    the archive's layout; their content does not depend on the class."""
    tasks = []
    for origin, count in (("train", n_train), ("val", n_test)):
        for i in range(count):
            folder = root / DATASET_DIR / origin / CLASSES[i % len(CLASSES)]
            folder.mkdir(parents=True, exist_ok=True)
            tasks.append((len(tasks), folder / f"{i:05d}.jpg"))
    for _ in parallel_map(_photo_like, tasks, "generate"):
        pass


def _train_images(images: int) -> int:
    """The training images prepare's own split rule leaves of ``generate(root, images)`` (the count is
    the same for any seed); 0 when a class has fewer than two (one for validation, one to train), which
    prepare refuses."""
    if images < 2 * len(CLASSES):
        return 0
    files = [ImageFile(Path(f"{i}.jpg"), CLASSES[i % len(CLASSES)], f"{i}.jpg", "train") for i in range(images)]
    return list(assign_splits(files, VAL_FRACTION, seed=0).values()).count("train")


def check_images(images: int, batch_size: int) -> None:
    """Refuse, before any image is written, counts that leave no full training batch: both loaders
    drop the last partial batch, so an epoch would see no images (and the rates divide by zero)."""
    train = _train_images(images)
    if train < batch_size:
        raise ValueError(f"--images {images} leaves {train} training images (validation takes at least one per "
                         f"class), fewer than one batch of --batch_size {batch_size}: pass more --images or a "
                         "smaller --batch_size")


def _cpu_seconds() -> float:
    """CPU time of this process and of its children, running (DataLoader workers; read from /proc on
    Linux) or finished."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
            if int(fields[1]) == me:
                total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime, in clock ticks
    return total


def timed_epochs(loader, device: torch.device, epochs: range) -> list[tuple[float, float, int]]:
    """(wall seconds, CPU seconds, images) of each epoch, every batch on ``device`` and finished. CPU
    seconds are reported too because wall time on a shared machine depends on what else runs."""
    timed = []
    for epoch in epochs:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        seen, wall, cpu = 0, time.perf_counter(), _cpu_seconds()
        for x, _ in loader:
            seen += len(x.to(device, non_blocking=True))
        synchronize(device)
        timed.append((time.perf_counter() - wall, _cpu_seconds() - cpu, seen))
    return timed


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has done the work queued on it."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _median(timed: list[tuple[float, float, int]]) -> tuple[float, float, int]:
    """The (wall, CPU, images) of the epoch with the median wall time."""
    return sorted(timed)[len(timed) // 2]


def imagefolder_loader(train_dir: Path, config: DataBenchConfig, device: torch.device):
    """The usual torchvision pipeline: decode and resize each JPEG every epoch, in worker processes."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize((config.size, config.size)),
        transforms.RandomResizedCrop(config.size, scale=(0.25, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    return torch.utils.data.DataLoader(datasets.ImageFolder(train_dir, transform), batch_size=config.batch_size,
                                       shuffle=True, drop_last=True, num_workers=config.workers,
                                       persistent_workers=config.workers > 0, pin_memory=device.type == "cuda")


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform says."""
    cpu = platform.processor() or platform.machine() or "unknown"
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return cpu


def hardware(device: torch.device) -> dict:
    """What a benchmark ran on."""
    return {"device": str(device), "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version()}


def check(config: DataBenchConfig) -> DataBenchConfig:
    """The options with --quick applied, refused before any image is written if they cannot run."""
    if config.quick:
        config = DataBenchConfig(**{**config.__dict__, **QUICK})
    check_images(config.images, config.batch_size)
    resolve_device(config.device)
    return config


def run(config: DataBenchConfig) -> dict:
    device = resolve_device(config.device)
    with tempfile.TemporaryDirectory(prefix="bench-data-", dir=config.work_dir) as tmp:
        root = Path(tmp)
        generate(root, config.images)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
            started = time.perf_counter()
            split_dir = prepare(root, val_fraction=VAL_FRACTION)
            prepare_s = time.perf_counter() - started
        n_total = config.images + len(CLASSES)

        started = time.perf_counter()
        cached = load_cache(split_dir, "train", config.size)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        cached = load_cache(split_dir, "train", config.size)
        load_s = time.perf_counter() - started

        def cache_loader(augment: bool) -> DeviceLoader:
            return DeviceLoader(cached.images, cached.labels, config.batch_size, device, train=True,
                                augment=augment, seed=0, mean=MEAN, std=STD)

        # The first pass also maps the cache file's pages into memory, once per run: reported on its own.
        (first_wall, _, first_seen), *cached_epochs = timed_epochs(cache_loader(True), device,
                                                                    range(config.epochs + 1))
        cache = _median(cached_epochs)
        plain = _median(timed_epochs(cache_loader(False), device, range(config.epochs + 1))[1:])
        folder_loader = imagefolder_loader(split_dir / "train", config, device)
        folder = timed_epochs(folder_loader, device, range(2))[-1]  # the second: the workers are running already
        del folder_loader
        cache_wall, cache_cpu, cache_seen = cache
        folder_wall, folder_cpu, folder_seen = folder

    return {
        "section": "data",
        "hardware": hardware(device),
        "source_images": "800x600 JPEG, quality 90",
        "size": config.size, "batch_size": config.batch_size, "workers": config.workers,
        "cache_epochs_timed": config.epochs,
        "train_images": len(cached.labels), "epoch_images": {"cache": cache_seen, "imagefolder": folder_seen},
        "prepare_images_per_s": round(n_total / prepare_s, 1),
        "cache_build_images_per_s": round(len(cached.labels) / build_s, 1),
        "cache_load_s": round(load_s, 4),
        "cache_first_epoch_images_per_s": round(first_seen / first_wall, 1),
        "cache_epoch_images_per_s": round(cache_seen / cache_wall, 1),
        "imagefolder_epoch_images_per_s": round(folder_seen / folder_wall, 1),
        "cache_epoch_no_augment_images_per_s": round(plain[2] / plain[0], 1),
        "speedup": round(folder_wall / folder_seen * cache_seen / cache_wall, 1),
        "cache_epoch_cpu_ms_per_image": round(1000 * cache_cpu / cache_seen, 2),
        "imagefolder_epoch_cpu_ms_per_image": round(1000 * folder_cpu / folder_seen, 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
