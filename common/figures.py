"""Report figures and guided backpropagation, for any image classifier (Part A or Part B).

Plotting functions return a matplotlib ``Figure`` in constrained layout (labels never overlap). Guided
backpropagation (Springenberg et al., 2015) passes a gradient back through a ReLU only where the forward
input *and* the gradient are positive, through hooks removed afterwards.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window or need a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

from common.activations import SIGN_PRESERVING  # noqa: E402

CORRECT_COLOR = "#1a7f37"  # green
WRONG_COLOR = "#cf222e"  # red
MAX_FILTERS = 128  # beyond this a filter grid is unreadable at report size, and slow to draw


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[num_classes, num_classes]`` counts: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def plot_confusion_matrix(matrix: torch.Tensor | np.ndarray, classes: Sequence[str]) -> Figure:
    """Two panels: raw counts, and rows normalised to 1 (each row = recall of that class)."""
    counts = np.asarray(matrix, dtype=np.int64)
    normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # an absent class: a zero row
    fig, axes = plt.subplots(1, 2, figsize=(16, 7.5), layout="constrained")
    panels = ((counts, "Counts", "d"), (normalised, "Normalised by true class", ".2f"))
    for ax, (values, title, fmt) in zip(axes, panels, strict=True):
        fig.colorbar(ax.imshow(values, cmap="Blues", vmin=0), ax=ax, shrink=0.8)
        threshold = values.max() / 2 if values.max() > 0 else 1
        for (row, col), value in np.ndenumerate(values):
            color = "white" if value > threshold else "black"
            ax.text(col, row, format(value, fmt), ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set(xlabel="Predicted class", ylabel="True class", title=title)
    return fig


def _grid(count: int, columns: int, cell: tuple[float, float], title_height: float = 0.0):
    """A figure of ``count`` cells filled row by row, ``columns`` per row; the unused cells removed."""
    rows = math.ceil(count / columns)
    size = (cell[0] * columns, cell[1] * rows + title_height)
    fig, axes = plt.subplots(rows, columns, figsize=size, layout="constrained", squeeze=False)
    for ax in axes.flat[count:]:
        fig.delaxes(ax)
    return fig, list(axes.flat[:count])


def plot_prediction_grid(images, true_labels, predicted_labels, confidences, classes, columns=3) -> Figure:
    """A captioned cell per image; mistakes red with a thicker border (visible in a greyscale print too)."""
    fig, axes = _grid(len(images), columns, (2.4, 2.7))
    cells = zip(axes, np.asarray(images), true_labels, predicted_labels, confidences, strict=True)
    for ax, image, true, pred, confidence in cells:
        color = CORRECT_COLOR if true == pred else WRONG_COLOR
        ax.imshow(image)
        ax.set(xticks=[], yticks=[])
        plt.setp(list(ax.spines.values()), edgecolor=color, linewidth=2.5 if true == pred else 4)
        caption = f"true: {classes[true]}\npred: {classes[pred]} ({float(confidence):.0%})"
        ax.set_title(caption, color=color, fontsize=9)
    return fig


def plot_filters(weight: torch.Tensor, title="First conv layer filters", max_filters=MAX_FILTERS) -> Figure:
    """The first ``max_filters`` filters (RGB, else their mean in grey), each min-max normalised on its own:
    one shared range would leave most of them flat grey."""
    all_filters = weight.shape[0]
    weight = weight.detach().float().cpu()[:max_filters]
    n_filters, channels, height, width = weight.shape
    low = weight.amin(dim=(1, 2, 3), keepdim=True)
    scaled = (weight - low) / (weight.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-12)
    fig, axes = _grid(n_filters, math.ceil(math.sqrt(n_filters)), (1.1, 1.1), title_height=0.5)
    pictures = scaled.permute(0, 2, 3, 1) if channels == 3 else scaled.mean(dim=1)  # RGB, else grey
    for ax, image in zip(axes, pictures, strict=True):
        ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
    shown = f"first {n_filters} of {all_filters}" if n_filters < all_filters else f"{n_filters}"
    fig.suptitle(f"{title} ({shown} filters, {channels} x {height} x {width})")
    return fig


def forward_hooks(modules: Sequence[nn.Module], hook) -> contextlib.ExitStack:
    """``hook`` on each of ``modules`` for the duration of a ``with`` block only."""
    hooks = contextlib.ExitStack()
    for module in modules:
        hooks.enter_context(module.register_forward_hook(hook))
    return hooks


def _guided_gate(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """Keep only positive gradients at positive units *before* the activation's own backward: its input gets
    f'(x) * max(grad, 0) where x > 0, else 0, the guided rule for ReLU (f(x) > 0 iff x > 0 for every
    ``SIGN_PRESERVING`` activation, so the mask is read from the output now, before any in-place change)."""
    if output.requires_grad:
        positive = output > 0
        output.register_hook(lambda grad: grad.clamp(min=0) * positive)


@contextlib.contextmanager
def guided_backward(model: nn.Module) -> Iterator[None]:
    """Within the block, gradients pass every ReLU-like activation of ``model`` the guided way."""
    if not (activations := [m for m in model.modules() if isinstance(m, SIGN_PRESERVING)]):
        names = ", ".join(c.__name__ for c in SIGN_PRESERVING)
        raise ValueError(f"{type(model).__name__} has no ReLU-like activation ({names}) for guided backprop")
    with forward_hooks(activations, _guided_gate):
        yield


def feature_activation(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The last ReLU-like module with a 4-D output on ``example``: any backbone, no attribute names."""
    last: list[nn.Module] = []

    def remember(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            last[:] = [module]

    activations = [m for m in model.modules() if isinstance(m, SIGN_PRESERVING)]
    with forward_hooks(activations, remember), torch.no_grad():
        model(example[:1])
    if not last:
        found = f"{type(model).__name__} has no ReLU-like activation with a 4-D (image-shaped) output"
        raise ValueError(f"{found}; guided backprop needs a convolutional feature map")
    return last[0]


def guided_backprop(model: nn.Module, images: torch.Tensor, channels, layer=None) -> torch.Tensor:
    """The guided gradient of channel ``channels[i]``'s summed map in ``layer`` with respect to ``images[i]``,
    in eval mode (samples do not interact through batch norm); the model is left as it was."""
    if len(channels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(channels)} channels; pass one channel per image")
    was_training = model.training
    model.eval()
    try:
        layer = layer if layer is not None else feature_activation(model, images)
        inputs = images.detach().clone().requires_grad_(True)
        # A module may run several times per forward (a torchvision bottleneck's shared ReLU): its last
        # call feeds onwards. The gate is on that output tensor, so the layer itself is guided too.
        outputs: list[torch.Tensor] = []
        record = forward_hooks([layer], lambda module, args, output: outputs.append(output))
        with torch.enable_grad(), guided_backward(model), record:
            model(inputs)
        if not outputs or outputs[-1].dim() != 4:
            raise ValueError(f"layer {type(layer).__name__} did not produce a 4-D feature map")
        feature_map, index = outputs[-1], torch.as_tensor(list(channels), device=outputs[-1].device)
        if index.max() >= feature_map.shape[1] or index.min() < 0:
            raise ValueError(f"channels must be in [0, {feature_map.shape[1]}), got {list(channels)}")
        # Samples are independent in eval mode: one summed objective gives each image its channel's gradient.
        objective = feature_map[torch.arange(len(inputs), device=index.device), index].sum()
        (gradient,) = torch.autograd.grad(objective, inputs)
    finally:
        model.train(was_training)
    return gradient


def gradient_to_image(gradient: torch.Tensor) -> np.ndarray:
    """An image with 0.5 for zero, scaled by the 99th percentile: a few extreme pixels wash nothing out."""
    gradient = gradient.detach().float().cpu()
    scale = torch.quantile(gradient.abs().flatten(), 0.99).clamp_min(1e-12)
    return (0.5 + 0.5 * gradient / scale).clamp(0, 1).permute(1, 2, 0).numpy()


def plot_guided_backprop(images, gradients: torch.Tensor, titles: Sequence[str], pairs_per_row=2) -> Figure:
    """Each input image (uint8 ``[N, H, W, 3]``) beside its guided gradient (``[N, 3, H, W]``)."""
    if not len(images) == len(gradients) == len(titles):
        counts = f"{len(images)} images, {len(gradients)} gradients and {len(titles)} titles"
        raise ValueError(f"got {counts}; they must match one to one")
    fig, axes = _grid(2 * len(images), 2 * pairs_per_row, (2.6, 2.9))
    pairs = zip(axes[::2], axes[1::2], np.asarray(images), gradients, titles, strict=True)
    for image_ax, gradient_ax, image, gradient, title in pairs:
        image_ax.imshow(image)
        gradient_ax.imshow(gradient_to_image(gradient))
        for ax, text in ((image_ax, title), (gradient_ax, "guided backprop")):
            ax.set_title(text, fontsize=9)
            ax.set_axis_off()
    fig.suptitle("Guided backpropagation: last conv layer neurons")
    return fig
