"""Random-weight checkpoints in the released HF on-disk layout (docs/model.md 2.2), written with numpy only.

Used by the demo (a tiny model that needs no download) and by benchmarks (multi-GB files with the
real tensor names, dtypes and FP8 scales). Written shard by shard, so memory stays at one shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from ..checkpoints import names, read
from ..config import ModelConfig
from ..model import fp8

E4M3_MAX = 448.0
_PARTS = ("language_model/", "lm_head/", "vision_tower/", "multi_modal_projector/")  # in file order


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """{name: (shape, stored_in_fp8)} of every weight of the released layout (no scales), in file order:
    text weights layer by layer, the head, then the vision tower and projector.

    Derived from the module tree and the inverse of the loading table (`checkpoints.names`), as
    `save_pretrained` names its tensors; FP8 are the weights the released checkpoint stores in FP8."""
    slots = []
    model = read.abstract_model(cfg, np.float32)
    stored_fp8 = fp8.fp8_paths(model)
    stacked = read.stacked_paths(model)
    for i, (path, shape) in enumerate(read.param_shapes(model).items()):
        part = next(k for k, p in enumerate(_PARTS) if path.startswith(p))
        for layer in read.layers_of(shape, path in stacked):
            name, transform = names.disk_name(path, layer, cfg, released=True)
            absolute = -1 if layer is None else names.absolute_layer(path, layer, cfg)
            disk = transform.disk_shape(shape if layer is None else shape[1:])
            slots.append(((part, absolute, i), name, (disk, path in stored_fp8)))
    return {name: spec for _, name, spec in sorted(slots, key=lambda s: s[0])}


def _random(rng: np.random.Generator, name: str, shape, std: float) -> np.ndarray:
    if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith("ln_pre.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    return (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def quantize_e4m3(w: np.ndarray, per_leading_axis: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """E4M3 weights and the float32 `scale_inv` (a multiplier) that dequantises them: w ~ q * s."""
    axes = tuple(range(1, w.ndim)) if per_leading_axis else None
    amax = np.max(np.abs(w), axis=axes, keepdims=per_leading_axis)
    s = np.asarray(np.maximum(amax, 1e-12) / E4M3_MAX, dtype=np.float32)
    q = np.clip(w / s, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q, s


def write_checkpoint(path, cfg: ModelConfig, *, fp8: bool = True, seed: int = 0, std: float = 0.05,
                     max_shard_bytes: int = 2 << 30, progress=None) -> Path:
    """Write `cfg` with random weights as an HF checkpoint (config.json, shards, index).

    fp8: store the projections the released checkpoint stores in FP8 as E4M3 with per-tensor (per
    expert for fused experts) `weight_scale_inv` and `activation_scale`, as the released files do.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = hf_tensor_shapes(cfg)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    files: list[tuple[str, dict[str, np.ndarray]]] = []
    weight_map: dict[str, str] = {}

    def flush():
        nonlocal size
        if shards[-1]:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shards[-1], str(path / fname), metadata={"format": "pt"})
            files.append((fname, {}))
            weight_map.update({k: fname for k in shards[-1]})
            shards[-1] = {}
            size = 0

    for name, (shape, is_fp8) in shapes.items():
        w = _random(rng, name, shape, std)
        if fp8 and is_fp8:
            fused = not name.endswith(".weight")  # fused experts: one scale per expert
            q, s = quantize_e4m3(w, per_leading_axis=fused)
            shards[-1][name] = q
            shards[-1][names.scale_name(name)] = s.reshape(-1, 1, 1) if fused else s.reshape(())
            shards[-1][names.activation_scale_name(name)] = np.ones(shape[0] if fused else (), np.float32)
            size += q.nbytes
        else:
            shards[-1][name] = w.astype(ml_dtypes.bfloat16)
            size += w.nbytes // 2
        if progress is not None:
            progress(w.nbytes)
        if size >= max_shard_bytes:
            flush()
    flush()
    n = len(files)
    renamed = {}
    for i, (fname, _) in enumerate(files):
        new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (path / fname).rename(path / new)
        renamed[fname] = new
    index = {"metadata": {}, "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = cfg.to_hf_dict()
    if fp8:
        config["quantization_config"] = {
            "quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None,
            "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
