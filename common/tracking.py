"""Experiment tracking: the run folder (config.json, metrics.jsonl, summary.json) always, mirrored to
wandb when wanted: online with credentials, else offline (``wandb sync`` later), never waiting long.
"""

from __future__ import annotations

import json
import netrc
import os
import sys
from pathlib import Path

from common.files import atomic_path

WANDB_MODES = ("online", "offline", "disabled")
INIT_TIMEOUT_S = 30  # how long an online start may wait for the server (WANDB_INIT_TIMEOUT overrides)


def append_metrics(path: str | Path, metrics: dict, wandb_run=None) -> None:
    """One line of metrics.jsonl, mirrored to ``wandb_run`` when there is one."""
    with open(path, "a") as handle:
        handle.write(json.dumps(metrics) + "\n")
    if wandb_run is not None:
        wandb_run.log(metrics)


def read_metrics(path: str | Path) -> list[dict]:
    lines = Path(path).read_text().splitlines() if Path(path).is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def truncate_metrics(path: str | Path, last_epoch: int) -> None:
    """Drop lines logged after ``last_epoch`` (written before a crash that lost their checkpoint)."""
    kept = [m for m in read_metrics(path) if m.get("epoch", 0) <= last_epoch]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))


def resolve_wandb_mode(requested: str | None) -> str:
    """``--wandb_mode`` wins; then ``WANDB_MODE``; then online with credentials (``WANDB_API_KEY`` or
    ``wandb login``'s entry in ~/.netrc), offline without."""
    if requested and requested not in WANDB_MODES:
        raise ValueError(f"wandb_mode must be one of {WANDB_MODES}, got {requested!r}")
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower().replace("dryrun", "offline")
    if requested or env_mode in WANDB_MODES:
        return requested or env_mode
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        logged_in = False
    return "online" if os.environ.get("WANDB_API_KEY") or logged_in else "offline"


def start_wandb(mode: str | None, run_dir: str | Path, resume_id: str | None = None, **init):
    """A wandb run in ``run_dir`` (``init``: ``wandb.init``'s arguments), ``None`` when disabled. An
    unreachable server fails after a short timeout, and the run logs offline instead, saying so."""
    mode = resolve_wandb_mode(mode)
    if mode == "disabled":
        return None
    import wandb

    init.update(dir=str(run_dir), id=resume_id, resume="allow" if resume_id else None)
    try:
        timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S))
        return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=timeout, silent=True), **init)
    except Exception as error:  # wandb raises its own CommError/UsageError/timeouts
        if mode != "online":
            raise
        line = f"wandb: could not reach the server ({type(error).__name__}); logging offline instead."
        print(line, f"Upload later with: wandb sync {Path(run_dir) / 'wandb'}", file=sys.stderr)
        return wandb.init(mode="offline", settings=wandb.Settings(silent=True), **init)
