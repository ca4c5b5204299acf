"""Part B: a pretrained torchvision backbone with a new head, and the freezing strategies (no training).

Every supported family has a ``Layout``: the stem, the ordered stages, the classifier the new head
replaces and any auxiliary branch. A strategy says how many backbone units (stem + stages), counted
from the top, train in an epoch; frozen units run in eval mode even while the model trains (``train()``
and ``set_epoch`` re-apply it). inception_v3's ``AuxLogits`` is kept (a torchvision file loads strictly)
but frozen and never run; googlenet's untrained auxiliary heads are not built. docs/part_b.md says why.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, list_models
from torchvision.models.vision_transformer import interpolate_embeddings

from common.activations import ACTIVATIONS
from common.config import from_namespace, option
from part_b import weights as weights_lib

STRATEGIES = ("head", "freeze_k", "full", "gradual", "mlp_head")
HEAD_ACTIVATIONS = ("relu", "gelu", "silu")  # a subset of common.activations.ACTIVATIONS
# Auxiliary classifiers may be absent on either side of a weights file: googlenet's are not built
# here but are in torchvision's file (untrained), and a file saved without them is still usable.
AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


@dataclass
class ModelBConfig:
    model: str = option("resnet50", "a torchvision model of a family in docs/part_b.md (resnet*, vit_*, ...)")
    weights: str = option("DEFAULT", "torchvision weights name (DEFAULT, IMAGENET1K_V2...), none, or a FILE")
    strategy: str = option("full", "what trains", choices=STRATEGIES)
    freeze_stages: int = option(2, "freeze_k: the stem and this many stages (input side) stay frozen")
    backbone_lr_scale: float = option(0.1, "LR multiplier of trainable pretrained layers (head: 1)")
    unfreeze_every: int = option(1, "gradual: epochs between unfreezing one more stage, from the top")
    head_layers: list[int] | None = option(None, "hidden sizes of the new head (none: 512,256 for mlp_head)")
    head_activation: str = option("relu", "activation between head layers", choices=HEAD_ACTIVATIONS)
    head_dropout: float = option(0.3, "dropout after each hidden head layer")
    input_size: int | None = option(None, "input side in pixels; none = the weights' crop size (224, 299...)")
    num_classes: int = option(10, "output classes (training: the data's)", cli=False)


@dataclass(frozen=True)
class Layout:
    """Where things are in one torchvision model, as dotted module (or parameter) paths."""

    stem: tuple[str, ...]
    stages: tuple[tuple[str, ...], ...]  # from the input side to the top
    head: str  # the final nn.Linear, replaced by the new head
    aux: tuple[str, ...] = ()  # auxiliary classifiers: kept, re-headed, always frozen

    @property
    def units(self) -> tuple[tuple[str, ...], ...]:
        """The backbone's freezable units, bottom to top: the stem, then every stage."""
        return (self.stem, *self.stages)


# Model-name prefixes -> their layout, "stem | stage 1 | ... | top stage > head", each unit the dotted
# paths of its modules; None: ``_layout`` reads it from the built model.
FAMILIES = {
    ("resnet", "resnext", "wide_resnet"): "conv1 bn1 | layer1 | layer2 | layer3 | layer4 > fc",
    # stem, stage 1, then (downsample, stage) pairs; the norm before the head is pretrained
    "convnext": (
        "features.0 | features.1 | features.2 features.3 | features.4 features.5"
        " | features.6 features.7 classifier.0 > classifier.2"
    ),
    ("efficientnet", "vit", "vgg", "googlenet", "inception_v3"): None,
}


def _family(name: str) -> str | None:
    return next((prefix for prefix in FAMILIES if name.startswith(prefix)), None)


def _layout(name: str, net: nn.Module) -> Layout:
    spec = FAMILIES[_family(name)]
    if name.startswith("efficientnet"):  # features[0] is the stem conv, then the MBConv stages and a 1x1 conv
        spec = " | ".join(f"features.{i}" for i in range(len(net.features))) + " > classifier.1"
    elif name.startswith("vit"):  # the last encoder layer's stage includes the final LayerNorm
        blocks = " | ".join(f"encoder.layers.{child}" for child, _ in net.encoder.layers.named_children())
        spec = f"conv_proj class_token encoder.pos_embedding | {blocks} encoder.ln > heads.head"
    elif name.startswith("vgg"):  # no stem; blocks end at each max-pool; the pretrained fc6 and fc7 on top
        top = len(net.classifier) - 1
        blocks = [f"features.{i}" + " |" * isinstance(m, nn.MaxPool2d) for i, m in enumerate(net.features)]
        spec = f"| {' '.join(blocks)} {' '.join(f'classifier.{i}' for i in range(top))} > classifier.{top}"
    elif name in ("googlenet", "inception_v3"):  # the stem's convs, then a stage per inception3*, Mixed_5*...
        blocks = [n for n, m in net.named_children() if list(m.parameters()) and n not in ("fc", "AuxLogits")]
        stages = itertools.groupby(blocks, lambda n: n[:-1] if n.startswith(("inception", "Mixed")) else "")
        spec = " | ".join(" ".join(stage) for _, stage in stages) + " > fc"
    units, head = spec.split(">")
    stem, *stages = [tuple(unit.split()) for unit in units.split("|")]
    return Layout(stem, tuple(stages), head.strip(), ("AuxLogits",) if name == "inception_v3" else ())


