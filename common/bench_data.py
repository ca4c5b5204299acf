"""The data-path benchmark (``python common/bench.py data``) and what every section shares: generated
photo-like JPEGs, the plain ImageFolder baseline, the timing and the hardware record.

Both loaders serve the same images at the same size, augmentation (random resized crop, scale (0.25,
1), horizontal flip) and batch size, one after the other. The cache's first epoch is reported on its
own (it also pages the cache file in), then the median of ``epochs``, with and without augmentation;
ImageFolder's is its second epoch (the first starts the workers). docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from common.config import option
from common.data import DeviceLoader, load_cache, prepare
from common.data_cache import parallel_map
from common.data_fetch import DATASET_DIR
from common.data_prepare import ImageFile, assign_splits
from common.device import resolve_device
from part_a.model import MEAN, STD  # the data the benchmark serves is the Part A model's, by design

CLASSES = "Amphibia Animalia Arachnida Aves Fungi Insecta Mammalia Mollusca Plantae Reptilia".split()
VAL_FRACTION = 0.01  # prepare needs a val split: this moves 1 image per class there (at least 1)


def check_options(config) -> None:
    """What every section refuses: an unknown device, a count below 1 (DataLoader workers: below 0)."""
    resolve_device(config.device)
    for name, value in ((f.name, getattr(config, f.name)) for f in fields(config)):
        lowest = 0 if name == "workers" else 1
        if any(type(v) is int and v < lowest for v in (value if isinstance(value, list) else [value])):
            raise ValueError(f"--{name} must be at least {lowest}, got {value}")


def check_images(images: int, batch_size: int) -> None:
    """Refuse counts that leave no full training batch (both loaders drop the last partial batch); a
    class needs two images, one to validate and one to train (prepare's own rule splits them)."""
    files = [ImageFile(Path(f"{i}.jpg"), CLASSES[i % 10], f"{i}.jpg", "train") for i in range(images)]
    split = assign_splits(files, VAL_FRACTION, seed=0) if images >= 2 * len(CLASSES) else {}
    if (train := list(split.values()).count("train")) < batch_size:
        few = f"--images {images} leaves {train} training images (validation takes at least one per class)"
        fix = "pass more --images or a smaller --batch_size"
        raise ValueError(f"{few}, fewer than one batch of --batch_size {batch_size}: {fix}")


@dataclass
class DataBenchConfig:
    """images/s of the cached device loader vs ImageFolder + DataLoader, and the cache build rate"""

    QUICK: ClassVar[dict] = dict(images=60, batch_size=8, epochs=2)
    images: int = option(500, "generated training images")
    size: int = option(224, "training resolution S")
    batch_size: int = option(64, "batch size of both loaders")
    workers: int = option(2, "DataLoader workers (the cache build uses all cores)")
    epochs: int = option(5, "cache epochs timed after the first; the median is reported")
    device: str = option("auto", "auto (the current accelerator, else cpu), cpu, cuda, mps, xpu")
    quick: bool = option(False, f"a seconds-long smoke run: {QUICK}")
    work_dir: str | None = option(None, "where to write the images (default: a temp folder)")

    def check(self) -> None:
        check_images(self.images, self.batch_size)


def _photo_like(task: tuple[int, Path]) -> None:
    """An 800x600 JPEG with smooth structure and mild noise: it compresses and decodes like a photo."""
    seed, path = task
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # smooth structure, upsampled
    coarse = Image.fromarray(coarse).resize((800, 600), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 8, (600, 800, 3)).astype(np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def generate(root: Path, n_train: int, n_test: int = len(CLASSES)) -> None:
    """``n_train`` training and ``n_test`` test images (prepare needs one per class) over 10 classes, in
    the archive's layout (tools/gpu_check.sh: the real counts); their content does not depend on the class."""
    tasks = []
    for origin, count in (("train", n_train), ("val", n_test)):
        for i in range(count):
            folder = root / DATASET_DIR / origin / CLASSES[i % len(CLASSES)]
            folder.mkdir(parents=True, exist_ok=True)
            tasks.append((len(tasks), folder / f"{i:05d}.jpg"))
    list(parallel_map(_photo_like, tasks, "generate"))


def generate_split(root: Path, images: int) -> tuple[float, Path]:
    """``generate``, then the seconds that ``prepare`` takes to validate and split them, and the split."""
    generate(root, images)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        return timed(prepare, root, val_fraction=VAL_FRACTION)


def timed(function, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def _cpu_seconds() -> float:
    """CPU time of this process and its children, finished or running (DataLoader workers, from /proc)."""
    total = sum(sum(resource.getrusage(who)[:2]) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            values = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
            if int(values[1]) == os.getpid():  # utime + stime, in clock ticks
                total += (int(values[11]) + int(values[12])) / os.sysconf("SC_CLK_TCK")
    return total


def timed_epochs(loader, device: torch.device, epochs: int, step=None) -> list[tuple[float, float, int]]:
    """(wall seconds, CPU seconds, images) of each epoch, every batch moved to ``device`` (by ``step``, if
    given, which trains on it) and finished; CPU time too, as wall time on a shared machine varies."""
    step, timings = step or (lambda images, labels: images.to(device, non_blocking=True)), []
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        seen, wall, cpu = 0, time.perf_counter(), _cpu_seconds()
        for images, labels in loader:
            step(images, labels)
            seen += len(images)
        if device.type != "cpu":
            torch.accelerator.synchronize(device)
        timings.append((time.perf_counter() - wall, _cpu_seconds() - cpu, seen))
    return timings


def imagefolder_loader(train_dir: Path, size: int, config, device: torch.device):
    """The usual torchvision pipeline: decode and resize each JPEG every epoch, in worker processes."""
    from torchvision import datasets
    from torchvision import transforms as T

    resize, crop = T.Resize((size, size)), T.RandomResizedCrop(size, scale=(0.25, 1.0))
    transform = T.Compose([resize, crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    dataset, workers = datasets.ImageFolder(train_dir, transform), config.workers
    options = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    return torch.utils.data.DataLoader(dataset, config.batch_size, shuffle=True, drop_last=True, **options)


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform says."""
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return platform.processor() or platform.machine() or "unknown"


def hardware(device: torch.device) -> dict:
    """What a benchmark ran on."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    cpu = dict(cpu=cpu_model(), cpu_cores=os.cpu_count(), threads=torch.get_num_threads())
    return dict(device=str(device), **cpu, gpu=gpu, torch=torch.__version__, python=platform.python_version())


def run_data(config: DataBenchConfig) -> dict:
    device = resolve_device(config.device)
    with tempfile.TemporaryDirectory(prefix="bench-data-", dir=config.work_dir) as tmp:
        prepare_s, split_dir = generate_split(Path(tmp), config.images)
        build_s, cached = timed(load_cache, split_dir, "train", config.size)
        load_s, cached = timed(load_cache, split_dir, "train", config.size)
        data, options = (cached.images, cached.labels, config.batch_size, device), dict(mean=MEAN, std=STD)
        (first, *augmented), (_, *plain) = [  # each loader freed before the next is made
            timed_epochs(DeviceLoader(*data, train=True, augment=on, **options), device, config.epochs + 1)
            for on in (True, False)
        ]
        folder = imagefolder_loader(split_dir / "train", config.size, config, device)
        folder = timed_epochs(folder, device, 2)[-1]  # the second: the workers were running already
    # Each (wall, CPU, images): the first cache epoch, the median ones (by wall time), ImageFolder's.
    cache, plain = sorted(augmented)[len(augmented) // 2], sorted(plain)[len(plain) // 2]
    timings = dict(cache_first_epoch=first, cache_epoch=cache, imagefolder_epoch=folder)
    timings["cache_epoch_no_augment"] = plain
    rates = {f"{name}_images_per_s": round(images / wall, 1) for name, (wall, _, images) in timings.items()}
    result = dict(section="data", hardware=hardware(device), source_images="800x600 JPEG, quality 90")
    result.update(size=config.size, batch_size=config.batch_size, workers=config.workers)
    result.update(cache_epochs_timed=config.epochs, train_images=len(cached.labels))
    result["epoch_images"] = {"cache": cache[2], "imagefolder": folder[2]}
    result["prepare_images_per_s"] = round((config.images + len(CLASSES)) / prepare_s, 1)
    result["cache_build_images_per_s"] = round(len(cached.labels) / build_s, 1)
    result["cache_load_s"] = round(load_s, 4)
    result.update(rates, speedup=round(cache[2] / cache[0] / (folder[2] / folder[0]), 1))
    result.update(cache_epoch_cpu_ms_per_image=round(1000 * cache[1] / cache[2], 2))
    result.update(imagefolder_epoch_cpu_ms_per_image=round(1000 * folder[1] / folder[2], 2))
    return dict(result, load_average_1min=round(os.getloadavg()[0], 2))
