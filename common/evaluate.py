"""Test metrics, figures and predictions for a checkpoint of either part (``python part_a/evaluate.py``).

Merges test accuracy and loss (overall and per class) into the run's summary.json, prints a table, writes
confusion_matrix.png, prediction_grid.png, first_layer_filters.png and guided_backprop.png (beside the
checkpoint unless --out_dir says otherwise) and logs them to wandb when a run is active or --wandb_mode
asks for one. ``--images`` prints the top-3 classes of image files instead and needs no dataset.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common import data as data_lib
from common import engine, figures, files, tracking
from common.checkpoint import CheckpointError, build_model_from_checkpoint, load_checkpoint
from common.config import UserError, add_dataclass_args, cli_main, from_namespace, option
from common.data import normalise
from common.device import resolve_device
from common.tracking import WANDB_MODES
from common.training import RunConfig

GRID_PER_CLASS = 3  # prediction_grid.png: one row per class
TABLE_PER_CLASS = 10  # rows per class in the wandb predictions table (the grid's images come first)
GUIDED_NEURONS = 10
SAMPLE_SEED = 0  # which test images the grid and table show: fixed, so reruns draw the same figure
REQUIRED_KEYS = ("model", "model_config", "classes", "input_size", "mean", "std")
WANDB_HELP = "online/offline: a new wandb run if none is active; disabled: none; default: only an active run"


@dataclass
class EvalConfig:
    checkpoint: str | None = option(None, "best.pt or last.pt of a run; required")
    data_dir: str = option("data", "dataset root holding split/test")
    out_dir: str | None = option(None, "figures' folder; default: the checkpoint's")
    batch_size: int = option(256, "evaluation batch size")
    device: str = option("auto", "auto, cpu, cuda, cuda:N, mps or xpu")
    tta: bool = option(False, "average the softmax of each image and its mirror")
    wandb_mode: str | None = option(None, WANDB_HELP, choices=WANDB_MODES)
    images: list[str] = field(default_factory=list, metadata={"cli": False})


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Test accuracy and report figures for a trained checkpoint.")
    add_dataclass_args(parser, EvalConfig, "evaluation")
    images_help = "only print the top-3 classes of these image files (no dataset needed)"
    parser.add_argument("--images", nargs="+", default=[], metavar="FILE", help=images_help)
    return parser


def load_model(checkpoint_path: str | Path, device: str) -> tuple[nn.Module, dict[str, Any], torch.device]:
    """The checkpoint's raw model in eval mode on ``device`` (resolved), the checkpoint, and the device."""
    torch_device = resolve_device(device)  # a ValueError (e.g. cuda on a machine without one): exit 1
    checkpoint = load_checkpoint(checkpoint_path, map_location="cpu")
    if missing := [key for key in REQUIRED_KEYS if key not in checkpoint]:
        origin = "part_a/train.py or part_b/train.py"
        raise CheckpointError(f"checkpoint {checkpoint_path} lacks {missing}; it was not written by {origin}")
    try:
        model = build_model_from_checkpoint(checkpoint)
    except (RuntimeError, ValueError, TypeError, KeyError) as error:  # config or weights do not fit
        reason = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        misfit = f"its weights do not fit the model its model_config describes ({reason})"
        raise CheckpointError(f"checkpoint {checkpoint_path}: {misfit}") from error
    return model.to(torch_device).eval(), checkpoint, torch_device


def sample_per_class(labels: torch.Tensor, per_class: int, num_classes: int) -> list[list[int]]:
    """Up to ``per_class`` indices of each class, drawn by a fixed-seed permutation (deterministic)."""
    chosen: list[list[int]] = [[] for _ in range(num_classes)]
    for index in torch.randperm(len(labels), generator=torch.Generator().manual_seed(SAMPLE_SEED)).tolist():
        if len(picked := chosen[int(labels[index])]) < per_class:
            picked.append(index)
    return chosen


def predict_test_set(model: nn.Module, loader, device: torch.device, feature_layer: nn.Module | None, tta):
    """engine.evaluate_test's results and ``feature_layer``'s ``[N, C]`` channel sums on the images."""
    strengths: list[torch.Tensor] = []

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        strengths.append(output.float().sum(dim=(2, 3)).cpu())

    hooked = [feature_layer] if feature_layer is not None else []
    with figures.forward_hooks(hooked, record), torch.inference_mode():
        result = engine.evaluate_test(model, loader, device, return_predictions=True, tta=tta)
    if feature_layer is None:
        return result, None
    # A layer called several times per forward (a shared ReLU) records each call; the last call of a
    # forward is the feature map, and with TTA the mirror images' forward follows. Padding rows come
    # last, so the first N rows are the real images.
    per_batch = len(strengths) // len(loader)
    per_forward = per_batch // 2 if tta else per_batch
    return result, torch.cat(strengths[per_forward - 1 :: per_batch])[: result["test_samples"]]


