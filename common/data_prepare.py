"""``prepare``: the archive (or an unpacked copy) or your own folders -> a validated, stratified split.

    root/nature_12K.zip, root/inaturalist_12K/    the archive when downloaded, the original (never changed)
    root/split/{train,val,test}/<Class>/          hard links (copies where linking fails)
    root/split/manifest.csv, prepare.json         path, class, split, bytes, sha256; what it was made from
    root/split/skipped.csv, duplicates.csv        unreadable images and why; identical files in two splits

``val`` is a stratified ``val_fraction`` of each class of ``train/`` (by ``seed``), ``test`` the original
``val/``; ``source=DIR`` splits ``DIR/<Class>/*`` three ways (``test_fraction``) or ``DIR/train/<Class>/*``
with ``DIR/test/`` or ``DIR/val/`` as the test set. A split never moves: a refresh removes the images gone
from its source and adds new ones without moving any other (``assign_splits``). Classes are folder names
in Unicode NFC (macOS zips decompose them), ``sorted`` (``Bee`` before ``ant``) as in ``ImageFolder``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import os
import random
import shutil
import unicodedata
import urllib.parse
from collections import Counter, namedtuple
from dataclasses import dataclass
from pathlib import Path

from PIL import UnidentifiedImageError

from common.config import option
from common.data_cache import MANIFEST, open_rgb, parallel_map, read_manifest
from common.data_fetch import DATASET_DIR, DATASET_URL, DataError, download, extract, is_hidden
from common.files import read_json, write_json

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
PREPARE_FORMAT = 2  # 2: origin "test" (was "val"), own sources
nfc = functools.partial(unicodedata.normalize, "NFC")  # names as typed: macOS writes them decomposed
FileCheck = namedtuple("FileCheck", "bytes sha256 problem")  # problem: why the image is left out, or None


@dataclass
class PrepareConfig:  # the options of ``prepare`` and of ``python common/data.py prepare``
    root: str = option("data", "data folder: the original and the split go here")
    url: str = option(DATASET_URL, "where to download the archive from")
    zip: str | None = option(None, "use this already downloaded archive instead")
    val_fraction: float = option(0.2, "stratified fraction of train/ held out for validation")
    seed: int = option(42, "seed of the train/val split")
    source: str | None = option(None, "split your own folders instead: DIR/<Class>/* or DIR/train/<Class>/*")
    test_fraction: float = option(0.2, "with --source and no test folder: fraction of each class for testing")


@dataclass(frozen=True)
class ImageFile:
    source: Path  # the original file
    label: str  # class name
    relative: str  # path below the class folder, posix style
    origin: str  # "train" (to be split) or "test" (the given test set)

    @property
    def key(self) -> tuple[str, str, str]:  # the image from one prepare to the next, wherever its source
        return self.origin, self.label, self.relative


def prepare(root: str | Path, refresh: bool = False, **options) -> Path:
    """``root/split``, made with ``PrepareConfig``'s ``options`` unless intact (and not ``refresh``)."""
    config, root = PrepareConfig(root=str(root), **options), Path(root)
    split_dir, source, test_fraction = root / "split", config.source, config.test_fraction
    for name, fraction in (("val_fraction", config.val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{name} must be between 0 and 1 (exclusive), got {fraction}")
    saved, rows, problem = read_json(split_dir / "prepare.json"), None, None
    if (split_dir / MANIFEST).is_file():
        rows = read_manifest(split_dir)
        _check_same_options(split_dir, saved, val_fraction=config.val_fraction, seed=config.seed)
        if not (problem := _split_problem(split_dir, rows)) and not refresh:
            print(f"data ready: {split_dir} (refresh: python common/data.py prepare --root {root})")
            return split_dir
        if problem:
            print(f"{split_dir} is incomplete ({problem}): rebuilding it from its source, moving no image")
    if source is None and saved.get("source") is not None:  # a split of your own folders: refresh from them
        source, test_fraction = saved["source"], saved["test_fraction"]
        if not Path(source).is_dir():
            raise DataError(f"source {source} is no longer there: pass its new place with --source")
    train_dir, test_dir = _folders(root, config, source)
    test_fraction = None if test_dir else test_fraction  # a test set of its own: none drawn from train/
    if rows is not None:
        _check_same_options(split_dir, saved, test_fraction=test_fraction)
    tests = scan_class_folders(test_dir, "test") if test_dir else []
    files = scan_class_folders(train_dir, "train") + tests
    train, test = ({f.label for f in files if f.origin == origin} for origin in ("train", "test"))
    if len(train) < 2:
        raise DataError(f"{train_dir} has {len(train)} class(es) with images; a classifier needs at least 2")
    if test_dir is not None and train != test:
        only = f"only in training: {sorted(train - test)}; only in test: {sorted(test - train)}"
        raise DataError(f"{train_dir} and its test set {test_dir} hold different classes: {only}")
    state = {"format": PREPARE_FORMAT, "val_fraction": config.val_fraction, "seed": config.seed}
    state["fingerprint"] = fingerprint(files)
    if source is not None:
        state.update(source=str(Path(source).resolve()), test_fraction=test_fraction)
    if rows is not None and not problem and saved == state:
        print(f"data ready: {split_dir} (no image of its source added, removed or changed)")
    else:
        _make_split(root, files, rows, state)
    return split_dir


def _check_same_options(split_dir: Path, saved: dict, **asked) -> None:
    """Refuse split options other than those ``split_dir`` was made with: its images never move."""
    if differ := [name for name, value in asked.items() if name in saved and saved[name] != value]:
        made, given = (", ".join(f"{name} {values[name]}" for name in differ) for values in (saved, asked))
        hint = "use its values (train scripts: --val_fraction, --split_seed) or a new --root / --data_dir"
        raise DataError(f"{split_dir} was made with {made}, not {given}, and its images never move: {hint}")


def _folders(root: Path, config: PrepareConfig, source: str | None) -> tuple[Path, Path | None]:
    """The folder of class folders to split and that of test class folders (or None), found or extracted."""
    if source is not None:
        if not (source := Path(source)).is_dir():
            raise DataError(f"--source {source}: no such folder")
        if not (source / "train").is_dir():
            return source, None  # source/<Class>/*: train, val and test are all drawn from it
        if len(tests := [source / name for name in ("test", "val") if (source / name).is_dir()]) > 1:
            raise DataError(f"{source} has both test/ and val/: keep the one that is your test set")
        return source / "train", tests[0] if tests else None
    dataset = root / DATASET_DIR
    if not ((dataset / "train").is_dir() and (dataset / "val").is_dir()):
        if dataset.exists():
            raise DataError(f"{dataset} has no train/ and val/ folders: remove it (or move them there)")
        if config.zip is not None and not Path(config.zip).is_file():
            raise DataError(f"--zip {config.zip}: no such file")
        name = Path(urllib.parse.urlsplit(config.url).path).name or "nature_12K.zip"
        extract(config.zip or download(config.url, root / name), root)
    return dataset / "train", dataset / "val"


def scan_class_folders(folder: Path, origin: str) -> list[ImageFile]:
    """Image files below ``folder/<Class>/`` (not hidden ones, notes, *:Zone.Identifier, ...); none empty."""
    found, class_dirs = [], sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name))
    for class_dir in class_dirs:
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            for name in sorted(filenames):
                if not is_hidden(name) and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    relative = nfc((Path(dirpath) / name).relative_to(class_dir).as_posix())
                    found.append(ImageFile(Path(dirpath) / name, nfc(class_dir.name), relative, origin))
    if empty := sorted({nfc(d.name) for d in class_dirs} - {f.label for f in found}):
        raise DataError(f"class folders with no images in {folder}: {', '.join(empty)}; add or remove them")
    return found


