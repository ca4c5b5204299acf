"""The one activation table: the names options accept, and the sets of classes other code asks about."""

from __future__ import annotations

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = dict(relu=nn.ReLU, gelu=nn.GELU, silu=nn.SiLU, mish=nn.Mish)
ACTIVATIONS.update(elu=nn.ELU, selu=nn.SELU, leaky_relu=nn.LeakyReLU, tanh=nn.Tanh)
# f(x) > 0 exactly when x > 0, and f' > 0 there: guided backprop's rule is well defined for these
# (the options, and those of torchvision models). Sigmoid and Softplus are positive everywhere.
SIGN_PRESERVING: tuple[type[nn.Module], ...] = (*ACTIVATIONS.values(), nn.ReLU6, nn.CELU, nn.Hardswish)
# Every element-wise activation, for the FLOP counter (one op per output element each).
ELEMENTWISE: tuple[type[nn.Module], ...] = (*SIGN_PRESERVING, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid)


def activation_class(name: str) -> type[nn.Module]:
    if (key := str(name).strip().lower().replace("-", "_")) not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[key]
