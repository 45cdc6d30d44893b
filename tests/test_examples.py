"""The examples run (quick mode) and write what they promise."""

import importlib.util
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_expert_load_example_quick(tmp_path):
    from PIL import Image

    assert _load("expert_load").main(["--quick", "--out", str(tmp_path)]) == 0
    for name in ("prose", "code"):
        stats = json.loads((tmp_path / f"{name}.json").read_text())
        np.testing.assert_allclose(np.sum(stats["fraction"], -1), stats["top_k"])  # K slots per token
        with Image.open(tmp_path / f"{name}.png") as img:
            assert img.format == "PNG"
    dis = json.loads((tmp_path / "disable_expert.json").read_text())
    assert len(dis["prompts"]) == 4
    assert all(p["kl"] >= -1e-6 for p in dis["prompts"])
    assert max(p["max_abs_change"] for p in dis["prompts"]) > 0  # the most loaded expert mattered somewhere
