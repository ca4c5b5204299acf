"""``prepare``: from the archive (or an unpacked copy) to a validated, stratified split on disk.

    root/nature_12K.zip                         the archive, when downloaded (kept; delete it to save space)
    root/inaturalist_12K/{train,val}/<Class>/   the original, never moved or changed
    root/split/{train,val,test}/<Class>/        hard links (copies where linking fails)
    root/split/manifest.csv                     path, class, split, bytes, sha256
    root/split/skipped.csv                      unreadable images, by name and reason
    root/split/duplicates.csv                   byte-identical files in different splits (leak check)
    root/split/prepare.json                     what the split was made from; makes reruns free

``val`` is a stratified ``val_fraction`` of each class of the original ``train/``, chosen by ``seed``;
``test`` is the original ``val/``.

A split never moves. An intact split is used as it is (the train scripts' call); ``refresh=True``
(``python common/data.py prepare``) brings it up to date with its source: images no longer there
leave, new ones are assigned by ``assign_splits`` without moving any other, and what changed is
printed. Another ``val_fraction``, ``seed`` or ``test_fraction`` for an existing split is refused:
it could only be honoured by moving images.

``source=DIR`` splits your own image folders instead, left where they are: ``DIR/<Class>/*`` (then
``test`` is a stratified ``test_fraction`` too) or ``DIR/train/<Class>/*`` with an optional
``DIR/test/`` or ``DIR/val/`` as the test set. A refresh without ``source`` uses the folder the split
was made from; only a refresh needs it.

A class is named by its folder's name in Unicode NFC (a macOS zip's decomposed names become the
names as typed), and every tool orders classes by Python's ``sorted`` of those names (code points:
``Bee`` before ``ant``), as torchvision's ``ImageFolder`` does.
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
from dataclasses import dataclass
from pathlib import Path

from PIL import UnidentifiedImageError

from common.data_cache import MANIFEST, open_rgb, parallel_map, read_manifest
from common.data_fetch import DATASET_DIR, DATASET_URL, DataError, download, extract, is_hidden
from common.files import read_json, write_json

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
PREPARE_FORMAT = 2  # 2: origin "test" (was "val"), own sources


@dataclass(frozen=True)
class ImageFile:
    source: Path  # the original file
    label: str  # class name
    relative: str  # path below the class folder, posix style
    origin: str  # "train" (to be split) or "test" (the given test set)

    @property
    def key(self) -> tuple[str, str, str]:
        """What identifies the image from one prepare to the next (not where the source lies)."""
        return self.origin, self.label, self.relative


@dataclass(frozen=True)
class FileCheck:
    bytes: int
    sha256: str
    problem: str | None  # why the image is left out; None when it decodes


def prepare(root: str | Path, url: str = DATASET_URL, zip_path: str | Path | None = None,
            val_fraction: float = 0.2, seed: int = 42, source: str | Path | None = None,
            test_fraction: float = 0.2, refresh: bool = False) -> Path:
    """Make ``root/split`` (see the module docstring) and return it. An intact split is used as it is
    unless ``refresh``; a refresh with unchanged files does nothing either."""
    root, split_dir = Path(root), Path(root) / "split"
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{name} must be between 0 and 1 (exclusive), got {fraction}")
    saved = read_json(split_dir / "prepare.json")
    made = (split_dir / MANIFEST).is_file()
    if made:
        _check_same_options(split_dir, saved, val_fraction=val_fraction, seed=seed)
    problem = _split_problem(split_dir) if made else None
    if made and not problem and not refresh:
        print(f"data ready: {split_dir} (to add new images of its source: python common/data.py prepare "
              f"--root {root})")
        return split_dir
    if problem:
        print(f"{split_dir} is incomplete ({problem}): rebuilding it from its source, moving no image")
    if source is None and saved.get("source") is not None:  # a split of your own folders: refresh from them
        source, test_fraction = saved["source"], saved["test_fraction"]
        if not Path(source).is_dir():
            raise DataError(f"refreshing {split_dir} needs {source}, the folder it was made from, which is "
                            f"no longer there: pass its new place (python common/data.py prepare --root "
                            f"{root} --source DIR)")
    if source is None:
        dataset = find_or_fetch_source(root, url, zip_path)
        train_dir, test_dir = dataset / "train", dataset / "val"
    else:
        train_dir, test_dir = source_folders(Path(source))
    if test_dir is not None:
        test_fraction = None  # a test set of its own: nothing is drawn from train/ for it
    if made:
        _check_same_options(split_dir, saved, test_fraction=test_fraction)
    files = scan_class_folders(train_dir, "train") + (scan_class_folders(test_dir, "test") if test_dir else [])
    check_class_sets(train_dir, test_dir, files)
    state = {"format": PREPARE_FORMAT, "val_fraction": val_fraction, "seed": seed, "fingerprint": fingerprint(files)}
    if source is not None:
        state.update(source=str(Path(source).resolve()), test_fraction=test_fraction)
    if made and not problem and saved == state:
        print(f"data ready: {split_dir} (no image of its source added, removed or changed)")
        return split_dir

    checks = dict(zip(files, parallel_map(check_file, [f.source for f in files], "validate")))
    good = [f for f in files if checks[f].problem is None]
    check_no_empty_class(files, good)
    before = _split_images(split_dir, test_drawn=test_fraction is not None) if made else {}
    assigned = assign_splits(good, val_fraction, seed, test_fraction or 0.0,
                             {key: split for key, (split, _) in before.items()})
    _write_split(root, split_dir, assigned, checks, files, state)
    if made:
        print(_changes({f.key: (split, checks[f].sha256) for f, split in assigned.items()}, before))
    return split_dir


def _check_same_options(split_dir: Path, saved: dict, **asked) -> None:
    """Refuse split options other than those ``split_dir`` was made with: its images never move."""
    differ = [name for name, value in asked.items() if name in saved and saved[name] != value]
    if differ:
        raise DataError(f"{split_dir} was made with {', '.join(f'{k} {saved[k]}' for k in differ)}, not "
                        f"{', '.join(f'{k} {asked[k]}' for k in differ)}, and its images never move: use its "
                        "values (train scripts: --val_fraction, --split_seed), or make a new split with another "
                        f"--root / --data_dir (or delete {split_dir}: runs trained on it can then no longer be "
                        "resumed or evaluated)")


def source_folders(source: Path) -> tuple[Path, Path | None]:
    """(the folder of class folders to split, the folder of test class folders or None) of ``source``."""
    if not source.is_dir():
        raise DataError(f"--source {source}: no such folder")
    if not (source / "train").is_dir():
        return source, None  # source/<Class>/*: train, val and test are all drawn from it
    tests = [source / name for name in ("test", "val") if (source / name).is_dir()]
    if len(tests) > 1:
        raise DataError(f"{source} has both test/ and val/: keep the one that is your test set (validation is "
                        "drawn from train/ by --val_fraction)")
    return source / "train", tests[0] if tests else None


def find_or_fetch_source(root: Path, url: str, zip_path: str | Path | None) -> Path:
    """``root/inaturalist_12K`` with ``train/`` and ``val/``: as found, else extracted from a zip."""
    source = root / DATASET_DIR
    if (source / "train").is_dir() and (source / "val").is_dir():
        return source
    if source.exists():
        raise DataError(f"{source} exists but has no train/ and val/ folders; remove it (or move the "
                        "folders there) and run again")
    if zip_path is None:
        zip_path = download(url, root / (Path(urllib.parse.urlsplit(url).path).name or "nature_12K.zip"))
    elif not Path(zip_path).is_file():
        raise DataError(f"--zip {zip_path}: no such file")
    return extract(Path(zip_path), root)


def scan_class_folders(folder: Path, origin: str) -> list[ImageFile]:
    """Image files below ``folder/<Class>/``; hidden folders and non-image files are ignored."""
    found = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name)):
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            for name in sorted(filenames):
                if is_hidden(name) or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue  # .DS_Store, *:Zone.Identifier, notes, ...
                path = Path(dirpath) / name
                relative = nfc(path.relative_to(class_dir).as_posix())
                found.append(ImageFile(path, nfc(class_dir.name), relative, origin))
    return found


def nfc(name: str) -> str:
    """A file or folder name as typed (Unicode NFC): macOS writes names decomposed (NFD)."""
    return unicodedata.normalize("NFC", name)


def check_class_sets(train_dir: Path, test_dir: Path | None, files: list[ImageFile]) -> None:
    """Every class folder holds images, there are at least two classes, and test has train's classes."""
    found = {origin: {f.label for f in files if f.origin == origin} for origin in ("train", "test")}
    for origin, folder in (("train", train_dir), ("test", test_dir)):
        if folder is None:
            continue
        empty = sorted(nfc(p.name) for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name)
                       and nfc(p.name) not in found[origin])
        if empty:
            raise DataError(f"class folders with no images in {folder}: {', '.join(empty)}; "
                            "add their images or remove the folders")
    if len(found["train"]) < 2:
        raise DataError(f"{train_dir} holds {len(found['train'])} class folder(s) with images "
                        f"({', '.join(sorted(found['train'])) or 'none'}); a classifier needs at least 2")
    if test_dir is not None and found["train"] != found["test"]:
        raise DataError(f"{train_dir} and its test set {test_dir} hold different classes: only in training: "
                        f"{sorted(found['train'] - found['test']) or 'none'}; only in test: "
                        f"{sorted(found['test'] - found['train']) or 'none'}")


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