def fingerprint(files: list[ImageFile]) -> str:
    """Hash of every file's name, size, inode and modification and change times: changes when any
    image changes, even if a copy tool restored its size and mtime (ctime cannot be set back)."""
    digest = hashlib.sha256()
    for f in files:
        try:
            stat = f.source.stat()
            state = f"{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0{stat.st_ino}"
        except OSError as error:  # a dangling link, a file that vanished: check_file reports it
            state = f"unreadable: {type(error).__name__}"
        digest.update(f"{f.origin}/{f.label}/{f.relative}\0{state}\n".encode())
    return digest.hexdigest()


def _split_problem(split_dir: Path, rows: list[dict[str, str]]) -> str | None:
    """What is wrong with the split's files (one deleted or replaced by hand), None when nothing is."""
    for line, row in enumerate(rows, start=2):
        try:
            row["path"].split("/", 2)[2]  # split/class/file: what _make_split reads
            if (split_dir / row["path"]).stat().st_size != int(row["bytes"]):
                return f"{row['path']} has another size than when it was split"
        except OSError:
            return f"{row['path']} is missing"
        except (AttributeError, IndexError, KeyError, ValueError) as error:
            damaged = f"{split_dir / MANIFEST} is damaged (line {line})"
            raise DataError(f"{damaged}: restore it, or make a new split") from error
    return None


