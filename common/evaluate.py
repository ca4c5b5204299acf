"""Test metrics, figures and predictions for a checkpoint of either part (``python part_a/evaluate.py``).

The test form merges test accuracy and loss (overall and per class) into the run's summary.json,
prints a table, writes confusion_matrix.png, prediction_grid.png, first_layer_filters.png and
guided_backprop.png (beside the checkpoint unless --out_dir says otherwise) and logs them to wandb
when a run is active or --wandb_mode asks for one. ``--images`` prints the top-3 classes of image
files instead and needs no dataset. The checkpoint says which model to rebuild, at which resolution
and normalisation.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from common import data as data_lib
from common import engine, figures, files, tracking
from common.checkpoint import CheckpointError, build_model_from_checkpoint, load_checkpoint
from common.config import UserError, add_dataclass_args, cli_main, from_namespace
from common.data import normalise
from common.device import resolve_device
from common.training import RunConfig

GRID_PER_CLASS = 3  # prediction_grid.png: one row per class
TABLE_PER_CLASS = 10  # rows per class in the wandb predictions table (the grid's images come first)
GUIDED_NEURONS = 10
SAMPLE_SEED = 0  # which test images the grid and table show: fixed, so reruns draw the same figure
REQUIRED_KEYS = ("model", "model_config", "classes", "input_size", "mean", "std")


@dataclass
class EvalConfig:
    checkpoint: str | None = field(default=None, metadata={
        "help": "best.pt or last.pt of a run (Part A or Part B); required"})
    data_dir: str = field(default="data", metadata={"help": "dataset root holding split/test"})
    out_dir: str | None = field(default=None, metadata={"help": "where figures go; default: the checkpoint's folder"})
    batch_size: int = field(default=256, metadata={"help": "evaluation batch size"})
    device: str = field(default="auto", metadata={
        "help": "auto (torch's current accelerator), cpu, cuda, cuda:N, mps or xpu"})
    tta: bool = field(default=False, metadata={"help": "average the softmax of each image and its mirror image"})
    wandb_mode: str | None = field(default=None, metadata={
        "help": "online/offline: log figures to a new wandb run unless one is active; disabled: log nothing; "
                "default: log only to an already active run",
        "choices": tracking.WANDB_MODES})
    images: list[str] = field(default_factory=list, metadata={"cli": False})


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Test accuracy and report figures for a trained checkpoint.")
    add_dataclass_args(parser, EvalConfig, "evaluation")
    parser.add_argument("--images", nargs="+", default=[], metavar="FILE",
                        help="only print the top-3 classes of these image files (no dataset needed)")
    return parser


def load_model(checkpoint_path: str | Path, device: str) -> tuple[nn.Module, dict[str, Any], torch.device]:
    """The checkpoint's raw model in eval mode on ``device`` (resolved), the checkpoint, and the device."""
    try:
        torch_device = resolve_device(device)
    except (ValueError, RuntimeError) as error:  # e.g. --device cuda on a machine without a GPU
        raise UserError(str(error)) from error
    checkpoint = load_checkpoint(checkpoint_path, map_location="cpu")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint_path} lacks {missing}; it was not written by "
                              "part_a/train.py or part_b/train.py")
    try:
        model = build_model_from_checkpoint(checkpoint)
    except (RuntimeError, ValueError, TypeError, KeyError) as error:  # config or weights do not fit
        raise CheckpointError(f"checkpoint {checkpoint_path}: its weights do not fit the model its "
                              f"model_config describes ({type(error).__name__}: {str(error).splitlines()[0]})") from error
    return model.to(torch_device).eval(), checkpoint, torch_device


