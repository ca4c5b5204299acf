"""The analytic counter agrees exactly with PyTorch's FlopCounterMode, parameter counts, the
Question 1 closed form, and torchvision's documented ResNet50 figures."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.vision_transformer import VisionTransformer

from common import flops
from common.flops import LayerCount, Report, count_config, count_module, question1_formula, verify
from part_a.model import ModelConfig, block_shapes, build_model

ROOT = Path(__file__).resolve().parents[1]


def random_configs(count: int, seed: int = 0) -> list[ModelConfig]:
    """Valid small configurations covering every strategy, padding kind, kernel and stride."""
    rng, configs = random.Random(seed), []
    while len(configs) < count:
        n_blocks = rng.randint(1, 5)
        kernel = rng.randint(1, 6) if rng.random() < 0.6 else [rng.randint(1, 6) for _ in range(n_blocks)]
        config = ModelConfig(
            n_blocks=n_blocks,
            n_filters=rng.randint(1, 6),
            filter_strategy=rng.choice(["same", "double", "half"]),
            kernel_size=kernel,
            stride=rng.choice([1, 1, 2]),
            padding=rng.choice(["same", "valid", 0, 1, 2]),
            activation=rng.choice(["relu", "gelu", "tanh", "mish"]),
            dense_neurons=rng.randint(1, 12),
            batch_norm=rng.random() < 0.5,
            conv_bias=rng.random() < 0.5,
            input_size=rng.randint(8, 48),
            num_classes=rng.randint(2, 10),
        )
        try:
            block_shapes(config)
        except ValueError:  # shrinks to nothing: draw again
            continue
        configs.append(config)
    return configs


CONFIGS = random_configs(40)


def test_random_configs_cover_every_option():
    assert {c.filter_strategy for c in CONFIGS} == {"same", "double", "half"}
    assert {str(c.padding) for c in CONFIGS} == {"same", "valid", "0", "1", "2"}
    assert {c.stride for c in CONFIGS} == {1, 2} and {c.batch_norm for c in CONFIGS} == {True, False}
    assert {c.conv_bias for c in CONFIGS} == {True, False}
    assert any(isinstance(c.kernel_size, list) for c in CONFIGS)
    kernels = {
        k for c in CONFIGS for k in ([c.kernel_size] if isinstance(c.kernel_size, int) else c.kernel_size)
    }
    assert {2, 4, 6} <= kernels  # even kernels, which need asymmetric 'same' padding


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"{c.filter_strategy}-{c.padding}-{c.kernel_size}-s{c.stride}"
)
def test_analytic_count_matches_flop_counter_and_parameters_exactly(config):
    torch.manual_seed(0)
    model = build_model(config)
    report = count_config(config)
    input_shape = (3, config.input_size, config.input_size)
    assert verify(model, input_shape, report) == []
    # The hook-based generic counter sees the same layers with the same counts.
    observed = count_module(model, input_shape)

    def strip(counts):
        return [(row.type, row.output_shape, row.macs, row.element_ops, row.params) for row in counts.layers]

    assert strip(observed) == strip(report)


def test_flop_counter_convention_is_two_per_multiply_accumulate_without_bias():
    # A 1x1 conv with bias on a 1x1 image and a linear layer: 2 multiply-adds each.
    conv = nn.Conv2d(2, 1, 1, bias=True)
    assert flops.torch_flop_counts(conv, (2, 1, 1)) == {"aten.convolution": 4}
    assert flops.torch_flop_counts(nn.Linear(2, 1), (2,)) == {"aten.addmm": 4}
    assert flops.torch_flop_counts(nn.Linear(2, 1, bias=False), (2,)) == {"aten.mm": 4}


def test_verify_reports_each_mismatch():
    config = CONFIGS[0]
    good = count_config(config)
    wrong = Report(good.input_shape, good.layers + [LayerCount("extra", "Linear", (1,), macs=3, params=5)])
    problems = verify(build_model(config), good.input_shape, wrong)
    assert len(problems) == 2
    assert problems[0].startswith("FLOPs:") and "difference +6" in problems[0]
    assert problems[1].startswith("params:") and "difference +5" in problems[1]


@pytest.mark.parametrize(
    "m,k,n,w",
    [(1, 1, 1, 32), (3, 2, 5, 64), (8, 5, 16, 96), (4, 7, 3, 224), (64, 5, 128, 224), (16, 4, 32, 256)],
)
@pytest.mark.parametrize("conv_bias,batch_norm", [(True, True), (True, False), (False, True), (False, False)])
def test_question1_formula_equals_the_exact_count(m, k, n, w, conv_bias, batch_norm):
    config = ModelConfig(
        n_filters=m, kernel_size=k, dense_neurons=n, input_size=w, conv_bias=conv_bias, batch_norm=batch_norm
    )
    exact = count_config(config)
    answer = question1_formula(m, k, n, w, conv_bias=conv_bias, batch_norm=batch_norm)
    assert (answer.macs, answer.flops, answer.element_ops, answer.params) == (
        exact.macs,
        exact.flops,
        exact.element_ops,
        exact.params,
    )


def test_question1_smallest_case_by_hand():
    # m=k=n=1, w=32, no bias, no batch norm.
    # conv MACs: 3*32^2 + (16^2 + 8^2 + 4^2 + 2^2) = 3072 + 340; dense: 1*1*1 + 10.
    # params: 3 + 4 conv weights, 1 + 1 dense, 10 + 10 output.
    answer = question1_formula(1, 1, 1, 32, conv_bias=False, batch_norm=False)
    assert answer.macs == 3072 + 340 + 11
    assert answer.params == 29
    # With conv bias and batch norm, every conv output costs 1 + 1 + 2 element ops, over
    # 32^2 + 16^2 + 8^2 + 4^2 + 2^2 = 1364 conv outputs; 3 per pool output over 341 of them;
    # dense bias and activation 2, output biases 10. Params gain 5 biases and 5 gammas + 5 betas.
    both = question1_formula(1, 1, 1, 32, conv_bias=True, batch_norm=True)
    assert both.element_ops == 4 * 1364 + 3 * 341 + 2 + 10
    assert both.params == 29 + 5 + 10
    with pytest.raises(ValueError, match="w divisible by 32"):
        question1_formula(1, 1, 1, 48)


def test_resnet50_matches_torchvision_documented_figures_on_meta():
    with torch.device("meta"):
        model = torchvision.models.resnet50(weights=None)
    report = count_module(model, (3, 224, 224))
    assert report.macs == 4_089_184_256
    assert report.params == 25_557_032
    assert verify(model, (3, 224, 224), report) == []


def test_count_module_covers_transposed_grouped_shared_and_loose_parameters():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
            self.grouped = nn.Conv2d(6, 6, 3, groups=3, bias=False)
            self.pool = nn.MaxPool2d(3)
            self.shared = nn.Linear(6, 6)
            self.scale = nn.Parameter(torch.ones(7))  # owned by no leaf layer

        def forward(self, x):
            x = self.pool(self.grouped(self.up(x))).mean((2, 3))
            return self.shared(self.shared(x)) * self.scale[:1]

    model = Odd()
    report = count_module(model, (4, 5, 5))
    assert verify(model, (4, 5, 5), report) == []
    assert [row.name for row in report.layers] == [
        "up",
        "grouped",
        "pool",
        "shared",
        "shared",
        "(parameters outside the layers above)",
    ]
    assert report.layers[2].element_ops == 8 * 6 * 3 * 3  # 3x3 window: 8 comparisons per output
    assert report.layers[4].params == 0  # the second call of a shared layer adds no parameters
    assert report.layers[-1].params == 7


def test_count_module_restores_training_mode():
    model = build_model(CONFIGS[0])
    for training in (True, False):  # the mode it had, not always train mode
        count_module(model.train(training), (3, CONFIGS[0].input_size, CONFIGS[0].input_size))
        assert model.training is training


def test_cli_json_with_verify_on_the_default_config():
    result = subprocess.run(
        [sys.executable, "common/flops.py", "--json", "--verify"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)  # exactly one JSON object and nothing else
    assert output["verified"] is True and output["mismatches"] == []
    assert output["macs"] == count_config(ModelConfig()).macs and output["flops"] == 2 * output["macs"]
    assert output["params"] == sum(p.numel() for p in build_model(ModelConfig()).parameters())
    assert {"name", "type", "output_shape", "macs", "flops", "element_ops", "params"} <= set(
        output["layers"][0]
    )
    assert output["layers"][0]["output_shape"] == [64, 224, 224]


def test_cli_human_output_has_table_totals_and_question1(capsys):
    assert flops.main(["--n_filters=4", "--dense_neurons=8", "--input_size=64"]) == 0
    text = capsys.readouterr().out
    exact = count_config(ModelConfig(n_filters=4, dense_neurons=8, input_size=64))
    assert "block1.conv  Conv2d" in text and f"MACs {exact.macs:,}" in text
    assert "= the exact layer-by-layer count above" in text
    assert flops.main(["--padding=valid", "--input_size=96", "--kernel_size=3"]) == 0
    assert "not evaluated for this configuration: padding is not 'same'" in capsys.readouterr().out


def test_cli_verify_exits_nonzero_on_a_mismatch(monkeypatch, capsys):
    def off_by_one(config):
        report = count_config(config)
        return Report(report.input_shape, report.layers + [LayerCount("bogus", "Linear", (1,), params=1)])

    monkeypatch.setattr(flops, "count_config", off_by_one)
    assert flops.main(["--verify", "--n_filters=2", "--input_size=32"]) == 1
    assert "params: analytic" in capsys.readouterr().out


def test_cli_counts_a_torchvision_model(capsys):
    assert flops.main(["--torchvision", "resnet18", "--json", "--verify"]) == 0
    output = json.loads(capsys.readouterr().out)
    assert output["params"] == 11_689_512 and output["verified"] is True


def test_attention_run_by_functional_ops_is_counted_exactly():
    # One encoder layer over 5 tokens (4 patches of 16x16 and the class token) of width 8, 2 heads.
    def tiny_vit():
        return VisionTransformer(
            image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16
        )

    torch.manual_seed(0)
    report = count_module(tiny_vit(), (3, 32, 32))  # real CPU tensors: fused attention kernels exist here
    # nn.MultiheadAttention's in-projection, q k^T, attention x v and out-projection run in a
    # function no layer hook sees.
    attention = 5 * 8 * 24 + 2 * (5 * 4 * 5) + 2 * (5 * 5 * 4) + 5 * 8 * 8
    by_hand = 2 * 2 * 8 * (3 * 16 * 16) + attention + 2 * (5 * 8 * 16) + 8 * 1000  # patches, MLP, head
    with torch.device("meta"):  # on meta attention runs as plain bmm/addmm, which FlopCounterMode counts
        meta = tiny_vit().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(torch.zeros(1, 3, 32, 32, device="meta"))
    assert report.macs == by_hand == counter.get_total_flops() // 2
    assert report.outside_macs == attention and report.to_dict()["macs_outside_layers"] == attention
    assert torch.backends.mha.get_fastpath_enabled()  # the switch counting turned off is back on


def test_cli_reports_vit_b_16_exactly_and_says_what_runs_outside_the_layers(capsys):
    assert flops.main(["--torchvision", "vit_b_16", "--json"]) == 0
    output = json.loads(capsys.readouterr().out)
    # torchvision documents 17.56 GFLOPS (its GFLOPS are MACs) and 86,567,656 parameters.
    assert output["macs"] == 17_563_828_224 and output["params"] == 86_567_656
    assert sum(layer["macs"] for layer in output["layers"]) == output["macs"]
    assert output["macs_outside_layers"] == 6_292_703_232
    assert flops.main(["--torchvision", "vit_b_16"]) == 0
    assert "6,292,703,232 of these MACs run in functional ops" in capsys.readouterr().out


def test_cli_counts_a_torchvision_model_that_cannot_be_built_on_meta(capsys):
    assert flops.main(["--torchvision", "regnet_x_400mf", "--json", "--verify"]) == 0  # reads tensor values
    output = json.loads(capsys.readouterr().out)
    assert output["params"] == 5_495_976 and output["verified"] is True
