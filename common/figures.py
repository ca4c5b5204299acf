"""Report figures and guided backpropagation, for any image classifier (Part A or Part B).

Every plotting function takes plain tensors or arrays and returns a matplotlib ``Figure`` in
constrained layout (labels never overlap); ``save_figure`` writes it. Guided backpropagation
(Springenberg et al., 2015, "Striving for Simplicity") passes a gradient backwards through a ReLU only
where the forward input was positive *and* the gradient itself is positive; ``guided_backward``
applies that rule through forward hooks that are removed afterwards, leaving the model as it was.
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
    """Write ``fig`` as an image (format from the suffix) and release its memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[num_classes, num_classes]`` counts: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def plot_confusion_matrix(matrix: torch.Tensor | np.ndarray, classes: Sequence[str]) -> Figure:
    """Two panels: raw counts, and rows normalised to 1 (each row = recall of that class)."""
    counts = np.asarray(matrix, dtype=np.int64)
    row_sums = counts.sum(axis=1, keepdims=True)
    normalised = counts / np.maximum(row_sums, 1)  # a class absent from the data keeps a zero row
    fig, axes = plt.subplots(1, 2, figsize=(16, 7.5), layout="constrained")
    panels = ((counts, "Counts", "d"), (normalised, "Normalised by true class", ".2f"))
    for ax, (values, title, fmt) in zip(axes, panels):
        image = ax.imshow(values, cmap="Blues", vmin=0)
        fig.colorbar(image, ax=ax, shrink=0.8)
        threshold = values.max() / 2 if values.max() > 0 else 1
        for (row, col), value in np.ndenumerate(values):
            ax.text(col, row, format(value, fmt), ha="center", va="center", fontsize=8,
                    color="white" if value > threshold else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
        ax.set_title(title)
    return fig


def _grid(count: int, columns: int, cell: tuple[float, float], title_height: float = 0.0) -> tuple[Figure, list]:
    """A figure of ``count`` cells filled row by row, ``columns`` per row; the unused cells removed."""
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(cell[0] * columns, cell[1] * rows + title_height),
                             layout="constrained", squeeze=False)
    for ax in axes.flat[count:]:
        fig.delaxes(ax)
    return fig, list(axes.flat[:count])


def plot_prediction_grid(images: torch.Tensor | np.ndarray, true_labels: Sequence[int],
                         predicted_labels: Sequence[int], confidences: Sequence[float],
                         classes: Sequence[str], columns: int = 3) -> Figure:
    """One captioned cell per image (uint8 ``[N, H, W, 3]``), filled row by row.

    Correct predictions get a green caption and border, wrong ones red with a thicker border, so
    mistakes stand out even in a greyscale print.
    """
    fig, axes = _grid(len(images), columns, (2.4, 2.7))
    for ax, image, true, pred, confidence in zip(axes, np.asarray(images), true_labels, predicted_labels, confidences):
        color = CORRECT_COLOR if true == pred else WRONG_COLOR
        ax.imshow(image)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(2.5 if true == pred else 4)
        ax.set_title(f"true: {classes[true]}\npred: {classes[pred]} ({float(confidence):.0%})", color=color, fontsize=9)
    return fig