def format_table(metrics: dict[str, Any], matrix: torch.Tensor, checkpoint_path: Path) -> str:
    width = max(len(name) for name in metrics["test_per_class_acc"]) + 2
    tta = " (mean of each image and its mirror image)" if metrics["test_tta"] else ""
    head = f"{checkpoint_path}: test accuracy {metrics['test_acc']:.4f}, loss {metrics['test_loss']:.4f} "
    lines = [f"{head}on {int(matrix.sum())} images{tta}", f"{'class':<{width}}{'accuracy':>9}{'images':>8}"]
    counts = matrix.sum(dim=1).tolist()
    for (name, accuracy), count in zip(metrics["test_per_class_acc"].items(), counts, strict=True):
        lines.append(f"{name:<{width}}{accuracy:>9.4f}{count:>8}")
    return "\n".join(lines)


def guided_backprop_figure(model: nn.Module, layer: nn.Module, channel_strength, images, checkpoint: dict):
    """Guided backprop for the strongest-firing channels, each on the test image it fires most for."""
    peak_value, peak_image = channel_strength.max(dim=0)
    channels = peak_value.argsort(descending=True)[:GUIDED_NEURONS].tolist()
    chosen = [int(peak_image[c]) for c in channels]
    device = next(model.parameters()).device
    inputs = normalise(images[chosen].to(device), checkpoint["mean"], checkpoint["std"])
    gradients = figures.guided_backprop(model, inputs, channels, layer)
    titles = [f"channel {c} (image {i})" for c, i in zip(channels, chosen, strict=True)]
    return figures.plot_guided_backprop(images[chosen], gradients, titles)


def log_to_wandb(mode, checkpoint: dict, checkpoint_path: Path, metrics: dict, figure_paths: dict, rows):
    """Figures and a predictions table to the active wandb run, or to a new one ``mode`` asks for."""
    # Without an import there can be no active run; importing wandb only when needed saves seconds.
    run = getattr(sys.modules.get("wandb"), "run", None) if mode != "disabled" else None
    started_here = run is None and mode not in (None, "disabled")
    if started_here:
        saved, folder = checkpoint.get("run_config") or {}, checkpoint_path.parent
        where = {key: saved.get(f"wandb_{key}") for key in ("entity", "group")}
        where["project"] = saved.get("wandb_project", RunConfig.wandb_project)
        config = {"checkpoint": str(checkpoint_path), **checkpoint["model_config"]}
        run = tracking.start_wandb(mode, folder, name=f"{folder.name}-eval", config=config, **where)
    if run is None:
        return
    import wandb

    table = wandb.Table(columns=["image", "true", "predicted", "confidence"])
    for image, *row in rows:
        table.add_data(wandb.Image(image), *row)
    test = {"test_acc": metrics["test_acc"], "test_loss": metrics["test_loss"]}
    pictures = {name: wandb.Image(str(path)) for name, path in figure_paths.items()}
    run.log({**test, "test_predictions": table, **pictures})
    run.summary.update(test)
    if started_here:
        run.finish()


