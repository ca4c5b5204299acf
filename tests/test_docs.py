"""The README and docs list every option the scripts accept (they are written by hand)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _options(parser) -> set[str]:
    return {
        opt
        for action in parser._actions
        for opt in action.option_strings
        if opt.startswith("--") and not opt.startswith("--no-") and opt != "--help"
    }


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


def _tool_parsers():
    import argparse

    from common import bench, data, flops, study, sweep
    from part_a import evaluate

    def subcommands(parser):
        return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0].choices

    yield "part_a/evaluate.py", evaluate.get_args_parser()
    yield "common/sweep.py", sweep.get_args_parser()
    yield "common/sweep.py report", sweep.get_report_parser()
    yield "common/study.py", study.get_args_parser()
    yield "common/data.py prepare", subcommands(data.get_args_parser())["prepare"]
    yield "common/flops.py", flops.get_args_parser()
    for name, parser in subcommands(bench.get_args_parser()).items():
        yield f"common/bench.py {name}", parser


def test_every_tool_option_is_in_the_readme_with_its_default():
    text = (ROOT / "README.md").read_text()
    for tool, parser in _tool_parsers():
        heading = f"**`python {tool}"
        assert heading in text, f"README.md has no options table for {tool}"
        table = text.split(heading, 1)[1].split("\n\n**", 1)[0].split("\n## ", 1)[0]
        rows = dict(re.findall(r"^\| `(--[a-z_]+)` \| `([^`]*)` \|", table, flags=re.M))
        if tool == "common/flops.py":  # the Part A model options are in the training table
            from part_a.train import get_args_parser as part_a_parser

            rows.update({option: None for option in _options(part_a_parser())})
        for action in parser._actions:
            option = next((o for o in action.option_strings if o.startswith("--")), None)
            if option in (None, "--help") or option.startswith("--no-"):
                continue
            assert option in rows, f"README.md: {tool} {option} is not documented"
            if rows[option] is not None and not action.required and action.default not in (None, []):
                assert rows[option] == str(action.default), (
                    f"README.md: {tool} {option} default {rows[option]!r}"
                )


def test_default_run_names_differ_and_follow_a_wandb_agent(monkeypatch):
    from common.training import default_run_name

    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert default_run_name("part_a") != default_run_name("part_a")
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc")
    monkeypatch.setenv("WANDB_RUN_ID", "run123")
    assert default_run_name("part_a") == "part_a-run123"
