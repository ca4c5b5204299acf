"""The data pipeline: download, extraction, validation, split, decode-once cache and the device loader."""

from __future__ import annotations

import csv
import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import class_image, http_server, make_image_tree
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from common import data_cache, data_prepare
from common.augment import crop_flip, matmul_crops, resize_crops, sample_crops, sample_flips
from common.data import DataError, DeviceLoader, load_cache, prepare
from common.data_fetch import download

REPO = Path(__file__).resolve().parents[1]
NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------- decoding to RGB


def mode_samples() -> dict[str, tuple[Image.Image, str, tuple[int, int, int]]]:
    """name -> (image, file format, the RGB colour every pixel must decode to)."""
    palette = Image.new("P", (30, 20))
    palette.putpalette([10, 200, 30] + [0] * 765)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 0
    half_alpha = Image.new("RGBA", (26, 21), (200, 0, 0, 128))
    return {
        "L": (Image.new("L", (32, 24), 100), "PNG", (100, 100, 100)),
        "P": (palette, "PNG", (10, 200, 30)),
        "P-transparent": (transparent_palette, "PNG", (255, 255, 255)),
        "CMYK": (Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
        "RGBA": (half_alpha, "PNG", (227, 127, 127)),  # 200*128/255 + 255*127/255, 0 + 127
        "LA": (Image.new("LA", (20, 20), (0, 0)), "PNG", (255, 255, 255)),
        "I;16": (Image.fromarray(np.full((22, 30), 32896, np.uint16)), "PNG", (128, 128, 128)),
    }


def exif_rotated_image() -> Image.Image:
    """40x20 stored, left half red, right half blue, EXIF orientation 6: shown turned 90 degrees clockwise."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    return img


@pytest.mark.parametrize("name", list(mode_samples()))
def test_every_mode_decodes_to_correct_rgb(tmp_path, name):
    img, fmt, expected = mode_samples()[name]
    path = tmp_path / f"image.{fmt.lower()}"
    img.save(path, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    rgb = np.asarray(data_cache.open_rgb(path)).astype(int)
    assert rgb.shape == (img.height, img.width, 3)
    tolerance = 3 if fmt == "JPEG" else 1
    assert np.abs(rgb - np.array(expected)).max() <= tolerance, (
        f"{name}: got {rgb[0, 0]}, expected {expected}"
    )


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    exif_rotated_image().save(tmp_path / "rotated.jpg", quality=100, exif=exif)
    rgb = np.asarray(data_cache.open_rgb(tmp_path / "rotated.jpg")).astype(int)
    assert rgb.shape == (40, 20, 3)  # portrait now
    assert np.abs(rgb[5, 10] - [255, 0, 0]).max() < 10  # the stored left (red) half is on top
    assert np.abs(rgb[35, 10] - [0, 0, 255]).max() < 10


# ---------------------------------------------------------------- validation and split


def write_bad_files(folder: Path) -> dict[str, str]:
    """Broken files in ``folder``; returns name -> a word its skip reason must contain."""
    good = io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(good, "JPEG")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture")
    Image.new("1", (8000, 7000)).save(folder / "huge.png")  # 56 MP, a few kB on disk
    return {"truncated.jpg": "decode", "empty.jpg": "empty", "text.jpg": "not an image", "huge.png": "pixel"}


def write_ignored_files(dataset: Path) -> None:
    """Files and folders that are not part of the dataset and must be ignored silently."""
    aves = dataset / "train" / "Aves"
    (aves / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (aves / "0000.jpg:Zone.Identifier").write_text("[ZoneTransfer]\nZoneId=3\n")
    (aves / "notes.txt").write_text("field notes")
    (aves / ".thumbnails").mkdir()
    (aves / ".thumbnails" / "0000.jpg").write_bytes((aves / "0000.jpg").read_bytes())
    (dataset / "train" / ".hidden_class").mkdir()
    (dataset / "train" / ".hidden_class" / "x.jpg").write_bytes((aves / "0000.jpg").read_bytes())


def test_bad_files_are_reported_by_name_and_left_out(tmp_path):
    dataset = make_image_tree(tmp_path, ["Aves", "Fungi"], n_train=6, n_test=2)
    expected = write_bad_files(dataset / "train" / "Fungi")
    write_ignored_files(dataset)
    split_dir = prepare(tmp_path)
    skipped = {Path(row["path"]).name: row["reason"] for row in read_csv(split_dir / "skipped.csv")}
    assert skipped.keys() == expected.keys()
    for name, word in expected.items():
        assert word in skipped[name].lower(), f"{name}: {skipped[name]}"
    manifest = read_csv(split_dir / "manifest.csv")
    assert {row["class"] for row in manifest} == {"Aves", "Fungi"}
    names = {Path(row["path"]).name for row in manifest}
    assert not names & (set(expected) | {".DS_Store", "notes.txt", "0000.jpg:Zone.Identifier", "x.jpg"})
    assert len(manifest) == 2 * 6 + 2 * 2  # every good image, nothing else
    assert sum(1 for row in manifest if "thumbnails" in row["path"]) == 0


def test_skipped_files_are_printed(tmp_path, capsys):
    dataset = make_image_tree(tmp_path, ["Aves", "Fungi"], n_train=4, n_test=1)
    (dataset / "val" / "Aves" / "broken.jpg").write_bytes(b"")
    prepare(tmp_path)
    out = capsys.readouterr().out
    assert "broken.jpg" in out and "empty" in out
    assert "Aves" in out and "Fungi" in out  # the class count table


def test_empty_class_and_mismatched_classes_are_clear_errors(tmp_path):
    dataset = make_image_tree(tmp_path / "a", ["Aves", "Fungi"], n_train=4, n_test=1)
    (dataset / "train" / "Mammalia").mkdir()
    with pytest.raises(DataError, match="Mammalia"):
        prepare(tmp_path / "a")

    dataset = make_image_tree(tmp_path / "b", ["Aves", "Fungi"], n_train=4, n_test=1)
    make_image_tree(tmp_path / "b", ["Plantae"], n_train=4, n_test=0)
    with pytest.raises(DataError, match="different classes.*Plantae"):
        prepare(tmp_path / "b")

    dataset = make_image_tree(tmp_path / "c", ["Aves", "Fungi"], n_train=2, n_test=1)
    for path in (dataset / "train" / "Fungi").iterdir():
        path.write_bytes(b"")
    with pytest.raises(DataError, match="no readable images left in train/Fungi"):
        prepare(tmp_path / "c")


def add_train_images(folder: Path, numbers: range) -> None:
    rng = np.random.default_rng(99)
    for i in numbers:
        class_image(8, rng).save(folder / f"{i:04d}.jpg")


def test_split_is_stratified_disjoint_reproducible_and_free_the_second_time(tmp_path, monkeypatch):
    dataset = make_image_tree(tmp_path / "a", ["Aves", "Fungi", "Plantae"], n_train=10, n_test=3)
    add_train_images(dataset / "train" / "Plantae", range(10, 20))  # 20 Plantae: 4 of them go to val
    originals = tree_digest(dataset)
    split_dir = prepare(tmp_path / "a", val_fraction=0.2, seed=7)
    manifest = read_csv(split_dir / "manifest.csv")

    counts = {(row["split"], row["class"]): 0 for row in manifest}
    for row in manifest:
        counts[(row["split"], row["class"])] += 1
    assert counts == {
        ("train", "Aves"): 8,
        ("val", "Aves"): 2,
        ("train", "Fungi"): 8,
        ("val", "Fungi"): 2,
        ("train", "Plantae"): 16,
        ("val", "Plantae"): 4,
        ("test", "Aves"): 3,
        ("test", "Fungi"): 3,
        ("test", "Plantae"): 3,
    }
    on_disk = {
        p.relative_to(split_dir).as_posix()
        for s in ("train", "val", "test")
        for p in (split_dir / s).rglob("*.jpg")
    }
    assert on_disk == {row["path"] for row in manifest}  # each file in exactly one split folder
    train_names = {row["path"].split("/", 1)[1] for row in manifest if row["split"] == "train"}
    val_names = {row["path"].split("/", 1)[1] for row in manifest if row["split"] == "val"}
    assert not train_names & val_names and len(train_names | val_names) == 40
    test_rows = [row for row in manifest if row["split"] == "test"]
    for row in test_rows:  # test is the original val/, linked not copied where possible
        original = dataset / "val" / row["path"].split("/", 1)[1]
        assert (split_dir / row["path"]).stat().st_ino == original.stat().st_ino
        assert row["sha256"] == hashlib.sha256(original.read_bytes()).hexdigest()
        assert int(row["bytes"]) == original.stat().st_size
    assert tree_digest(dataset) == originals

    # The same seed on another copy gives the same split; another seed gives another one.
    for copy in ("b", "c"):
        add_train_images(
            make_image_tree(tmp_path / copy, ["Aves", "Fungi", "Plantae"], n_train=10, n_test=3)
            / "train"
            / "Plantae",
            range(10, 20),
        )
    again = read_csv(prepare(tmp_path / "b", val_fraction=0.2, seed=7) / "manifest.csv")
    assert again == manifest
    other = read_csv(prepare(tmp_path / "c", val_fraction=0.2, seed=8) / "manifest.csv")
    assert {r["path"] for r in other if r["split"] == "val"} != {
        r["path"] for r in manifest if r["split"] == "val"
    }

    # A second run with the same options, even a refresh from the source, decodes and rewrites nothing.
    stamp = (split_dir / "manifest.csv").stat().st_mtime_ns

    def no_work(*args, **kwargs):
        raise AssertionError("prepare validated images again although nothing changed")

    monkeypatch.setattr(data_prepare, "parallel_map", no_work)
    started = time.perf_counter()
    assert prepare(tmp_path / "a", val_fraction=0.2, seed=7) == split_dir
    assert prepare(tmp_path / "a", val_fraction=0.2, seed=7, refresh=True) == split_dir
    assert time.perf_counter() - started < 1.0
    assert (split_dir / "manifest.csv").stat().st_mtime_ns == stamp


def test_prepare_rebuilds_a_damaged_split_and_notices_content_changes_that_keep_size_and_mtime(
    tmp_path, capsys
):
    dataset = make_image_tree(tmp_path, ["Aves", "Fungi"], n_train=5, n_test=2)
    split_dir = prepare(tmp_path)
    manifest = read_csv(split_dir / "manifest.csv")
    # A split file deleted by hand: prepare builds the split again instead of calling it ready.
    (split_dir / manifest[0]["path"]).unlink()
    capsys.readouterr()
    prepare(tmp_path)
    assert "data ready" not in capsys.readouterr().out and (split_dir / manifest[0]["path"]).is_file()
    assert load_cache(split_dir, "train", 8).images.shape[0] == sum(r["split"] == "train" for r in manifest)
    prepare(tmp_path)
    assert "data ready" in capsys.readouterr().out
    # New bytes of the same size with the old mtime put back (as cp -p, rsync -t or tar do).
    original = dataset / "train" / "Aves" / "0001.jpg"
    stat, data = original.stat(), bytearray(original.read_bytes())
    data[-3] ^= 0xFF
    original.write_bytes(bytes(data))
    os.utime(original, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    prepare(tmp_path)  # what the train scripts do: the split as it is
    assert "data ready" in capsys.readouterr().out
    prepare(tmp_path, refresh=True)
    assert "data ready" not in capsys.readouterr().out
    row = next(r for r in read_csv(split_dir / "manifest.csv") if r["path"].endswith("Aves/0001.jpg"))
    assert row["sha256"] == hashlib.sha256(bytes(data)).hexdigest()


def test_symlinked_images_are_followed_and_dangling_ones_reported(tmp_path, capsys):
    dataset = make_image_tree(tmp_path, ["Aves", "Fungi"], n_train=5, n_test=2)
    # A relative link to an image in a hidden folder (never scanned): from the split it would dangle.
    target = dataset / "train" / "Fungi" / ".kept" / "pic.jpg"
    target.parent.mkdir()
    (dataset / "train" / "Fungi" / "0002.jpg").rename(target)
    (dataset / "train" / "Aves" / "linked.jpg").symlink_to(Path("..") / "Fungi" / ".kept" / "pic.jpg")
    (dataset / "train" / "Aves" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    split_dir = prepare(tmp_path)
    linked = next(split_dir.glob("*/Aves/linked.jpg"))
    assert linked.read_bytes() == target.read_bytes()  # the image, not a link that broke when moved
    skipped = read_csv(split_dir / "skipped.csv")
    assert [Path(r["path"]).name for r in skipped] == ["dangling.jpg"] and "cannot read" in skipped[0][
        "reason"
    ]
    assert "dangling.jpg" in capsys.readouterr().out


def test_identical_files_across_splits_are_reported(tmp_path, capsys):
    dataset = make_image_tree(tmp_path, ["Aves", "Fungi"], n_train=5, n_test=2)
    leaked = (dataset / "train" / "Aves" / "0003.jpg").read_bytes()
    (dataset / "val" / "Aves" / "copy.jpg").write_bytes(leaked)
    split_dir = prepare(tmp_path)
    rows = read_csv(split_dir / "duplicates.csv")
    assert {row["sha256"] for row in rows} == {hashlib.sha256(leaked).hexdigest()}
    assert {row["split"] for row in rows} >= {"test"} and len(rows) == 2
    assert "possible leak" in capsys.readouterr().out


# ---------------------------------------------------------------- decode-once cache


def test_cache_matches_torchvision_resize_and_rebuilds_when_files_or_size_change(tmp_path, monkeypatch):
    dataset = tmp_path / "inaturalist_12K"
    samples = mode_samples()
    for origin in ("train", "val"):
        for i, (_name, (img, fmt, _)) in enumerate(samples.items()):
            folder = dataset / origin / ("Aves" if i % 2 else "Fungi")
            folder.mkdir(parents=True, exist_ok=True)
            img.resize((img.width + 7 * i, img.height + 3 * i)).save(
                folder / f"{origin}{i}.{fmt.lower()}", fmt
            )
    big = dataset / "train" / "Aves" / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8)).save(big, quality=95)
    split_dir = prepare(tmp_path, val_fraction=0.3)

    size = 16
    cached = load_cache(split_dir, "train", size)
    assert cached.images.dtype == torch.uint8 and cached.images.shape == (len(cached.paths), size, size, 3)
    assert cached.classes == ["Aves", "Fungi"]
    resize = transforms.Resize((size, size))
    for image, label, path in zip(cached.images, cached.labels, cached.paths, strict=True):
        assert cached.classes[label] == path.parent.name
        reference = np.asarray(resize(data_cache.open_rgb(path))).astype(int)
        assert np.array_equal(image.numpy().astype(int), reference), path  # JPEGs too: no draft decoding

    # A second load reads the cache file instead of decoding.
    monkeypatch.setattr(data_cache, "parallel_map", lambda *a, **k: pytest.fail("decoded a cache again"))
    again = load_cache(split_dir, "train", size)
    assert torch.equal(again.images, cached.images)
    monkeypatch.undo()

    # A changed file (after prepare notices it) and a changed size give new caches.
    changed = next(p for p in cached.paths if p.name == "big.jpg")
    Image.new("RGB", (96, 128), (0, 255, 0)).save(big, quality=95)
    prepare(tmp_path, val_fraction=0.3, refresh=True)
    rebuilt = load_cache(split_dir, "train", size)
    index = rebuilt.paths.index(changed)
    assert np.abs(rebuilt.images[index].numpy().astype(int) - [0, 255, 0]).max() <= 3
    assert len(list((split_dir / "cache").glob(f"train-{size}-*.npy"))) == 1  # the stale one is gone
    assert load_cache(split_dir, "train", 8).images.shape[1:] == (8, 8, 3)


def test_concurrent_builds_of_one_cache_are_safe(prepared_data, tmp_path, monkeypatch):
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    # Without the shared fixture's caches, which other tests may have built already.
    split_dir = shutil.copytree(
        prepared_data / "split", tmp_path / "split", ignore=shutil.ignore_patterns("cache")
    )
    both_writing = threading.Barrier(2, timeout=30)

    def in_step(fn, items, desc, chunksize=16):  # both builders are mid-write before either finishes
        both_writing.wait()
        yield from map(fn, items)

    monkeypatch.setattr(data_cache, "parallel_map", in_step)
    with ThreadPoolExecutor(2) as pool:  # threads share a process id: temp names must still differ
        first, second = pool.map(lambda _: load_cache(split_dir, "train", 16), range(2))
    assert torch.equal(first.images, second.images) and first.paths == second.paths
    assert [p.suffix for p in (split_dir / "cache").iterdir()] == [".npy"]  # no temp files left


# ---------------------------------------------------------------- device loader


def numbered_images(n: int, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value i (so batches can be traced back), label i."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, size, size, 3).contiguous()
    return images, torch.arange(n)


def test_eval_loader_yields_every_sample_once_padded_with_minus_one():
    images, labels = numbered_images(23)
    for world_size in (1, 2, 3):
        seen, lengths = [], set()
        for rank in range(world_size):
            loader = DeviceLoader(
                images, labels, 4, "cpu", train=False, rank=rank, world_size=world_size, **NORM
            )
            lengths.add(len(loader))
            batches = list(loader)
            assert len(batches) == len(loader)
            for x, y in batches:
                assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32
                assert x.is_contiguous(memory_format=torch.channels_last)
                real = y >= 0
                value = x[real][:, 0, 0, 0]  # the normalised fill value traces the sample
                assert torch.allclose(value, (y[real].float() / 255 - 0.5) / 0.5)
                seen += y[real].tolist()
        assert len(lengths) == 1, f"ranks have different batch counts: {lengths}"
        assert sorted(seen) == list(range(23))


def test_train_shards_are_disjoint_equal_and_drop_the_last_partial_batch():
    images, labels = numbered_images(50)
    single = DeviceLoader(images, labels, 8, "cpu", train=True, seed=3, **NORM)
    assert len(single) == 6 and all(len(y) == 8 for _, y in single)
    shards = []
    for rank in range(3):
        loader = DeviceLoader(images, labels, 4, "cpu", train=True, seed=3, rank=rank, world_size=3, **NORM)
        loader.set_epoch(2)
        ys = [y for _, y in loader]
        assert len(ys) == len(loader) == 4
        shards.append(set(torch.cat(ys).tolist()))
    assert all(len(s) == 16 for s in shards)
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])


def epoch_batches(loader: DeviceLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_augmentation_is_per_image_and_a_pure_function_of_seed_and_epoch():
    size = 24
    ramp = torch.arange(size * size, dtype=torch.float32).view(size, size) * 255 / (size * size)
    one = torch.stack([ramp, ramp.t(), 255 - ramp], dim=-1).to(torch.uint8)
    images, labels = one.expand(16, size, size, 3).contiguous(), torch.zeros(16, dtype=torch.int64)
    loader = DeviceLoader(images, labels, 8, "cpu", train=True, augment=True, seed=5, **NORM)
    first = epoch_batches(loader, 0)
    x = first[0][0]
    assert x.shape == (8, 3, size, size) and x.is_contiguous(memory_format=torch.channels_last)
    flat = x.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))

    replay = DeviceLoader(images, labels, 8, "cpu", train=True, augment=True, seed=5, **NORM)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, epoch_batches(replay, 0), strict=True))
    assert not torch.equal(first[0][0], epoch_batches(loader, 1)[0][0])

    plain = DeviceLoader(images, labels, 8, "cpu", train=True, seed=5, **NORM)
    expected = (one.permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert all(torch.allclose(img, expected, atol=1e-6) for img in epoch_batches(plain, 0)[0][0])


def random_images(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator), torch.arange(n)


def test_host_to_device_path_gives_the_resident_path_batches():
    """The pinned prefetch path that GPUs take when the cache does not fit, forced on the CPU."""
    images, labels = random_images(30, 16, seed=6)
    for augment, mean, std in ((True, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), (False, *NORM.values())):
        for train in (True, False):
            options = dict(train=train, augment=augment and train, seed=8, mean=mean, std=std)
            resident, copied = (DeviceLoader(images, labels, 4, "cpu", **options) for _ in range(2))
            assert not resident.prefetch
            copied.prefetch = True
            with torch.inference_mode():  # as in evaluation
                batches = epoch_batches(copied, 2)
            for (a, ya), (b, yb) in zip(epoch_batches(resident, 2), batches, strict=True):
                assert b.is_contiguous(memory_format=torch.channels_last)
                assert torch.equal(a, b) and torch.equal(ya, yb)


@pytest.mark.parametrize("augment", [False, True])
def test_cpu_loader_normalises_per_channel_like_the_formula(augment):
    images, labels = random_images(12, 16, seed=4)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # a Part B model's statistics
    loader = DeviceLoader(images, labels, 4, "cpu", train=True, augment=augment, seed=1, mean=mean, std=std)
    loader.set_epoch(3)
    indices, crops, flips = loader._plan()
    for step, (x, y) in enumerate(loader):
        raw = images[indices[step]]
        pixels = (
            (crop_flip(raw, crops[step], flips[step], 16) if augment else raw).permute(0, 3, 1, 2).float()
        )
        expected = (pixels / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        assert torch.equal(y, labels[indices[step]])
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)


def test_held_batches_never_change_and_channels_last_is_optional():
    images, labels = random_images(64, 16, seed=5)
    loader = DeviceLoader(images, labels, 4, "cpu", train=True, augment=True, seed=0, **NORM)
    # Held batches (and a slice of one) are never written again: compare with copies taken at once.
    held, copies = [], []
    for x, _ in epoch_batches(loader, 0):
        held.append(x[:2] if len(held) == 3 else x)
        copies.append(held[-1].clone())
    assert len({x.data_ptr() for x in held}) == len(held) == 16
    assert all(torch.equal(x, c) for x, c in zip(held, copies, strict=True))
    # channels_last=False gives contiguous tensors with the same values.
    plain = DeviceLoader(
        images, labels, 4, "cpu", train=True, augment=True, seed=0, channels_last=False, **NORM
    )
    first = [x for x, _ in epoch_batches(plain, 1)]
    assert all(x.is_contiguous() for x in first)
    assert all(
        torch.equal(a, b[0].contiguous()) for a, b in zip(first, epoch_batches(loader, 1), strict=True)
    )


def _loader_in_forked_child(queue) -> None:
    # As in DataLoader workers: with GNU OpenMP, a forked child that runs a multi-threaded op after
    # its parent did hangs, whatever this project does (torch 2.14: `torch.rand(100000).exp()`).
    torch.set_num_threads(1)
    images, labels = random_images(16, 12)
    loader = DeviceLoader(images, labels, 8, "cpu", train=True, augment=True, seed=0, **NORM)
    queue.put(torch.cat([x for x, _ in loader]).sum().item())


def test_cpu_loader_works_in_a_forked_child():
    import multiprocessing

    images, labels = random_images(16, 12)
    loader = DeviceLoader(images, labels, 8, "cpu", train=True, augment=True, seed=0, **NORM)
    expected = torch.cat([x for x, _ in loader]).sum().item()  # the parent has run the loader's ops
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_loader_in_forked_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("a forked child hung running the loader")
    assert child.exitcode == 0 and queue.get(timeout=5) == pytest.approx(expected)


def reference_crop_flip(
    images: torch.Tensor, crops: torch.Tensor, flips: torch.Tensor, size: int
) -> torch.Tensor:
    """torchvision, one image at a time, in float: ``hflip(resized_crop(...))`` of each [H, W, 3] image."""
    out = []
    for image, (top, left, height, width), flip in zip(
        images, crops.long().tolist(), flips.tolist(), strict=True
    ):
        resized = TF.resized_crop(
            image.permute(2, 0, 1).float(), top, left, height, width, [size, size], antialias=False
        )
        out.append(TF.hflip(resized) if flip else resized)
    return torch.stack(out)


def test_crop_flip_matches_torchvision_resized_crop_and_hflip():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 20, 30, 3), dtype=torch.uint8, generator=generator)
    crops = torch.cat(
        [
            torch.tensor([[3, 5, 12, 16], [0, 0, 20, 30], [19, 29, 1, 1]], dtype=torch.float32),
            sample_crops(21, 20, 30, generator),
        ]
    )
    flips = torch.arange(24) % 2 == 0
    size = 18
    reference = reference_crop_flip(images, crops, flips, size)
    # The matmul kernel (the GPU's) is exact bilinear in float32, over the whole output, edges included.
    exact = matmul_crops(images, crops, flips, size)
    assert exact.shape == (24, size, size, 3)
    assert torch.allclose(exact.permute(0, 3, 1, 2), reference, atol=1e-3)
    # The resize kernel (the CPU's) rounds to uint8 once: within one level, and the default on CPU.
    rounded = resize_crops(images, crops, flips, size)
    difference = rounded.permute(0, 3, 1, 2) - reference
    assert difference.abs().max() <= 1.01 and difference.abs().mean() < 0.5
    assert torch.equal(crop_flip(images, crops, flips, size), rounded)


def test_crop_flip_kernels_agree_at_training_size():
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 224, 224, 3), dtype=torch.uint8, generator=generator)
    crops, flips = sample_crops(8, 224, 224, generator), sample_flips(8, generator)
    difference = resize_crops(images, crops, flips, 224) - matmul_crops(images, crops, flips, 224)
    assert difference.abs().max() <= 1.01 and difference.abs().mean() < 0.5


def test_sampled_crops_obey_scale_and_ratio_bounds():
    crops = sample_crops(2000, 40, 60, torch.Generator().manual_seed(0))
    top, left, height, width = crops.unbind(1)
    assert (
        (top >= 0).all() and (left >= 0).all() and (top + height <= 40).all() and (left + width <= 60).all()
    )
    area = height * width / (40 * 60)
    assert area.min() > 0.2 and area.max() <= 1.0
    ratio = width / height
    assert ratio.min() > 0.7 and ratio.max() < 1.4
    assert len(set(map(tuple, crops.tolist()))) > 1500  # independent per image


# ---------------------------------------------------------------- download and extraction


def dataset_zip(tmp_path: Path, prefix: str = "inaturalist_12K/", with_junk: bool = True) -> bytes:
    source = make_image_tree(tmp_path / "zipsource", ["Aves", "Fungi"], n_train=5, n_test=2, size=(20, 16))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(source.rglob("*.jpg")):
            archive.write(path, prefix + path.relative_to(source).as_posix())
            if with_junk:  # what macOS' Archive Utility adds
                junk = f"__MACOSX/{prefix}{path.parent.relative_to(source).as_posix()}/._{path.name}"
                archive.writestr(junk, b"\0\5\26\7 resource fork")
    return buffer.getvalue()


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``payload`` at any path, honouring ``Range: bytes=N-`` unless ``ignore_range`` is set."""

    payload = b""
    ignore_range = False
    requests: list[tuple[str | None, int, int]] = []  # (Range header, status, body bytes sent)

    def do_GET(self):
        requested = self.headers.get("Range")
        start = 0
        if requested and not self.ignore_range:
            start = int(requested.removeprefix("bytes=").split("-")[0])
        if start >= len(self.payload) > 0:  # nothing after that byte, as real servers answer
            self.requests.append((requested, 416, 0))  # before answering: the client may be done at once
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(self.payload)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.payload[start:]
        status = 206 if start else 200
        self.requests.append((requested, status, len(body)))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output quiet
        pass


@contextmanager
def serve(payload: bytes, ignore_range: bool = False):
    handler = type(
        "Handler", (RangeHandler,), {"payload": payload, "ignore_range": ignore_range, "requests": []}
    )
    with http_server(handler) as base:
        yield f"{base}/nature_12K.zip", handler.requests


def test_prepare_downloads_extracts_and_ignores_macosx(tmp_path):
    payload = dataset_zip(tmp_path)
    with serve(payload) as (url, requests):
        split_dir = prepare(tmp_path / "data", url=url)
    assert requests == [(None, 200, len(payload))]
    assert (tmp_path / "data" / "nature_12K.zip").read_bytes() == payload
    assert not (tmp_path / "data" / "nature_12K.zip.part").exists()
    assert not list((tmp_path / "data").rglob("__MACOSX")) and not list((tmp_path / "data").rglob("._*"))
    assert len(read_csv(split_dir / "manifest.csv")) == 14


@pytest.mark.parametrize("ignore_range", [False, True])
def test_download_resumes_a_partial_file_or_restarts_when_range_is_ignored(tmp_path, ignore_range):
    payload = os.urandom(300_000)
    dest = tmp_path / "nature_12K.zip"
    Path(str(dest) + ".part").write_bytes(payload[:120_000])
    with serve(payload, ignore_range=ignore_range) as (url, requests):
        download(url, dest)
    assert dest.read_bytes() == payload
    expected_status, expected_sent = (200, 300_000) if ignore_range else (206, 180_000)
    assert requests == [("bytes=120000-", expected_status, expected_sent)]


def test_a_complete_part_file_is_kept_when_the_server_has_nothing_more(tmp_path):
    payload = os.urandom(50_000)
    dest = tmp_path / "nature_12K.zip"
    Path(str(dest) + ".part").write_bytes(payload)  # the last run stopped just before renaming it
    with serve(payload) as (url, requests):
        download(url, dest)
    assert dest.read_bytes() == payload and requests == [("bytes=50000-", 416, 0)]
    # A longer .part is no prefix of the file: it is dropped and the download starts over.
    dest.unlink()
    Path(str(dest) + ".part").write_bytes(payload + b"junk")
    with serve(payload) as (url, requests):
        download(url, dest)
    assert dest.read_bytes() == payload and requests == [("bytes=50004-", 416, 0), (None, 200, 50_000)]


def test_no_network_fails_fast_and_says_how_to_use_zip(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on once this socket is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(DataError, match="--zip"):
        prepare(tmp_path, url=f"http://127.0.0.1:{port}/nature_12K.zip")
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("entry, message", [("../evil.jpg", r"'\.\.'"), ("/etc/evil.jpg", "absolute path")])
def test_unsafe_zip_entries_are_refused_before_anything_is_written(tmp_path, entry, message):
    archive_path = tmp_path / "bad.zip"
    archive_path.write_bytes(dataset_zip(tmp_path, with_junk=False))
    with zipfile.ZipFile(archive_path, "a") as archive:
        archive.writestr(zipfile.ZipInfo(entry), b"gotcha")
    with pytest.raises(DataError, match=message):
        prepare(tmp_path / "data", zip=archive_path)
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "data" / "inaturalist_12K").exists()


def test_archive_without_train_and_val_is_a_clear_error(tmp_path):
    archive_path = tmp_path / "other.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("photos/Aves/1.jpg", b"x")
    with pytest.raises(DataError, match="no train/ and val/ class folders"):
        prepare(tmp_path / "data", zip=archive_path)


def test_a_damaged_archive_is_a_clear_error_and_leaves_no_partial_folder(tmp_path):
    payload = bytearray(dataset_zip(tmp_path, with_junk=False))
    with zipfile.ZipFile(io.BytesIO(bytes(payload))) as archive:
        entry = next(e for e in archive.infolist() if e.filename.endswith(".jpg"))
    start = entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra)  # the file's data
    payload[start + entry.compress_size // 2] ^= 0xFF
    archive_path = tmp_path / "damaged.zip"
    archive_path.write_bytes(bytes(payload))
    with pytest.raises(DataError, match=r"damaged.*delete it and download it again"):
        prepare(tmp_path / "data", zip=archive_path)
    assert not list((tmp_path / "data").glob("*.partial"))


def test_an_interrupted_cache_build_leaves_no_temporary_file(tmp_path, monkeypatch):
    make_image_tree(tmp_path, ["Aves", "Fungi"], n_train=5, n_test=2)
    split_dir = prepare(tmp_path)

    def interrupted(fn, items, desc, chunksize=16):
        yield fn(items[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(data_cache, "parallel_map", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_cache(split_dir, "train", 8)
    assert not [p.name for p in (split_dir / "cache").iterdir()]  # no array, no meta, no temporary
    monkeypatch.undo()
    assert load_cache(split_dir, "train", 8).images.shape[1:] == (8, 8, 3)


def test_cli_prepares_from_a_zip_in_a_subfolder(tmp_path):
    archive_path = tmp_path / "nested.zip"
    archive_path.write_bytes(dataset_zip(tmp_path, prefix="download/nature_12K/inaturalist_12K/"))
    result = subprocess.run(
        [
            sys.executable,
            "common/data.py",
            "prepare",
            "--root",
            str(tmp_path / "data"),
            "--zip",
            str(archive_path),
            "--val_fraction=0.4",
            "--seed",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    state = json.loads((tmp_path / "data" / "split" / "prepare.json").read_text())
    assert state["seed"] == 1 and state["val_fraction"] == 0.4
    assert sorted(p.name for p in (tmp_path / "data" / "inaturalist_12K" / "train").iterdir()) == [
        "Aves",
        "Fungi",
    ]


# ---------------------------------------------------------------- benchmark


def test_bench_data_quick_prints_json_with_both_rates(capsys, tmp_path):
    from common import bench

    assert bench.main(["data", "--quick", "--work_dir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)  # stdout holds the JSON object and nothing else
    for key in ("cache_epoch_images_per_s", "imagefolder_epoch_images_per_s", "cache_build_images_per_s"):
        assert result[key] > 0, key
    assert result["epoch_images"]["cache"] == result["epoch_images"]["imagefolder"] > 0
    assert result["size"] == 224 and result["hardware"]["cpu_cores"] >= 1
