"""PEFT LoRA adapters on disk (`adapter_config.json` + `adapter_model.safetensors`) <-> our LoRA adapters.

Ours are {parameter path: {"a": A [..., in, r], "b": B [..., r, out]}} with the parameter's leading axes (layers,
experts) and W_eff = W + scale * A @ B (`model/lora.py`). PEFT's are per module of the transformers tree, as
peft 0.21's `save_pretrained` writes them (`peft/tuners/lora/layer.py`), every key below `base_model.model.`:

- a targeted `nn.Linear` (`target_modules`): `<module>.lora_A.weight` [r, in] and `<module>.lora_B.weight` [out, r],
  delta W = lora_B @ lora_A * lora_alpha / r in torch's [out, in] layout: A = lora_A^T and B = lora_B^T in ours;
- transformers' routed experts are not Linear modules but two 3-D parameters of `mlp.experts`, `gate_up_proj`
  [E, 2I, H] and `down_proj` [E, H, I] ([out, in] per expert), which PEFT adapts through `target_parameters`
  (`ParamWrapper`): `lora_A.weight` [E * r, in] (row e * r + k) and `lora_B.weight` [out, r * E] (column
  k * E + e), one rank-r pair per expert as ours. Two targeted parameters of one module nest, the one registered
  first (`gate_up_proj`) innermost: its tensors are `experts.base_layer.lora_*`, those of `down_proj` `experts.lora_*`.

Module names and layouts come from the loading table (`names.py`), so the adapter fits the tree
`save_pretrained` writes. Loading accepts plain LoRA only and refuses, naming the field or tensor, what changes
the forward otherwise (DoRA, biases, rank / alpha patterns, base-modifying initialisations) and any module that is
not a LoRA target here (`model/layers.py` tags: text attention, shared experts, routed experts, dense MLPs).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from safetensors.numpy import save_file

from .. import sharding as shard_lib
from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import weights
from ..model.lora import LoRAWeight, merge, merge_in_place
from . import names, read
from .safetensors_io import SafetensorsFile

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
# The parameters of transformers' `Mistral4Experts`, in the order `__init__` registers them (PEFT's nesting order).
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_IN_LAYER = re.compile(r"\.layers\.\d+\.(?P<rest>.+)$")

# adapter_config.json fields that must be absent or empty / false: each changes what the adapter computes.
_MUST_BE_OFF = ("use_dora", "lora_bias", "fan_in_fan_out", "use_qalora", "use_bdlora", "modules_to_save",
                "trainable_token_indices", "layer_replication", "alora_invocation_tokens", "rank_pattern",
                "alpha_pattern", "velora_config", "kasa_config", "arrow_config", "monteclora_config")
# init_lora_weights values with which peft rewrites the base weights as it builds the adapter.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# ---------------------------------------------------------------------- names
def _peft_module(path: str, layer: int | None, cfg: ModelConfig) -> tuple[str, str | None]:
    """(transformers module name, expert parameter name or None) of layer `layer` of our parameter `path`."""
    name, transform = names.disk_name(path, layer, cfg)
    if transform is names.EXPERTS:
        module, _, param = name.rpartition(".")
        return module, param
    if transform is names.LINEAR and name.endswith(".weight"):
        return name[: -len(".weight")], None
    raise CheckpointError(f"parameter {path} ({name}) is not a Linear kernel or fused experts: PEFT has no LoRA form "
                          "for it")


def _in_layer(name: str) -> str:
    """The part of a module or parameter name after `layers.N.` (PEFT matches target names as suffixes)."""
    found = _IN_LAYER.search(name)
    if not found:
        raise CheckpointError(f"{name}: not inside a decoder layer; only layer weights are LoRA targets here")
    return found["rest"]


def _nesting(module: str, targeted: list[str], param: str) -> str:
    """The name PEFT stores the factors of expert parameter `param` under: `module` with one `.base_layer` per
    wrapper outside its own (`targeted`: the module's adapted parameters, in registration order)."""
    return module + ".base_layer" * (len(targeted) - 1 - targeted.index(param))


# ---------------------------------------------------------------------- writing
def save_adapter(adapters: dict[str, dict], rank: int, alpha: float, cfg: ModelConfig, path: str | os.PathLike,
                 base_model: str | None = None) -> Path:
    """Write `adapters` (keyed by parameter path) as a PEFT LoRA adapter directory `path`, float32.

    The directory is written under a temporary sibling name and renamed into place (an existing one is replaced
    only then), so it is never seen half-written. base_model: `base_model_name_or_path` of the config."""
    host = {p: (np.asarray(jax.device_get(ad["a"]), np.float32), np.asarray(jax.device_get(ad["b"]), np.float32))
            for p, ad in adapters.items()}
    tensors: dict[str, np.ndarray] = {}
    modules, params = set(), set()
    experts: dict[str, list[str]] = {}  # expert module -> its adapted parameters
    slices = []
    stacked = read.stacked_paths(read.abstract_model(cfg, jnp.float32))
    for p, (a, b) in host.items():
        for layer in range(a.shape[0]) if p in stacked else [None]:
            module, param = _peft_module(p, layer, cfg)
            slices.append((module, param, a if layer is None else a[layer], b if layer is None else b[layer]))
            if param is None:
                modules.add(_in_layer(module))
            else:
                params.add(_in_layer(f"{module}.{param}"))
                experts.setdefault(module, []).append(param)
    for module, param, a, b in slices:
        if param is None:  # A [in, r] -> lora_A [r, in]; B [r, out] -> lora_B [out, r]
            key, la, lb = module, a.T, b.T
        else:  # A [E, in, r] -> [E * r, in], row e * r + k; B [E, r, out] -> [out, r * E], column k * E + e
            targeted = [q for q in EXPERT_PARAMS if q in experts[module]]
            key = _nesting(module, targeted, param)
            la = a.transpose(0, 2, 1).reshape(-1, a.shape[1])
            lb = b.transpose(2, 1, 0).reshape(b.shape[2], -1)
        tensors[f"{PREFIX}{key}.lora_A.weight"] = np.ascontiguousarray(la)
        tensors[f"{PREFIX}{key}.lora_B.weight"] = np.ascontiguousarray(lb)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "r": rank, "lora_alpha": alpha, "target_modules": sorted(modules), "target_parameters": sorted(params) or None,
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "lora_bias": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    out = Path(path)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------- reading
def read_config(path: str | os.PathLike) -> dict:
    """adapter_config.json of a PEFT LoRA adapter directory, checked: one error naming the field otherwise."""
    d = Path(path)
    f = d / CONFIG_FILE
    if not d.is_dir() or not f.is_file():
        raise CheckpointError(f"{d}: not a PEFT adapter directory (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not readable JSON ({e})") from None
    where = f"{f}:"
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{where} peft_type is {cfg.get('peft_type')!r}; only LoRA adapters (\"LORA\") load here")
    for field in _MUST_BE_OFF:
        if cfg.get(field):
            raise CheckpointError(f"{where} {field}={cfg[field]!r} is not supported (only plain LoRA: W + "
                                  "lora_alpha / r * B @ A); use an adapter trained without it")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{where} bias={cfg['bias']!r} is not supported (the adapter would train biases); "
                              "only bias=\"none\" loads here")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise CheckpointError(f"{where} init_lora_weights={init!r} changes the base weights when peft builds the "
                              "adapter; convert it to a plain LoRA first (peft: save_pretrained(..., "
                              "path_initial_model_for_weight_conversion=...))")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{where} r must be a positive integer and lora_alpha a number, got r={r!r}, "
                              f"lora_alpha={alpha!r}")
    return cfg


