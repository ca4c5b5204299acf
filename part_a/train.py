"""Train the Part A CNN from scratch on iNaturalist-12K.

    python part_a/train.py --data_dir data --out_dir runs --name best [options] [--test] [--resume]

Also the program ``wandb agent`` runs for sweep.yaml (wandb passes ``--name=value``). Defaults are
the best configuration the original sweeps found. Every option is a field of ``ModelConfig``
(part_a/model.py) or ``RunConfig`` (common/training.py); ``--help`` lists them by group.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Callable

from common import training
from common.config import add_dataclass_args, cli_main, from_namespace
from part_a.model import ModelConfig, block_shapes, build_model


@dataclass
class TrainConfig(training.RunConfig, ModelConfig):
    """Every option of this script: the model's fields and the run's fields."""


def model_config_of(config: TrainConfig) -> ModelConfig:
    return from_namespace(ModelConfig, dataclasses.asdict(config))


def run_config_of(config: TrainConfig) -> training.RunConfig:
    return from_namespace(training.RunConfig, dataclasses.asdict(config))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train the Part A CNN from scratch on iNaturalist-12K (defaults: the best sweep configuration).")
    add_dataclass_args(parser, ModelConfig, "model")
    add_dataclass_args(parser, training.RunConfig, "training")
    return parser


def validate(config: TrainConfig) -> None:
    """Every check that needs no data: bad values fail here, before anything is read."""
    block_shapes(model_config_of(config))
    training.validate_run_config(run_config_of(config))


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    config = from_namespace(TrainConfig, get_args_parser().parse_args(argv))
    validate(config)
    return config


def run(config: TrainConfig, epoch_callback: Callable[[int, dict], None] | None = None) -> dict:
    """Train one model as ``config`` says; return the summary (also written to summary.json)."""
    validate(config)
    model_config = model_config_of(config)
    training.seed_everything(config.seed)
    model = build_model(model_config)
    return training.run(run_config_of(config), model, kind="part_a", model_config=dataclasses.asdict(model_config),
                        input_size=model_config.input_size, epoch_callback=epoch_callback)


def main(argv: list[str] | None = None) -> int:
    return cli_main(config_from_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
