"""The benchmark sections run in quick mode and print one JSON object with their figures."""
from __future__ import annotations

import json

import pytest

from common import bench


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


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variants"):
        bench.main(["step", "--quick", "--device", "cpu", "--variants", "warp_speed"])
