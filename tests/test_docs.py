"""The README and docs list every option the scripts accept (they are written by hand)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _options(parser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings
            if opt.startswith("--") and not opt.startswith("--no-") and opt != "--help"}


@pytest.mark.parametrize("module, doc", [("part_a.train", "README.md"), ("part_b.train", "docs/part_b.md")])
def test_every_option_is_documented(module, doc):
    parser = __import__(module, fromlist=["get_args_parser"]).get_args_parser()
    text = (ROOT / doc).read_text()
    documented = set(re.findall(r"`(--[a-z_]+)", text))
    missing = _options(parser) - documented
    if doc != "README.md":  # docs/part_b.md lists the model options; the run options are Part A's
        from part_a.train import get_args_parser as part_a_parser
        missing -= _options(part_a_parser())
    assert not missing, f"{doc} does not document {sorted(missing)}"


def test_default_run_names_differ_and_follow_a_wandb_agent(monkeypatch):
    from common.training import default_run_name
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert default_run_name("part_a") != default_run_name("part_a")
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc")
    monkeypatch.setenv("WANDB_RUN_ID", "run123")
    assert default_run_name("part_a") == "part_a-run123"