def check_file(path: Path) -> FileCheck:
    """Hash the bytes and decode the image fully once; a problem is returned, never raised."""
    try:
        data = path.read_bytes()
    except OSError as error:  # a dangling link, no permission, a file that vanished
        return FileCheck(0, "", f"cannot read: {type(error).__name__}: {error.strerror or error}")
    problem = None if data else "empty file (0 bytes)"
    try:
        if data:
            open_rgb(io.BytesIO(data))
    except UnidentifiedImageError:
        problem = "not an image PIL can read"
    except Exception as error:  # truncated or corrupt data, decompression bombs, over MAX_PIXELS
        problem = f"cannot decode: {type(error).__name__}: {error}"
    return FileCheck(len(data), hashlib.sha256(data).hexdigest(), problem)


def assign_splits(good: list, val_fraction: float, seed: int, test_fraction=0.0, kept=None) -> dict:
    """The given test set -> test. Per class to split, images already in ``kept`` (key -> split) stay
    there; new ones fill the val (and with ``test_fraction`` test) counts of the class's total,
    round(n * fraction) and at least 1, drawn by ``seed``; the rest -> train. Nothing kept: a fresh split."""
    kept, assigned = kept or {}, {f: "test" for f in good if f.origin == "test"}
    for label in sorted({f.label for f in good if f.origin == "train"}):
        members = [f for f in good if f.origin == "train" and f.label == label]
        new = sorted((f for f in members if f.key not in kept), key=lambda f: f.relative)
        assigned.update({f: kept.get(f.key, "train") for f in members})
        have = Counter(kept[f.key] for f in members if f.key in kept)
        n_val = min(max(0, max(1, round(len(members) * val_fraction)) - have["val"]), len(new))
        n_test = max(1, round(len(members) * test_fraction)) - have["test"] if test_fraction else 0
        n_test = min(max(0, n_test), len(new) - n_val)
        # A string seed is hashed deterministically (not with Python's per-process hash salt).
        drawn = random.Random(f"{seed}:{label}").sample(range(len(new)), n_val + n_test)
        for position, index in enumerate(drawn):
            assigned[new[index]] = "val" if position < n_val else "test"
        counts, wanted = Counter(assigned[f] for f in members), SPLITS if test_fraction else SPLITS[:2]
        if not all(counts[split] for split in wanted):
            raise DataError(f"class {label} has {len(members)} readable image(s) to split: too few; add more")
    return assigned


