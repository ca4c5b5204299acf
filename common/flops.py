"""Analytic computation and parameter counts, checked exactly against PyTorch's own counter.

    python common/flops.py [Part A model options] [--verify] [--json] [--torchvision NAME]

Counts are per image, by ``CONVENTIONS`` (dropout, flatten and padding are free). ``count_config``
counts the Part A network from its block shapes alone (Question 1); ``count_module`` any module, per
layer, from one forward pass under ``FlopCounterMode``; ``verify`` checks a count against both.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

if __name__ == "__main__":  # run as `python common/flops.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from common import activations
from common.config import add_dataclass_args, from_namespace

FLOPS_PER_MAC = 2
BIAS_OPS, NORM_OPS, ACTIVATION_OPS = 1, 2, 1  # per output element
TOTALS, LABELS = ("macs", "flops", "element_ops", "params"), ("MACs", "FLOPs", "element ops", "params")
OUTSIDE_MACS = "(MACs outside the layers above)"  # count_module's row for FlopCounterMode's remainder
CONVENTIONS = {
    "macs": "multiply-accumulates of conv and linear layers and of products in functions (attention)",
    "flops": "2 per multiply-accumulate, as torch.utils.flop_counter.FlopCounterMode counts (no bias adds)",
    "element_ops": "per output: bias add 1, batch norm 2 (scale, shift), activation 1, max-pool window-1",
    "params": "nn.Parameter elements (batch-norm running statistics are buffers, not counted)",
}


@dataclass(frozen=True)
class LayerCount:  # one layer's counts, or a formula's totals
    name: str
    type: str
    output_shape: tuple[int, ...]  # per image
    macs: int = 0
    element_ops: int = 0
    params: int = 0
    flops = property(lambda self: FLOPS_PER_MAC * self.macs)


@dataclass
class Report:
    input_shape: tuple[int, ...]
    layers: list[LayerCount]

    def total(self, key: str, name: str | None = None) -> int:
        return sum(getattr(layer, key) for layer in self.layers if name in (None, layer.name))

    macs = property(lambda self: self.total("macs"))
    flops = property(lambda self: self.total("flops"))
    element_ops = property(lambda self: self.total("element_ops"))
    params = property(lambda self: self.total("params"))
    outside_macs = property(lambda self: self.total("macs", OUTSIDE_MACS))  # attention and other functions

    def to_dict(self) -> dict:
        totals = {key: getattr(self, key) for key in TOTALS}
        layers = [{**asdict(layer), "flops": layer.flops} for layer in self.layers]
        extra = {"macs_outside_layers": self.outside_macs, "conventions": CONVENTIONS, "layers": layers}
        return {"input_shape": list(self.input_shape), **totals, **extra}

    def table(self) -> str:
        rows = [("layer", "type", "output", *LABELS)]
        for layer in self.layers:
            shape = "x".join(map(str, layer.output_shape)) or "-"
            rows.append((layer.name, layer.type, shape, *_numbers(layer)))
        rows.append(("total", "", "", *_numbers(self)))
        widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
        line = "  ".join(f"{{:{'<' if i < 3 else '>'}{width}}}" for i, width in enumerate(widths))
        lines = [line.format(*row).rstrip() for row in rows]
        rule = "-" * len(lines[0])
        return "\n".join([lines[0], rule, *lines[1:-1], rule, lines[-1]])


def _numbers(counts: LayerCount | Report) -> list[str]:
    return [f"{getattr(counts, key):,}" for key in TOTALS]


def count_config(config) -> Report:
    """Count a Part A ``ModelConfig`` from its block shapes without building it (ValueError: it cannot be)."""
    from part_a.model import activation_class, block_shapes  # common/ imports a part only where needed

    act = activation_class(config.activation).__name__
    dense_act = activation_class(config.dense_activation or config.activation).__name__
    layers = []

    def add(*counts) -> None:  # name, type, output shape, MACs, element ops, params
        layers.append(LayerCount(*counts))

    for i, block in enumerate(block_shapes(config), start=1):
        out, fan_in = block.out_channels, block.in_channels * block.kernel**2
        conv_shape = (out, block.conv_size, block.conv_size)
        pooled_shape = (out, block.pool_size, block.pool_size)
        elements, bias = math.prod(conv_shape), out if config.conv_bias else 0
        bias_ops = BIAS_OPS * elements if bias else 0
        add(f"block{i}.conv", "Conv2d", conv_shape, elements * fan_in, bias_ops, out * fan_in + bias)
        if config.batch_norm:  # parameters: gamma and beta
            add(f"block{i}.norm", "BatchNorm2d", conv_shape, 0, NORM_OPS * elements, 2 * out)
        add(f"block{i}.act", act, conv_shape, 0, ACTIVATION_OPS * elements)
        add(f"block{i}.pool", "MaxPool2d", pooled_shape, 0, 3 * math.prod(pooled_shape))  # 3 per 2x2 window
    flat, n, classes = math.prod(pooled_shape), config.dense_neurons, config.num_classes
    add("dense", "Linear", (n,), flat * n, BIAS_OPS * n, (flat + 1) * n)
    add("dense.act", dense_act, (n,), 0, ACTIVATION_OPS * n)
    add("output", "Linear", (classes,), n * classes, BIAS_OPS * classes, (n + 1) * classes)
    return Report((config.in_channels, config.input_size, config.input_size), layers)


def _one_pass(module: nn.Module, input_shape: Sequence[int], counter: FlopCounterMode | None = None):
    # Attention runs its math path (bmm/addmm): FlopCounterMode has no formula for the fused CPU kernels.
    counter = counter or FlopCounterMode(display=False)
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    example = torch.zeros((1, *input_shape), device=tensor.device if tensor is not None else "cpu")
    was_training, fastpath = module.training, torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            module.eval()(example)
    finally:
        module.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter


def _element_ops(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return BIAS_OPS * out.numel() if module.bias is not None else 0
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return NORM_OPS * out.numel()
    if isinstance(module, activations.ELEMENTWISE):
        return ACTIVATION_OPS * out.numel()
    if isinstance(module, nn.modules.pooling._MaxPoolNd):
        kernel = module.kernel_size
        window = math.prod(kernel) if isinstance(kernel, tuple) else kernel ** (out.dim() - 2)
        return (window - 1) * out.numel()
    return 0


def count_module(module: nn.Module, input_shape: Sequence[int]) -> Report:
    """One row per leaf-module call; MACs in functions (attention) and parameters no leaf owns get a row
    each, so the totals are exact (element ops in functions, e.g. residual adds, are not counted)."""
    names = {sub: name for name, sub in module.named_modules()}
    layers, counted, started = [], set(), []  # counted: parameter ids (shared weights count once)
    counter = FlopCounterMode(display=False)

    def record(sub: nn.Module, inputs: tuple, output) -> None:
        macs = (counter.get_total_flops() - started.pop()) // FLOPS_PER_MAC
        own = [p for p in sub.parameters(recurse=False) if id(p) not in counted]
        counted.update(id(p) for p in own)
        tensor = isinstance(output, torch.Tensor)  # else a tuple (a recurrent layer): only parameters count
        shape, ops = (tuple(output.shape[1:]), _element_ops(sub, output)) if tensor else ((), 0)
        params = sum(p.numel() for p in own)
        if macs or ops or params:
            kind = type(sub).__name__
            layers.append(LayerCount(names[sub] or kind, kind, shape, macs, ops, params))

    def start(*_) -> None:
        started.append(counter.get_total_flops())

    with contextlib.ExitStack() as hooks:  # removed on exit
        for leaf in (sub for sub in module.modules() if next(sub.children(), None) is None):
            hooks.enter_context(leaf.register_forward_pre_hook(start))
            hooks.enter_context(leaf.register_forward_hook(record))
        _one_pass(module, input_shape, counter)
    if outside := counter.get_total_flops() // FLOPS_PER_MAC - sum(layer.macs for layer in layers):
        layers.append(LayerCount(OUTSIDE_MACS, "functional", (), macs=outside))
    if other := sum(p.numel() for p in module.parameters() if id(p) not in counted):
        layers.append(LayerCount("(parameters outside the layers above)", "Parameter", (), params=other))
    return Report(tuple(input_shape), layers)


def torch_flop_counts(module: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    counts = _one_pass(module, input_shape).get_flop_counts().get("Global", {})
    return {str(op): flops for op, flops in counts.items()}


def verify(model: nn.Module, input_shape: Sequence[int], expected: Report) -> list[str]:
    """``expected`` against FlopCounterMode (products only) and the parameters: one message per mismatch."""
    problems = []
    by_op = torch_flop_counts(model, input_shape)
    if (measured := sum(by_op.values())) != expected.flops:
        breakdown = ", ".join(f"{op} {flops:,}" for op, flops in sorted(by_op.items())) or "nothing"
        message = f"FLOPs: analytic {expected.flops:,} but FlopCounterMode counted {measured:,} ({breakdown})"
        problems.append(f"{message}; difference {expected.flops - measured:+,}")
    if (params := sum(p.numel() for p in model.parameters())) != expected.params:
        difference = f"difference {expected.params - params:+,}"
        problems.append(f"params: analytic {expected.params:,} but the model has {params:,}; {difference}")
    return problems


def question1_formula(m: int, k: int, n: int, w: int, *, conv_bias=True, batch_norm=False) -> LayerCount:
    """Question 1's totals in closed form (``QUESTION1_DERIVATION``)."""
    if w % 32:
        raise ValueError(f"the Question 1 formula assumes w divisible by 32, got w={w}; use count_config")
    conv_pixels, pool_pixels = 341 * w * w // 256, 341 * w * w // 1024  # sums of (w/2^i)^2 over the blocks
    flat = m * (w // 32) ** 2
    macs = k * k * m * (3 * w * w + m * 85 * w * w // 256) + flat * n + n * 10
    per_conv_output = ACTIVATION_OPS + BIAS_OPS * conv_bias + NORM_OPS * batch_norm
    dense_ops = (BIAS_OPS + ACTIVATION_OPS) * n + BIAS_OPS * 10
    element_ops = per_conv_output * m * conv_pixels + 3 * m * pool_pixels + dense_ops
    params = 3 * k * k * m + 4 * k * k * m * m + flat * n + 11 * n + 10
    params += (5 * conv_bias + 10 * batch_norm) * m  # conv biases; batch-norm gamma and beta
    return LayerCount("Question 1", "formula", (), macs, element_ops, params)


QUESTION1_DERIVATION = """\
Question 1 (5 blocks of m filters of size k x k, 'same' padding and stride 1, so block i's conv
runs at w/2^(i-1) and the last 2x2 pool leaves (w/32)^2 pixels; n dense neurons; w x w x 3 input;
10 classes; one multiply-add = 2 FLOPs):
  conv MACs   = sum_i (w/2^(i-1))^2 k^2 c_in_i m, c_in = 3, m, m, m, m
              = k^2 m w^2 (3 + 85m/256)
  dense MACs  = m (w/32)^2 n + 10n
  FLOPs       = 2 (conv MACs + dense MACs)
  element ops = (1 activation [+1 bias] [+2 batch norm]) x 341 m w^2/256   (every conv output)
              + 3 x 341 m w^2/1024   (3 comparisons per 2x2 pool output)
              + 2n + 10              (dense bias and activation, output bias)
  params      = 3k^2 m + 4(k^2 m^2) + m (w/32)^2 n + n + 10n + 10
                [+ 5m conv biases] [+ 10m batch-norm gamma and beta]"""


def question1_text(config, exact: Report) -> str:
    """The derivation, then the formula for ``config`` checked against ``exact``, or why it does not apply."""
    kernels = {config.kernel_size} if isinstance(config.kernel_size, int) else set(config.kernel_size)
    checks = {
        "n_blocks is not 5": config.n_blocks == 5,
        "filter_strategy is not 'same'": config.filter_strategy == "same",
        "kernel_size differs per block": len(kernels) == 1,
        "padding is not 'same'": config.padding == "same",
        "stride is not 1": config.stride == 1,
        "input_size is not divisible by 32": config.input_size % 32 == 0,
        "not 3 channels in, 10 classes out": config.in_channels == 3 and config.num_classes == 10,
    }
    if misfits := [reason for reason, ok in checks.items() if not ok]:
        return f"{QUESTION1_DERIVATION}\n  (not evaluated for this configuration: {'; '.join(misfits)})"
    m, k, n, w = config.n_filters, kernels.pop(), config.dense_neurons, config.input_size
    answer = question1_formula(m, k, n, w, conv_bias=config.conv_bias, batch_norm=config.batch_norm)
    same = all(getattr(answer, key) == getattr(exact, key) for key in TOTALS)
    on = ("off", "on")
    switches = f"conv bias {on[config.conv_bias]}, batch norm {on[config.batch_norm]}"
    counts = ", ".join(f"{label} {getattr(answer, key):,}" for label, key in zip(LABELS, TOTALS, strict=True))
    verdict = "= the exact" if same else "DIFFERS from the exact"
    text = f"{QUESTION1_DERIVATION}\n  with m={m}, k={k}, n={n}, w={w}, {switches}: {counts}\n"
    return text + f"  {verdict} layer-by-layer count above"


def _torchvision_on_meta(name: str) -> nn.Module:
    import torchvision

    try:
        with torch.device("meta"):  # shapes only: no weight memory, no download
            return torchvision.models.get_model(name, weights=None)
    except ValueError as error:
        raise ValueError(f"{error}; see torchvision.models.list_models() for the names") from None
    except NotImplementedError:  # a builder that reads tensor values (regnet): build on the CPU once
        return torchvision.models.get_model(name, weights=None).to("meta")


def get_args_parser() -> argparse.ArgumentParser:
    from part_a.model import ModelConfig

    what = "the Part A network or a torchvision model"
    parser = argparse.ArgumentParser(description=f"Count MACs, FLOPs, element ops and parameters of {what}.")
    add_dataclass_args(parser, ModelConfig, "Part A model")
    group = parser.add_argument_group("counter")
    verify_help = "check FLOPs against FlopCounterMode, params against the built model; exit 1 on a mismatch"
    group.add_argument("--verify", action="store_true", help=verify_help)
    group.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    group.add_argument("--torchvision", metavar="NAME", help="count this torchvision model instead")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from part_a.model import ModelConfig, build_model

    parser = get_args_parser()
    args = parser.parse_args(argv)
    size, question1 = args.input_size, ""
    try:
        if args.torchvision:
            model = _torchvision_on_meta(args.torchvision)
            title, report = f"{args.torchvision} (torchvision)", count_module(model, (3, size, size))
        else:
            config = from_namespace(ModelConfig, args)
            title, report = "Part A network", count_config(config)
            model, question1 = build_model(config) if args.verify else None, question1_text(config, report)
    except ValueError as error:
        parser.error(str(error))
    title = f"{title} at {size}x{size}"
    problems = verify(model, report.input_shape, report) if args.verify else []
    if args.json:
        verified = {"verified": not problems, "mismatches": problems} if args.verify else {}
        print(json.dumps({"model": title, **report.to_dict(), **verified}))
        return 1 if problems else 0
    print(f"{title}, counts per image\n\n{report.table()}\n")
    totals = f"MACs {report.macs:,}  FLOPs {report.flops:,}  element ops {report.element_ops:,}  "
    print(f"{totals}FLOPs + element ops {report.flops + report.element_ops:,}  params {report.params:,}")
    if report.outside_macs:
        where = "run in functional ops (e.g. attention) that no layer above owns; FlopCounterMode counts them"
        print(f"  {report.outside_macs:,} of these MACs {where}, so the total is exact")
    print("\n".join(f"  {key}: {text}" for key, text in CONVENTIONS.items()))
    if question1:
        print(f"\n{question1}")
    if args.verify:
        exact = "exact match with FlopCounterMode FLOPs and the model's parameter count"
        print("\nverify: " + ("MISMATCH\n  " + "\n  ".join(problems) if problems else exact))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
