"""The benchmark sections run in quick mode and print one JSON object with their figures."""
from __future__ import annotations

import json

import pytest

from common import bench, bench_data


@pytest.mark.parametrize("section", ["step", "e2e"])
def test_quick_benchmark_prints_json_with_its_figures(section, capsys):
    assert bench.main([section, "--quick", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["section"] == section and result["hardware"]["device"] == "cpu"
    if section == "step":
        variants = result["models"][0]["variants"]
        assert set(variants) == {"eager_fp32_nchw", "channels_last"}
        assert variants["eager_fp32_nchw"]["ratio_to_eager"] == 1.0
        for figures in variants.values():
            assert figures["images_per_s"] > 0 and 0 < figures["mfu"] and figures["warmup_s"] > 0
    else:
        assert result["ours"]["images_per_s"] > 0 and result["plain_imagefolder_eager"]["images_per_s"] > 0
        assert result["ratio"] == pytest.approx(
            result["ours"]["images_per_s"] / result["plain_imagefolder_eager"]["images_per_s"])


def test_unknown_variant_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["step", "--quick", "--device", "cpu", "--variants", "warp_speed"])
    assert exit_.value.code == 2 and "unknown variants" in capsys.readouterr().err


@pytest.mark.parametrize("section", ["data", "e2e"])
def test_too_few_images_for_one_batch_is_refused_before_any_image_is_written(section, monkeypatch, capsys):
    def no_images(*args):
        raise AssertionError("images generated before the options were checked")

    monkeypatch.setattr(bench_data, "generate", no_images)
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