def _split_problem(split_dir: Path) -> str | None:
    """None when every file the manifest lists is there with its size, else what is wrong (a deleted or
    replaced split file makes ``prepare`` rebuild the split instead of reporting it ready)."""
    for line, row in enumerate(read_manifest(split_dir), start=2):
        try:
            row["path"].split("/", 2)[2]  # split/class/file: what _split_images reads
            if (split_dir / row["path"]).stat().st_size != int(row["bytes"]):
                return f"{row['path']} has another size than when it was split"
        except OSError:
            return f"{row['path']} is missing"
        except (AttributeError, IndexError, KeyError, ValueError) as error:
            raise DataError(f"{split_dir / MANIFEST} is damaged (line {line}), so which image is in which "
                            f"split is unknown: restore it, or delete {split_dir} to make a new split (runs "
                            "trained on it can then no longer be resumed or evaluated)") from error
    return None


def _split_images(split_dir: Path, test_drawn: bool) -> dict[tuple[str, str, str], tuple[str, str]]:
    """``ImageFile.key`` -> (split, sha256) of every image in the manifest (checked by ``_split_problem``);
    its test images came from ``train/`` too when ``test_drawn``."""
    images = {}
    for row in read_manifest(split_dir):
        split, label, relative = row["path"].split("/", 2)
        origin = "test" if split == "test" and not test_drawn else "train"
        images[(origin, nfc(label), nfc(relative))] = (split, row["sha256"])
    return images


