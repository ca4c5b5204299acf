"""Pretrained weights that work offline: ``--weights`` is a torchvision weights name (``DEFAULT``,
``IMAGENET1K_V1``, ...), ``none``, or a file (a state dict, or one under ``"state_dict"`` or ``"model"``).
A name is read from the torch hub cache, where torchvision keeps it, and downloaded by ``torch.hub``
(sha256 checked) only when missing; without network it fails in seconds saying where to put the file.
"""

from __future__ import annotations

import os
import socket
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum, get_model_weights

from common.data_fetch import NETWORK_TIMEOUT_S


class WeightsError(ValueError):
    """Weights that cannot be found, read or loaded; the message says what to do instead."""


def is_pretrained(spec: str) -> bool:
    return spec.strip().lower() != "none"


def named_weights(model_name: str, spec: str) -> WeightsEnum | None:
    """The torchvision entry ``spec`` names for ``model_name``; None for ``none`` or a file path."""
    return get_model_weights(model_name).__members__.get(spec.strip().upper())


def preset(model_name: str, spec: str) -> WeightsEnum:
    """The entry whose preprocessing fits ``spec``; for a file (assumed trained alike) or none, DEFAULT."""
    return named_weights(model_name, spec) or get_model_weights(model_name).DEFAULT


def check_spec(model_name: str, spec: str) -> None:
    """Fail early, before data or models, when ``spec`` is neither a known name nor a file."""
    is_file = Path(spec).expanduser().is_file()
    if is_pretrained(spec) and named_weights(model_name, spec) is None and not is_file:
        names = ", ".join([*get_model_weights(model_name).__members__, "none"])
        named = f"a weights name of {model_name} ({names})"
        raise WeightsError(f"--weights {spec!r} is neither {named} nor an existing file")


def fetch(url: str, timeout: float = NETWORK_TIMEOUT_S) -> Path:
    """The hub cache's file for ``url``, downloaded (hash checked) when missing; offline, fails fast."""
    dest = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if dest.is_file():
        return dest
    match = torch.hub.HASH_REGEX.search(dest.name)
    # torch.hub's urlopen has no timeout: the socket default bounds its connect and each read.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(dest), match and match.group(1))
    except (OSError, HTTPException, RuntimeError) as error:  # no network, timeouts, cut-off, wrong hash
        reason = getattr(error, "reason", error)  # a URLError's cause, e.g. "Network is unreachable"
        failed = f"pretrained weights are not in the local cache and the download failed ({url}: {reason})"
        where = f"copy it to {dest}\n  (that folder is $TORCH_HOME/hub/checkpoints)"
        fix = f"Download {url}\n  on a machine with internet and {where}, or pass --weights /path/to/file.pth"
        raise WeightsError(f"{failed}.\n  {fix}, or --weights none to train from scratch.") from error
    finally:
        socket.setdefaulttimeout(previous)
    return dest


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: plain, or under a ``state_dict``/``model`` key; DDP's ``module.`` dropped."""
    path = Path(path).expanduser()
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a bad file; all mean the same here
        raise WeightsError(f"cannot read weights file {path}: {error}") from error
    if isinstance(data, dict):
        data = next((data[key] for key in ("state_dict", "model") if isinstance(data.get(key), dict)), data)
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        expected = "a mapping of parameter names to tensors, possibly under a 'state_dict' or 'model' key"
        raise WeightsError(f"weights file {path} holds no state dict ({expected})")
    if all(key.startswith("module.") for key in data):
        data = {key.removeprefix("module."): value for key, value in data.items()}
    return data


def load_state(model_name: str, spec: str) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict ``--weights spec`` names for ``model_name``, and the file it came from."""
    check_spec(model_name, spec)
    entry = named_weights(model_name, spec)
    path = fetch(entry.url) if entry is not None else Path(spec).expanduser()
    return read_state_dict(path), path


def load_matching(module: nn.Module, state: dict, source, replaced: tuple, optional: tuple) -> None:
    """Load ``state`` into ``module``, refusing a file made for another architecture: every key must be
    in both with the same shape, except those under the ``replaced`` prefixes (skipped) and the
    ``optional`` ones (may be absent on either side)."""
    expected = module.state_dict()
    keys = [k for k in {**expected, **state} if not k.startswith(replaced)]
    missing = [k for k in keys if k not in state and not k.startswith(optional)]
    unexpected = [k for k in keys if k not in expected and not k.startswith(optional)]
    reshaped = [k for k in keys if k in state and k in expected and state[k].shape != expected[k].shape]
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})" for k in reshaped]
    problems = {"missing in the file": missing, "not in the model": unexpected, "different shape": shapes}
    if any(problems.values()):
        lines = [f"weights file {source} does not fit this architecture - is it for another model?"]
        for label, names in problems.items():
            if names:
                more = " ..." if len(names) > 5 else ""
                lines.append(f"{label}: {', '.join(names[:5])}{more} ({len(names)} in all)")
        raise WeightsError("\n  ".join(lines))
    module.load_state_dict({k: state[k] for k in keys if k in state and k in expected}, strict=False)
