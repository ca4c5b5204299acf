"""The benchmark sections run in quick mode, print one JSON object with their figures, and time the
training step that a run trains with."""

from __future__ import annotations

import json

import pytest
import torch

from common import bench, bench_data, engine


def test_quick_step_benchmark_times_each_variant_or_says_why_it_cannot_run(capsys):
    assert bench.main(["step", "--quick", "--device", "cpu", "--variants", "eager,graphs"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["section"] == "step" and result["hardware"]["device"] == "cpu"
    (row,) = result["results"]
    eager, graphs = row["variants"]["eager"], row["variants"]["graphs"]
    assert (row["model"], row["batch_size"]) == ("part_a", 8)
    assert eager["images_per_s"] > 0 and eager["warmup_s"] > 0 and eager["precision"] == "fp32"
    assert eager["ms_per_step"] == pytest.approx(1000 * 8 / eager["images_per_s"])
    assert eager["gpu_busy"] is None  # a CUDA-only figure
    assert "CUDA graphs need a CUDA GPU" in graphs["skipped"]


def test_the_step_benchmark_times_the_step_a_run_trains_with(monkeypatch):
    steps = []
    real_step = engine.train_step
    monkeypatch.setattr(engine, "train_step", lambda *args: steps.append(args) or real_step(*args))
    epoch, policy = bench.trainer("resnet50", dict(device="cpu", batch_size=2, input_size=32), 1)
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert epoch([batch] * 2)["images_per_s"] > 0 and len(steps) == 2
    model, optimizer = steps[0][0], steps[0][1]
    # part_b/train.py's own choices: AdamW at its rate, the backbone at backbone_lr_scale of it.
    assert type(optimizer) is torch.optim.AdamW and [g["lr"] for g in optimizer.param_groups] == [1e-4, 1e-3]
    assert type(model).__name__ == "FineTuneNet" and policy.channels_last


def test_gpu_busy_share_is_the_union_of_the_device_spans_over_the_window():
    spans = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (9.0, 12.0)]  # overlapping, and past the window's end
    assert bench.covered_share(spans, 0.0, 10.0) == pytest.approx(0.5)
    assert bench.covered_share([], 0.0, 1.0) == 0.0


def test_quick_e2e_benchmark_prints_both_rates(capsys):
    assert bench.main(["e2e", "--quick", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ours"]["images_per_s"] > 0 and result["plain_imagefolder_eager"]["images_per_s"] > 0
    assert result["ratio"] == pytest.approx(
        result["ours"]["images_per_s"] / result["plain_imagefolder_eager"]["images_per_s"]
    )
    assert result["ours"]["compile"] is False and result["ours"]["cuda_graphs"] is False  # the CPU's defaults


@pytest.fixture
def no_images(monkeypatch):
    """The test fails if a benchmark writes its images: bad options must be refused before that."""
    monkeypatch.setattr(
        bench_data, "generate", lambda *args: pytest.fail("images generated before the check")
    )


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["step", "--variants", "warp_speed"], "unknown variants or models ['warp_speed']"),
        (["step", "--models", "vgg"], "unknown variants or models ['vgg']"),
        (["step", "--batch_sizes", "0"], "--batch_sizes must be at least 1, got [0]"),
        (["step", "--device", "tpu"], "--device tpu"),  # not a "skipped" entry per variant
        (["data", "--epochs", "0"], "--epochs must be at least 1"),  # the median of no epochs
        (["data", "--workers", "-1"], "--workers must be at least 0"),  # DataLoader's traceback
        (["e2e", "--workers", "-1"], "--workers must be at least 0"),
        (["e2e", "--batch_size", "0"], "--batch_size must be at least 1"),  # given, so --quick keeps it
    ],
)
def test_bad_options_are_one_error_line_before_anything_runs(capsys, no_images, argv, fragment):
    with pytest.raises(SystemExit) as exit_:
        bench.main([*argv, "--quick", "--device", "cpu"] if "--device" not in argv else [*argv, "--quick"])
    assert exit_.value.code == 2 and fragment in capsys.readouterr().err


def test_quick_replaces_only_the_options_left_at_their_defaults(monkeypatch):
    parser, seen = bench.get_args_parser(), {}
    for argv, expected in [
        (["data", "--quick"], dict(images=60, batch_size=8, epochs=2, size=224)),
        (["data", "--quick", "--batch_size", "4"], dict(images=60, batch_size=4)),
        (["e2e", "--quick", "--input_size", "48"], dict(images=40, input_size=48)),
        (["step", "--quick", "--steps", "2"], dict(steps=2, repeats=1, batch_sizes=[8])),
    ]:
        seen.clear()
        config_class, _ = bench.SECTIONS[argv[0]]
        monkeypatch.setitem(bench.SECTIONS, argv[0], (config_class, lambda c: seen.update(vars(c)) or {}))
        assert bench.main(argv) == 0
        assert {k: seen[k] for k in expected} == expected, argv
    assert parser.parse_args(["data"]).batch_size == 64  # the parser's own defaults are untouched


def test_an_e2e_run_that_cannot_train_here_is_refused_before_any_image_is_written(no_images, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["e2e", "--quick", "--device", "cpu", "--cuda_graphs", "true"])
    assert exit_.value.code == 2 and "CUDA graphs need a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("section", ["data", "e2e"])
def test_too_few_images_for_one_batch_is_refused_before_any_image_is_written(section, no_images, capsys):
    # 20 images leave 10 for training (one per class goes to validation): no batch of 16, so an
    # epoch would time nothing and its images/s divide by zero.
    with pytest.raises(SystemExit) as exit_:
        bench.main([section, "--images", "20", "--batch_size", "16", "--device", "cpu"])
    assert exit_.value.code == 2
    assert "--images 20 leaves 10 training images" in capsys.readouterr().err
    bench_data.check_images(20, 10)  # exactly one full batch is enough
    with pytest.raises(ValueError, match="--images 9 leaves 0 training images"):  # a class with none
        bench_data.check_images(9, 1)
    with pytest.raises(ValueError, match="--images 15 leaves 0 training images"):  # a class with one (val)
        bench_data.check_images(15, 1)


def test_an_error_while_a_benchmark_runs_keeps_its_traceback(monkeypatch):
    def broken(*args):
        raise ValueError("a bug inside the benchmark")

    monkeypatch.setattr(bench_data, "generate", broken)  # the options are fine: not a usage error (exit 2)
    with pytest.raises(ValueError, match="a bug inside the benchmark"):
        bench.main(["data", "--quick", "--device", "cpu"])
