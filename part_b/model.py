"""Part B: a pretrained torchvision backbone with a new head, and the freezing strategies.

Every supported family is described by a ``Layout``: the stem, the ordered stages, the classifier
the new head replaces and any auxiliary branch. A strategy is then just "how many backbone units,
counted from the top, train in this epoch" (units = stem + stages):

    head      0                          only the new head trains (feature extraction)
    mlp_head  0                          the same, with a head of extra dense layers
    freeze_k  stages - K                 the stem and the first K stages stay frozen
    full      all                        everything trains, the backbone at backbone_lr_scale x LR
    gradual   (epoch - 1) // E, capped   epoch 1 the head, then one more unit every E epochs

A frozen unit runs in eval mode even while the model trains: its batch-norm running statistics stay
the pretrained ones and its dropout / stochastic depth is off, so it is the same fixed function in
training and evaluation. ``FineTuneNet.train()`` re-applies this each time, and ``set_epoch``
re-applies it whenever gradual unfreezing changes what is frozen.

Auxiliary classifiers: inception_v3's ``AuxLogits`` is kept (its pretrained weights load, so a
torchvision file loads strictly) and gets a new ``num_classes`` output, but it is frozen and never run:
the forward pass returns the main logits only, in training and evaluation. The shared training loop
takes one logits tensor; the auxiliary loss mainly helps deep networks trained from scratch, not a
pretrained one being fine-tuned; and skipping the branch saves its compute and lets inception_v3
train on inputs below 299 px, where the branch's 5x5 pooling has nothing left to pool. googlenet's
auxiliary heads have no pretrained weights at all (torchvision drops them when it loads its
weights), so they are not built.

No training code lives here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, list_models
from torchvision.models.vision_transformer import interpolate_embeddings

from common.activations import ACTIVATIONS
from part_b import weights as weights_lib

STRATEGIES = ("head", "freeze_k", "full", "gradual", "mlp_head")
HEAD_ACTIVATIONS = ("relu", "gelu", "silu")  # a subset of common.activations.ACTIVATIONS
MLP_HEAD_DEFAULT_LAYERS = [512, 256]
# Auxiliary classifiers may be absent on either side of a weights file: googlenet's are not built
# here but are in torchvision's file (untrained), and a file saved without them is still usable.
AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


@dataclass
class ModelBConfig:
    model: str = field(default="resnet50", metadata={
        "help": "torchvision model name (resnet*, resnext*, wide_resnet*, efficientnet_*, convnext_*, vit_*, "
                "vgg*, googlenet, inception_v3)"})
    weights: str = field(default="DEFAULT", metadata={
        "help": "DEFAULT, a torchvision weights name such as IMAGENET1K_V1/IMAGENET1K_V2, none (random "
                "init), or a state-dict FILE; named weights come from the torch hub cache"})
    strategy: str = field(default="full", metadata={"help": "what trains", "choices": STRATEGIES})
    freeze_stages: int = field(default=2, metadata={
        "help": "freeze_k: the stem and this many stages (from the input side) stay frozen"})
    backbone_lr_scale: float = field(default=0.1, metadata={
        "help": "learning-rate multiplier of trainable pretrained layers; the new head gets the full rate"})
    unfreeze_every: int = field(default=1, metadata={
        "help": "gradual: epochs between unfreezing one more stage, from the top"})
    head_layers: list[int] | None = field(default=None, metadata={
        "help": "hidden sizes of the new head, e.g. 512,256; none = 512,256 for mlp_head, a single "
                "linear layer otherwise"})
    head_activation: str = field(default="relu", metadata={
        "help": "activation between head layers", "choices": HEAD_ACTIVATIONS})
    head_dropout: float = field(default=0.3, metadata={"help": "dropout after each hidden head layer"})
    input_size: int | None = field(default=None, metadata={
        "help": "input side in pixels; none = the crop size of the weights' transforms (224, 299 for inception_v3)"})
    num_classes: int = field(default=10, metadata={"help": "output classes (training: the data's)", "cli": False})


@dataclass(frozen=True)
class Layout:
    """Where things are in one torchvision model, as dotted module (or parameter) paths."""
    stem: tuple[str, ...]
    stages: tuple[tuple[str, ...], ...]  # from the input side to the top
    head: str                            # the final nn.Linear, replaced by the new head
    aux: tuple[str, ...] = ()            # auxiliary classifiers: kept, re-headed, always frozen

    @property
    def units(self) -> tuple[tuple[str, ...], ...]:
        """The backbone's freezable units, bottom to top: the stem, then every stage."""
        return (self.stem, *self.stages)


