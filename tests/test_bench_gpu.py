"""The GPU benchmark's tiny preset runs end to end (on CPU here) and writes its JSON and RESULTS entry."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_gpu  # noqa: E402


def test_tiny_preset(tmp_path):
    res = bench_gpu.main(["--tiny", "--json", str(tmp_path / "r.json"), "--results", str(tmp_path / "R.md")])
    assert json.loads((tmp_path / "r.json").read_text())["preset"] == "tiny"
    assert "## tiny on" in (tmp_path / "R.md").read_text()
    for impl in ("auto", "routed", "gather", "grouped"):
        for b in (1, 8):
            d = res[f"decode_{impl}_b{b}"]
            assert d["ms_step"] > 0 and d["of_roofline"] > 0
    assert res["prefill_64"]["tok_s"] > 0 and res["transformers"]["eager_b1_ms_step"] > 0


def test_expected_experts_by_arithmetic():
    assert bench_gpu.expected_experts(128, 4, 1) == 4
    np.testing.assert_allclose(bench_gpu.expected_experts(128, 4, 128), 128 * (1 - (124 / 128) ** 128))
