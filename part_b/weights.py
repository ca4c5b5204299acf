"""Pretrained weights that work offline: torchvision names, the hub cache, or a file.

``--weights`` is a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``, ...), ``none``, or a
path. A named entry is read from the torch hub cache (``torch.hub.get_dir()/checkpoints/<file name
from the URL>``, the place torchvision itself uses) and downloaded only when it is not there, with a
short socket timeout, so a machine without network fails in seconds with the URL and the exact path
to put the file at - never a hang. Files may be a plain state dict or a dict holding one under
``"state_dict"`` or ``"model"``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum, get_model_weights

from common.data_fetch import NETWORK_TIMEOUT_S, DataError, download_into
from common.files import atomic_path

StateDict = Mapping[str, torch.Tensor]


class WeightsError(ValueError):
    """Weights that cannot be found, read or loaded; the message says what to do instead."""


def is_pretrained(spec: str) -> bool:
    return spec.strip().lower() != "none"


def named_weights(model_name: str, spec: str) -> WeightsEnum | None:
    """The torchvision entry ``spec`` names for ``model_name``; None for ``none`` or a file path."""
    members = get_model_weights(model_name).__members__
    key = spec.strip().upper()
    return members[key] if key in members else None


def preset(model_name: str, spec: str) -> WeightsEnum:
    """The entry whose preprocessing (input size, mean, std) fits ``spec``.

    A file or ``none`` gets the architecture's DEFAULT entry: the file is assumed to hold weights
    trained like torchvision's, and a network trained from scratch may as well see the same inputs.
    """
    return named_weights(model_name, spec) or get_model_weights(model_name).DEFAULT


def check_spec(model_name: str, spec: str) -> None:
    """Fail early, before data or models, when ``spec`` is neither a known name nor a file."""
    if not is_pretrained(spec) or named_weights(model_name, spec) is not None:
        return
    if not Path(spec).expanduser().is_file():
        names = ", ".join(get_model_weights(model_name).__members__)
        raise WeightsError(f"--weights {spec!r} is neither a weights name of {model_name} ({names}, none) "
                           "nor an existing file")


def cache_path(url: str) -> Path:
    """Where torchvision keeps (and this module looks for) the file downloaded from ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def fetch(url: str, timeout: float = NETWORK_TIMEOUT_S) -> Path:
    """The cached file for ``url``; downloaded only when missing, checked against the sha256 prefix its
    name carries. Offline, fails fast saying what to do."""
    dest = cache_path(url)
    if dest.is_file():
        return dest
    match = torch.hub.HASH_REGEX.search(dest.name)
    try:
        with atomic_path(dest) as part:  # a temporary of this process's own: ranks may fetch at once
            download_into(url, part, timeout)
            digest = hashlib.sha256()
            with open(part, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
            if match and not digest.hexdigest().startswith(match.group(1)):
                raise DataError(f"sha256 of the downloaded file is {digest.hexdigest()[:16]}..., not "
                                f"{match.group(1)}... as its name says (corrupt or truncated download)")
    except DataError as error:
        raise WeightsError(
            f"pretrained weights are not in the local cache and the download failed ({error}).\n"
            f"  Download {url}\n"
            f"  on a machine with internet and copy it to {dest}\n"
            "  (that folder is $TORCH_HOME/hub/checkpoints), or pass --weights /path/to/file.pth, "
            "or --weights none to train from scratch.") from error
    return dest


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: plain, or under a ``state_dict``/``model`` key; DDP's ``module.`` dropped."""
    path = Path(path).expanduser()
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a bad file; all mean the same here
        raise WeightsError(f"cannot read weights file {path}: {error}") from error
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"weights file {path} holds no state dict (a mapping of parameter names to "
                           "tensors, possibly under a 'state_dict' or 'model' key)")
    if all(key.startswith("module.") for key in data):
        data = {key[len("module."):]: value for key, value in data.items()}
    return data


def load_state(model_name: str, spec: str) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict ``--weights spec`` names for ``model_name``, and the file it came from."""
    check_spec(model_name, spec)
    entry = named_weights(model_name, spec)
    path = fetch(entry.url) if entry is not None else Path(spec).expanduser()
    return read_state_dict(path), path


def load_matching(module: nn.Module, state: StateDict, source: Path | str, *,
                  ignore: Callable[[str], bool], optional: Callable[[str], bool]) -> None:
    """Load ``state`` into ``module``, refusing a file made for another architecture.

    Keys for which ``ignore`` is true (heads that are replaced anyway) are skipped on both sides;
    keys for which ``optional`` is true (auxiliary branches) may be absent on either side. Every
    other key must be in both with the same shape, otherwise the error names the file and the
    first offending keys.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not ignore(k) and not optional(k)]
    unexpected = [k for k in state if k not in expected and not ignore(k) and not optional(k)]
    reshaped = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                for k in state if k in expected and not ignore(k) and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        problems = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)} in all)"
                    for label, keys in (("missing in the file", missing), ("not in the model", unexpected),
                                        ("different shape", reshaped)) if keys]
        raise WeightsError(f"weights file {source} does not fit this architecture - is it for another "
                           "model?\n  " + "\n  ".join(problems))
    module.load_state_dict({k: v for k, v in state.items() if k in expected and not ignore(k)}, strict=False)