def scale_of(cfg: dict) -> float:
    """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    return cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])


def _targets_param(cfg: dict, name: str) -> bool:
    """Whether PEFT's `target_parameters` matching (a name equal to, or ending in `.` + an entry) takes `name`."""
    return any(name == t or name.endswith("." + t) for t in cfg.get("target_parameters") or ())


def read_adapter(path: str | os.PathLike, model: nnx.Module) -> tuple[dict[str, dict], float]:
    """(adapters {parameter path: {"a": A, "b": B}} as float32 numpy arrays in our layout, scale) of the PEFT LoRA
    adapter directory `path` for `model` (a `Mistral3ForConditionalGeneration`). Layers an adapter leaves out
    get zero factors. Raises CheckpointError naming the field or tensor that does not fit."""
    d = Path(path)
    cfg = read_config(d)
    r = cfg["r"]
    f = d / WEIGHTS_FILE
    if not f.is_file():
        other = sorted(p.name for p in d.glob("adapter_model*"))
        raise CheckpointError(f"{d}: no {WEIGHTS_FILE}" + (f" ({', '.join(other)}: pickle files are never opened; "
                                                           "save the adapter with safe_serialization=True)"
                                                           if other else ""))
    mcfg = model.config
    state = nnx.state(model, nnx.Param)
    params = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
    file = SafetensorsFile(f)
    factors: dict[tuple[str, int | None], dict[str, np.ndarray]] = {}
    try:
        for key in file.keys():
            m = re.fullmatch(re.escape(PREFIX) + r"(?P<module>.+)\.lora_(?P<ab>[AB])\.weight", key)
            if not m:
                raise CheckpointError(f"{f}: tensor {key!r} is not a LoRA factor (expected "
                                      f"{PREFIX}<module>.lora_A.weight / .lora_B.weight)")
            module = m["module"]
            depth = module.count(".base_layer")
            module = module.replace(".base_layer", "")
            slot, kind = _slot(module, depth, cfg, mcfg, params, key, f)
            x = np.asarray(file.get(key), np.float32)
            shape = tuple(params[slot.path].shape)
            per = shape if slot.layer is None else shape[1:]
            e = per[0] if kind == "experts" else 1
            want = (e * r, per[-2]) if m["ab"] == "A" else (per[-1], r * e)
            if x.shape != want:
                raise CheckpointError(f"{f}: tensor {key!r} has shape {list(x.shape)}, expected {list(want)} (r={r} "
                                      f"from {CONFIG_FILE}, {slot.path} of shape {list(shape)})")
            if kind == "experts":  # [E * r, in] -> [E, in, r]; [out, r * E] -> [E, r, out]
                ours = (x.reshape(e, r, -1).transpose(0, 2, 1) if m["ab"] == "A"
                        else x.reshape(-1, r, e).transpose(2, 1, 0))
            else:
                ours = x.T
            factors.setdefault((slot.path, slot.layer), {})[m["ab"].lower()] = ours
    finally:
        file.close()
    if not factors:
        raise CheckpointError(f"{f}: holds no LoRA factors")
    adapters: dict[str, dict] = {}
    for (p, layer), ab in factors.items():
        if set(ab) != {"a", "b"}:
            raise CheckpointError(f"{f}: {p} (layer {layer}) has lora_{'A' if 'a' in ab else 'B'} but not "
                                  f"lora_{'B' if 'a' in ab else 'A'}")
        shape = tuple(params[p].shape)
        if p not in adapters:
            adapters[p] = {"a": np.zeros((*shape[:-1], r), np.float32), "b": np.zeros((*shape[:-2], r, shape[-1]),
                                                                                     np.float32)}
        for k in "ab":
            if layer is None:
                adapters[p][k][...] = ab[k]
            else:
                adapters[p][k][layer] = ab[k]
    return adapters, scale_of(cfg)