def check_file(path: Path) -> FileCheck:
    """Hash the bytes and decode the image fully once; a problem is returned, never raised."""
    try:
        data = path.read_bytes()
    except OSError as error:  # a dangling link, no permission, a file that vanished
        return FileCheck(0, "", f"cannot read: {type(error).__name__}: {error.strerror or error}")
    sha256 = hashlib.sha256(data).hexdigest()
    if not data:
        return FileCheck(0, sha256, "empty file (0 bytes)")
    try:
        open_rgb(io.BytesIO(data))
    except UnidentifiedImageError:
        problem = "not an image PIL can read"
    except ValueError as error:  # our pixel limit
        problem = str(error)
    except Exception as error:  # truncated or corrupt data, decompression bombs, ...
        problem = f"cannot decode: {type(error).__name__}: {error}"
    else:
        problem = None
    return FileCheck(len(data), sha256, problem)


def check_no_empty_class(files: list[ImageFile], good: list[ImageFile]) -> None:
    before = Counter((f.origin, f.label) for f in files)
    after = Counter((f.origin, f.label) for f in good)
    lost = sorted(f"{origin}/{label}" for origin, label in before if after[(origin, label)] == 0)
    if lost:
        raise DataError(f"no readable images left in {', '.join(lost)} (see the skipped files above); "
                        "replace the broken files")


