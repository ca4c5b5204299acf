"""Analytic computation and parameter counts, checked exactly against PyTorch's own counter.

    python common/flops.py [Part A model options] [--verify] [--json] [--torchvision NAME]

Conventions, the same in every count here (all counts are per image, i.e. for a batch of one):

- MACs: the multiply-accumulates of conv and linear layers (and of products in functions, attention).
- FLOPs = 2 x MACs, as ``torch.utils.flop_counter.FlopCounterMode`` counts them; it ignores bias adds.
- Element ops, the work FlopCounterMode does not count, per output element: a bias add 1, batch norm
  2 (at inference one scale and one shift), an activation 1 (whatever its formula), a max-pool
  ``window - 1`` comparisons (3 for 2x2). Dropout, flatten and padding cost nothing.
- Params: ``nn.Parameter`` elements; batch norm's running mean and variance are buffers, not params.

``count_part_a`` derives the Part A counts from the analytic block shapes alone (Question 1;
``count_config`` for a ``ModelConfig``);
``count_module`` counts any ``nn.Module`` per layer from one forward pass under FlopCounterMode (on
the meta device no weight memory is used); ``verify`` checks a report against FlopCounterMode and
``sum(p.numel())``.
"""
from __future__ import annotations

import argparse
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
BIAS_OPS = 1        # one add per output element
NORM_OPS = 2        # inference batch norm: one multiply and one add per element
ACTIVATION_OPS = 1  # one op per output element, whatever the function
OUTSIDE_MACS = "(MACs outside the layers above)"  # count_module's row for FlopCounterMode's remainder

CONVENTIONS = {
    "macs": "multiply-accumulates of conv and linear layers, and of products in functions (attention), per image",
    "flops": "2 per multiply-accumulate, as torch.utils.flop_counter.FlopCounterMode counts (bias adds excluded)",
    "element_ops": "per output element: bias add 1, batch norm 2, activation 1, max-pool window-1 comparisons",
    "params": "nn.Parameter elements (batch-norm running statistics are buffers and not counted)",
}


@dataclass(frozen=True)
class LayerCount:
    """One layer's counts; ``output_shape`` is per image (no batch dimension)."""
    name: str
    type: str
    output_shape: tuple[int, ...]
    macs: int = 0
    element_ops: int = 0
    params: int = 0

    flops = property(lambda self: FLOPS_PER_MAC * self.macs)


@dataclass
class Report:
    """Per-layer counts for one input shape (per image); the totals are sums over ``layers``."""
    input_shape: tuple[int, ...]
    layers: list[LayerCount]

    def _sum(self, key: str, name: str | None = None) -> int:
        return sum(getattr(layer, key) for layer in self.layers if name in (None, layer.name))

    macs = property(lambda self: self._sum("macs"))
    flops = property(lambda self: FLOPS_PER_MAC * self.macs)
    element_ops = property(lambda self: self._sum("element_ops"))
    params = property(lambda self: self._sum("params"))
    # MACs of functional ops (e.g. attention) that no listed layer accounts for.
    outside_macs = property(lambda self: self._sum("macs", OUTSIDE_MACS))

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "macs": self.macs, "flops": self.flops,
                "element_ops": self.element_ops, "params": self.params,
                "macs_outside_layers": self.outside_macs, "conventions": CONVENTIONS,
                "layers": [{**asdict(layer), "flops": layer.flops} for layer in self.layers]}

    def table(self) -> str:
        """An aligned text table, one row per layer, then the totals; names left, numbers right."""
        rows = [(layer.name, layer.type, "x".join(map(str, layer.output_shape)) or "-",
                 *(f"{n:,}" for n in (layer.macs, layer.flops, layer.element_ops, layer.params)))
                for layer in self.layers]
        header = ("layer", "type", "output", "MACs", "FLOPs", "element ops", "params")
        total = ("total", "", "", *(f"{n:,}" for n in (self.macs, self.flops, self.element_ops, self.params)))
        widths = [max(len(row[i]) for row in (header, *rows, total)) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                 for row in (header, *rows, total)]
        rule = "-" * len(lines[0])
        return "\n".join([lines[0], rule, *lines[1:-1], rule, lines[-1]])