def sample_per_class(labels: torch.Tensor, per_class: int, num_classes: int,
                     seed: int = SAMPLE_SEED) -> list[list[int]]:
    """Up to ``per_class`` indices of each class, drawn by a fixed-seed permutation (deterministic)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    chosen: dict[int, list[int]] = {label: [] for label in range(num_classes)}
    for index in order.tolist():
        picked = chosen[int(labels[index])]
        if len(picked) < per_class:
            picked.append(index)
    return list(chosen.values())


def predict_test_set(model: nn.Module, loader, device: torch.device, feature_layer: nn.Module | None,
                     tta: bool = False) -> tuple[dict[str, Any], torch.Tensor | None]:
    """engine.evaluate_test's loss, accuracy and per-image probabilities, plus ``[N, C]`` channel
    strengths of ``feature_layer`` (each channel's activation map summed) for picking the images
    that excite each neuron most, from the images themselves, not their mirror images; ``None``
    without a layer."""
    strengths: list[torch.Tensor] = []

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        strengths.append(output.float().sum(dim=(2, 3)).cpu())

    with figures.forward_hooks([feature_layer] if feature_layer is not None else [], record), torch.inference_mode():
        result = engine.evaluate_test(model, loader, device, return_predictions=True, tta=tta)
    if feature_layer is None:
        return result, None
    # A layer called several times per forward (a shared ReLU) records each call; the last call of a
    # forward is the feature map, and with TTA the mirror images' forward follows. Padding rows come
    # last, so the first N rows are the real images.
    per_batch = len(strengths) // len(loader)
    per_forward = per_batch // 2 if tta else per_batch
    return result, torch.cat(strengths[per_forward - 1::per_batch])[:result["test_samples"]]


def format_table(metrics: dict[str, Any], matrix: torch.Tensor, checkpoint_path: Path) -> str:
    width = max(len(name) for name in metrics["test_per_class_acc"]) + 2
    tta = " (mean of each image and its mirror image)" if metrics["test_tta"] else ""
    lines = [f"{checkpoint_path}: test accuracy {metrics['test_acc']:.4f}, loss {metrics['test_loss']:.4f} "
             f"on {int(matrix.sum())} images{tta}", f"{'class':<{width}}{'accuracy':>9}{'images':>8}"]
    for (name, accuracy), count in zip(metrics["test_per_class_acc"].items(), matrix.sum(dim=1).tolist()):
        lines.append(f"{name:<{width}}{accuracy:>9.4f}{count:>8}")
    return "\n".join(lines)


def guided_backprop_figure(model: nn.Module, layer: nn.Module, channel_strength: torch.Tensor,
                           images: torch.Tensor, checkpoint: dict, device: torch.device):
    """Guided backprop for the strongest-firing channels, each on the test image it fires most for."""
    peak_value, peak_image = channel_strength.max(dim=0)
    channels = peak_value.argsort(descending=True)[:GUIDED_NEURONS].tolist()
    chosen = [int(peak_image[c]) for c in channels]
    inputs = normalise(images[chosen].to(device), checkpoint["mean"], checkpoint["std"])
    gradients = figures.guided_backprop(model, inputs, channels, layer)
    titles = [f"channel {c} (image {i})" for c, i in zip(channels, chosen)]
    return figures.plot_guided_backprop(images[chosen], gradients, titles)


def log_to_wandb(mode: str | None, checkpoint: dict, checkpoint_path: Path, metrics: dict[str, Any],
                 figure_paths: dict[str, Path], table_rows: list[list[Any]]) -> None:
    """Log figures and a predictions table to the active wandb run, or to a new one ``mode`` asks for
    (``disabled``: log nothing)."""
    if mode == "disabled":
        return
    # Without an import there can be no active run; importing wandb only when needed saves seconds.
    wandb = sys.modules.get("wandb")
    run = wandb.run if wandb is not None else None
    started_here = run is None and mode is not None
    if started_here:
        import wandb
        run_config = checkpoint.get("run_config") or {}
        run = tracking.start_wandb(mode, project=run_config.get("wandb_project", RunConfig.wandb_project),
                                   entity=run_config.get("wandb_entity"),
                                   name=f"{checkpoint_path.parent.name}-eval", group=run_config.get("wandb_group"),
                                   config={"checkpoint": str(checkpoint_path), **checkpoint["model_config"]},
                                   run_dir=checkpoint_path.parent)
    if run is None:
        return
    table = wandb.Table(columns=["image", "true", "predicted", "confidence"])
    for image, true, predicted, confidence in table_rows:
        table.add_data(wandb.Image(image), true, predicted, confidence)
    run.log({"test_acc": metrics["test_acc"], "test_loss": metrics["test_loss"], "test_predictions": table,
             **{name: wandb.Image(str(path)) for name, path in figure_paths.items()}})
    run.summary.update({"test_acc": metrics["test_acc"], "test_loss": metrics["test_loss"]})
    if started_here:
        run.finish()


def evaluate_checkpoint(checkpoint_path: str | Path, data_dir: str | Path = "data", out_dir: str | Path | None = None,
                        batch_size: int = 256, device: str = "auto", wandb_mode: str | None = None,
                        tta: bool = False) -> dict[str, Any]:
    """Test metrics and figures for one checkpoint; returns the metrics and the figures' paths."""
    checkpoint_path = Path(checkpoint_path)
    model, checkpoint, torch_device = load_model(checkpoint_path, device)
    classes, mean, std = list(checkpoint["classes"]), checkpoint["mean"], checkpoint["std"]
    split_dir = Path(data_dir) / "split"
    test_set = data_lib.load_cache(split_dir, "test", checkpoint["input_size"])
    if list(test_set.classes) != classes:
        raise UserError(f"checkpoint {checkpoint_path} was trained on classes {classes} but "
                        f"{split_dir / 'test'} holds {list(test_set.classes)}; evaluate it on the "
                        "dataset it was trained on")
    loader = data_lib.DeviceLoader(test_set.images, test_set.labels, batch_size, torch_device, train=False,
                                   mean=mean, std=std)
    images = torch.as_tensor(test_set.images)
    try:
        feature_layer = figures.feature_activation(model, normalise(images[:1].to(torch_device), mean, std))
    except ValueError as error:  # e.g. a vision transformer: no convolutional feature map to explain
        print(f"no guided_backprop.png: {error}")
        feature_layer = None
    result, channel_strength = predict_test_set(model, loader, torch_device, feature_layer, tta)

    labels, predictions = result["targets"], result["predictions"]
    matrix = figures.confusion_matrix(labels, predictions, len(classes))
    recall = matrix.diag().double() / matrix.sum(dim=1).double()  # nan for a class with no test image
    metrics = {"test_acc": result["test_acc"], "test_loss": result["test_loss"],
               "test_per_class_acc": dict(zip(classes, recall.tolist())), "test_tta": tta}
    summary_path = checkpoint_path.parent / "summary.json"
    files.update_json(summary_path, {**metrics, "test_checkpoint": checkpoint_path.name,
                                     "test_epoch": checkpoint.get("epoch"), "test_precision": engine.TEST_PRECISION})
    print(format_table(metrics, matrix, checkpoint_path))

    out = Path(out_dir) if out_dir is not None else checkpoint_path.parent
    confidence = result["probabilities"].max(dim=1).values
    samples = sample_per_class(labels, TABLE_PER_CLASS, len(classes))
    grid = [index for per_class in samples for index in per_class[:GRID_PER_CLASS]]
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    drawn = {"confusion_matrix": figures.plot_confusion_matrix(matrix, classes),
             "prediction_grid": figures.plot_prediction_grid(
                 images[grid], labels[grid].tolist(), predictions[grid].tolist(), confidence[grid].tolist(), classes),
             "first_layer_filters": figures.plot_filters(first_conv.weight)}
    if feature_layer is not None:
        drawn["guided_backprop"] = guided_backprop_figure(model, feature_layer, channel_strength, images,
                                                          checkpoint, torch_device)
    figure_paths = {name: figures.save_figure(fig, out / f"{name}.png") for name, fig in drawn.items()}
    table_rows = [[images[i].numpy(), classes[labels[i]], classes[predictions[i]], float(confidence[i])]
                  for per_class in samples for i in per_class]
    log_to_wandb(wandb_mode, checkpoint, checkpoint_path, metrics, figure_paths, table_rows)
    print("figures: " + ", ".join(str(path) for path in figure_paths.values()))
    return {**metrics, "confusion_matrix": matrix.tolist(), "summary_path": summary_path, "figures": figure_paths}


def predict_files(checkpoint_path: str | Path, paths: Sequence[str | Path], device: str = "auto",
                  top: int = 3, batch_size: int = 256, tta: bool = False) -> list[list[tuple[str, float]]]:
    """The ``top`` most likely classes and their probabilities for each image file."""
    model, checkpoint, torch_device = load_model(checkpoint_path, device)
    decoded = []
    for path in paths:
        try:
            decoded.append(data_lib.decode_image(path, checkpoint["input_size"]))
        except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(f"cannot read image {path}: {error}") from error
    with torch.inference_mode():
        probabilities = torch.cat([
            engine.predict(model, normalise(batch.to(torch_device), checkpoint["mean"], checkpoint["std"]),
                           tta).softmax(dim=1)
            for batch in torch.from_numpy(np.stack(decoded)).split(batch_size)])
    values, indices = probabilities.topk(min(top, probabilities.shape[1]), dim=1)
    return [[(checkpoint["classes"][i], v) for v, i in zip(row_values, row_indices)]
            for row_values, row_indices in zip(values.tolist(), indices.tolist())]


def config_from_args(argv: list[str] | None = None) -> EvalConfig:
    config = from_namespace(EvalConfig, get_args_parser().parse_args(argv))
    if not config.checkpoint:
        raise ValueError("--checkpoint is required (a best.pt or last.pt from a run folder)")
    return config


def run(config: EvalConfig) -> None:
    if config.images:
        predictions = predict_files(config.checkpoint, config.images, config.device, batch_size=config.batch_size,
                                    tta=config.tta)
        for path, top in zip(config.images, predictions):
            print(f"{path}: " + " | ".join(f"{name} {probability:.3f}" for name, probability in top))
    else:
        evaluate_checkpoint(config.checkpoint, config.data_dir, config.out_dir, config.batch_size,
                            config.device, config.wandb_mode, config.tta)


def main(argv: list[str] | None = None) -> int:
    return cli_main(config_from_args, run, argv)
