"""Files that are never half-written, and the JSON records of runs and data."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` for the block to write, fsynced and renamed over ``path``
    at its end, removed if it raises: a crash or a full disk mid-write leaves ``path`` as it was. The
    mode follows the umask; an ``OSError`` of the temporary (or of no file) names ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mkstemp's would be 0600
        try:
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as error:
        if error.filename in (None, str(tmp)):
            error.filename = str(path)
        raise


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> dict:
    """The JSON object in ``path``; ``{}`` when there is none yet. A damaged file is an error naming it
    (never silently empty: a summary or a data state read as empty would be overwritten)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete it and run again") from error


def update_json(path: str | Path, updates: dict) -> dict:
    merged = {**read_json(path), **updates}
    write_json(path, merged)
    return merged
