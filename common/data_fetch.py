"""The dataset archive onto disk and unpacked, standard library only. The download goes to ``NAME.part``
(renamed when complete, continued by a rerun with an HTTP Range request); extraction checks every entry
before writing any, into a ``.partial`` folder renamed at the end: nothing half-done passes for done.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import zipfile
import zlib
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from tqdm import tqdm

from common.config import UserError

# Downloads and extraction take minutes: a live bar on a terminal, a line every 30 s in a log file.
LOG_INTERVAL_S = 0.1 if sys.stderr.isatty() else 30.0
DATASET_URL = "https://storage.googleapis.com/wandb_datasets/nature_12K.zip"
DATASET_DIR = "inaturalist_12K"
# Long enough for a slow link, short enough that a machine without network fails at once.
NETWORK_TIMEOUT_S = 10
BYTES_BAR = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "mininterval": LOG_INTERVAL_S}


class DataError(UserError):
    """A data problem the user can fix; the message says what is wrong and what to do."""


def download(url: str, dest: Path, timeout: float = NETWORK_TIMEOUT_S) -> Path:
    """``url`` to ``dest`` through ``dest.part``, which a rerun continues; a failure says what to do."""
    dest, part = Path(dest), Path(f"{dest}.part")
    if not dest.is_file():
        try:
            download_into(url, part, timeout)
        except DataError as error:
            hint = f"run it again to resume from {part}, or " if part.is_file() else ""
            hint += f"download it elsewhere and pass --zip FILE, or put its {DATASET_DIR}/ in {dest.parent}"
            raise DataError(f"{error}: {hint}") from error
        os.replace(part, dest)
    return dest


def download_into(url: str, part: Path, timeout: float = NETWORK_TIMEOUT_S) -> None:
    """Append the rest of ``url`` to ``part`` (HTTP Range), or start over if the server cannot resume."""
    part.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # a second try only after the server refused to resume: then from byte 0
        have = part.stat().st_size if part.is_file() else 0
        try:
            headers = {"Range": f"bytes={have}-"} if have else {}
            response = urlopen(Request(url, headers=headers), timeout=timeout)
        except HTTPError as error:
            if error.code != 416 or not have:
                raise DataError(f"downloading {url} failed: HTTP {error.code} {error.reason}") from error
            # Nothing after byte `have`: a complete file if the server's size is `have`, else start over.
            if (error.headers.get("Content-Range") or "").strip() == f"bytes */{have}":
                return
            part.unlink()
            continue
        except OSError as error:  # URLError, refused connections, timeouts, DNS failures
            raise DataError(f"cannot download {url}: {getattr(error, 'reason', error)}") from error
        with response:
            start = have if response.status == 206 else 0  # 200: the whole file, from the start
            if start and not (response.headers.get("Content-Range") or "").startswith(f"bytes {have}-"):
                part.unlink()  # some other range than we asked for: start over
                continue
            length = response.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            bar = tqdm(total=total, initial=start, desc=f"download {part.stem}", **BYTES_BAR)
            with open(part, "ab" if start else "wb") as out, bar:
                try:
                    while chunk := response.read(1 << 20):
                        bar.update(out.write(chunk))
                except (OSError, HTTPException) as error:  # timeouts, resets, a cut-off transfer
                    raise DataError(f"download interrupted after {out.tell():,} bytes ({error})") from error
                if total is not None and out.tell() != total:
                    raise DataError(f"download stopped at {out.tell():,} of {total:,} bytes")
        return
    raise DataError(f"the server at {url} answers Range requests inconsistently; delete {part} and retry")


def is_hidden(name: str) -> bool:
    """Hidden files and folders, and the macOS resource forks zip tools add: never part of the dataset."""
    return name.startswith(".") or name == "__MACOSX"


def extract(zip_path: Path, root: Path) -> Path:
    """Unpack the archive's folder of train/<Class>/ and val/<Class>/ (any depth) to root/inaturalist_12K."""
    target, partial = Path(root) / DATASET_DIR, Path(root) / f"{DATASET_DIR}.partial"
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as error:
        raise DataError(f"cannot open {zip_path} as a zip archive ({error}); download it again") from error
    with archive:
        entries, prefixes = [], {"train": set(), "val": set()}
        for entry in archive.infolist():  # every entry is checked before anything is written
            entry.filename = name = entry.filename.replace("\\", "/")
            parts, absolute = name.split("/"), name.startswith("/") or re.match(r"[A-Za-z]:", name)
            if absolute or ".." in parts:
                why = "has an absolute path" if absolute else "points outside the target folder ('..')"
                raise DataError(f"refusing to extract {zip_path}: its entry {name!r} {why}")
            if not entry.is_dir() and not any(map(is_hidden, parts)):
                entries.append(entry)
                for i, part in enumerate(parts[:-2]):  # <split>/<Class>/<file> below the prefix
                    prefixes.get(part, set()).add("".join(p + "/" for p in parts[:i]))
        if not (common := prefixes["train"] & prefixes["val"]):
            raise DataError(f"{zip_path} holds no train/ and val/ class folders: is it the right archive?")
        prefix = min(common, key=lambda prefix: (prefix.count("/"), prefix))
        entries = [entry for entry in entries if entry.filename.startswith(prefix)]
        shutil.rmtree(partial, ignore_errors=True)
        size = sum(entry.file_size for entry in entries)
        with tqdm(total=size, desc=f"extract {Path(zip_path).name}", **BYTES_BAR) as bar:
            try:
                for entry in entries:
                    entry.filename = entry.filename[len(prefix) :]
                    archive.extract(entry, partial)
                    bar.update(entry.file_size)
            except (zipfile.BadZipFile, zlib.error, EOFError) as error:
                shutil.rmtree(partial, ignore_errors=True)
                damaged = f"{zip_path} is damaged ({entry.filename}: {error})"
                raise DataError(f"{damaged}; delete it and download it again") from error
    os.replace(partial, target)
    return target
