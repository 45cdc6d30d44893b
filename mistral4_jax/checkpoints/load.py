"""`from_pretrained`: a checkpoint directory -> a Flax NNX model (docs/model.md 2.2, 2.4).

The directory is recognised first: a converted Orbax checkpoint (`orbax.py`) is restored; an HF or
Mistral-native safetensors one is planned (`plan.py`: every tensor matched to a parameter slot through
the `names.py` table and checked, all problems reported in one error) and then read slot by slot
(`read.py`), each parameter straight onto its sharding.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import sharding as shard_lib
from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import fp8
from . import adapter as adapter_lib
from . import native, orbax, read
from .plan import plan_checkpoint
from .names import is_weight
from .safetensors_io import hf_weight_files, index_files


def load_config(path: str | os.PathLike) -> ModelConfig:
    if not Path(path).is_dir():
        raise CheckpointError(f"{Path(path)}: not a directory (expected a checkpoint directory with config.json "
                              "and *.safetensors files)")
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{Path(path)}: no config.json (expected an HF-layout checkpoint directory)")
    return ModelConfig.from_json_file(cfg_path)


def open_safetensors(path: str | os.PathLike, dtype, **config_overrides):
    """(config, abstract model, plan) of an HF or native safetensors directory; nothing is read yet."""
    is_native = native.is_native_dir(path)
    if is_native:
        cfg, index = native.load_params_config(path), index_files(native.native_files(path))
    else:
        cfg, index = load_config(path), index_files(hf_weight_files(path))
    cfg = read.with_overrides(cfg, config_overrides)
    model = read.abstract_model(cfg, dtype)
    return cfg, model, plan_checkpoint(cfg, index, read.param_shapes(model), native=is_native)


def stored_float_dtype(path: str | os.PathLike) -> str:
    """"float32" when most of a checkpoint's weight bytes are stored in float32, else "bfloat16" (16-bit and FP8
    checkpoints): the parameter dtype fine-tuning picks when none is given (FP8 scales do not count)."""
    if orbax.is_orbax_dir(path):
        arrays = orbax.read_marker(path)["arrays"].values()
        sizes = [(a["dtype"], int(np.prod(a["shape"], dtype=np.int64))) for a in arrays]
    else:
        is_native = native.is_native_dir(path)
        index = index_files(native.native_files(path) if is_native else hf_weight_files(path))
        sizes = [(f.dtype_name(k), int(np.prod(f.shape(k), dtype=np.int64))) for k, f in index.items()
                 if is_weight(k)]
    wide = sum(n for d, n in sizes if d in ("float32", "F32"))
    return "float32" if wide * 2 > sum(n for _, n in sizes) else "bfloat16"


def from_pretrained(path: str | os.PathLike, dtype="bfloat16", mesh=None, weights=None, adapter=None,
                    **config_overrides):
    """Load a checkpoint directory into a `Mistral3ForConditionalGeneration` (an `nnx.Module`).

    path: an HF-format directory (`config.json` plus one `.safetensors` file or an index with shards),
    a Mistral-native one (`params.json` plus `consolidated*.safetensors`) or an Orbax checkpoint written
    by `mistral4-jax convert`; FP8 weights are dequantised to `dtype`. mesh: a `jax.sharding.Mesh` to
    shard the parameters over (see `mistral4_jax.sharding`), or None for the default device.
    weights: None, or "fp8" to keep the attention projections, shared / dense MLPs and routed experts as
    E4M3 with float32 per-output-column scales (`mistral4_jax.model.fp8`; about half the bytes of bf16).
    adapter: a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`, e.g. the
    `OUT/adapter` of a LoRA `finetune`, or one saved by peft for the transformers model) applied on top
    (`checkpoints/adapter.py`): merged into plain weights, kept beside quantised ones (the base stays FP8).
    config_overrides: port switches of the text config, e.g. `apply_yarn_mscale=True` or `expert_impl="dense"`.
    """
    mesh = shard_lib.as_auto_mesh(mesh)
    dtype = read.resolve_dtype(dtype)
    fp8.check_weights(weights)
    if adapter is not None:
        adapter_lib.read_config(adapter)  # a bad adapter fails before the base is read
    if orbax.is_orbax_dir(path):
        model = orbax.restore(path, dtype, mesh, weights, **config_overrides)
    else:
        _, model, plan = open_safetensors(path, dtype, **config_overrides)
        model = read.read_params(model, plan, dtype, mesh, weights, Path(path))
    return model if adapter is None else adapter_lib.load_adapter(model, adapter, mesh, donate=True)
