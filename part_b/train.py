"""Fine-tune a pretrained torchvision model on iNaturalist-12K (Part B).

    python part_b/train.py --data_dir data --out_dir runs --name ft [--model resnet50] [--weights DEFAULT]
        [--strategy head|freeze_k|full|gradual|mlp_head] [options] [--test] [--resume]

Same run folder, checkpoints, wandb logging, resume and ``--test`` as Part A (common/training.py).
Input size and normalisation come from the chosen weights' torchvision transforms (224 for most
models, 299 for inception_v3, 384 for efficientnet_v2_s); ``--input_size`` overrides the size for
quick runs. Weights are read offline from the torch hub cache or a file: see docs/part_b.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from common import training
from common.config import add_dataclass_args, cli_main, from_namespace
from common.distributed import is_main_process
from part_b import weights as weights_lib
from part_b.model import (FineTuneNet, ModelBConfig, build_from_config, build_model, normalisation,
                          parameter_counts, resolve_config)


@dataclass
class FineTuneRunConfig(training.RunConfig):
    """Part A's run options with defaults for fine-tuning: fewer epochs, AdamW, a larger rate for the new head."""
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    optimizer: str = field(default="adamw", metadata={"help": "optimizer", "choices": training.OPTIMIZERS})
    learning_rate: float = field(default=1e-3, metadata={
        "help": "peak learning rate of the new head (pretrained layers: x backbone_lr_scale)"})
    weight_decay: float = field(default=0.05, metadata={
        "help": "weight decay (L2 for adam/nadam/sgd, decoupled for adamw)"})


@dataclass
class TrainConfig(FineTuneRunConfig, ModelBConfig):
    """Every option of this script: the model's fields and the run's fields."""


def model_config_of(config: TrainConfig) -> ModelBConfig:
    return from_namespace(ModelBConfig, dataclasses.asdict(config))


def run_config_of(config: TrainConfig) -> training.RunConfig:
    return from_namespace(training.RunConfig, dataclasses.asdict(config))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Fine-tune a pretrained torchvision model on iNaturalist-12K.")
    add_dataclass_args(parser, ModelBConfig, "model")
    add_dataclass_args(parser, FineTuneRunConfig, "training")
    return parser


def validate(config: TrainConfig) -> None:
    """Every check that needs no data and no weights: bad values fail here, before anything is read."""
    model_config = resolve_config(model_config_of(config))
    weights_lib.check_spec(model_config.model, model_config.weights)
    with torch.device("meta"):  # the layout checks (e.g. freeze_stages against the stage count), no memory
        build_from_config(model_config)
    training.validate_run_config(run_config_of(config))


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    config = from_namespace(TrainConfig, get_args_parser().parse_args(argv))
    validate(config)
    return config


def _describe(model: FineTuneNet) -> str:
    counts = parameter_counts(model)
    return (f"{model.frozen_summary()} | {counts['trainable_params']:,} trainable, "
            f"{counts['frozen_params']:,} frozen parameters")


def _unfreeze_on_schedule(epoch: int, model: FineTuneNet) -> None:
    """Bring the trainable set to what the strategy says for ``epoch``; only gradual changes it."""
    before = model.frozen_units
    model.set_epoch(epoch)
    if model.frozen_units != before and is_main_process():
        print(f"epoch {epoch}: {_describe(model)}", flush=True)


def run(config: TrainConfig, epoch_callback: Callable[[int, dict], None] | None = None) -> dict:
    """Fine-tune one model as ``config`` says; return the summary (also written to summary.json)."""
    validate(config)
    model_config = resolve_config(model_config_of(config))
    training.seed_everything(config.seed)  # before the build: the new head's initialisation is seeded
    model = build_model(model_config)
    mean, std = normalisation(model_config)
    if is_main_process():
        print(f"{model_config.model} | weights {model_config.weights} | strategy {model_config.strategy} | "
              f"input {model_config.input_size}px | {_describe(model)}", flush=True)
    return training.run(run_config_of(config), model, kind="part_b", model_config=dataclasses.asdict(model_config),
                        input_size=model_config.input_size, mean=mean, std=std, param_groups=model.param_groups(),
                        on_epoch_start=_unfreeze_on_schedule, epoch_callback=epoch_callback)


def main(argv: list[str] | None = None) -> int:
    return cli_main(config_from_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
