"""``prepare``: from the archive (or an unpacked copy) or your own folders to a validated, stratified split.

    root/nature_12K.zip                         the archive, when downloaded (kept; delete it to save space)
    root/inaturalist_12K/{train,val}/<Class>/   the original, never moved or changed
    root/split/{train,val,test}/<Class>/        hard links (copies where linking fails)
    root/split/manifest.csv                     path, class, split, bytes, sha256
    root/split/skipped.csv                      unreadable images, by name and reason
    root/split/duplicates.csv                   byte-identical files in different splits (leak check)
    root/split/prepare.json                     what the split was made from; makes reruns free

``val`` is a stratified ``val_fraction`` of each class of ``train/`` (by ``seed``), ``test`` the original
``val/``; ``source=DIR`` splits ``DIR/<Class>/*`` three ways (``test_fraction``) or ``DIR/train/<Class>/*``
with ``DIR/test/`` or ``DIR/val/`` as the test set, left where they are. A split never moves: ``refresh``
(the CLI) removes images no longer in the source and adds new ones (``assign_splits``) without moving
any other; other fractions or seed for an existing split are refused. A class is named by its folder's
name in Unicode NFC (macOS zips decompose names) and classes are ordered by ``sorted`` of those names
(code points: ``Bee`` before ``ant``), as torchvision's ``ImageFolder`` does.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import random
import shutil
import unicodedata
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from PIL import UnidentifiedImageError

from common.data_cache import MANIFEST, open_rgb, parallel_map, read_manifest
from common.data_fetch import DATASET_DIR, DATASET_URL, DataError, download, extract, is_hidden
from common.files import read_json, write_json

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
PREPARE_FORMAT = 2  # 2: origin "test" (was "val"), own sources


def option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class PrepareConfig:  # the options of ``prepare`` and of ``python common/data.py prepare``
    root: str = option("data", "data folder: the original and the split go here")
    url: str = option(DATASET_URL, "where to download the archive from")
    zip: str | None = option(None, "use this already downloaded archive instead")
    val_fraction: float = option(0.2, "stratified fraction of train/ held out for validation")
    seed: int = option(42, "seed of the train/val split")
    source: str | None = option(
        None, "split your own image folders instead: DIR/<Class>/* or DIR/train/<Class>/* (+ DIR/test or "
        "DIR/val as the test set); they are linked, never changed")
    test_fraction: float = option(0.2, "with --source and no test folder: stratified fraction of each "
                                              "class held out for testing")


@dataclass(frozen=True)
class ImageFile:
    source: Path  # the original file
    label: str  # class name
    relative: str  # path below the class folder, posix style
    origin: str  # "train" (to be split) or "test" (the given test set)

    @property
    def key(self) -> tuple[str, str, str]:  # the image from one prepare to the next, wherever its source
        return self.origin, self.label, self.relative


class FileCheck(NamedTuple):
    bytes: int
    sha256: str
    problem: str | None  # why the image is left out; None when it decodes


def prepare(root: str | Path, refresh: bool = False, **options) -> Path:
    """Make ``root/split`` (see the module docstring) with ``options`` (``PrepareConfig``'s) and return it.
    An intact split is used as it is unless ``refresh``; a refresh with unchanged files does nothing."""
    config, root, split_dir = PrepareConfig(root=str(root), **options), Path(root), Path(root) / "split"
    for name, fraction in (("val_fraction", config.val_fraction), ("test_fraction", config.test_fraction)):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{name} must be between 0 and 1 (exclusive), got {fraction}")
    saved, made = read_json(split_dir / "prepare.json"), (split_dir / MANIFEST).is_file()
    rows, problem = read_manifest(split_dir) if made else [], None
    if made:
        _check_same_options(split_dir, saved, val_fraction=config.val_fraction, seed=config.seed)
        if not (problem := _split_problem(split_dir, rows)) and not refresh:
            print(f"data ready: {split_dir} (to add new images of its source: python common/data.py prepare "
                  f"--root {root})")
            return split_dir
        if problem:
            print(f"{split_dir} is incomplete ({problem}): rebuilding it from its source, moving no image")
    source, test_fraction = config.source, config.test_fraction
    if source is None and saved.get("source") is not None:  # a split of your own folders: refresh from them
        source, test_fraction = saved["source"], saved["test_fraction"]
        if not Path(source).is_dir():
            raise DataError(
                f"refreshing {split_dir} needs {source}, the folder it was made from, which is no longer "
                f"there: pass its new place (python common/data.py prepare --root {root} --source DIR)")
    train_dir, test_dir = _folders(root, config, source)
    if test_dir is not None:
        test_fraction = None  # a test set of its own: nothing is drawn from train/ for it
    if made:
        _check_same_options(split_dir, saved, test_fraction=test_fraction)
    tests = scan_class_folders(test_dir, "test") if test_dir else []
    files = scan_class_folders(train_dir, "train") + tests
    check_class_sets(train_dir, test_dir, files)
    state = {"format": PREPARE_FORMAT, "val_fraction": config.val_fraction, "seed": config.seed}
    state["fingerprint"] = fingerprint(files)
    if source is not None:
        state.update(source=str(Path(source).resolve()), test_fraction=test_fraction)
    if made and not problem and saved == state:
        print(f"data ready: {split_dir} (no image of its source added, removed or changed)")
        return split_dir
    _make_split(root, files, rows if made else None, state)
    return split_dir


def _check_same_options(split_dir: Path, saved: dict, **asked) -> None:
    """Refuse split options other than those ``split_dir`` was made with: its images never move."""
    if differ := [name for name, value in asked.items() if name in saved and saved[name] != value]:
        raise DataError(
            f"{split_dir} was made with {', '.join(f'{k} {saved[k]}' for k in differ)}, not "
            f"{', '.join(f'{k} {asked[k]}' for k in differ)}, and its images never move: use its values "
            "(train scripts: --val_fraction, --split_seed), or make a new split with another --root / "
            f"--data_dir (or delete {split_dir}: runs trained on it can then no longer be resumed or "
            "evaluated)")


def _folders(root: Path, config: PrepareConfig, source: str | None) -> tuple[Path, Path | None]:
    """(the folder of class folders to split, the folder of test class folders or None): of ``source``, else
    ``train/`` and ``val/`` of ``root/inaturalist_12K``, as found or else extracted from the archive."""
    if source is not None:
        if not (source := Path(source)).is_dir():
            raise DataError(f"--source {source}: no such folder")
        if not (source / "train").is_dir():
            return source, None  # source/<Class>/*: train, val and test are all drawn from it
        if len(tests := [source / name for name in ("test", "val") if (source / name).is_dir()]) > 1:
            raise DataError(f"{source} has both test/ and val/: keep the one that is your test set "
                            "(validation is drawn from train/ by --val_fraction)")
        return source / "train", tests[0] if tests else None
    dataset = root / DATASET_DIR
    if not ((dataset / "train").is_dir() and (dataset / "val").is_dir()):
        if dataset.exists():
            raise DataError(f"{dataset} exists but has no train/ and val/ folders; remove it (or move the "
                            "folders there) and run again")
        if config.zip is not None and not Path(config.zip).is_file():
            raise DataError(f"--zip {config.zip}: no such file")
        name = Path(urllib.parse.urlsplit(config.url).path).name or "nature_12K.zip"
        extract(Path(config.zip) if config.zip else download(config.url, root / name), root)
    return dataset / "train", dataset / "val"


def nfc(name: str) -> str:
    """A file or folder name as typed (Unicode NFC): macOS writes names decomposed (NFD)."""
    return unicodedata.normalize("NFC", name)


def scan_class_folders(folder: Path, origin: str) -> list[ImageFile]:
    """Image files below ``folder/<Class>/``; hidden folders and non-image files are ignored. A class
    folder without images is an error."""
    found, class_dirs = [], sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name))
    for class_dir in class_dirs:
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            for name in sorted(filenames):  # not .DS_Store, *:Zone.Identifier, notes, ...
                if not is_hidden(name) and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    relative = nfc((Path(dirpath) / name).relative_to(class_dir).as_posix())
                    found.append(ImageFile(Path(dirpath) / name, nfc(class_dir.name), relative, origin))
    if empty := sorted({nfc(d.name) for d in class_dirs} - {f.label for f in found}):
        raise DataError(f"class folders with no images in {folder}: {', '.join(empty)}; "
                        "add their images or remove the folders")
    return found


def check_class_sets(train_dir: Path, test_dir: Path | None, files: list[ImageFile]) -> None:
    """There are at least two classes, and a test set has the training set's."""
    train, test = ({f.label for f in files if f.origin == origin} for origin in ("train", "test"))
    if len(train) < 2:
        raise DataError(f"{train_dir} holds {len(train)} class folder(s) with images "
                        f"({', '.join(sorted(train)) or 'none'}); a classifier needs at least 2")
    if test_dir is not None and train != test:
        raise DataError(f"{train_dir} and its test set {test_dir} hold different classes: only in training: "
                        f"{sorted(train - test) or 'none'}; only in test: {sorted(test - train) or 'none'}")


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
    """None when every file the manifest lists is there with its size, else what is wrong (a deleted or
    replaced split file makes ``prepare`` rebuild the split instead of reporting it ready)."""
    for line, row in enumerate(rows, start=2):
        try:
            row["path"].split("/", 2)[2]  # split/class/file: what _make_split reads
            if (split_dir / row["path"]).stat().st_size != int(row["bytes"]):
                return f"{row['path']} has another size than when it was split"
        except OSError:
            return f"{row['path']} is missing"
        except (AttributeError, IndexError, KeyError, ValueError) as error:
            raise DataError(f"{split_dir / MANIFEST} is damaged (line {line}), so which image is in which "
                            f"split is unknown: restore it, or delete {split_dir} to make a new split (runs "
                            "trained on it can then no longer be resumed or evaluated)") from error
    return None


def check_file(path: Path) -> FileCheck:
    """Hash the bytes and decode the image fully once; a problem is returned, never raised."""
    try:
        data = path.read_bytes()
    except OSError as error:  # a dangling link, no permission, a file that vanished
        return FileCheck(0, "", f"cannot read: {type(error).__name__}: {error.strerror or error}")
    sha256, problem = hashlib.sha256(data).hexdigest(), None if data else "empty file (0 bytes)"
    try:
        if data:
            open_rgb(io.BytesIO(data))
    except UnidentifiedImageError:
        problem = "not an image PIL can read"
    except ValueError as error:  # our pixel limit
        problem = str(error)
    except Exception as error:  # truncated or corrupt data, decompression bombs, ...
        problem = f"cannot decode: {type(error).__name__}: {error}"
    return FileCheck(len(data), sha256, problem)


def assign_splits(good: list[ImageFile], val_fraction: float, seed: int, test_fraction: float = 0.0,
                  kept: dict | None = None) -> dict[ImageFile, str]:
    """The given test set -> test. Per class to split, images already in ``kept`` (key -> split) stay
    there; the new ones first fill the val (and with ``test_fraction`` the test) counts that the class's
    total gives, round(n * fraction) and at least 1, drawn by ``seed``; the rest -> train. With nothing
    kept this is a fresh stratified split."""
    kept, assigned = kept or {}, {f: "test" for f in good if f.origin == "test"}
    for label in sorted({f.label for f in good if f.origin == "train"}):
        members = [f for f in good if f.origin == "train" and f.label == label]
        new = sorted((f for f in members if f.key not in kept), key=lambda f: f.relative)
        assigned.update({f: kept.get(f.key, "train") for f in members})
        # New images fill the counts the fractions give for the class's total, less the kept ones there.
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
            shown = ", ".join(f"{split} {counts[split]}" for split in wanted)
            raise DataError(
                f"class {label} has {len(members)} readable image(s) to split: too few for an image in each "
                f"split ({shown}); add images, or lower --val_fraction / --test_fraction")
    return assigned


def _link_or_copy(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = source.resolve()  # os.link would link a symlink itself, and a relative one breaks when moved
    try:
        os.link(source, dest)
    except OSError:  # another file system, or links not allowed: a copy keeps the original untouched
        shutil.copy2(source, dest)


def _write_csv(path: Path, header: str, rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header.split(","), *rows])


def _make_split(root: Path, files: list[ImageFile], rows: list[dict] | None, state: dict) -> None:
    """Validate every file and assign the good ones (the images of the manifest's ``rows``, None for a
    first split, stay where they are); write the split and print what it holds and what changed."""
    checks = dict(zip(files, parallel_map(check_file, [f.source for f in files], "validate"), strict=True))
    good = [f for f in files if checks[f].problem is None]
    if lost := sorted({f"{f.origin}/{f.label}" for f in files} - {f"{f.origin}/{f.label}" for f in good}):
        raise DataError(f"no readable images left in {', '.join(lost)} (see the skipped files above); "
                        "replace the broken files")
    before, test_fraction = {}, state.get("test_fraction")  # ImageFile.key -> (split, sha256), as it was
    for row in rows or []:
        split, label, relative = row["path"].split("/", 2)
        origin = "test" if split == "test" and not test_fraction else "train"
        before[(origin, nfc(label), nfc(relative))] = (split, row["sha256"])
    kept = {key: split for key, (split, _) in before.items()}
    assigned = assign_splits(good, state["val_fraction"], state["seed"], test_fraction or 0.0, kept)
    skipped = _write_split(root, assigned, checks, files)
    # Written last, with the fingerprint taken now: making and removing hard links changed the
    # originals' change times (link counts), and the next run compares against these.
    write_json(root / "split" / "prepare.json", {**state, "fingerprint": fingerprint(files)})
    counts = Counter((split, f.label) for f, split in assigned.items())
    classes = sorted({f.label for f in good})
    print(f"{'class':<12}" + "".join(f"{s:>7}" for s in SPLITS))
    for label in classes:
        print(f"{label:<12}" + "".join(f"{counts[(s, label)]:>7}" for s in SPLITS))
    totals = "".join(f"{sum(counts[(s, c)] for c in classes):>7}" for s in SPLITS)
    print(f"{'total':<12}{totals}   skipped {skipped}  -> {root / 'split'}")
    if rows is not None:
        print(_changes({f.key: (split, checks[f].sha256) for f, split in assigned.items()}, before))


def _write_split(root: Path, assigned: dict, checks: dict, files: list[ImageFile]) -> int:
    """Build the split (``assigned``: file -> split) with its csv files in a fresh folder, then swap it in,
    so a crash never leaves half a split; print the skipped files and any leak. Returns how many were."""
    split_dir, building, old = root / "split", root / "split.partial", root / "split.old"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    manifest = []
    for f in sorted(assigned, key=lambda f: (SPLITS.index(assigned[f]), f.label, f.relative)):
        split = assigned[f]
        relative = f"{split}/{f.label}/{f.relative}"
        _link_or_copy(f.source, building / relative)
        manifest.append([relative, f.label, split, checks[f].bytes, checks[f].sha256])
    _write_csv(building / MANIFEST, "path,class,split,bytes,sha256", manifest)
    skipped = [[str(f.source), checks[f].problem] for f in files if checks[f].problem is not None]
    _write_csv(building / "skipped.csv", "path,reason", skipped)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    by_hash: dict[str, list[list]] = {}
    for row in manifest:
        by_hash.setdefault(row[4], []).append(row)
    leaked = [sha for sha, group in by_hash.items() if len({row[2] for row in group}) > 1]
    duplicates = [[row[4], row[2], row[0]] for sha in leaked for row in by_hash[sha]]
    _write_csv(building / "duplicates.csv", "sha256,split,path", duplicates)
    if leaked:
        print(f"warning: {len(leaked)} images appear byte-identical in more than one split (possible leak): "
              f"see {split_dir / 'duplicates.csv'}")
    if (split_dir / "cache").is_dir():  # caches are keyed by content: those of unchanged splits stay valid
        os.replace(split_dir / "cache", building / "cache")
    shutil.rmtree(old, ignore_errors=True)
    if split_dir.exists():
        os.replace(split_dir, old)
    os.replace(building, split_dir)
    shutil.rmtree(old, ignore_errors=True)
    return len(skipped)


def _changes(now: dict, before: dict) -> str:
    """What a refresh did, e.g. 'added 1 image (Aves: 1 train), removed 0'; ``now`` and ``before`` map
    ``ImageFile.key`` to (split, sha256)."""
    def listed(keys, images: dict) -> str:
        counts = Counter((key[1], images[key][0]) for key in keys)
        by_class = "; ".join(f"{label}: " + ", ".join(f"{counts[label, s]} {s}" for s in SPLITS
                                                      if counts[label, s])
                             for label in sorted({label for label, _ in counts}))
        return f"{len(keys)} image{'s' * (len(keys) != 1)} ({by_class})" if keys else "0"
    added, removed = now.keys() - before.keys(), before.keys() - now.keys()
    changed = sum(now[key][1] != before[key][1] for key in now.keys() & before.keys())
    return (f"added {listed(added, now)}, removed {listed(removed, before)}"
            + (f"; {changed} changed in place (kept in their split)" if changed else ""))