def _resnet(net: nn.Module) -> Layout:
    return Layout(stem=("conv1", "bn1"), stages=(("layer1",), ("layer2",), ("layer3",), ("layer4",)), head="fc")


def _efficientnet(net: nn.Module) -> Layout:
    # features[0] is the stem conv, the rest are the MBConv stages and the final 1x1 conv.
    return Layout(stem=("features.0",), stages=tuple((f"features.{i}",) for i in range(1, len(net.features))),
                  head="classifier.1")


def _convnext(net: nn.Module) -> Layout:
    # features: stem, stage 1, then (downsample, stage) pairs; the norm before the head is pretrained.
    return Layout(stem=("features.0",),
                  stages=(("features.1",), ("features.2", "features.3"), ("features.4", "features.5"),
                          ("features.6", "features.7", "classifier.0")),
                  head="classifier.2")


def _vit(net: nn.Module) -> Layout:
    blocks = [f"encoder.layers.{name}" for name, _ in net.encoder.layers.named_children()]
    stages = [(block,) for block in blocks]
    stages[-1] = (blocks[-1], "encoder.ln")
    return Layout(stem=("conv_proj", "class_token", "encoder.pos_embedding"), stages=tuple(stages),
                  head="heads.head")


def _vgg(net: nn.Module) -> Layout:
    # Conv blocks end at each max-pool; the two pretrained dense layers (fc6, fc7) are the top stage.
    blocks, current = [], []
    for name, module in net.features.named_children():
        current.append(f"features.{name}")
        if isinstance(module, nn.MaxPool2d):
            blocks.append(tuple(current))
            current = []
    dense = tuple(f"classifier.{i}" for i in range(len(net.classifier) - 1))
    return Layout(stem=(), stages=(*blocks, dense), head=f"classifier.{len(net.classifier) - 1}")


def _googlenet(net: nn.Module) -> Layout:
    return Layout(stem=("conv1", "conv2", "conv3"),
                  stages=(("inception3a", "inception3b"),
                          ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e"),
                          ("inception5a", "inception5b")),
                  head="fc")  # its untrained auxiliary heads are not built (aux_logits=False)