def count_part_a(blocks: Sequence, *, dense_neurons: int, num_classes: int, batch_norm: bool, conv_bias: bool,
                 activation: str = "Activation", dense_activation: str | None = None) -> Report:
    """Count the Part A network from its analytic block shapes (``part_a.model.block_shapes``).

    ``activation`` and ``dense_activation`` only label the rows (every activation costs the same
    here). Each block is conv -> [batch norm] -> activation -> 2x2 max-pool; then dense ->
    activation -> output layer. Dropout, flatten and asymmetric padding are free.
    """
    if not blocks:
        raise ValueError("count_part_a needs at least one block shape")
    layers: list[LayerCount] = []
    for index, block in enumerate(blocks, start=1):
        conv_shape = (block.out_channels, block.conv_size, block.conv_size)
        conv_elements = math.prod(conv_shape)
        weights = block.out_channels * block.in_channels * block.kernel ** 2
        layers.append(LayerCount(f"block{index}.conv", "Conv2d", conv_shape,
                                 macs=conv_elements * block.in_channels * block.kernel ** 2,
                                 element_ops=BIAS_OPS * conv_elements if conv_bias else 0,
                                 params=weights + (block.out_channels if conv_bias else 0)))
        if batch_norm:
            layers.append(LayerCount(f"block{index}.norm", "BatchNorm2d", conv_shape,
                                     element_ops=NORM_OPS * conv_elements, params=2 * block.out_channels))
        layers.append(LayerCount(f"block{index}.act", activation, conv_shape,
                                 element_ops=ACTIVATION_OPS * conv_elements))
        pooled_shape = (block.out_channels, block.pool_size, block.pool_size)
        layers.append(LayerCount(f"block{index}.pool", "MaxPool2d", pooled_shape,
                                 element_ops=(2 * 2 - 1) * math.prod(pooled_shape)))
    flat = math.prod(pooled_shape)
    layers += [LayerCount("dense", "Linear", (dense_neurons,), macs=flat * dense_neurons,
                          element_ops=BIAS_OPS * dense_neurons, params=(flat + 1) * dense_neurons),
               LayerCount("dense.act", dense_activation or activation, (dense_neurons,),
                          element_ops=ACTIVATION_OPS * dense_neurons),
               LayerCount("output", "Linear", (num_classes,), macs=dense_neurons * num_classes,
                          element_ops=BIAS_OPS * num_classes, params=(dense_neurons + 1) * num_classes)]
    first = blocks[0]
    return Report((first.in_channels, first.in_size, first.in_size), layers)


def _one_pass(module: nn.Module, input_shape: Sequence[int], counter: FlopCounterMode | None = None) -> FlopCounterMode:
    """One forward pass of a single sample under ``counter``, on the module's device (meta stays
    meta), in eval mode without autograd, restoring what it changed. Attention runs its math path:
    FlopCounterMode has no formula for the fused CPU kernels (nn.MultiheadAttention's fast path, CPU
    flash attention) and would miss their products; the math path runs them as bmm/addmm."""
    counter = counter or FlopCounterMode(display=False)
    tensor = next(module.parameters(), None)
    tensor = next(module.buffers(), None) if tensor is None else tensor
    example = torch.zeros((1, *input_shape), device=tensor.device if tensor is not None else "cpu")
    was_training, fastpath = module.training, torch.backends.mha.get_fastpath_enabled()
    module.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            module(example)
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
    """Count any module, one row per leaf-module call of a single sample's forward pass.

    ``input_shape`` excludes the batch dimension. A row's MACs are what FlopCounterMode counted
    during that call; its element ops follow the conventions. Products computed by functions rather
    than leaf modules (attention's projections and products) are one extra row, so ``macs`` is
    always exact; element ops in functions (residual adds, softmax) are not counted. Parameters no
    called leaf owns are totalled in one extra row too, so ``params`` is always the module's full
    count. Build the module under ``torch.device('meta')`` to count a large model without
    allocating or computing anything.
    """
    names = {sub: name for name, sub in module.named_modules()}
    layers: list[LayerCount] = []
    counted: set[int] = set()  # parameter ids, so shared weights are counted once
    started: list[int] = []  # FlopCounterMode's total when each running leaf call began

    def record(sub: nn.Module, inputs: tuple, output) -> None:
        macs = (counter.get_total_flops() - started.pop()) // FLOPS_PER_MAC
        own = [p for p in sub.parameters(recurse=False) if id(p) not in counted]
        counted.update(id(p) for p in own)
        if isinstance(output, torch.Tensor):
            shape, ops = tuple(output.shape[1:]), _element_ops(sub, output)
        else:  # e.g. a recurrent layer returning a tuple: only its parameters are counted
            shape, ops = (), 0
        params = sum(p.numel() for p in own)
        if macs or ops or params:
            layers.append(LayerCount(names[sub] or type(sub).__name__, type(sub).__name__, shape, macs, ops, params))

    counter = FlopCounterMode(display=False)
    leaves = [sub for sub in module.modules() if next(sub.children(), None) is None]
    handles = [leaf.register_forward_pre_hook(lambda sub, inputs: started.append(counter.get_total_flops()))
               for leaf in leaves] + [leaf.register_forward_hook(record) for leaf in leaves]
    try:
        _one_pass(module, input_shape, counter)
    finally:
        for handle in handles:
            handle.remove()
    if outside := counter.get_total_flops() // FLOPS_PER_MAC - sum(layer.macs for layer in layers):
        layers.append(LayerCount(OUTSIDE_MACS, "functional", (), macs=outside))
    if other := sum(p.numel() for p in module.parameters() if id(p) not in counted):
        layers.append(LayerCount("(parameters outside the layers above)", "Parameter", (), params=other))
    return Report(tuple(input_shape), layers)


