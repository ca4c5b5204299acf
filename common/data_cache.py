"""Decode once: ``load_cache(split_dir, split, size)`` is the split as a memory-mapped uint8 ``[N, S, S, 3]``
tensor, decoded and resized once into ``split_dir/cache/<split>-<S>-<key>.npy``. The key hashes the split's
manifest rows and S, so a stale cache is never read; the file is written atomically, and concurrent
builders (sweep workers) write identical bytes. ``open_rgb`` turns every mode PIL reads into correct RGB;
resizing matches ``transforms.Resize((S, S))`` exactly (no JPEG drafting: 4 levels off, docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from common.data_fetch import LOG_INTERVAL_S, DataError
from common.files import atomic_path

# Larger images are left out, not decoded: far above the dataset's (0.5 MP), below PIL's bomb limit.
MAX_PIXELS = 50_000_000
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto it: one RGB for every alpha mode
MANIFEST = "manifest.csv"
CACHE_FORMAT = 2  # 2: full JPEG decoding (1 drafted JPEGs), so older caches are rebuilt


@dataclass
class CachedSplit:
    images: torch.Tensor  # uint8 [N, S, S, 3], HWC, memory-mapped from the cache file
    labels: torch.Tensor  # int64 [N], indices into classes
    classes: list[str]
    paths: list[Path]


def open_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully to correct 8-bit RGB with EXIF orientation applied, whatever its mode (16-bit
    scaled, not clipped; transparency composited); raises for unreadable or huge images."""
    with Image.open(path) as img:
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"{img.width}x{img.height} pixels is over the {MAX_PIXELS:,} pixel limit")
        img.load()
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0  # 65535 -> 255; PIL's own convert would clip instead
        elif img.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0  # float images in [0, 1]
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if "transparency" in img.info or img.mode in ("LA", "La", "PA", "RGBa", "RGBA"):
        img = Image.alpha_composite(Image.new("RGBA", img.size, BACKGROUND + (255,)), img.convert("RGBA"))
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """uint8 ``[size, size, 3]``: the image as ``transforms.Resize((size, size))`` gives it, exactly."""
    return np.asarray(open_rgb(path).resize((size, size), Image.Resampling.BILINEAR))


def parallel_map(fn: Callable, items: list, desc: str, chunksize: int = 16) -> Iterator:
    """``map(fn, items)`` in order over worker processes, with a progress bar; in-process when tiny."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(cpus, -(-len(items) // chunksize))
    bar = tqdm(total=len(items), desc=desc, unit="img", mininterval=LOG_INTERVAL_S)  # as downloads
    with bar, ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for result in pool.map(fn, items, chunksize=chunksize) if pool else map(fn, items):
            bar.update()
            yield result


def read_manifest(split_dir: Path) -> list[dict[str, str]]:
    if not (path := Path(split_dir) / MANIFEST).is_file():
        raise DataError(f"no {path}: prepare the data first (python common/data.py prepare --root DIR)")
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def split_digests(split_dir: str | Path) -> dict[str, torch.Tensor]:
    """Per split, the sorted 64-bit digests of its manifest rows (path, class, sha256): what a checkpoint
    records of the split it trained on, small enough to keep and to say later what changed."""
    digests: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for row in read_manifest(Path(split_dir)):
        digest = hashlib.sha256(f"{row['path']}\0{row['class']}\0{row['sha256']}".encode()).digest()
        digests.setdefault(row["split"], []).append(int.from_bytes(digest[:8], "little", signed=True))
    return {split: torch.tensor(sorted(values), dtype=torch.int64) for split, values in digests.items()}


def split_changes(recorded: dict | None, split_dir: str | Path, splits: tuple[str, ...]) -> str:
    """How ``splits`` of ``split_dir`` differ from ``recorded`` (a checkpoint's ``split``), e.g. "3 images
    added to train"; "" if not or if nothing was recorded. New content counts as removed and added."""
    if recorded is None:
        return ""
    current, changes = split_digests(split_dir), []
    for split in splits:
        then, now = set(recorded[split].tolist()), set(current[split].tolist())
        for count, what in ((len(now - then), "added to"), (len(then - now), "removed from")):
            if count:
                changes.append(f"{count} image{'s' * (count != 1)} {what} {split}")
    return ", ".join(changes)


def load_cache(split_dir: str | Path, split: str, size: int) -> CachedSplit:
    """The decoded split at ``size`` x ``size``, building the cache first when missing or stale."""
    split_dir = Path(split_dir)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"cache size must be a positive integer, got {size!r}")
    manifest = read_manifest(split_dir)
    classes = sorted({row["class"] for row in manifest})
    if not (rows := [row for row in manifest if row["split"] == split]):
        raise DataError(f"{split_dir / MANIFEST} lists no {split!r} images; is it damaged?")
    content = [CACHE_FORMAT, size, classes, [[r["path"], r["class"], r["bytes"], r["sha256"]] for r in rows]]
    key = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]
    path, paths = split_dir / "cache" / f"{split}-{size}-{key}.npy", [split_dir / r["path"] for r in rows]
    if not path.is_file():
        if missing := next((p for p in paths if not p.is_file()), None):
            raise DataError(f"{missing} is gone: run python common/data.py prepare --root {split_dir.parent}")
        with atomic_path(path) as tmp:  # an interrupted build leaves no full-size temporary behind
            array = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(rows), size, size, 3))
            # Claim the space: a full disk is then an OSError, not a SIGBUS.
            if hasattr(os, "posix_fallocate"):
                with open(tmp, "rb+") as handle:
                    os.posix_fallocate(handle.fileno(), 0, tmp.stat().st_size)
            decode = functools.partial(decode_image, size=size)
            for index, image in enumerate(parallel_map(decode, paths, f"cache {split} {size}px")):
                array[index] = image
            array.flush()
            del array
        # Older caches of this split and size (and the .json files older versions kept) are stale.
        for stale in path.parent.glob(f"{split}-{size}-*"):
            if stale.suffix in (".npy", ".json") and stale.name != path.name:
                stale.unlink(missing_ok=True)
    images = np.load(path, mmap_mode="c")  # copy-on-write: a writable tensor, the file never changes
    if images.shape != (len(rows), size, size, 3):
        raise DataError(f"cache {path} has shape {images.shape}: delete {path.parent} and run again")
    labels = torch.tensor([classes.index(row["class"]) for row in rows])
    return CachedSplit(torch.from_numpy(images), labels, classes, paths)
