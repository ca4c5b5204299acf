"""wandb mode selection and the fallback when the server cannot be reached."""

from __future__ import annotations

import time

import pytest

from common import tracking


@pytest.fixture
def clean_wandb_env(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    return tmp_path


def test_mode_is_offline_without_credentials_and_online_with_them(clean_wandb_env, monkeypatch):
    assert tracking.resolve_wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking.resolve_wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_wandb_mode(None) == "disabled"
    assert tracking.resolve_wandb_mode("offline") == "offline"
    with pytest.raises(ValueError, match="wandb_mode"):
        tracking.resolve_wandb_mode("sometimes")


def test_unreachable_server_falls_back_to_offline_quickly(clean_wandb_env, monkeypatch):
    # Credentials but a server that refuses connections: a short init timeout, then offline logging.
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    run_dir = clean_wandb_env / "run"
    run_dir.mkdir()
    started = time.monotonic()
    run = tracking.start_wandb(
        None, project="p", entity=None, name="n", group=None, config={"a": 1}, run_dir=run_dir
    )
    try:
        assert run is not None and run.settings.mode == "offline"
        run.log({"val_acc": 0.5})
    finally:
        run.finish()
    assert time.monotonic() - started < 30
    assert list((run_dir / "wandb").glob("offline-run-*"))