def _slot(module: str, depth: int, cfg: dict, mcfg: ModelConfig, params: dict, key: str, f: Path):
    """(the slot a PEFT module's factors adapt, "linear" or "experts"), or one error naming the tensor."""
    def refuse(why: str):
        return CheckpointError(f"{f}: tensor {key!r} adapts {module}, {why}; LoRA targets here are the text decoder's "
                               "attention projections, shared experts, routed experts (mlp.experts.gate_up_proj / "
                               "down_proj) and dense-layer MLPs")

    targeted = [q for q in EXPERT_PARAMS if _targets_param(cfg, f"{module}.{q}")]
    if targeted:  # a module whose 3-D parameters PEFT adapts (target_parameters), one wrapper per parameter
        if depth >= len(targeted):
            raise refuse(f"nested {depth} deep while target_parameters names {len(targeted)} of its parameters")
        kind, slot = "experts", names.slot_of(f"{module}.{targeted[len(targeted) - 1 - depth]}", mcfg, None)
    else:
        kind, slot = "linear", names.slot_of(module + ".weight", mcfg, None) if depth == 0 else None
    if slot is None or (isinstance(slot, names.Slot) and slot.transform is not (names.EXPERTS if kind == "experts"
                                                                                else names.LINEAR)):
        raise refuse("which this model does not have as a Linear module or fused experts")
    if slot == names.SKIP or slot.path not in params or not params[slot.path].get_metadata().get("lora"):
        raise refuse("which is not a LoRA target" + ("" if slot == names.SKIP else f" (our {slot.path})"))
    return slot, kind


# ---------------------------------------------------------------------- applying
def apply_adapter(model: nnx.Module, adapters: dict[str, dict], scale: float, mesh=None,
                  donate: bool = False) -> nnx.Module:
    """`model` with the adapters applied. A plain (bf16 / float32) weight gets W + scale * A @ B merged in its dtype,
    so the model runs as fast as the base; a quantised one (FP8) stays packed and becomes a `LoRAWeight` whose
    W_eff is formed where it is read, one layer at a time inside the layer scan (merging would mean re-quantising
    it, which loses the update, or dequantising the whole model). The factors are float32, split like their weight
    on `mesh`. donate: merge into the base's own buffers (no second copy; `model` is not usable afterwards)."""
    graphdef, state = nnx.split(model)
    axes = shard_lib.param_axes(state) if mesh is not None else {}
    flat = []
    for p, v in nnx.to_flat_state(state):
        path = "/".join(map(str, p))
        ad = adapters.get(path)
        if ad is None:
            flat.append((p, v))
            continue
        a, b = np.asarray(ad["a"], np.float32), np.asarray(ad["b"], np.float32)
        if mesh is not None:  # every process holds the whole file's factors: each places its devices' parts
            sa, sb = shard_lib.adapter_specs(path, axes[path], a.shape, b.shape, mesh)
            a = jax.make_array_from_callback(a.shape, NamedSharding(mesh, sa), lambda i, x=a: x[i])
            b = jax.make_array_from_callback(b.shape, NamedSharding(mesh, sb), lambda i, x=b: x[i])
        else:
            a, b = jnp.asarray(a), jnp.asarray(b)
        w = v.get_value()
        if weights.is_kind(w):
            flat.append((p, v.replace(LoRAWeight(w, a, b, scale))))
        else:
            flat.append((p, v.replace((merge_in_place if donate else merge)(w, a, b, scale))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_adapter(model: nnx.Module, path: str | os.PathLike, mesh=None, donate: bool = False) -> nnx.Module:
    """`model` with the PEFT LoRA adapter directory `path` applied (`read_adapter`, `apply_adapter`)."""
    adapters, scale = read_adapter(path, model)
    return apply_adapter(model, adapters, scale, mesh, donate)
