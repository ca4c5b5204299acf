"""Train the Part A CNN from scratch on iNaturalist-12K.

    python part_a/train.py --data_dir data --out_dir runs --name best [options] [--test] [--resume]

Also the program ``wandb agent`` runs for sweep.yaml (wandb passes ``--name=value``). Options are the
fields of ``ModelConfig`` (part_a/model.py) and ``RunConfig`` (common/training.py), by group in ``--help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

from common import training
from common.config import cli_main
from part_a.model import MEAN, STD, ModelConfig, block_shapes, build_model

# The best configuration of the original sweeps (the model's are ModelConfig's defaults).
TRAINING_DEFAULTS = dict(epochs=40, optimizer="adam", learning_rate=0.00027, weight_decay=0.00133)
DESCRIPTION = "Train the Part A CNN from scratch on iNaturalist-12K (defaults: the best sweep configuration)."


def get_args_parser():
    return training.get_args_parser(ModelConfig, DESCRIPTION, **TRAINING_DEFAULTS)


def check_model(config: ModelConfig) -> ModelConfig:
    block_shapes(config)  # raises for any bad value (e.g. a feature map shrunk to nothing), before any weight
    return config


def config_from_args(argv: list[str] | None = None) -> tuple[ModelConfig, training.RunConfig]:
    return training.parse_configs(get_args_parser(), ModelConfig, argv, check_model)


def run(config: tuple[ModelConfig, training.RunConfig], epoch_callback=None) -> dict:
    """Train one model as ``config_from_args`` says; return the summary (also written to summary.json)."""
    model_config, run_config = config
    options = dict(kind="part_a", mean=MEAN, std=STD, epoch_callback=epoch_callback)
    return training.run(run_config, model_config, build_model, **options)


def main(argv: list[str] | None = None) -> int:
    return cli_main(config_from_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
