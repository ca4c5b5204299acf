"""Report figures and guided backpropagation, for any image classifier (Part A or Part B).

Every plotting function takes plain tensors or arrays and returns a matplotlib ``Figure``;
``save_figure`` writes it. Figures use constrained layout so labels never overlap, and sizes that stay
readable when a report shrinks them to a column's width.

Guided backpropagation (Springenberg et al., 2015, "Striving for Simplicity") passes a gradient
backwards through a ReLU only where the forward input was positive *and* the gradient itself is
positive. ``guided_backward`` applies that rule to every ReLU-like activation of a model for the
duration of a ``with`` block, through forward hooks that are removed afterwards, so the model is
left exactly as it was.
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

# Activations f with f(x) > 0 exactly when x > 0 and f'(x) > 0 for x > 0: the guided rule below is
# well defined for them. (Sigmoid and Softplus are positive everywhere, so they are left out.)
GUIDED_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Tanh,
)
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


# --------------------------------------------------------------------------- confusion matrix

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


# --------------------------------------------------------------------------- prediction grid

def plot_prediction_grid(images: torch.Tensor | np.ndarray, true_labels: Sequence[int],
                         predicted_labels: Sequence[int], confidences: Sequence[float],
                         classes: Sequence[str], columns: int = 3) -> Figure:
    """One captioned cell per image (uint8 ``[N, H, W, 3]``), filled row by row.

    Correct predictions get a green caption and border, wrong ones red with a thicker border, so
    mistakes stand out even in a greyscale print.
    """
    images = np.asarray(images)
    count = len(images)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.7 * rows), layout="constrained",
                             squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= count:
            fig.delaxes(ax)
            continue
        true, pred = int(true_labels[index]), int(predicted_labels[index])
        color = CORRECT_COLOR if true == pred else WRONG_COLOR
        ax.imshow(images[index])
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(2.5 if true == pred else 4)
        ax.set_title(f"true: {classes[true]}\npred: {classes[pred]} ({float(confidences[index]):.0%})",
                     color=color, fontsize=9)
    return fig


# --------------------------------------------------------------------------- first-layer filters

def plot_filters(weight: torch.Tensor, title: str = "First conv layer filters",
                 max_filters: int = MAX_FILTERS) -> Figure:
    """Each filter of a conv weight ``[F, C, k, k]`` as a small image in a near-square grid.

    Three input channels are shown as RGB, anything else as the channel mean in grey. Each filter is
    min-max normalised on its own, since filters differ in scale and one shared range would leave
    most of them flat grey. Only the first ``max_filters`` are drawn (a ViT patch embedding has 768).
    """
    all_filters = weight.shape[0]
    weight = weight.detach().float().cpu()[:max_filters]
    n_filters = weight.shape[0]
    per_filter = weight.reshape(n_filters, -1)
    low = per_filter.min(dim=1).values.view(-1, 1, 1, 1)
    high = per_filter.max(dim=1).values.view(-1, 1, 1, 1)
    scaled = (weight - low) / (high - low).clamp_min(1e-12)
    columns = math.ceil(math.sqrt(n_filters))
    rows = math.ceil(n_filters / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.1 * columns, 1.1 * rows + 0.5),
                             layout="constrained", squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= n_filters:
            fig.delaxes(ax)
            continue
        if weight.shape[1] == 3:
            ax.imshow(scaled[index].permute(1, 2, 0).numpy(), interpolation="nearest")
        else:
            ax.imshow(scaled[index].mean(dim=0).numpy(), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
        ax.set_axis_off()
    shown = f"first {n_filters} of {all_filters}" if n_filters < all_filters else f"{n_filters}"
    fig.suptitle(f"{title} ({shown} filters, {weight.shape[1]} x {weight.shape[2]} x {weight.shape[3]})")
    return fig


# --------------------------------------------------------------------------- guided backprop

class _GuidedGate(torch.autograd.Function):
    """Identity on an activation's output; backward keeps only positive gradients at positive units.

    Gating the gradient *before* it enters the activation's own backward means the gradient that
    reaches the activation's input is f'(x) * max(grad, 0) where x > 0 and 0 elsewhere: non-negative
    for every activation in ``GUIDED_ACTIVATIONS``, and exactly the guided rule for ReLU. The mask is
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


def _gate_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return _GuidedGate.apply(output)


@contextlib.contextmanager
def guided_backward(model: nn.Module) -> Iterator[None]:
    """Within the block, gradients pass every ReLU-like activation of ``model`` the guided way."""
    handles = [module.register_forward_hook(_gate_output)
               for module in model.modules() if isinstance(module, GUIDED_ACTIVATIONS)]
    if not handles:
        raise ValueError(f"{type(model).__name__} has no ReLU-like activation "
                         f"({', '.join(c.__name__ for c in GUIDED_ACTIVATIONS)}); guided backprop needs one")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class OutputRecorder:
    """Keeps the output of a module's most recent call (a module may run several times per forward,
    like the shared ReLU of a torchvision bottleneck; the last call is the one that feeds onwards)."""

    def __init__(self, module: nn.Module):
        self.output: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.output = output

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> OutputRecorder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


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

    handles = [module.register_forward_hook(remember)
               for module in model.modules() if isinstance(module, GUIDED_ACTIVATIONS)]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
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
        # layer's own activation then follows the guided rule too.
        with torch.enable_grad(), guided_backward(model), OutputRecorder(layer) as recorder:
            model(inputs)
            feature_map = recorder.output
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
    images = np.asarray(images)
    count = len(images)
    if len(gradients) != count or len(titles) != count:
        raise ValueError(f"got {count} images, {len(gradients)} gradients and {len(titles)} titles; "
                         "they must match one to one")
    rows = math.ceil(count / pairs_per_row)
    fig, axes = plt.subplots(rows, 2 * pairs_per_row, figsize=(2.6 * 2 * pairs_per_row, 2.9 * rows),
                             layout="constrained", squeeze=False)
    for index in range(rows * pairs_per_row):
        image_ax, gradient_ax = axes[index // pairs_per_row, 2 * (index % pairs_per_row):][:2]
        if index >= count:
            fig.delaxes(image_ax)
            fig.delaxes(gradient_ax)
            continue
        image_ax.imshow(images[index])
        image_ax.set_title(titles[index], fontsize=9)
        gradient_ax.imshow(gradient_to_image(gradients[index]))
        gradient_ax.set_title("guided backprop", fontsize=9)
        image_ax.set_axis_off()
        gradient_ax.set_axis_off()
    fig.suptitle("Guided backpropagation: last conv layer neurons")
    return fig
