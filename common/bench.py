"""Benchmarks, one section per subcommand; each prints one JSON object on stdout (progress on stderr).

    python common/bench.py data [--quick]    decode-once cache + DeviceLoader vs ImageFolder + DataLoader
    python common/bench.py step [--quick]    training step: eager, channels_last, autocast, compile; MFU
    python common/bench.py e2e [--quick]     a whole epoch, data included: ours vs ImageFolder + plain loop

A section is a config dataclass (its fields become the options), a ``check(config)`` that applies --quick and
refuses bad options before anything runs, and a ``run(config) -> dict``; adding
one is one more entry in ``SECTIONS``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, NamedTuple

if __package__ in (None, ""):  # run as `python common/bench.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import bench_data, bench_step
from common.config import add_dataclass_args, from_namespace


class Section(NamedTuple):
    help: str
    config: type
    check: Callable[[object], object]  # the config with --quick applied; ValueError for a bad option
    run: Callable[[object], dict]


SECTIONS: dict[str, Section] = {
    "data": Section("images/s of the cached device loader vs ImageFolder + DataLoader, and the cache build rate",
                    bench_data.DataBenchConfig, bench_data.check, bench_data.run),
    "step": Section("training-step images/s per variant (eager fp32 NCHW, channels_last, autocast, compile) with "
                    "ratios to eager, MFU and compile time",
                    bench_step.StepBenchConfig, bench_step.check_step, bench_step.run_step),
    "e2e": Section("one epoch with data: decode-once cache + our engine vs ImageFolder + a plain eager loop",
                   bench_step.E2EBenchConfig, bench_step.check_e2e, bench_step.run_e2e),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="project benchmarks; each section prints one JSON object")
    sections = parser.add_subparsers(dest="section", required=True)
    for name, section in SECTIONS.items():
        add_dataclass_args(sections.add_parser(name, help=section.help), section.config, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    section = SECTIONS[args.section]
    try:
        config = section.check(from_namespace(section.config, args))
    except ValueError as error:  # a bad option: one line and exit code 2, as argparse's own errors
        parser.error(str(error))
    print(json.dumps(section.run(config), indent=2))  # an error from here on is a bug: traceback
    return 0


if __name__ == "__main__":
    sys.exit(main())
