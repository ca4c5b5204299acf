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

import torch

from common import training
from common.config import cli_main
from common.distributed import is_main_process
from part_b import weights as weights_lib
from part_b.model import FineTuneNet, ModelBConfig, build_from_config, build_model, normalisation

# Fine-tuning: fewer epochs than from scratch, AdamW, a larger rate for the new head (the pretrained
# layers get backbone_lr_scale times it).
TRAINING_DEFAULTS = dict(epochs=10, optimizer="adamw", learning_rate=1e-3, weight_decay=0.05)
DESCRIPTION = "Fine-tune a pretrained torchvision model on iNaturalist-12K."


def get_args_parser():
    return training.get_args_parser(ModelBConfig, DESCRIPTION, **TRAINING_DEFAULTS)


def check_model(config: ModelBConfig) -> ModelBConfig:
    """The config resolved (input size, head layers), with the weights' name or file and the layout
    (e.g. freeze_stages against the stage count) checked, on the meta device: no weights, no memory."""
    with torch.device("meta"):
        config = build_from_config(config).config
    weights_lib.check_spec(config.model, config.weights)
    return config


def config_from_args(argv: list[str] | None = None) -> tuple[ModelBConfig, training.RunConfig]:
    return training.parse_configs(get_args_parser(), ModelBConfig, argv, check_model)


def _build(config: ModelBConfig) -> FineTuneNet:
    model = build_model(config)
    if is_main_process():
        what = f"{config.model} | weights {config.weights} | strategy {config.strategy}"
        size = f"input {config.input_size}px | {config.num_classes} classes"
        print(f"{what} | {size} | {model.extra_repr()}", flush=True)
    return model


def run(config: tuple[ModelBConfig, training.RunConfig], epoch_callback=None) -> dict:
    """Fine-tune one model as ``config_from_args`` says; return the summary (also written to summary.json)."""
    model_config, run_config = config
    mean, std = normalisation(model_config)
    options = dict(kind="part_b", mean=mean, std=std, epoch_callback=epoch_callback)
    return training.run(run_config, model_config, _build, **options)


def main(argv: list[str] | None = None) -> int:
    return cli_main(config_from_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