def assign_splits(good: list[ImageFile], val_fraction: float, seed: int, test_fraction: float = 0.0,
                  kept: dict[tuple[str, str, str], str] | None = None) -> dict[ImageFile, str]:
    """The given test set -> test. Per class to split, images already in ``kept`` (key -> split) stay
    there; the new ones first fill the val (and with ``test_fraction`` the test) counts that the class's
    total gives, round(n * fraction) and at least 1, drawn by ``seed``; the rest -> train. With nothing
    kept this is a fresh stratified split."""
    kept = kept or {}
    assigned = {f: "test" for f in good if f.origin == "test"}
    for label in sorted({f.label for f in good if f.origin == "train"}):
        members = [f for f in good if f.origin == "train" and f.label == label]
        new = sorted((f for f in members if f.key not in kept), key=lambda f: f.relative)
        assigned.update({f: kept[f.key] for f in members if f.key in kept})
        assigned.update(dict.fromkeys(new, "train"))
        # New images fill the counts the fractions give for the class's total, less the kept ones there.
        have = Counter(kept[f.key] for f in members if f.key in kept)
        n_val = max(1, round(len(members) * val_fraction)) - have["val"]
        n_test = max(1, round(len(members) * test_fraction)) - have["test"] if test_fraction else 0
        n_val = min(max(0, n_val), len(new))
        n_test = min(max(0, n_test), len(new) - n_val)
        # A string seed is hashed deterministically (not with Python's per-process hash salt).
        drawn = random.Random(f"{seed}:{label}").sample(range(len(new)), n_val + n_test)
        for position, index in enumerate(drawn):
            assigned[new[index]] = "val" if position < n_val else "test"
        counts, wanted = Counter(assigned[f] for f in members), SPLITS if test_fraction else SPLITS[:2]
        if not all(counts[split] for split in wanted):
            shown = ", ".join(f"{split} {counts[split]}" for split in wanted)
            raise DataError(f"class {label} has {len(members)} readable image(s) to split: too few for an "
                            f"image in each split ({shown}); add images, or lower --val_fraction / "
                            "--test_fraction")
    return assigned


def _link_or_copy(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = source.resolve()  # os.link would link a symlink itself, and a relative one breaks when moved
    try:
        os.link(source, dest)
    except OSError:  # another file system, or links not allowed: a copy keeps the original untouched
        shutil.copy2(source, dest)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _write_split(root: Path, split_dir: Path, assigned: dict[ImageFile, str], checks: dict[ImageFile, FileCheck],
                 files: list[ImageFile], state: dict) -> None:
    """Build the split in a fresh folder, then swap it in, so a crash never leaves half a split."""
    building = root / "split.partial"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    order = {name: i for i, name in enumerate(SPLITS)}
    entries = sorted(assigned.items(), key=lambda item: (order[item[1]], item[0].label, item[0].relative))
    manifest = []
    for f, split in entries:
        relative = f"{split}/{f.label}/{f.relative}"
        _link_or_copy(f.source, building / relative)
        manifest.append([relative, f.label, split, checks[f].bytes, checks[f].sha256])
    _write_csv(building / MANIFEST, ["path", "class", "split", "bytes", "sha256"], manifest)

    skipped = [[str(f.source), checks[f].problem] for f in files if checks[f].problem is not None]
    _write_csv(building / "skipped.csv", ["path", "reason"], skipped)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")

    by_hash: dict[str, list[list]] = {}
    for row in manifest:
        by_hash.setdefault(row[4], []).append(row)
    duplicates = [[sha, row[2], row[0]] for sha, rows in by_hash.items() if len({r[2] for r in rows}) > 1
                  for row in rows]
    _write_csv(building / "duplicates.csv", ["sha256", "split", "path"], duplicates)
    if duplicates:
        print(f"warning: {len({d[0] for d in duplicates})} images appear byte-identical in more than one split "
              f"(possible leak): see {split_dir / 'duplicates.csv'}")

    if (split_dir / "cache").is_dir():  # caches are keyed by content: those of unchanged splits stay valid
        os.replace(split_dir / "cache", building / "cache")
    old = root / "split.old"
    shutil.rmtree(old, ignore_errors=True)
    if split_dir.exists():
        os.replace(split_dir, old)
    os.replace(building, split_dir)
    shutil.rmtree(old, ignore_errors=True)
    # Written last, with the fingerprint taken now: making and removing hard links changed the
    # originals' change times (link counts), and the next run compares against these.
    state = {**state, "fingerprint": fingerprint(files)}
    write_json(split_dir / "prepare.json", state)

    counts = Counter((split, f.label) for f, split in assigned.items())
    classes = sorted({f.label for f in assigned})
    print(f"{'class':<12}" + "".join(f"{s:>7}" for s in SPLITS))
    for label in classes:
        print(f"{label:<12}" + "".join(f"{counts[(s, label)]:>7}" for s in SPLITS))
    print(f"{'total':<12}" + "".join(f"{sum(counts[(s, c)] for c in classes):>7}" for s in SPLITS)
          + f"   skipped {len(skipped)}  -> {split_dir}")


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
