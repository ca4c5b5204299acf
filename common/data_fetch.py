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
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

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
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


class DataError(UserError):
    """A data problem the user can fix; the message says what is wrong and what to do."""


def offline_hint(url: str, root: Path) -> str:
    return (f"Download {url} on a machine with internet access (e.g. `wget {url}`), copy it here and run "
            f"`python common/data.py prepare --root {root} --zip /path/to/nature_12K.zip`, or unpack it so "
            f"that {root / DATASET_DIR}/train and {root / DATASET_DIR}/val exist.")


def download(url: str, dest: Path, timeout: float = NETWORK_TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial ``.part`` file."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # a second try only after the server refused to resume: then from byte 0
        have = part.stat().st_size if part.is_file() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as error:
            if error.code == 416 and have:
                # Nothing left after byte `have`: the file was complete when the last run stopped
                # before renaming it (the server says "bytes */N" with N == have), else it is no
                # prefix the server can continue and the download starts over.
                complete = re.fullmatch(r"bytes \*/(\d+)", (error.headers.get("Content-Range") or "").strip())
                if complete and int(complete.group(1)) == have:
                    os.replace(part, dest)
                    return dest
                part.unlink()
                continue
            raise DataError(f"downloading {url} failed: HTTP {error.code} {error.reason}. "
                            + offline_hint(url, dest.parent)) from error
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise DataError(f"cannot download {url}: {reason}. " + offline_hint(url, dest.parent)) from error
        with response:
            start, total = _resume_point(response, have)
            if start is None:  # a 206 for some other range than we asked: start over cleanly
                part.unlink()
                continue
            _copy_body(response, part, start, total, url)
        os.replace(part, dest)
        return dest
    raise DataError(f"the server at {url} answers Range requests inconsistently; delete {part} and retry, "
                    "or " + offline_hint(url, dest.parent))


def _resume_point(response, have: int) -> tuple[int | None, int | None]:
    """(byte offset the body starts at, total size) for a response to a request from byte ``have``."""
    length = response.headers.get("Content-Length")
    if response.status != 206:  # 200: the server ignored Range (or we asked for none); restart
        return 0, int(length) if length is not None else None
    match = _CONTENT_RANGE.fullmatch((response.headers.get("Content-Range") or "").strip())
    if not match or int(match.group(1)) != have:
        return None, None
    return have, int(match.group(2)) if match.group(2) != "*" else None


def _copy_body(response, part: Path, start: int, total: int | None, url: str) -> None:
    with open(part, "r+b" if start else "wb") as out, \
            tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=f"download {Path(part).name[:-5]}", mininterval=LOG_INTERVAL_S) as bar:
        out.seek(start)
        out.truncate()
        try:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
        except OSError as error:  # includes timeouts; what arrived stays in .part for the rerun
            raise DataError(f"download of {url} interrupted after {out.tell():,} bytes ({error}); run the "
                            f"same command again to resume from {part}") from error
        received = out.tell()
    if total is not None and received != total:
        raise DataError(f"download of {url} stopped at {received:,} of {total:,} bytes; run the same command "
                        f"again to resume from {part}")


def _is_ignored(name: str) -> bool:
    """macOS resource forks and hidden files that zip tools add; never part of the dataset."""
    return any(part == "__MACOSX" or part.startswith(".") for part in name.split("/") if part)


def _check_safe(zip_path: Path, name: str) -> None:
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise DataError(f"refusing to extract {zip_path}: entry {name!r} has an absolute path; the archive "
                        "is not the dataset or has been tampered with")
    if ".." in name.split("/"):
        raise DataError(f"refusing to extract {zip_path}: entry {name!r} points outside the target folder "
                        "('..'); the archive is not the dataset or has been tampered with")


def _dataset_prefix(zip_path: Path, names: list[str]) -> str:
    """The folder inside the archive that holds ``train/<Class>/file`` and ``val/<Class>/file``."""
    found: dict[str, set[str]] = {"train": set(), "val": set()}
    for name in names:
        parts = name.split("/")
        for i, part in enumerate(parts[:-2]):  # need <split>/<Class>/<file> below the prefix
            if part in found:
                found[part].add("".join(p + "/" for p in parts[:i]))
    common = found["train"] & found["val"]
    if not common:
        raise DataError(f"{zip_path} holds no train/ and val/ class folders (expected "
                        f"{DATASET_DIR}/train/<Class>/*.jpg and {DATASET_DIR}/val/<Class>/*.jpg); is it the "
                        f"iNaturalist-12K archive from {DATASET_URL}?")
    return min(common, key=lambda prefix: (prefix.count("/"), prefix))


def extract(zip_path: Path, root: Path) -> Path:
    """Unpack the dataset folder of ``zip_path`` to ``root/inaturalist_12K`` and return that folder."""
    zip_path, root = Path(zip_path), Path(root)
    target, partial = root / DATASET_DIR, root / f"{DATASET_DIR}.partial"
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as error:
        raise DataError(f"cannot open {zip_path} as a zip archive ({error}); download it again") from error
    with archive:
        entries = archive.infolist()
        for entry in entries:  # every entry is checked before anything is written
            _check_safe(zip_path, entry.filename.replace("\\", "/"))
        files = [e for e in entries if not e.is_dir() and not _is_ignored(e.filename.replace("\\", "/"))]
        prefix = _dataset_prefix(zip_path, [e.filename.replace("\\", "/") for e in files])
        files = [e for e in files if e.filename.replace("\\", "/").startswith(prefix)]
        shutil.rmtree(partial, ignore_errors=True)
        with tqdm(total=sum(e.file_size for e in files), unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"extract {zip_path.name}", mininterval=LOG_INTERVAL_S) as bar:
            for entry in files:
                out = partial / entry.filename.replace("\\", "/")[len(prefix):]
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with archive.open(entry) as source, open(out, "wb") as sink:
                        shutil.copyfileobj(source, sink, CHUNK_BYTES)
                except (zipfile.BadZipFile, zlib.error, EOFError) as error:
                    shutil.rmtree(partial, ignore_errors=True)
                    raise DataError(f"{zip_path} is damaged ({entry.filename}: {error}); delete it and "
                                    "download it again (or pass --zip with a good copy)") from error
                bar.update(entry.file_size)
    os.replace(partial, target)
    return target