def torch_flop_counts(module: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """FlopCounterMode's FLOPs per aten op for one forward pass of a single sample."""
    counter = _one_pass(module, input_shape)
    return {str(op): flops for op, flops in counter.get_flop_counts().get("Global", {}).items()}


def verify(model: nn.Module, input_shape: Sequence[int], expected: Report) -> list[str]:
    """Check ``expected`` exactly against FlopCounterMode and ``sum(p.numel())``; one message per mismatch.

    FlopCounterMode counts convolutions, matrix products and attention, never element-wise work, so
    it must equal ``expected.flops`` (which excludes element ops). The model runs one sample on its
    own device; meta works.
    """
    problems = []
    by_op = torch_flop_counts(model, input_shape)
    if (measured := sum(by_op.values())) != expected.flops:
        breakdown = ", ".join(f"{op} {flops:,}" for op, flops in sorted(by_op.items())) or "nothing"
        problems.append(f"FLOPs: analytic {expected.flops:,} but FlopCounterMode counted {measured:,} "
                        f"({breakdown}); difference {expected.flops - measured:+,}")
    if (params := sum(p.numel() for p in model.parameters())) != expected.params:
        problems.append(f"params: analytic {expected.params:,} but the model has {params:,}; "
                        f"difference {expected.params - params:+,}")
    return problems


@dataclass(frozen=True)
class Question1:
    """The closed-form Question 1 counts (see ``question1_text`` for the derivation)."""
    macs: int
    element_ops: int
    params: int
    flops = property(lambda self: FLOPS_PER_MAC * self.macs)


def question1_formula(m: int, k: int, n: int, w: int, *, conv_bias: bool = True,
                      batch_norm: bool = False) -> Question1:
    """Question 1 in closed form: 5 blocks of m k x k filters, 'same' padding, stride 1, 2x2 pools,
    n dense neurons, a w x w x 3 input and 10 classes. w must be divisible by 32 (five halvings)."""
    if w % 32:
        raise ValueError(f"the Question 1 formula assumes w divisible by 32 (five exact halvings), "
                         f"got w={w}; use count_part_a for other sizes")
    # Conv i runs at w/2^(i-1): sum of (w/2^(i-1))^2 over i=1..5 is w^2 (1+1/4+...+1/256) = 341 w^2/256.
    conv_pixels = 341 * w * w // 256
    # Pool i outputs w/2^i: sum of (w/2^i)^2 over i=1..5 is 341 w^2/1024.
    pool_pixels = 341 * w * w // 1024
    # Block 1 reads 3 channels at w^2 pixels; blocks 2..5 read m channels: (1/4+1/16+1/64+1/256) = 85/256.
    conv_macs = k * k * m * (3 * w * w + m * 85 * w * w // 256)
    flat = m * (w // 32) ** 2
    dense_macs = flat * n + n * 10
    per_conv_element = ACTIVATION_OPS + (BIAS_OPS if conv_bias else 0) + (NORM_OPS if batch_norm else 0)
    element_ops = (per_conv_element * m * conv_pixels + 3 * m * pool_pixels
                   + (BIAS_OPS + ACTIVATION_OPS) * n + BIAS_OPS * 10)
    params = (3 * k * k * m + 4 * (k * k * m * m) + (5 * m if conv_bias else 0)
              + (10 * m if batch_norm else 0) + flat * n + n + 10 * n + 10)
    return Question1(conv_macs + dense_macs, element_ops, params)


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
    """The derivation, then the formula evaluated for a Part A ``ModelConfig`` and compared with
    ``exact``, or the reasons the formula does not apply to it."""
    kernels = [config.kernel_size] if isinstance(config.kernel_size, int) else list(config.kernel_size)
    checks = [(config.n_blocks == 5, "n_blocks is not 5"),
              (config.filter_strategy == "same", "filter_strategy is not 'same'"),
              (len(set(kernels)) == 1, "kernel_size differs per block"),
              (config.padding == "same", "padding is not 'same'"),
              (config.stride == 1, "stride is not 1"),
              (config.input_size % 32 == 0, "input_size is not divisible by 32"),
              (config.in_channels == 3 and config.num_classes == 10, "not 3 channels in, 10 classes out")]
    if misfits := [reason for ok, reason in checks if not ok]:
        return f"{QUESTION1_DERIVATION}\n  (not evaluated for this configuration: {'; '.join(misfits)})"
    m, k, n, w = config.n_filters, kernels[0], config.dense_neurons, config.input_size
    answer = question1_formula(m, k, n, w, conv_bias=config.conv_bias, batch_norm=config.batch_norm)
    same = (answer.macs, answer.element_ops, answer.params) == (exact.macs, exact.element_ops, exact.params)
    return (f"{QUESTION1_DERIVATION}\n"
            f"  with m={m}, k={k}, n={n}, w={w}, conv bias {'on' if config.conv_bias else 'off'}, batch norm "
            f"{'on' if config.batch_norm else 'off'}: MACs {answer.macs:,}, FLOPs {answer.flops:,}, "
            f"element ops {answer.element_ops:,}, params {answer.params:,}\n"
            + ("  = the exact" if same else "  DIFFERS from the exact") + " layer-by-layer count above")


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
    # The one place common/ needs the concrete Part A model; imported here, not at module level.
    from part_a.model import ModelConfig

    parser = argparse.ArgumentParser(description="Count MACs, FLOPs, element ops and parameters "
                                                 "of the Part A network or a torchvision model.")
    add_dataclass_args(parser, ModelConfig, "Part A model")
    group = parser.add_argument_group("counter")
    group.add_argument("--verify", action="store_true",
                       help="check FLOPs against FlopCounterMode and params against the built model; "
                            "exit 1 on any mismatch")
    group.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    group.add_argument("--torchvision", metavar="NAME",
                       help="count this torchvision model (e.g. resnet50) at input_size instead")
    return parser


def count_config(config) -> Report:
    """``count_part_a`` for a Part A ``ModelConfig`` (its analytic block shapes; no weights built).
    Raises ``ValueError`` for a configuration that cannot be built."""
    from part_a.model import activation_class, block_shapes
    return count_part_a(block_shapes(config), dense_neurons=config.dense_neurons, num_classes=config.num_classes,
                        batch_norm=config.batch_norm, conv_bias=config.conv_bias,
                        activation=activation_class(config.activation).__name__,
                        dense_activation=activation_class(config.dense_activation or config.activation).__name__)


def _count(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, Report, nn.Module | None, str]:
    """(title, report, the model when --verify needs one, the Question 1 text) for the parsed options."""
    from part_a.model import ModelConfig, build_model
    try:
        if args.torchvision:
            model = _torchvision_on_meta(args.torchvision)
            title = f"{args.torchvision} (torchvision) at {args.input_size}x{args.input_size}"
            return title, count_module(model, (3, args.input_size, args.input_size)), model, ""
        config = from_namespace(ModelConfig, args)
        report = count_config(config)
    except ValueError as error:
        parser.error(str(error))
    return (f"Part A network at {config.input_size}x{config.input_size}", report,
            build_model(config) if args.verify else None, question1_text(config, report))


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    title, report, model, question1 = _count(parser, args)
    problems = verify(model, report.input_shape, report) if args.verify else []
    if args.json:
        verified = {"verified": not problems, "mismatches": problems} if args.verify else {}
        print(json.dumps({"model": title, **report.to_dict(), **verified}))
        return 1 if problems else 0
    print(f"{title}, counts per image\n\n{report.table()}\n")
    print(f"MACs {report.macs:,}  FLOPs {report.flops:,}  element ops {report.element_ops:,}  "
          f"FLOPs + element ops {report.flops + report.element_ops:,}  params {report.params:,}")
    if report.outside_macs:
        print(f"  {report.outside_macs:,} of these MACs run in functional ops (e.g. attention) that no "
              f"layer above owns; FlopCounterMode counts them, so the total is exact")
    for key, text in CONVENTIONS.items():
        print(f"  {key}: {text}")
    if question1:
        print(f"\n{question1}")
    if args.verify:
        print("\nverify: " + ("exact match with FlopCounterMode FLOPs and the model's parameter count"
                              if not problems else "MISMATCH\n  " + "\n  ".join(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