def _inception(net: nn.Module) -> Layout:
    return Layout(stem=("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"),
                  stages=(("Mixed_5b", "Mixed_5c", "Mixed_5d"),
                          ("Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
                          ("Mixed_7a", "Mixed_7b", "Mixed_7c")),
                  head="fc", aux=("AuxLogits",))


# Model-name prefix -> layout of that family.
_FAMILIES: dict[str, Callable[[nn.Module], Layout]] = {
    "resnet": _resnet, "resnext": _resnet, "wide_resnet": _resnet, "efficientnet": _efficientnet,
    "convnext": _convnext, "vit": _vit, "vgg": _vgg, "googlenet": _googlenet, "inception_v3": _inception,
}


def _family(name: str) -> Callable[[nn.Module], Layout] | None:
    return next((layout for prefix, layout in _FAMILIES.items() if name.startswith(prefix)), None)


def supported_models() -> list[str]:
    return [name for name in list_models(module=torchvision.models) if _family(name) is not None]


def resolve_config(config: ModelBConfig | dict) -> ModelBConfig:
    """Validate ``config`` and fill in what depends on the model: input size, default head layers.

    Raises ``ValueError`` naming the bad option. Touches no file: a checkpoint's config must rebuild
    on a machine where its weights file is gone.
    """
    if isinstance(config, dict):
        names = {f.name for f in dataclasses.fields(ModelBConfig)}
        config = ModelBConfig(**{k: v for k, v in config.items() if k in names})
    if _family(config.model) is None:
        raise ValueError(f"unsupported model {config.model!r}; choose one of: {', '.join(supported_models())}")
    if config.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {config.strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    if config.head_activation not in HEAD_ACTIVATIONS:
        raise ValueError(f"unknown head_activation {config.head_activation!r}; choose one of: "
                         f"{', '.join(HEAD_ACTIVATIONS)}")
    head_layers = config.head_layers
    if head_layers is None:
        head_layers = list(MLP_HEAD_DEFAULT_LAYERS) if config.strategy == "mlp_head" else []
    checks = [
        (config.strategy != "mlp_head" or len(head_layers) > 0,
         "strategy mlp_head needs at least one hidden layer: pass --head_layers such as 512,256"),
        (all(isinstance(n, int) and n >= 1 for n in head_layers), f"head_layers must be positive integers, got {head_layers}"),
        (0 <= config.head_dropout < 1, f"head_dropout must be in [0, 1), got {config.head_dropout}"),
        (config.freeze_stages >= 0, f"freeze_stages must be >= 0, got {config.freeze_stages}"),
        (config.backbone_lr_scale >= 0, f"backbone_lr_scale must be >= 0, got {config.backbone_lr_scale}"),
        (config.unfreeze_every >= 1, f"unfreeze_every must be >= 1, got {config.unfreeze_every}"),
        (config.input_size is None or config.input_size >= 1, f"input_size must be >= 1, got {config.input_size}"),
        (config.num_classes >= 1, f"num_classes must be >= 1, got {config.num_classes}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    input_size = config.input_size or weights_lib.preset(config.model, config.weights).transforms().crop_size[0]
    if config.model == "inception_v3" and input_size < 75:
        raise ValueError(f"inception_v3 needs input_size >= 75, got {input_size}")
    if config.model.startswith("vit") and input_size % (patch := int(config.model.rsplit("_", 1)[1])):
        raise ValueError(f"{config.model} cuts images into {patch}x{patch} patches: input_size must be a multiple "
                         f"of {patch}, got {input_size}")
    return dataclasses.replace(config, head_layers=list(head_layers), input_size=int(input_size))


def normalisation(config: ModelBConfig) -> tuple[list[float], list[float]]:
    """Mean and std the chosen weights were trained with (from their torchvision transforms)."""
    transforms = weights_lib.preset(config.model, config.weights).transforms()
    return list(transforms.mean), list(transforms.std)


def trainable_units(config: ModelBConfig, n_units: int, epoch: int) -> int:
    """How many backbone units, counted from the top, train in ``epoch`` (1-based)."""
    if config.strategy in ("head", "mlp_head"):
        return 0
    if config.strategy == "freeze_k":
        return n_units - 1 - config.freeze_stages  # units = stem + stages
    if config.strategy == "full":
        return n_units
    return min((epoch - 1) // config.unfreeze_every, n_units)  # gradual


def _resolve(root: nn.Module, path: str) -> nn.Module | nn.Parameter:
    """The module or (for ViT's class token and position embedding) the parameter at ``path``."""
    parent, _, name = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    own_parameters = dict(owner.named_parameters(recurse=False))
    return own_parameters[name] if name in own_parameters else owner.get_submodule(name)


def _parameters_at(root: nn.Module, path: str) -> Iterator[nn.Parameter]:
    target = _resolve(root, path)
    yield from ([target] if isinstance(target, nn.Parameter) else target.parameters())


def _new_head(in_features: int, config: ModelBConfig) -> nn.Module:
    if not config.head_layers:
        return nn.Linear(in_features, config.num_classes)
    layers: list[nn.Module] = []
    width = in_features
    for hidden in config.head_layers:
        layers += [nn.Linear(width, hidden), ACTIVATIONS[config.head_activation](), nn.Dropout(config.head_dropout)]
        width = hidden
    layers.append(nn.Linear(width, config.num_classes))
    return nn.Sequential(*layers)


def _builder_kwargs(config: ModelBConfig) -> dict:
    """Constructor options that make the torchvision module match the weights it will hold."""
    pretrained = weights_lib.is_pretrained(config.weights)
    if config.model in ("googlenet", "inception_v3"):
        # The ported Google weights expect inputs scaled to [-1, 1]; transform_input converts from
        # ImageNet normalisation, as torchvision does whenever it loads these weights. The random
        # init is skipped when pretrained weights (or a checkpoint) will overwrite it anyway.
        return {"aux_logits": config.model == "inception_v3", "transform_input": pretrained,
                "init_weights": not pretrained}
    if config.model.startswith("vit"):
        return {"image_size": config.input_size}  # position embeddings are sized for it
    return {}


class FineTuneNet(nn.Module):
    """A torchvision model with a new head; knows which units are frozen and keeps them in eval mode."""

    def __init__(self, net: nn.Module, layout: Layout, config: ModelBConfig):
        super().__init__()
        self.net = net
        self.layout = layout
        self.config = config
        if config.strategy == "freeze_k" and config.freeze_stages > len(layout.stages):
            raise ValueError(f"freeze_stages {config.freeze_stages} is more than the {len(layout.stages)} stages "
                             f"of {config.model}; use 0..{len(layout.stages)} (or --strategy head)")
        self._check_layout()
        self.frozen_units = len(layout.units)
        self.set_epoch(1)

    def _check_layout(self) -> None:
        """Every parameter belongs to exactly one of stem, stages, head, aux: a wrong layout fails here."""
        owners: dict[int, str] = {}
        for path in (*[p for unit in self.layout.units for p in unit], self.layout.head, *self.layout.aux):
            for param in _parameters_at(self.net, path):
                if id(param) in owners:
                    raise AssertionError(f"{self.config.model}: parameter in both {owners[id(param)]} and {path}")
                owners[id(param)] = path
        left = [name for name, param in self.net.named_parameters() if id(param) not in owners]
        if left:
            raise AssertionError(f"{self.config.model}: layout misses parameters {left[:5]}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(_parameters_at(self.net, self.layout.head))

    def set_epoch(self, epoch: int) -> dict[str, int]:
        """Freeze and unfreeze for ``epoch`` (1-based) as the strategy says; return the parameter counts."""
        units = self.layout.units
        self.frozen_units = len(units) - trainable_units(self.config, len(units), epoch)
        self.requires_grad_(False)
        for index, unit in enumerate(units):
            for path in unit:
                for param in _parameters_at(self.net, path):
                    param.requires_grad_(index >= self.frozen_units)
        for param in self.head_parameters():
            param.requires_grad_(True)
        self.train(self.training)  # which units run in eval mode may have changed
        return parameter_counts(self)

    def train(self, mode: bool = True) -> FineTuneNet:
        super().train(mode)
        if self.layout.aux:
            # Inception3 reads its own ``training`` flag only to run the auxiliary classifier and return
            # a (logits, aux) tuple; its layers (dropout, batch norm) read their own flags. Clearing just
            # that flag makes forward return plain logits and skip the frozen, unused aux branch.
            self.net.training = False
        if mode:
            frozen_paths = [p for unit in self.layout.units[:self.frozen_units] for p in unit] + list(self.layout.aux)
            for path in frozen_paths:
                target = _resolve(self.net, path)
                if isinstance(target, nn.Module):
                    target.eval()
        return self

    def param_groups(self) -> list[dict]:
        """Optimizer groups covering every parameter: backbone at ``backbone_lr_scale``, head at 1."""
        head_ids = {id(p) for p in self.head_parameters()}
        backbone = [p for p in self.parameters() if id(p) not in head_ids]
        return [{"name": "backbone", "params": backbone, "lr_scale": self.config.backbone_lr_scale},
                {"name": "head", "params": self.head_parameters(), "lr_scale": 1.0}]

    def extra_repr(self) -> str:
        """What trains, as the log shows it at the start and whenever ``set_epoch`` changes it."""
        stages, frozen = len(self.layout.stages), self.frozen_units - 1  # frozen stages, after the stem
        if frozen < 0:
            what = "nothing frozen"
        elif frozen == 0:
            what = f"stem frozen, all {stages} stages train"
        else:
            what = f"stem + stage{'s 1-' if frozen > 1 else ' '}{frozen} of {stages} frozen"
        counts = parameter_counts(self)
        return f"{what} | {counts['trainable_params']:,} trainable, {counts['frozen_params']:,} frozen parameters"


def parameter_counts(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "frozen_params": total - trainable}


def _head_paths(net: nn.Module, layout: Layout) -> list[str]:
    """The layers that get ``num_classes`` outputs: the head and each auxiliary classifier's last Linear."""
    aux_linears = [f"{aux}.{name}" for aux in layout.aux
                   for name in [n for n, m in net.get_submodule(aux).named_modules() if isinstance(m, nn.Linear)][-1:]]
    return [layout.head, *aux_linears]


def build_from_config(model_config: dict | ModelBConfig) -> FineTuneNet:
    """The architecture with its new head and random weights; loads nothing (checkpoints fill it)."""
    return _build(resolve_config(model_config))


def _build(config: ModelBConfig) -> FineTuneNet:
    """``build_from_config`` of a config ``resolve_config`` returned."""
    net = get_model(config.model, **_builder_kwargs(config))
    layout = _family(config.model)(net)
    head, *aux_linears = _head_paths(net, layout)
    net.set_submodule(head, _new_head(net.get_submodule(head).in_features, config))
    for path in aux_linears:
        net.set_submodule(path, nn.Linear(net.get_submodule(path).in_features, config.num_classes))
    return FineTuneNet(net, layout, config)


def build_model(config: ModelBConfig | dict) -> FineTuneNet:
    """``build_from_config``, then the pretrained weights ``config.weights`` names loaded into the backbone."""
    config = resolve_config(config)
    weights_lib.check_spec(config.model, config.weights)  # a wrong name or missing file fails before any build
    model = _build(config)
    if weights_lib.is_pretrained(config.weights):
        state, source = weights_lib.load_state(config.model, config.weights)
        if config.model.startswith("vit"):
            # Pretrained position embeddings are sized for the weights' image size; resample them to ours.
            state = interpolate_embeddings(config.input_size, model.net.patch_size, state)
        replaced = tuple(f"{path}." for path in _head_paths(model.net, model.layout))
        weights_lib.load_matching(model.net, state, source, ignore=lambda key: key.startswith(replaced),
                                  optional=lambda key: key.startswith(AUX_PREFIXES))
    return model