def plot_filters(weight: torch.Tensor, title: str = "First conv layer filters",
                 max_filters: int = MAX_FILTERS) -> Figure:
    """Each filter of a conv weight ``[F, C, k, k]`` as a small image in a near-square grid.

    Three input channels are shown as RGB, anything else as the channel mean in grey. Each filter is
    min-max normalised on its own, since filters differ in scale and one shared range would leave
    most of them flat grey. Only the first ``max_filters`` are drawn (a ViT patch embedding has 768).
    """
    all_filters = weight.shape[0]
    weight = weight.detach().float().cpu()[:max_filters]
    n_filters, channels, height, width = weight.shape
    low = weight.amin(dim=(1, 2, 3), keepdim=True)
    scaled = (weight - low) / (weight.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-12)
    fig, axes = _grid(n_filters, math.ceil(math.sqrt(n_filters)), (1.1, 1.1), title_height=0.5)
    for ax, image in zip(axes, scaled):
        if channels == 3:
            ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        else:
            ax.imshow(image.mean(dim=0).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
    shown = f"first {n_filters} of {all_filters}" if n_filters < all_filters else f"{n_filters}"
    fig.suptitle(f"{title} ({shown} filters, {channels} x {height} x {width})")
    return fig


class _GuidedGate(torch.autograd.Function):
    """Identity on an activation's output; backward keeps only positive gradients at positive units.

    Gating the gradient *before* it enters the activation's own backward means the gradient that
    reaches the activation's input is f'(x) * max(grad, 0) where x > 0 and 0 elsewhere: non-negative
    for every activation in ``SIGN_PRESERVING``, and exactly the guided rule for ReLU. The mask is
    read from the output (f(x) > 0 iff x > 0 for those activations), which stays correct for in-place
    activations that overwrite their input.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(output > 0)
        return output.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (positive,) = ctx.saved_tensors
        return grad.clamp(min=0) * positive


@contextlib.contextmanager
def forward_hooks(modules: Sequence[nn.Module], hook) -> Iterator[None]:
    """``hook`` on each of ``modules`` for the duration of the block only."""
    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _activations(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, SIGN_PRESERVING)]


@contextlib.contextmanager
def guided_backward(model: nn.Module) -> Iterator[None]:
    """Within the block, gradients pass every ReLU-like activation of ``model`` the guided way."""
    activations = _activations(model)
    if not activations:
        raise ValueError(f"{type(model).__name__} has no ReLU-like activation "
                         f"({', '.join(c.__name__ for c in SIGN_PRESERVING)}); guided backprop needs one")
    with forward_hooks(activations, lambda module, inputs, output: _GuidedGate.apply(output)):
        yield


def feature_activation(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The activation module that produces the model's last spatial feature map.

    Found by running ``example`` (a batch of at least one image) through the model and keeping the
    last ReLU-like call with a 4-D output, so it works for the Part A network (the last conv block's
    activation) and for torchvision backbones alike, without knowing their attribute names.
    """
    last: list[nn.Module] = []

    def remember(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            last[:] = [module]

    with forward_hooks(_activations(model), remember), torch.no_grad():
        model(example[:1])
    if not last:
        raise ValueError(f"{type(model).__name__} has no ReLU-like activation with a 4-D (image-shaped) "
                         "output; guided backprop needs a convolutional feature map")
    return last[0]


def guided_backprop(model: nn.Module, images: torch.Tensor, channels: Sequence[int],
                    layer: nn.Module | None = None) -> torch.Tensor:
    """Guided-backprop gradients of the input, one image per channel: the gradient of the sum of
    channel ``channels[i]``'s activation map on ``images[i]`` with respect to ``images[i]``.

    ``images`` are normalised model inputs ``[N, C, H, W]``; ``layer`` is the activation whose output
    holds the channels (default: ``feature_activation``). The model runs in eval mode (so samples do
    not interact through batch norm) and is returned to its previous mode; no parameter gradient is
    touched, since the gradient is taken with respect to the input only.
    """
    if len(channels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(channels)} channels; pass one channel per image")
    was_training = model.training
    model.eval()
    try:
        layer = layer if layer is not None else feature_activation(model, images)
        inputs = images.detach().clone().requires_grad_(True)
        # The gate hooks are registered first so the recorder sees the gated output: the target
        # layer's own activation then follows the guided rule too. A module may run several times
        # per forward (the shared ReLU of a torchvision bottleneck); its last call feeds onwards.
        outputs: list[torch.Tensor] = []
        with torch.enable_grad(), guided_backward(model), forward_hooks([layer], lambda m, i, o: outputs.append(o)):
            model(inputs)
            feature_map = outputs[-1] if outputs else None
            if feature_map is None or feature_map.dim() != 4:
                raise ValueError(f"layer {type(layer).__name__} did not produce a 4-D feature map")
            index = torch.as_tensor(list(channels), device=feature_map.device)
            if index.max() >= feature_map.shape[1] or index.min() < 0:
                raise ValueError(f"channels must be in [0, {feature_map.shape[1]}), got {list(channels)}")
            rows = torch.arange(len(inputs), device=feature_map.device)
            # Samples are independent in eval mode, so one summed objective gives every image the
            # gradient of its own channel.
            objective = feature_map[rows, index].sum()
            (gradient,) = torch.autograd.grad(objective, inputs)
    finally:
        model.train(was_training)
    return gradient


def gradient_to_image(gradient: torch.Tensor) -> np.ndarray:
    """A ``[3, H, W]`` gradient as an ``[H, W, 3]`` image in [0, 1]: 0.5 is zero gradient.

    Scaled by the 99th percentile of its magnitude rather than its maximum, so a few extreme pixels
    do not wash the rest of the picture out to grey.
    """
    gradient = gradient.detach().float().cpu()
    scale = torch.quantile(gradient.abs().flatten(), 0.99).clamp_min(1e-12)
    return (0.5 + 0.5 * gradient / scale).clamp(0, 1).permute(1, 2, 0).numpy()


def plot_guided_backprop(images: torch.Tensor | np.ndarray, gradients: torch.Tensor,
                         titles: Sequence[str], pairs_per_row: int = 2) -> Figure:
    """Each input image (uint8 ``[N, H, W, 3]``) beside its guided gradient (``[N, 3, H, W]``)."""
    if not len(images) == len(gradients) == len(titles):
        raise ValueError(f"got {len(images)} images, {len(gradients)} gradients and {len(titles)} titles; "
                         "they must match one to one")
    fig, axes = _grid(2 * len(images), 2 * pairs_per_row, (2.6, 2.9))
    for image_ax, gradient_ax, image, gradient, title in zip(axes[::2], axes[1::2], np.asarray(images),
                                                             gradients, titles):
        image_ax.imshow(image)
        image_ax.set_title(title, fontsize=9)
        gradient_ax.imshow(gradient_to_image(gradient))
        gradient_ax.set_title("guided backprop", fontsize=9)
        image_ax.set_axis_off()
        gradient_ax.set_axis_off()
    fig.suptitle("Guided backpropagation: last conv layer neurons")
    return fig
