"""`save_pretrained`: a parameter tree -> an HF-layout checkpoint directory that `from_pretrained` reads.

Names and layouts come from the inverse of the loader's table (`names.disk_name`), in the
transformers 5 spelling (`model.language_model.*`, `lm_head.*`, ...), so the directory also loads in
transformers. Tensors are written unquantised, in the parameters' dtype (a weight kind, FP8 or LoRA, as its
dense value), in shards of at most `shard_bytes`; files are written under temporary names and renamed last,
so a crash leaves no directory that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from ..config import ModelConfig
from ..model import weights
from ..model.layers import is_stacked
from .names import disk_name


@jax.jit
def _dense_at(w, idx: tuple):
    return weights.dense(weights.index(w, *idx))


def _dense_host(w, idx: tuple) -> np.ndarray:
    """dense(w[idx]) of a weight kind on the host, formed one [in, out] matrix at a time (an FP8 or LoRA layer's
    experts one by one), so the device never holds more than one matrix of it in the export dtype."""
    lead = tuple(w.shape[len(idx):-2])
    mats = [np.asarray(jax.device_get(_dense_at(w, (*idx, *j)))) for j in np.ndindex(lead)]
    return np.stack(mats).reshape(*lead, *mats[0].shape)


def hf_tensors(params: nnx.State, cfg: ModelConfig):
    """Yield (HF name, numpy array in the on-disk layout) for every parameter; stacked ones per layer. A weight
    kind is written as its `dense()` (FP8 dequantised, LoRA merged: W + scale * A @ B), in its compute dtype."""
    for p, v in nnx.to_flat_state(params):
        path = "/".join(map(str, p))
        x = v.get_value()
        layers = range(x.shape[0]) if is_stacked(v) else [None]
        if not weights.is_kind(x):
            x = np.asarray(jax.device_get(x))
        for layer in layers:
            name, transform = disk_name(path, layer, cfg)
            if weights.is_kind(x):
                value = _dense_host(x, () if layer is None else (layer,))
            else:
                value = x if layer is None else x[layer]
            yield name, np.ascontiguousarray(transform.to_disk(value))


def save_pretrained(params: nnx.State, cfg: ModelConfig, path: str | os.PathLike,
                    shard_bytes: int = 4 << 30) -> Path:
    """Write `params` (the `nnx.Param` state of a `Mistral3ForConditionalGeneration`) and `cfg` to `path`.

    Writes `config.json` (without `quantization_config`: the weights are not FP8 any more), and
    `model.safetensors` or `model-XXXXX-of-YYYYY.safetensors` + `model.safetensors.index.json`.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in hf_tensors(params, cfg):
        if size and size + x.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    written = []
    for fname, tensors in zip(names, shards):
        tmp = out / (fname + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        written.append((tmp, out / fname))
    files = {"config.json": json.dumps(cfg.replace(quantization=None).to_hf_dict(), indent=2)}
    if n > 1:
        weight_map = {k: f for f, t in zip(names, shards) for k in t}
        files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    for fname, text in files.items():
        tmp = out / (fname + ".tmp")
        tmp.write_text(text)
        written.append((tmp, out / fname))
    for tmp, final in written:
        os.replace(tmp, final)
    return out
