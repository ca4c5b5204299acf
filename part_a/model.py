"""The Part A network: a small CNN whose every structural choice is a hyperparameter.

    input -> n_blocks x [conv -> (batch norm) -> activation -> max-pool 2x2/2 -> (dropout)]
          -> flatten -> dense (dense_neurons) -> activation -> dropout -> dense (num_classes)

No training code lives here. Shapes are derived analytically (``block_shapes``), so a configuration
that shrinks the feature map to nothing fails with the block and the sizes before any weight exists.
"""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass

import torch
from torch import nn

from common.activations import ACTIVATIONS, activation_class
from common.config import from_namespace, option

FILTER_STRATEGIES = ("same", "double", "half")
# Inputs are normalised to [-1, 1]; the network trains from scratch, so no dataset statistics are needed.
MEAN = STD = (0.5, 0.5, 0.5)
SAME_HELP = "'same' (output size = ceil(input/stride), asymmetric for even kernels), 'valid', or an int"


@dataclass
class ModelConfig:
    input_size: int = option(224, "input images are input_size x input_size")
    n_blocks: int = option(5, "number of conv blocks")
    n_filters: int = option(64, "filters in the first conv layer (m)")
    filter_strategy: str = option("same", "how filter counts change per block", choices=FILTER_STRATEGIES)
    kernel_size: int | list[int] = option(5, "conv kernel size k: one int, or a comma list, one per block")
    stride: int = option(1, "conv stride")
    padding: int | str = option("same", SAME_HELP)
    activation: str = option("gelu", "conv activation: " + ", ".join(ACTIVATIONS))
    dense_activation: str | None = option(None, "dense-layer activation; none = same as --activation")
    dense_neurons: int = option(128, "neurons in the dense layer (n)")
    batch_norm: bool = option(True, "batch norm after each conv")
    conv_bias: bool = option(True, "bias term in conv layers")
    dropout: float = option(0.31396, "dropout before the output layer")
    block_dropout: float = option(0.0, "dropout after each conv block")
    in_channels: int = option(3, "input channels", cli=False)
    num_classes: int = option(10, "output classes (training: the data's)", cli=False)


def filter_counts(config: ModelConfig) -> list[int]:
    """Output channels of each block for the filter strategy (``half`` never drops below 1)."""
    m, powers = config.n_filters, [2**i for i in range(config.n_blocks)]
    counts = {"same": [m for _ in powers], "double": [m * p for p in powers]}
    counts["half"] = [max(1, m // p) for p in powers]
    if config.filter_strategy not in counts:
        choices = ", ".join(FILTER_STRATEGIES)
        raise ValueError(f"unknown filter_strategy {config.filter_strategy!r}; choose one of: {choices}")
    return counts[config.filter_strategy]


def kernel_sizes(config: ModelConfig) -> list[int]:
    k = config.kernel_size
    sizes = [k] * config.n_blocks if isinstance(k, int) else list(k)
    if len(sizes) != config.n_blocks:
        problem = f"kernel_size lists {len(sizes)} values but there are {config.n_blocks} blocks"
        raise ValueError(f"{problem}; give one value or one per block")
    if any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"kernel sizes must be positive integers, got {sizes}")
    return sizes


def conv_padding(padding: int | str, kernel: int, stride: int, size: int) -> tuple[int, int]:
    """(before, after) padding on one spatial axis for an input of ``size``."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        # TensorFlow's rule: output = ceil(size / stride); the odd pixel goes after (bottom/right).
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2
    if isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0:
        return padding, padding
    raise ValueError(f"padding must be 'same', 'valid' or a non-negative int, got {padding!r}")


# Analytic shapes of one block: channels, kernel, input side, conv padding (before, after), output sides.
BlockShape = namedtuple("BlockShape", "in_channels out_channels kernel in_size pad conv_size pool_size")


def block_shapes(config: ModelConfig) -> list[BlockShape]:
    """Validate ``config`` and derive every block's shapes without building anything."""
    positive = "n_blocks n_filters dense_neurons stride input_size num_classes in_channels".split()
    for name, value in [(name, getattr(config, name)) for name in positive]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in [("dropout", config.dropout), ("block_dropout", config.block_dropout)]:
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    activation_class(config.activation)
    activation_class(config.dense_activation or config.activation)
    shapes, size, in_ch = [], config.input_size, config.in_channels
    for index, (out_ch, k) in enumerate(zip(filter_counts(config), kernel_sizes(config), strict=True), 1):
        pad = conv_padding(config.padding, k, config.stride, size)
        conv_size = (size + sum(pad) - k) // config.stride + 1
        pool_size = max(conv_size, 0) // 2
        if pool_size < 1:  # padding='same' is suggested only where it is not already the padding
            side, same = max(conv_size, 0), "" if config.padding == "same" else " or padding='same'"
            conv = f"input {size}x{size}, kernel {k}, stride {config.stride}, padding {config.padding!r}"
            gives = f"gives a {side}x{side} conv output and a 0x0 pooled output"
            fix = f"a larger input_size, fewer blocks, a smaller kernel{same}"
            raise ValueError(f"block {index} shrinks the feature map to nothing: {conv} {gives}; use {fix}")
        shapes.append(BlockShape(in_ch, out_ch, k, size, pad, conv_size, pool_size))
        size, in_ch = pool_size, out_ch
    return shapes


class ConvNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config, shapes = config, block_shapes(config)  # raises before any weight is made
        act, blocks = activation_class(config.activation), []
        for shape in shapes:
            (before, after), symmetric = shape.pad, shape.pad[0] == shape.pad[1]
            # Asymmetric 'same' padding (even kernels) is a layer of its own.
            layers = [] if symmetric else [nn.ZeroPad2d((before, after, before, after))]
            padding = before if symmetric else 0
            conv = nn.Conv2d(*shape[:3], config.stride, padding, bias=config.conv_bias)  # in, out, kernel
            layers += [conv, nn.BatchNorm2d(shape.out_channels)] if config.batch_norm else [conv]
            layers += [act(), nn.MaxPool2d(2, 2)]
            layers += [nn.Dropout(config.block_dropout)] if config.block_dropout else []
            blocks.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*blocks)
        flat = shapes[-1].out_channels * shapes[-1].pool_size ** 2
        dense_act = activation_class(config.dense_activation or config.activation)
        dense = [nn.Flatten(), nn.Linear(flat, config.dense_neurons), dense_act(), nn.Dropout(config.dropout)]
        self.classifier = nn.Sequential(*dense, nn.Linear(config.dense_neurons, config.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def first_conv(self) -> nn.Conv2d:
        return next(m for m in self.features.modules() if isinstance(m, nn.Conv2d))

    def last_conv_block(self) -> nn.Module:
        return self.features[-1]


def build_model(config: ModelConfig | dict) -> ConvNet:
    return ConvNet(from_namespace(ModelConfig, config) if isinstance(config, dict) else config)
