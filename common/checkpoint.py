"""Checkpoints that are never half-written (``files.atomic_path``) and always loadable with
``weights_only=True``: a plain dict of tensors and plain data (see docs/architecture.md)."""

from __future__ import annotations

import functools
import io
import pkgutil
import random
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from common.files import atomic_path

FORMAT = "inat12k-checkpoint"
# Each kind's builder (from its saved ``model_config``) by name: the parts import common, not the reverse.
MODEL_BUILDERS = {"part_a": "part_a.model:build_model", "part_b": "part_b.model:build_from_config"}
PASS_ONE = "pass a best.pt or last.pt from a run folder"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not one of ours."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    buffer = io.BytesIO()  # torch.save into a file on a full disk raises a RuntimeError without the reason
    torch.save({"format": FORMAT, **state}, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, or raise ``CheckpointError`` naming it."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; {PASS_ONE}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for truncated, damaged or foreign files
        if "Unsupported global" in str(error):  # a readable pickle of other Python objects: not ours
            message = f"{path} holds Python objects, so it is not a checkpoint of this project; {PASS_ONE}"
            raise CheckpointError(message) from error
        # torch's own text for a damaged pickle suggests weights_only=False, which is wrong here.
        detail = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().split("\n")[0]
        detail = "" if not detail or detail.startswith("Weights only load failed") else f": {detail}"
        message = f"checkpoint {path} cannot be read ({type(error).__name__}{detail}): corrupt or truncated"
        raise CheckpointError(f"{message}; use another checkpoint (best.pt / last.pt) of the run") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no format {FORMAT}); {PASS_ONE}")
    if state.get("kind") not in MODEL_BUILDERS:
        kind, kinds = state.get("kind"), tuple(MODEL_BUILDERS)
        raise CheckpointError(f"checkpoint {path} has unknown kind {kind!r}; expected one of {kinds}")
    return state


def build_model_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """The raw model of a checkpoint with the weights it is evaluated with (``ema`` when last.pt has it)."""
    model = pkgutil.resolve_name(MODEL_BUILDERS[state["kind"]])(state["model_config"])
    model.load_state_dict(state.get("ema", state["model"]))
    return model


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every generator a run draws from, weights_only-safe; of the GPUs only ``device``'s (others may go)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss)}
    numpy["cached_gaussian"] = float(cached_gaussian)
    state = {"torch": torch.get_rng_state(), "numpy": numpy, "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` saved; tensors are accepted on any device."""
    torch.set_rng_state(state["torch"].cpu())
    numpy = state["numpy"]
    keys = numpy["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """Library versions and the git commit, so a checkpoint says what produced it (read once)."""
    git = ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"]
    try:
        commit = subprocess.run(git, capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {module.__name__: str(module.__version__) for module in (torch, torchvision, np)}
    return {"versions": versions, "git_commit": commit}
