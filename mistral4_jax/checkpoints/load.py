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
from . import adapter as adapter_lib
from . import native, orbax, read, scheme
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
    plan = plan_checkpoint(cfg, index, read.param_shapes(model), read.stacked_paths(model), native=is_native)
    return cfg, model, plan


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


def experts_plan(path: str | os.PathLike, model, dtype, **config_overrides) -> dict[str, list]:
    """The plan of the routed experts (role "experts") of the safetensors checkpoint at `path`, which must
    describe the same model as `model` (same parameter shapes)."""
    if orbax.is_orbax_dir(path):
        raise CheckpointError(f"{Path(path)}: experts_from must be a safetensors checkpoint (HF or Mistral-native), "
                              "not a converted one")
    _, other, plan = open_safetensors(path, dtype, **config_overrides)
    paths = expert_paths(model)
    want, got = read.param_shapes(model), read.param_shapes(other)
    bad = [f"{p}: {list(got.get(p, ()))} there, {list(want[p])} here" for p in paths if got.get(p) != want[p]]
    if bad:
        raise CheckpointError(f"{Path(path)}: its routed experts do not fit this model:\n  " + "\n  ".join(bad))
    return {p: plan[p] for p in paths}


def expert_paths(model) -> set[str]:
    """The routed experts' parameters (role "experts")."""
    return {p for p, v in read.flat_params(model) if scheme.role(v) == "experts"}


def from_pretrained(path: str | os.PathLike, dtype="bfloat16", mesh=None, weights=None, experts_from=None,
                    adapter=None, **config_overrides):
    """Load a checkpoint directory into a `Mistral3ForConditionalGeneration` (an `nnx.Module`).

    path: an HF-format directory (`config.json` plus one `.safetensors` file or an index with shards),
    a Mistral-native one (`params.json` plus `consolidated*.safetensors`, FP8 or NVFP4) or an Orbax checkpoint
    written by `mistral4-jax convert`. mesh: a `jax.sharding.Mesh` to shard the parameters over (see
    `mistral4_jax.sharding`), or None for the default device.
    weights: which parameters are held quantised and in which kind (`checkpoints/scheme.py`): None (the
    default) reads every parameter in `dtype` (FP8 dequantised) except NVFP4 weights, which stay packed;
    "dense" dequantises NVFP4 too; "fp8" keeps the attention projections, shared / dense MLPs and routed
    experts as E4M3 with float32 per-output-column scales (`mistral4_jax.model.fp8`); "nvfp4" holds the
    routed and shared experts as NVFP4 (`mistral4_jax.model.nvfp4`); "hybrid" the routed experts as NVFP4
    and the rest as FP8; or {role: kind}. Weights stored as NVFP4 stay NVFP4 unless "dense" or a dict says
    otherwise.
    experts_from: another safetensors checkpoint of the same model whose routed experts replace those of
    `path`, e.g. the NVFP4 release's beside the FP8 release: `from_pretrained(fp8_dir, weights="fp8",
    experts_from=nvfp4_dir)` is the hybrid of FP8 attention and shared expert with the NVFP4 experts as
    released.
    adapter: a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`, e.g. the
    `OUT/adapter` of a LoRA `finetune`, or one saved by peft for the transformers model) applied on top
    (`checkpoints/adapter.py`): merged into plain weights, kept beside quantised ones (an FP8 or NVFP4 base stays
    packed).
    config_overrides: port switches of the text config, e.g. `apply_yarn_mscale=True` or `expert_impl="dense"`.
    """
    mesh = shard_lib.as_auto_mesh(mesh)
    dtype = read.resolve_dtype(dtype)
    scheme.check(weights)
    if adapter is not None:
        adapter_lib.read_config(adapter)  # a bad adapter fails before the base is read
    if orbax.is_orbax_dir(path):
        replace = None
        if experts_from is not None:
            model = read.abstract_model(orbax.config_of(path, **config_overrides), dtype)
            replace = experts_plan(experts_from, model, dtype, **config_overrides)
        model = orbax.restore(path, dtype, mesh, weights, replace=replace, **config_overrides)
    else:
        _, model, plan = open_safetensors(path, dtype, **config_overrides)
        if experts_from is not None:
            plan = {**plan, **experts_plan(experts_from, model, dtype, **config_overrides)}
        model = read.read_params(model, plan, dtype, mesh, weights, Path(path))
    return model if adapter is None else adapter_lib.load_adapter(model, adapter, mesh, donate=True)
