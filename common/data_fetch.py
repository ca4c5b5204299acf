"""Getting the dataset archive onto disk and unpacked: a resumable download and a safe extraction.

Standard library only (urllib, zipfile): the download goes to ``NAME.part`` and is renamed when
complete, so a half-downloaded file is never mistaken for the archive, and a rerun continues it with
an HTTP Range request. Extraction checks every entry before writing anything and unpacks into a
``.partial`` folder that is renamed at the end, for the same reason.
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
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

from tqdm import tqdm

from common.config import UserError

# Downloads and extraction take minutes: a live bar on a terminal, a line every 30 s in a log file.
LOG_INTERVAL_S = 0.1 if sys.stderr.isatty() else 30.0

DATASET_URL = "https://storage.googleapis.com/wandb_datasets/nature_12K.zip"
DATASET_DIR = "inaturalist_12K"
# Seconds to wait for a connection or for the next chunk: long enough for a slow link, short enough
# that a machine without network fails at once instead of hanging.
NETWORK_TIMEOUT_S = 10
CHUNK_BYTES = 1 << 20
BYTES_BAR = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "mininterval": LOG_INTERVAL_S}


class DataError(UserError):
    """A data problem the user can fix; the message says what is wrong and what to do."""


def download(url: str, dest: Path, timeout: float = NETWORK_TIMEOUT_S) -> Path:
    """Download the archive ``url`` to ``dest`` through ``dest.part``, which a rerun continues; a failure
    says how to resume or to work offline."""
    dest, root = Path(dest), Path(dest).parent
    if dest.is_file():
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        download_into(url, part, timeout)
    except DataError as error:
        resume = f"Run the same command again to resume from {part}, or: " if part.is_file() else ""
        raise DataError(
            f"{error}. {resume}Download {url} on a machine with internet access (e.g. `wget {url}`), copy it "
            f"here and run `python common/data.py prepare --root {root} --zip /path/to/nature_12K.zip`, or "
            f"unpack it so that {root / DATASET_DIR}/train and {root / DATASET_DIR}/val exist.") from error
    os.replace(part, dest)
    return dest


def download_into(url: str, part: Path, timeout: float = NETWORK_TIMEOUT_S) -> None:
    """Append the rest of ``url`` to ``part``: after the bytes already there, with an HTTP Range request,
    or from the start when the server cannot continue. What arrived stays for the next try."""
    part.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # a second try only after the server refused to resume: then from byte 0
        have = part.stat().st_size if part.is_file() else 0
        try:
            headers = {"Range": f"bytes={have}-"} if have else {}
            response = urlopen(Request(url, headers=headers), timeout=timeout)
        except HTTPError as error:
            if error.code != 416 or not have:
                raise DataError(f"downloading {url} failed: HTTP {error.code} {error.reason}") from error
            # Nothing left after byte `have`: the file was complete when the last run stopped before
            # renaming it (the server says "bytes */N" with N == have), else it is no prefix the server
            # can continue and the download starts over.
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
            name = Path(urlsplit(url).path).name
            with open(part, "r+b" if start else "wb") as out, \
                    tqdm(total=total, initial=start, desc=f"download {name}", **BYTES_BAR) as bar:
                out.truncate(start)
                out.seek(start)
                try:
                    while chunk := response.read(CHUNK_BYTES):
                        bar.update(out.write(chunk))
                except (OSError, HTTPException) as error:  # timeouts, resets, a cut-off transfer
                    raise DataError(f"download of {url} interrupted after {out.tell():,} bytes "
                                    f"({error})") from error
                received = out.tell()
            if total is not None and received != total:
                raise DataError(f"download of {url} stopped at {received:,} of {total:,} bytes")
        return
    raise DataError(f"the server at {url} answers Range requests inconsistently; delete {part} and retry")


def is_hidden(name: str) -> bool:
    """Hidden files and folders, and the macOS resource forks zip tools add: never part of the dataset."""
    return name.startswith(".") or name == "__MACOSX"


def extract(zip_path: Path, root: Path) -> Path:
    """Unpack the dataset folder of ``zip_path`` (the one holding ``train/<Class>/file`` and
    ``val/<Class>/file``) to ``root/inaturalist_12K`` and return that folder."""
    zip_path, root = Path(zip_path), Path(root)
    target, partial = root / DATASET_DIR, root / f"{DATASET_DIR}.partial"
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as error:
        raise DataError(f"cannot open {zip_path} as a zip archive ({error}); download it again") from error
    with archive:
        entries, prefixes = [], {"train": set(), "val": set()}
        for entry in archive.infolist():  # every entry is checked before anything is written
            entry.filename = name = entry.filename.replace("\\", "/")
            absolute = name.startswith("/") or re.match(r"[A-Za-z]:", name)
            if absolute or ".." in name.split("/"):
                why = "has an absolute path" if absolute else "points outside the target folder ('..')"
                raise DataError(f"refusing to extract {zip_path}: entry {name!r} {why}; the archive is not "
                                "the dataset or has been tampered with")
            if not entry.is_dir() and not any(map(is_hidden, name.split("/"))):
                entries.append(entry)
                parts = name.split("/")
                for i, part in enumerate(parts[:-2]):  # <split>/<Class>/<file> below the prefix
                    prefixes.get(part, set()).add("".join(p + "/" for p in parts[:i]))
        if not (common := prefixes["train"] & prefixes["val"]):
            raise DataError(f"{zip_path} holds no train/ and val/ class folders (expected {DATASET_DIR}/"
                            f"train/<Class>/*.jpg and {DATASET_DIR}/val/<Class>/*.jpg); is it the "
                            f"iNaturalist-12K archive from {DATASET_URL}?")
        prefix = min(common, key=lambda prefix: (prefix.count("/"), prefix))
        entries = [entry for entry in entries if entry.filename.startswith(prefix)]
        shutil.rmtree(partial, ignore_errors=True)
        size = sum(entry.file_size for entry in entries)
        with tqdm(total=size, desc=f"extract {zip_path.name}", **BYTES_BAR) as bar:
            for entry in entries:
                entry.filename = entry.filename[len(prefix):]
                try:
                    archive.extract(entry, partial)
                except (zipfile.BadZipFile, zlib.error, EOFError) as error:
                    shutil.rmtree(partial, ignore_errors=True)
                    raise DataError(f"{zip_path} is damaged ({prefix}{entry.filename}: {error}); delete it "
                                    "and download it again (or pass --zip with a good copy)") from error
                bar.update(entry.file_size)
    os.replace(partial, target)
    return target