def _make_split(root: Path, files: list[ImageFile], rows: list[dict] | None, state: dict) -> None:
    """Validate every file, assign the good ones (those in ``rows`` stay), write the split, say so."""
    checks = dict(zip(files, parallel_map(check_file, [f.source for f in files], "validate"), strict=True))
    skipped = [[str(f.source), checks[f].problem] for f in files if checks[f].problem is not None]
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    good = [f for f in files if checks[f].problem is None]
    if lost := sorted({f"{f.origin}/{f.label}" for f in files} - {f"{f.origin}/{f.label}" for f in good}):
        raise DataError(f"no readable images left in {', '.join(lost)} (see the skipped files above)")
    before, test_fraction = {}, state.get("test_fraction")  # ImageFile.key -> (split, sha256), as it was
    for row in rows or []:
        split, label, relative = row["path"].split("/", 2)
        origin = "test" if split == "test" and not test_fraction else "train"
        before[(origin, nfc(label), nfc(relative))] = (split, row["sha256"])
    kept = {key: split for key, (split, _) in before.items()}
    assigned = assign_splits(good, state["val_fraction"], state["seed"], test_fraction or 0.0, kept)
    _write_split(root, assigned, checks, skipped)
    # Written last, with the fingerprint taken now: making and removing hard links changed the
    # originals' change times (link counts), and the next run compares against these.
    write_json(root / "split" / "prepare.json", {**state, "fingerprint": fingerprint(files)})
    counts = Counter((f.label, split) for f, split in assigned.items())
    counts.update((None, split) for split in assigned.values())  # None: the total (no class is named so)
    print(f"{'class':<12}" + "".join(f"{split:>7}" for split in SPLITS))
    for label in [*sorted({f.label for f in good}), None]:
        print(f"{label or 'total':<12}" + "".join(f"{counts[label, split]:>7}" for split in SPLITS))
    print(f"skipped {len(skipped)}, split in {root / 'split'}")
    if rows is not None:
        print(_changes({f.key: (split, checks[f].sha256) for f, split in assigned.items()}, before))


def _write_split(root: Path, assigned: dict, checks: dict, skipped: list[list]) -> None:
    """Build the split and its csv files in a fresh folder, then swap it in: never half a split."""
    split_dir, building, old = root / "split", root / "split.partial", root / "split.old"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    manifest, splits_of = [], {}  # sha256 -> the splits that hold it
    for f in sorted(assigned, key=lambda f: (SPLITS.index(assigned[f]), f.label, f.relative)):
        relative = f"{assigned[f]}/{f.label}/{f.relative}"
        (building / relative).parent.mkdir(parents=True, exist_ok=True)
        try:  # resolved: os.link would link a symlink itself, and a relative one breaks when moved
            os.link(f.source.resolve(), building / relative)
        except OSError:  # another file system, or links not allowed: a copy keeps the original untouched
            shutil.copy2(f.source.resolve(), building / relative)
        manifest.append([relative, f.label, assigned[f], checks[f].bytes, checks[f].sha256])
        splits_of.setdefault(checks[f].sha256, set()).add(assigned[f])
    duplicates = [[sha, split, path] for path, _, split, _, sha in manifest if len(splits_of[sha]) > 1]
    tables = [(MANIFEST, "path,class,split,bytes,sha256", manifest), ("skipped.csv", "path,reason", skipped)]
    for name, header, table in [*tables, ("duplicates.csv", "sha256,split,path", duplicates)]:
        with open(building / name, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([header.split(","), *table])
    if leaked := len({row[0] for row in duplicates}):
        print(f"warning: {leaked} image(s) in several splits (possible leak): see {split_dir}/duplicates.csv")
    if (split_dir / "cache").is_dir():  # caches are keyed by content: those of unchanged splits stay valid
        os.replace(split_dir / "cache", building / "cache")
    shutil.rmtree(old, ignore_errors=True)
    if split_dir.exists():
        os.replace(split_dir, old)
    os.replace(building, split_dir)
    shutil.rmtree(old, ignore_errors=True)


def _changes(now: dict, before: dict) -> str:
    """What a refresh did, e.g. 'added 1 image (Aves: 1 train), removed 0'; key -> (split, sha256)."""

    def listed(keys: set, images: dict) -> str:
        counts = Counter((key[1], images[key][0]) for key in keys)  # (class, split)
        by_class = {c: ", ".join(f"{counts[c, s]} {s}" for s in SPLITS if counts[c, s]) for c, _ in counts}
        shown = "; ".join(f"{label}: {by_class[label]}" for label in sorted(by_class))
        return f"{len(keys)} image{'s' * (len(keys) != 1)} ({shown})" if keys else "0"

    added, removed = now.keys() - before.keys(), before.keys() - now.keys()
    changed = sum(now[key][1] != before[key][1] for key in now.keys() & before.keys())
    in_place = f"; {changed} changed in place (kept in their split)" if changed else ""
    return f"added {listed(added, now)}, removed {listed(removed, before)}{in_place}"
