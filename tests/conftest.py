"""Fixtures and hooks every test file gets; the helpers they share are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    """``cuda`` tests skip, with the reason, where torch sees no GPU (CI); they run wherever one is."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def wandb_off(tmp_path_factory):
    """wandb disabled for every test, module fixture and program a test starts (they inherit the
    environment), every folder it could write in a temporary one: never the network, never ~/.
    Tests of wandb itself set WANDB_MODE (or --wandb_mode) to what they test."""
    folder = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "disabled")
        patch.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
            patch.setenv(name, str(folder / name.lower()))
        yield


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """A data root with the 10 real class names, 10 train + 3 test images each, already prepared.

    Shared by the whole session: tests must not change it (copy it first if they need to).
    """
    from helpers import CLASSES, make_image_tree

    from common.data import prepare

    root = tmp_path_factory.mktemp("data")
    make_image_tree(root, CLASSES, n_train=10, n_test=3)
    prepare(root)
    return root