def resolve_config(config: ModelBConfig | dict) -> ModelBConfig:
    """Validate ``config`` (a ValueError names the bad option) and fill in the input size and default head
    layers. Touches no file: a checkpoint's config must rebuild where its weights file is gone."""
    config = from_namespace(ModelBConfig, config) if isinstance(config, dict) else config
    if _family(config.model) is None:
        supported = ", ".join(name for name in list_models(module=torchvision.models) if _family(name))
        raise ValueError(f"unsupported model {config.model!r}; choose one of {supported}")
    head_layers = config.head_layers
    if head_layers is None:
        head_layers = [512, 256] if config.strategy == "mlp_head" else []
    checks = [  # (option, valid, what it must be)
        ("strategy", config.strategy in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
        ("head_activation", config.head_activation in HEAD_ACTIVATIONS, "/".join(HEAD_ACTIVATIONS)),
        ("head_layers", config.strategy != "mlp_head" or head_layers, "hidden sizes for mlp_head: 512,256"),
        ("head_layers", all(isinstance(n, int) and n >= 1 for n in head_layers), "positive integers"),
        ("head_dropout", 0 <= config.head_dropout < 1, "in [0, 1)"),
        ("freeze_stages", config.freeze_stages >= 0, ">= 0"),
        ("backbone_lr_scale", config.backbone_lr_scale >= 0, ">= 0"),
        ("unfreeze_every", config.unfreeze_every >= 1, ">= 1"),
        ("input_size", config.input_size is None or config.input_size >= 1, ">= 1"),
        ("num_classes", config.num_classes >= 1, ">= 1"),
    ]
    for name, ok, requirement in checks:
        if not ok:
            raise ValueError(f"{name} must be {requirement}, got {getattr(config, name)!r}")
    preset = weights_lib.preset(config.model, config.weights)
    input_size = config.input_size or preset.transforms().crop_size[0]
    if config.model == "inception_v3" and input_size < 75:
        raise ValueError(f"inception_v3 needs input_size >= 75, got {input_size}")
    if config.model.startswith("vit") and input_size % (patch := int(config.model.rsplit("_", 1)[1])):
        raise ValueError(f"input_size must be a multiple of {patch} ({config.model}), got {input_size}")
    return dataclasses.replace(config, head_layers=list(head_layers), input_size=int(input_size))


def normalisation(config: ModelBConfig) -> tuple[list[float], list[float]]:
    """Mean and std the chosen weights were trained with (from their torchvision transforms)."""
    transforms = weights_lib.preset(config.model, config.weights).transforms()
    return list(transforms.mean), list(transforms.std)


def _under(name: str, paths) -> bool:
    """Whether the parameter or module ``name`` is at or below one of the dotted ``paths``."""
    return f"{name}.".startswith(tuple(f"{path}." for path in paths))


def _new_head(width: int, config: ModelBConfig) -> nn.Module:
    layers, activation = [], ACTIVATIONS[config.head_activation]
    for hidden in config.head_layers:
        layers += [nn.Linear(width, hidden), activation(), nn.Dropout(config.head_dropout)]
        width = hidden
    last = nn.Linear(width, config.num_classes)
    return nn.Sequential(*layers, last) if layers else last


class FineTuneNet(nn.Module):
    """The torchvision model with new heads and random weights; keeps its frozen units in eval mode."""

    def __init__(self, config: ModelBConfig):
        super().__init__()
        name, kwargs, pretrained = config.model, {}, weights_lib.is_pretrained(config.weights)
        if name in ("googlenet", "inception_v3"):
            # Google's ported weights expect [-1, 1] inputs (transform_input, as torchvision sets it with
            # them); their slow random init is skipped where the weights overwrite it anyway.
            kwargs = dict(transform_input=pretrained, init_weights=not pretrained)
            kwargs["aux_logits"] = name == "inception_v3"
        elif name.startswith("vit"):
            kwargs = dict(image_size=config.input_size)  # position embeddings are sized for it
        self.config, self.net = config, get_model(name, **kwargs)
        self.layout = layout = _layout(name, self.net)
        if config.strategy == "freeze_k" and (k := config.freeze_stages) > (n := len(layout.stages)):
            raise ValueError(f"freeze_stages {k} is more than the {n} stages of {name}; use 0..{n}")
        # The layers that get num_classes outputs: the head, and inception_v3's AuxLogits.fc.
        self.head_paths = [layout.head, *(f"{aux}.fc" for aux in layout.aux)]
        for path in self.head_paths:
            width = self.net.get_submodule(path).in_features
            new = _new_head(width, config) if path == layout.head else nn.Linear(width, config.num_classes)
            self.net.set_submodule(path, new)
        paths = [*(path for unit in layout.units for path in unit), layout.head, *layout.aux]
        for key, _ in self.net.named_parameters():  # a wrong layout fails here, not as a silent freeze
            owners = [path for path in paths if _under(key, [path])]
            if len(owners) != 1:
                raise AssertionError(f"{name}: {key} is in {owners or 'no unit'} of the layout")
        self.set_epoch(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def set_epoch(self, epoch: int) -> dict[str, int]:
        """Freeze and unfreeze for ``epoch`` (1-based) as the strategy says; return the parameter counts."""
        units, config = self.layout.units, self.config
        gradual = min((epoch - 1) // config.unfreeze_every, len(units))
        trains = dict(full=len(units), freeze_k=len(units) - 1 - config.freeze_stages, gradual=gradual)
        self.frozen_units = len(units) - trains.get(config.strategy, 0)  # head and mlp_head: 0
        training = [path for unit in units[self.frozen_units :] for path in unit] + [self.layout.head]
        for name, param in self.net.named_parameters():
            param.requires_grad_(_under(name, training))
        self.train(self.training)  # which units run in eval mode may have changed
        return parameter_counts(self)

    def train(self, mode: bool = True) -> FineTuneNet:
        super().train(mode)
        if self.layout.aux:  # Inception3's own flag only runs AuxLogits (its layers read their own flags)
            self.net.training = False
        if mode:
            frozen = [path for unit in self.layout.units[: self.frozen_units] for path in unit]
            for name, module in self.net.named_modules():
                if name in frozen or name in self.layout.aux:
                    module.eval()
        return self

    def param_groups(self) -> list[dict]:
        """Optimizer groups covering every parameter: backbone at ``backbone_lr_scale``, head at 1."""
        groups = {"backbone": [], "head": []}
        for name, param in self.net.named_parameters():
            groups["head" if _under(name, [self.layout.head]) else "backbone"].append(param)
        scales = {"backbone": self.config.backbone_lr_scale, "head": 1.0}
        return [{"name": name, "params": params, "lr_scale": scales[name]} for name, params in groups.items()]

    def extra_repr(self) -> str:
        """What trains, as the log shows it at the start and whenever ``set_epoch`` changes it."""
        stages, frozen = len(self.layout.stages), self.frozen_units - 1  # frozen stages, after the stem
        what = f"stem + stage{'s 1-' if frozen > 1 else ' '}{frozen} of {stages} frozen"
        if frozen <= 0:
            what = "nothing frozen" if frozen < 0 else f"stem frozen, all {stages} stages train"
        trainable, frozen_params = parameter_counts(self).values()
        return f"{what} | {trainable:,} trainable, {frozen_params:,} frozen parameters"


def parameter_counts(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "frozen_params": total - trainable}


def build_from_config(model_config: dict | ModelBConfig) -> FineTuneNet:
    """The architecture with its new head and random weights; loads nothing (checkpoints fill it)."""
    return FineTuneNet(resolve_config(model_config))


def build_model(config: ModelBConfig | dict) -> FineTuneNet:
    """``build_from_config``, then the pretrained weights that ``config.weights`` names loaded."""
    config = resolve_config(config)
    if not weights_lib.is_pretrained(config.weights):
        return FineTuneNet(config)
    # Read first: a bad name or file, or a failed download, stops it before the model is built.
    state, source = weights_lib.load_state(config.model, config.weights)
    model = FineTuneNet(config)
    if config.model.startswith("vit"):
        # Pretrained position embeddings are sized for the weights' image size; resample them to ours.
        state = interpolate_embeddings(config.input_size, model.net.patch_size, state)
    replaced = tuple(f"{path}." for path in model.head_paths)  # new heads: not loaded
    weights_lib.load_matching(model.net, state, source, replaced, AUX_PREFIXES)
    return model