def evaluate_checkpoint(
    checkpoint_path, data_dir="data", out_dir=None, batch_size=256, device="auto", wandb_mode=None, tta=False
) -> dict[str, Any]:
    """Test metrics and figures for one checkpoint; returns the metrics and the figures' paths."""
    checkpoint_path = Path(checkpoint_path)
    model, checkpoint, torch_device = load_model(checkpoint_path, device)
    classes, mean, std = list(checkpoint["classes"]), checkpoint["mean"], checkpoint["std"]
    test_dir = Path(data_dir) / "split" / "test"
    if changes := data_lib.split_changes(checkpoint.get("split"), test_dir.parent, ("test",)):
        fix = "evaluate it on the split it trained on, or train a new run on this one (train.py --test)"
        raise UserError(f"{test_dir} changed since {checkpoint_path} was trained ({changes}): {fix}")
    test_set = data_lib.load_cache(test_dir.parent, "test", checkpoint["input_size"])
    if list(test_set.classes) != classes:
        found = f"{test_dir} holds {list(test_set.classes)}; evaluate it on the dataset it was trained on"
        raise UserError(f"checkpoint {checkpoint_path} was trained on classes {classes} but {found}")
    test_data = (test_set.images, test_set.labels)
    loader = data_lib.DeviceLoader(*test_data, batch_size, torch_device, train=False, mean=mean, std=std)
    images = torch.as_tensor(test_set.images)
    try:
        layer = figures.feature_activation(model, normalise(images[:1].to(torch_device), mean, std))
    except ValueError as error:  # e.g. a vision transformer: no convolutional feature map to explain
        print(f"no guided_backprop.png: {error}")
        layer = None
    result, channel_strength = predict_test_set(model, loader, torch_device, layer, tta)

    labels, predictions = result["targets"], result["predictions"]
    matrix = figures.confusion_matrix(labels, predictions, len(classes))
    recall = matrix.diag().double() / matrix.sum(dim=1).double()  # nan for a class with no test image
    metrics = {key: result[key] for key in ("test_acc", "test_loss")}
    metrics.update(test_per_class_acc=dict(zip(classes, recall.tolist(), strict=True)), test_tta=tta)
    summary_path = checkpoint_path.parent / "summary.json"
    tested = dict(test_checkpoint=checkpoint_path.name, test_epoch=checkpoint.get("epoch"))
    files.update_json(summary_path, {**metrics, **tested, "test_precision": engine.TEST_PRECISION})
    print(format_table(metrics, matrix, checkpoint_path))

    grid = [i for per_class in sample_per_class(labels, GRID_PER_CLASS, len(classes)) for i in per_class]
    confidence = result["probabilities"].max(dim=1).values.tolist()
    shown = (images[grid], labels[grid].tolist(), predictions[grid].tolist(), [confidence[i] for i in grid])
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    drawn = {"confusion_matrix": figures.plot_confusion_matrix(matrix, classes)}
    drawn["prediction_grid"] = figures.plot_prediction_grid(*shown, classes)
    drawn["first_layer_filters"] = figures.plot_filters(first_conv.weight)
    if layer is not None:
        drawn["guided_backprop"] = guided_backprop_figure(model, layer, channel_strength, images, checkpoint)
    out = Path(out_dir) if out_dir is not None else checkpoint_path.parent
    figure_paths = {name: figures.save_figure(fig, out / f"{name}.png") for name, fig in drawn.items()}
    table = [i for per_class in sample_per_class(labels, TABLE_PER_CLASS, len(classes)) for i in per_class]
    rows = [[images[i].numpy(), classes[labels[i]], classes[predictions[i]], confidence[i]] for i in table]
    log_to_wandb(wandb_mode, checkpoint, checkpoint_path, metrics, figure_paths, rows)
    print("figures: " + ", ".join(str(path) for path in figure_paths.values()))
    return dict(metrics, confusion_matrix=matrix.tolist(), summary_path=summary_path, figures=figure_paths)


def predict_files(config: EvalConfig, top: int = 3) -> list[list[tuple[str, float]]]:
    """The ``top`` most likely classes and their probabilities for each of ``config.images``."""
    model, checkpoint, device = load_model(config.checkpoint, config.device)
    decoded = []
    for path in config.images:
        try:
            decoded.append(data_lib.decode_image(path, checkpoint["input_size"]))
        except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(f"cannot read image {path}: {error}") from error
    mean, std, tta = checkpoint["mean"], checkpoint["std"], config.tta
    batches = torch.from_numpy(np.stack(decoded)).split(config.batch_size)
    with torch.inference_mode():
        logits = [engine.predict(model, normalise(batch.to(device), mean, std), tta) for batch in batches]
    classes = checkpoint["classes"]
    values, indices = torch.cat(logits).softmax(dim=1).topk(min(top, len(classes)), dim=1)
    names = [[classes[i] for i in row] for row in indices.tolist()]
    return [list(zip(*pair, strict=True)) for pair in zip(names, values.tolist(), strict=True)]


def config_from_args(argv: list[str] | None = None) -> EvalConfig:
    config = from_namespace(EvalConfig, get_args_parser().parse_args(argv))
    if not config.checkpoint:
        raise ValueError("--checkpoint is required (a best.pt or last.pt from a run folder)")
    return config


def run(config: EvalConfig) -> None:
    if config.images:
        for path, top in zip(config.images, predict_files(config), strict=True):
            print(f"{path}: " + " | ".join(f"{name} {probability:.3f}" for name, probability in top))
    else:
        options = (config.batch_size, config.device, config.wandb_mode, config.tta)
        evaluate_checkpoint(config.checkpoint, config.data_dir, config.out_dir, *options)


def main(argv: list[str] | None = None) -> int:
    return cli_main(config_from_args, run, argv)
