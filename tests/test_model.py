"""The Part A network: shapes, gradients, every structural option, and early, clear errors."""

import pytest
import torch
from torch import nn

from part_a.model import (
    ACTIVATIONS,
    ModelConfig,
    block_shapes,
    build_model,
    conv_padding,
    filter_counts,
    kernel_sizes,
)

# Small enough to run in milliseconds, large enough for five 2x2 pools (32 -> 1).
SMALL = dict(n_filters=4, kernel_size=3, dense_neurons=8, input_size=32)


def small(**overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL, **overrides})


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_output_shape_and_every_parameter_gets_a_finite_gradient(activation):
    torch.manual_seed(0)
    model = build_model(small(activation=activation, block_dropout=0.1))
    x = torch.randn(3, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (3, 10)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"  # cut off from the loss


def test_activation_names_are_case_insensitive():
    model = build_model(small(activation="LeakY_ReLU", dense_activation="TANH"))
    assert isinstance(model.features[0][2], nn.LeakyReLU)
    assert isinstance(model.classifier[2], nn.Tanh)


@pytest.mark.parametrize("kernel", range(1, 8))
def test_same_padding_keeps_the_size_for_odd_and_even_kernels(kernel):
    model = build_model(small(kernel_size=kernel, n_blocks=1, input_size=13))
    conv_output = model.features[0][:-2](torch.randn(1, 3, 13, 13))  # up to before act + pool
    assert conv_output.shape[-2:] == (13, 13)
    before, after = conv_padding("same", kernel, 1, 13)
    assert before + after == kernel - 1 and after - before in (0, 1)
    assert block_shapes(small(kernel_size=kernel, n_blocks=1, input_size=13))[0].conv_size == 13


def test_valid_padding_shapes_match_the_analytic_shapes():
    config = small(padding="valid", kernel_size=3, input_size=94)
    # 94 -conv-> 92 -pool-> 46 -> 44 -> 22 -> 20 -> 10 -> 8 -> 4 -> 2 -> 1
    assert [(s.conv_size, s.pool_size) for s in block_shapes(config)] == [
        (92, 46),
        (44, 22),
        (20, 10),
        (8, 4),
        (2, 1),
    ]
    features = build_model(config).features(torch.randn(2, 3, 94, 94))
    assert features.shape == (2, 4, 1, 1)


@pytest.mark.parametrize("padding,stride,size", [(2, 1, 32), (0, 2, 64), ("same", 2, 64), (1, 2, 65)])
def test_int_padding_and_strides_match_the_analytic_shapes(padding, stride, size):
    config = small(padding=padding, stride=stride, n_blocks=2, input_size=size)
    shapes = block_shapes(config)
    model = build_model(config)
    x = torch.randn(1, 3, size, size)
    for block, shape in zip(model.features, shapes, strict=True):
        x = block(x)
        assert x.shape[-1] == shape.pool_size
    assert model(torch.randn(1, 3, size, size)).shape == (1, 10)


@pytest.mark.parametrize(
    "strategy,expected",
    [("same", [8, 8, 8, 8, 8]), ("double", [8, 16, 32, 64, 128]), ("half", [8, 4, 2, 1, 1])],
)
def test_filter_strategies(strategy, expected):
    config = small(n_filters=8, filter_strategy=strategy)
    assert filter_counts(config) == expected
    convs = [m for m in build_model(config).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == expected
    assert [c.in_channels for c in convs] == [3] + expected[:-1]


def test_half_strategy_never_drops_below_one_filter():
    assert filter_counts(small(n_filters=1, filter_strategy="half")) == [1] * 5
    assert min(filter_counts(small(n_filters=3, filter_strategy="half", n_blocks=5))) == 1


def test_per_block_kernel_list():
    config = small(kernel_size=[1, 2, 3, 4, 5], input_size=64)
    assert kernel_sizes(config) == [1, 2, 3, 4, 5]
    model = build_model(config)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(k, k) for k in range(1, 6)]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_batch_norm_and_bias_switches():
    with_both = build_model(small(batch_norm=True, conv_bias=True))
    without = build_model(small(batch_norm=False, conv_bias=False))
    assert any(isinstance(m, nn.BatchNorm2d) for m in with_both.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without.modules())
    assert all(c.bias is None for c in without.modules() if isinstance(c, nn.Conv2d))
    assert all(c.bias is not None for c in with_both.modules() if isinstance(c, nn.Conv2d))


def test_flattened_size_and_accessors():
    config = small(n_filters=8, filter_strategy="double", input_size=64)
    model = build_model(config)
    # 64 / 2^5 = 2 pixels a side, 128 channels in the last block.
    assert model.classifier[1].in_features == 128 * 2 * 2
    assert model.first_conv() is next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model.last_conv_block() is model.features[-1]


def test_build_model_accepts_a_dict_with_extra_keys():
    model = build_model({**SMALL, "learning_rate": 0.1, "activation": "relu"})
    assert isinstance(model.features[0][2], nn.ReLU)


BAD_CONFIGS = [
    (
        dict(activation="swishy"),
        r"unknown activation 'swishy'; choose one of: relu, gelu, silu, mish, "
        r"elu, selu, leaky_relu, tanh",
    ),
    (dict(dense_activation="nope"), r"unknown activation 'nope'; choose one of: relu"),
    (dict(input_size=16), r"block 5 shrinks the feature map to nothing: input 1x1"),
    (
        dict(padding="valid", kernel_size=7, input_size=32),
        r"block 3 shrinks the feature map.*input 3x3, kernel 7",
    ),
    (dict(kernel_size=[3, 3]), r"kernel_size lists 2 values but there are 5 blocks"),
    (dict(kernel_size=[3, 0, 3, 3, 3]), r"kernel sizes must be positive integers"),
    (dict(padding="full"), r"padding must be 'same', 'valid' or a non-negative int, got 'full'"),
    (dict(padding=-1), r"padding must be .* got -1"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(block_dropout=-0.1), r"block_dropout must be in \[0, 1\)"),
    (dict(filter_strategy="triple"), r"unknown filter_strategy 'triple'; choose one of: same, double, half"),
    (dict(n_filters=0), r"n_filters must be a positive integer, got 0"),
    (dict(stride=0), r"stride must be a positive integer"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS)
def test_bad_configuration_fails_clearly_before_any_weight_is_made(overrides, message, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("a layer with weights was constructed before the configuration was checked")

    for layer in (nn.Conv2d, nn.Linear, nn.BatchNorm2d):
        monkeypatch.setattr(layer, "__init__", no_weights)
    with pytest.raises(ValueError, match=message):
        block_shapes(small(**overrides))
    with pytest.raises(ValueError, match=message):
        build_model(small(**overrides))


def test_shrinking_error_names_the_sizes():
    with pytest.raises(ValueError) as error:
        block_shapes(small(padding="valid", kernel_size=5, input_size=20))
    # 20 -conv5-> 16 -pool-> 8 -conv5-> 4 -pool-> 2 -conv5-> nothing
    assert "block 3" in str(error.value) and "input 2x2" in str(error.value)
    assert "or padding='same'" in str(error.value)
    with pytest.raises(ValueError) as error:
        block_shapes(small(input_size=16))  # already 'same': do not suggest it
    assert "or padding='same'" not in str(error.value)
    assert len(block_shapes(small(padding="valid", kernel_size=5, input_size=20, n_blocks=2))) == 2
