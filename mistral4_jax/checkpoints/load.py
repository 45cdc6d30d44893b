"""`from_pretrained`: an HF-layout checkpoint directory -> a Flax NNX model (spec 2.2, 2.4).

The mapping is a rename table: each on-disk tensor name (after stripping one of the known prefixes)
matches one rule, which says which parameter of the module tree it fills, which slot of it (layer,
expert, gate/up half) and how its layout changes. Everything is validated before any tensor is
read, and all problems are reported in one error. Tensors are read lazily, one parameter slot at a
time; FP8 weights are dequantised with their own per-tensor (or per-expert) scale.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import sharding as shard_lib
from ..config import ModelConfig
from ..errors import CheckpointError
from ..model.mistral3 import Mistral3ForConditionalGeneration
from .safetensors_io import FP8, SafetensorsFile, check_shard_numbers, indexed_shards

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# On-disk prefix -> part of the model. Released files use the first form of each pair, transformers 5
# (in memory, and `save_pretrained`) the second. "model." alone is a text-only Mistral4ForCausalLM.
PREFIXES = [
    ("language_model.model.", "text"), ("model.language_model.", "text"),
    ("language_model.lm_head.", "head"), ("lm_head.", "head"),
    ("vision_tower.", "vision"), ("model.vision_tower.", "vision"),
    ("multi_modal_projector.", "projector"), ("model.multi_modal_projector.", "projector"),
    ("model.", "text"),
]

# Tensors that carry no information for a bf16/fp32 forward (static FP8 activation scales, buffers).
IGNORED = re.compile(r"(\.activation_scale|_activation_scale|\.input_scale|\.qscale_act|rotary_emb\.inv_freq)$")

_ATTN = r"q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj"
# (part, name regex, target parameter path, kind). "{stack}" is the text layer stack of the layer.
RULES: list[tuple[str, str, str, str]] = [
    ("text", r"embed_tokens\.weight", "language_model/embed_tokens/embedding", "copy"),
    ("text", r"norm\.weight", "language_model/norm/weight", "copy"),
    ("text", r"layers\.(?P<l>\d+)\.(?P<m>input_layernorm|post_attention_layernorm)\.weight", "{stack}/{m}/weight", "copy"),
    ("text", r"layers\.(?P<l>\d+)\.self_attn\.(?P<m>q_a_layernorm|kv_a_layernorm)\.weight", "{stack}/self_attn/{m}/weight", "copy"),
    ("text", rf"layers\.(?P<l>\d+)\.self_attn\.(?P<m>{_ATTN})\.weight", "{stack}/self_attn/{m}/kernel", "linear"),
    ("text", rf"layers\.(?P<l>\d+)\.self_attn\.(?P<m>{_ATTN})\.bias", "{stack}/self_attn/{m}/bias", "copy"),
    ("text", r"layers\.(?P<l>\d+)\.mlp\.gate\.weight", "{stack}/mlp/gate/kernel", "linear"),
    ("text", r"layers\.(?P<l>\d+)\.mlp\.shared_experts\.(?P<m>gate_proj|up_proj|down_proj)\.weight",
     "{stack}/mlp/shared_experts/{m}/kernel", "linear"),
    ("text", r"layers\.(?P<l>\d+)\.mlp\.(?P<m>gate_proj|up_proj|down_proj)\.weight", "{stack}/mlp/{m}/kernel", "linear"),
    ("text", r"layers\.(?P<l>\d+)\.mlp\.experts\.(?P<m>gate_up_proj|down_proj)", "{stack}/mlp/experts/{m}", "experts"),
    ("text", r"layers\.(?P<l>\d+)\.mlp\.experts\.(?P<e>\d+)\.(?P<m>gate_proj|up_proj)\.weight",
     "{stack}/mlp/experts/gate_up_proj", "expert_{m}"),
    ("text", r"layers\.(?P<l>\d+)\.mlp\.experts\.(?P<e>\d+)\.down_proj\.weight", "{stack}/mlp/experts/down_proj",
     "expert_down_proj"),
    ("head", r"weight", "lm_head/kernel", "linear"),
    ("vision", r"patch_conv\.weight", "vision_tower/patch_conv/kernel", "conv"),
    ("vision", r"ln_pre\.weight", "vision_tower/ln_pre/weight", "copy"),
    ("vision", r"transformer\.layers\.(?P<l>\d+)\.attention\.(?P<m>[qkvo]_proj)\.weight",
     "vision_tower/transformer/layers/attention/{m}/kernel", "linear"),
    ("vision", r"transformer\.layers\.(?P<l>\d+)\.(?P<m>attention_norm|ffn_norm)\.weight",
     "vision_tower/transformer/layers/{m}/weight", "copy"),
    ("vision", r"transformer\.layers\.(?P<l>\d+)\.feed_forward\.(?P<m>gate_proj|up_proj|down_proj)\.weight",
     "vision_tower/transformer/layers/feed_forward/{m}/kernel", "linear"),
    ("projector", r"norm\.weight", "multi_modal_projector/norm/weight", "copy"),
    ("projector", r"patch_merger\.merging_layer\.weight", "multi_modal_projector/patch_merger/merging_layer/kernel",
     "linear"),
    ("projector", r"(?P<m>linear_1|linear_2)\.weight", "multi_modal_projector/{m}/kernel", "linear"),
    ("projector", r"(?P<m>linear_1|linear_2)\.bias", "multi_modal_projector/{m}/bias", "copy"),
]
_COMPILED = [(part, re.compile(rx + r"$"), target, kind) for part, rx, target, kind in RULES]

# The inverse, for writing (transformers 5 names): module-tree prefix -> HF prefix. The tree mirrors the
# HF names, so below a prefix only the layer index and the leaf name (and layout) change.
EXPORT_PREFIXES = [("language_model/", "model.language_model."), ("lm_head/", "lm_head."),
                   ("vision_tower/", "model.vision_tower."),
                   ("multi_modal_projector/", "model.multi_modal_projector.")]
TEXT_ONLY_EXPORT_PREFIXES = [("language_model/", "model."), ("lm_head/", "lm_head.")]


def hf_tensor_name(path: str, layer: int | None, cfg: ModelConfig) -> tuple[str, str]:
    """(HF tensor name, kind) of parameter `path` (layer `layer` of a stacked one); kind as in RULES."""
    prefixes = EXPORT_PREFIXES if cfg.vision is not None else TEXT_ONLY_EXPORT_PREFIXES
    head, hf = next((a, b) for a, b in prefixes if path.startswith(a))
    rest = path[len(head):]
    if layer is not None:
        stack, rest = re.match(r"(.*?)(?:dense_layers|layers)/(.*)$", rest).groups()
        k = cfg.text.first_k_dense_replace if "/layers/" in path and path.startswith("language_model/") else 0
        rest = f"{stack}layers/{layer + k}/{rest}"
    parts = rest.split("/")
    leaf = parts[-1]
    if leaf in ("gate_up_proj", "down_proj") and parts[:-1][-1:] == ["experts"]:
        kind = "experts"
    elif leaf == "kernel":
        kind, parts[-1] = ("conv" if parts[:-1][-1:] == ["patch_conv"] else "linear"), "weight"
    elif leaf == "embedding":
        kind, parts[-1] = "copy", "weight"
    else:
        kind = "copy"
    return hf + ".".join(parts), kind


def to_hf_layout(kind: str, x: np.ndarray) -> np.ndarray:
    """Our layout -> the on-disk one (the inverse of `_slot_value`'s transforms)."""
    if kind == "linear":
        return x.T
    if kind == "conv":  # [p, p, C, D] -> [D, C, p, p]
        return np.transpose(x, (3, 2, 0, 1))
    if kind == "experts":  # [E, in, out] -> [E, out, in]
        return np.swapaxes(x, 1, 2)
    return x


@dataclass(frozen=True)
class Piece:
    """One on-disk tensor and the slot of a parameter it fills."""

    file: SafetensorsFile
    key: str
    kind: str
    layer: int | None = None  # index into the parameter's stacked axis
    expert: int | None = None
    scale: tuple[SafetensorsFile, str] | None = None


# ---------------------------------------------------------------------- finding the files
def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The .safetensors files of an HF checkpoint directory (index-listed shards or every file)."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory (expected a checkpoint directory with config.json and "
                              "*.safetensors files)")
    index = d / "model.safetensors.index.json"
    if index.exists():
        return indexed_shards(index)
    files = sorted(d.glob("*.safetensors"))
    hf_files = [f for f in files if not f.name.startswith("consolidated")]
    if hf_files and (d / "params.json").exists():  # a full snapshot: the native copy sits beside the HF one
        files = hf_files
    if not files:
        pickled = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise CheckpointError(f"{d}: only pickle files ({', '.join(pickled)}) found; they are never loaded "
                                  "(unpickling runs code). Save the weights as .safetensors")
        raise CheckpointError(f"{d}: no *.safetensors weight files found")
    return check_shard_numbers(files)


def load_config(path: str | os.PathLike) -> ModelConfig:
    if not Path(path).is_dir():
        raise CheckpointError(f"{Path(path)}: not a directory (expected a checkpoint directory with config.json "
                              "and *.safetensors files)")
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{Path(path)}: no config.json (expected an HF-layout checkpoint directory)")
    return ModelConfig.from_json_file(cfg_path)


# ---------------------------------------------------------------------- the plan
def _split_prefix(name: str) -> tuple[str, str] | None:
    for prefix, part in PREFIXES:
        if name.startswith(prefix):
            return part, name[len(prefix):]
    return None


def _scale_for(name: str, index: dict[str, SafetensorsFile]):
    stem = name[: -len(".weight")] if name.endswith(".weight") else name
    for cand in (f"{stem}.weight_scale_inv", f"{stem}_scale_inv", f"{stem}.weight_scale", f"{stem}_scale",
                 f"{stem}.qscale_weight"):
        if cand in index:
            return index[cand], cand
    return None


def plan_checkpoint(cfg: ModelConfig, index: dict[str, SafetensorsFile], expected: dict[str, tuple], rename=None):
    """Match every tensor to a parameter slot. Returns {param path: [Piece]}; raises listing all problems.

    rename: maps an on-disk name to its HF name (None: not a weight) for layouts with other names, as the
    native one (`mistral4_jax.native`); pieces and messages keep the on-disk name."""
    t = cfg.text
    k = t.first_k_dense_replace
    n_vision = None
    if cfg.vision is not None and "vision_tower/transformer/layers/attention_norm/weight" in expected:
        n_vision = expected["vision_tower/transformer/layers/attention_norm/weight"][0]
    plan: dict[str, list[Piece]] = {}
    unexpected, used_scales = [], set()
    for name, f in index.items():
        if IGNORED.search(name) or re.search(r"(weight_scale_inv|_scale_inv|weight_scale|_proj_scale|qscale_weight)$", name):
            continue
        hf_name = rename(name) if rename is not None else name
        split = _split_prefix(hf_name) if hf_name is not None else None
        piece = None
        if split is not None:
            part, rest = split
            for rpart, rx, target, kind in _COMPILED:
                m = rpart == part and rx.match(rest)
                if not m:
                    continue
                g = m.groupdict()
                layer = int(g["l"]) if g.get("l") is not None else None
                fmt = dict(g)
                if part == "text" and layer is not None:
                    if layer >= t.num_hidden_layers:
                        break
                    fmt["stack"] = "language_model/dense_layers" if layer < k else "language_model/layers"
                    layer = layer if layer < k else layer - k
                if part == "vision" and layer is not None and (n_vision is None or layer >= n_vision):
                    piece = "skip"  # a block after vision_feature_layer: never used
                    break
                path = target.format(**fmt)
                if path not in expected:
                    break
                scale = _scale_for(name, index) if f.dtype_name(name) in FP8 else None
                if scale is not None:
                    used_scales.add(scale[1])
                piece = Piece(f, name, kind.format(**fmt), layer, int(g["e"]) if g.get("e") is not None else None, scale)
                plan.setdefault(path, []).append(piece)
                break
        # An empty tensor with no slot is a zero-width module (n_shared_experts = 0): nothing to load.
        if piece is None and 0 not in f.shape(name):
            unexpected.append(name)
    if "lm_head/kernel" not in plan and cfg.tie_word_embeddings and "language_model/embed_tokens/embedding" in plan:
        emb = plan["language_model/embed_tokens/embedding"][0]
        plan["lm_head/kernel"] = [dataclasses.replace(emb, kind="tied")]
    problems = _check_plan(cfg, plan, expected)
    for name in unexpected:
        problems.append(f"unexpected tensor {name!r} in {index[name].path}")
    if problems:
        raise CheckpointError(f"checkpoint does not match the config ({len(problems)} problems):\n  "
                              + "\n  ".join(problems[:200]) + ("\n  ..." if len(problems) > 200 else ""))
    return plan


def _source_shape(kind: str, slot_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The on-disk shape that fills a parameter slot of `slot_shape` (per layer, unstacked)."""
    if kind in ("linear", "tied"):
        return tuple(reversed(slot_shape))
    if kind == "conv":  # [p, p, C, D] <- [D, C, p, p]
        return (slot_shape[3], slot_shape[2], slot_shape[0], slot_shape[1])
    if kind == "experts":  # [E, in, out] <- [E, out, in]
        return (slot_shape[0], slot_shape[2], slot_shape[1])
    if kind in ("expert_gate_proj", "expert_up_proj"):  # [E, H, 2I] -> one expert's half: [I, H]
        return (slot_shape[2] // 2, slot_shape[1])
    if kind == "expert_down_proj":  # [E, I, H] -> [H, I]
        return (slot_shape[2], slot_shape[1])
    return slot_shape


def _check_plan(cfg: ModelConfig, plan: dict[str, list[Piece]], expected: dict[str, tuple]) -> list[str]:
    problems = []
    for path, shape in expected.items():
        stacked = _is_stacked(path)
        pieces = plan.get(path, [])
        slot_shape = shape[1:] if stacked else shape
        n_layers = shape[0] if stacked else 1
        for p in pieces:
            src = p.file.shape(p.key)
            want = _source_shape(p.kind, slot_shape)
            if tuple(src) != want:
                problems.append(f"tensor {p.key!r} in {p.file.path} has shape {list(src)}, expected {list(want)}")
            if p.file.dtype_name(p.key) in FP8 and p.scale is None:
                problems.append(f"FP8 tensor {p.key!r} in {p.file.path} has no weight_scale_inv")
            if p.expert is not None and p.expert >= slot_shape[0]:
                problems.append(f"tensor {p.key!r}: expert {p.expert} >= n_routed_experts ({slot_shape[0]})")
        by_layer: dict[int | None, list[Piece]] = {}
        for p in pieces:
            by_layer.setdefault(p.layer if stacked else None, []).append(p)
        for layer in (range(n_layers) if stacked else [None]):
            got = by_layer.get(layer, [])
            where = f"{path}" + (f" (layer {layer})" if stacked else "")
            if path.endswith("/mlp/experts/gate_up_proj") or path.endswith("/mlp/experts/down_proj"):
                problems += _check_experts(got, slot_shape[0], where)
            elif not got:
                problems.append(f"missing tensor for {where}")
            elif len(got) > 1:
                problems.append(f"{where} is given more than once: {', '.join(p.key for p in got)}")
    return problems


def _check_experts(got: list[Piece], n_experts: int, where: str) -> list[str]:
    fused = [p for p in got if p.kind == "experts"]
    per = [p for p in got if p.kind != "experts"]
    if fused and per:
        return [f"{where}: both fused and per-expert tensors are present"]
    if len(fused) > 1:
        return [f"{where} is given more than once: {', '.join(p.key for p in fused)}"]
    if fused:
        return []
    kinds = ("expert_gate_proj", "expert_up_proj") if where.split(" (")[0].endswith("gate_up_proj") else ("expert_down_proj",)
    have = {(p.expert, p.kind) for p in per}
    if len(have) != len(per):
        return [f"{where}: a per-expert tensor is given more than once"]
    missing = [f"{e}.{kd[len('expert_'):]}" for e in range(n_experts) for kd in kinds if (e, kd) not in have]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        return [f"missing tensor for {where}: experts {shown}"]
    return []


def _is_stacked(path: str) -> bool:
    return "/layers/" in path or "/dense_layers/" in path


# ---------------------------------------------------------------------- reading
def _read(piece: Piece, sel=slice(None)) -> np.ndarray:
    """The tensor (its leading `sel` for fused experts), dequantised to float32 if FP8."""
    x = piece.file.get(piece.key)
    x = x[sel] if piece.kind == "experts" else x
    if piece.scale is None:
        return np.asarray(x)
    s = np.asarray(piece.scale[0].get(piece.scale[1]), dtype=np.float32)
    x = np.asarray(x).astype(np.float32)
    if s.size == 1:
        return x * s.reshape(())
    if piece.kind == "experts":
        return x * s.reshape(-1)[sel].reshape(-1, *([1] * (x.ndim - 1)))
    if s.ndim == 2 and x.ndim == 2:  # block-wise scales [ceil(out/b), ceil(in/b)]
        bo, bi = -(-x.shape[0] // s.shape[0]), -(-x.shape[1] // s.shape[1])
        return x * np.repeat(np.repeat(s, bo, 0), bi, 1)[: x.shape[0], : x.shape[1]]
    raise CheckpointError(f"{piece.file.path}: scale {piece.scale[1]!r} of shape {list(s.shape)} does not fit "
                          f"tensor {piece.key!r} of shape {list(x.shape)}")


def _slot_value(pieces: list[Piece], slot_shape, dtype, index) -> np.ndarray:
    """One layer's (or an unstacked) parameter value, restricted to `index` (a tuple of slices)."""
    first = pieces[0]
    if first.kind in ("experts", "expert_gate_proj", "expert_up_proj", "expert_down_proj"):
        e_sel = index[0]
        experts = range(*e_sel.indices(slot_shape[0]))
        if first.kind == "experts":
            out = np.empty((len(experts), *slot_shape[1:]), dtype)
            for j in range(0, len(experts), 8):  # 8 experts at a time bounds the float32 temporaries
                chunk = slice(experts[j], experts[min(j + 8, len(experts)) - 1] + 1)
                out[j: j + 8] = np.swapaxes(_read(first, chunk), 1, 2).astype(dtype)
            return out[(slice(None), *index[1:])]
        by = {(p.expert, p.kind): p for p in pieces}
        out = np.empty((len(experts), *slot_shape[1:]), dtype)
        half = slot_shape[2] // 2
        for j, e in enumerate(experts):
            if first.kind == "expert_down_proj":
                out[j] = _read(by[(e, "expert_down_proj")]).T.astype(dtype)
            else:
                out[j, :, :half] = _read(by[(e, "expert_gate_proj")]).T.astype(dtype)
                out[j, :, half:] = _read(by[(e, "expert_up_proj")]).T.astype(dtype)
        return out[(slice(None), *index[1:])]
    x = _read(first)
    if first.kind in ("linear", "tied"):
        x = x.T
    elif first.kind == "conv":
        x = np.transpose(x, (2, 3, 1, 0))
    return np.ascontiguousarray(x[index]).astype(dtype)


def _normalize(index, shape) -> tuple[slice, ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def load_param(path: str, pieces: list[Piece], shape, dtype, sharding) -> jax.Array:
    """Build one parameter on its sharding; each process reads only the slices its devices hold.

    A stacked parameter is filled one layer at a time, in place on the device, so host memory
    holds at most one layer's slice of it."""
    np_dtype = np.dtype(dtype)
    if not _is_stacked(path):
        return jax.make_array_from_callback(
            shape, sharding, lambda idx: _slot_value(pieces, shape, np_dtype, _normalize(idx, shape)))
    slot_shape = shape[1:]
    layer_sharding = shard_lib.drop_leading_axis(sharding)
    by_layer: dict[int, list[Piece]] = {}
    for p in pieces:
        by_layer.setdefault(p.layer, []).append(p)
    out = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
    for layer in range(shape[0]):
        value = jax.make_array_from_callback(
            slot_shape, layer_sharding,
            lambda idx, ps=by_layer[layer]: _slot_value(ps, slot_shape, np_dtype, _normalize(idx, slot_shape)))
        out = _set_layer(out, value, layer)
    return out


@partial(jax.jit, donate_argnums=0)
def _set_layer(stack, value, layer):
    return jax.lax.dynamic_update_index_in_dim(stack, value, layer, 0)


# ---------------------------------------------------------------------- public API
def abstract_model(cfg: ModelConfig, dtype) -> Mistral3ForConditionalGeneration:
    """The module tree with ShapeDtypeStruct leaves: no memory is allocated."""
    return nnx.eval_shape(lambda: Mistral3ForConditionalGeneration(cfg, dtype, rngs=nnx.Rngs(0)))


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    return {"/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def index_files(files) -> dict[str, SafetensorsFile]:
    """{tensor name: its file} over `files`; a name in two files is an error."""
    index: dict[str, SafetensorsFile] = {}
    for f in files:
        st = SafetensorsFile(f)
        for name in st.keys():
            if name in index:
                raise CheckpointError(f"tensor {name!r} appears in both {index[name].path} and {st.path}")
            index[name] = st
    return index


def open_safetensors(path: str | os.PathLike, dtype, **config_overrides):
    """(config, abstract model, plan) of an HF or native safetensors directory; nothing is read yet."""
    from . import native

    if native.is_native_dir(path):
        cfg, index, rename = native.open_native(path)
    else:
        cfg, index, rename = load_config(path), index_files(checkpoint_files(path)), None
    if config_overrides:
        try:
            cfg = cfg.replace_text(**config_overrides)
        except TypeError as e:
            raise ValueError(f"unknown config override: {e}") from None
    model = abstract_model(cfg, dtype)
    return cfg, model, plan_checkpoint(cfg, index, param_shapes(model), rename)


def from_pretrained(path: str | os.PathLike, dtype="bfloat16", mesh=None, weights=None, **config_overrides):
    """Load a checkpoint directory into a `Mistral3ForConditionalGeneration` (an `nnx.Module`).

    path: an HF-format directory (`config.json` plus one `.safetensors` file or an index with shards),
    a Mistral-native one (`params.json` plus `consolidated*.safetensors`) or an Orbax checkpoint written
    by `mistral4-jax convert`; FP8 weights are dequantised to `dtype`. mesh: a `jax.sharding.Mesh` to
    shard the parameters over (see `mistral4_jax.sharding`), or None for the default device.
    weights: None, or "fp8" to keep the attention projections, shared / dense MLPs and routed experts as
    E4M3 with float32 per-output-column scales (`mistral4_jax.quant`; about half the bytes of bf16).
    config_overrides: port switches of the text config, e.g. `apply_yarn_mscale=True` or `expert_impl="dense"`.
    """
    from . import orbax as checkpoint
    from ..model import fp8

    mesh = shard_lib.as_auto_mesh(mesh)
    dtype = resolve_dtype(dtype)
    fp8.check_weights(weights)
    if checkpoint.is_orbax_dir(path):
        return checkpoint.restore(path, dtype, mesh, weights, **config_overrides)
    cfg, model, plan = open_safetensors(path, dtype, **config_overrides)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    shardings = shard_lib.param_shardings(state, mesh)
    keep_fp8 = fp8.fp8_paths(state) if weights == "fp8" else set()
    values = []
    for p, var in flat:
        key = "/".join(map(str, p))
        if key in keep_fp8:
            values.append((p, var.replace(checkpoint.load_fp8_param(key, plan[key], tuple(var.shape), dtype,
                                                                    shardings[key]))))
            continue
        arr = load_param(key, plan[key], tuple(var.shape), var.dtype, shardings[key])
        values.append((p, var.replace(arr) if hasattr(var, "replace") else arr))
    state = nnx.from_flat_state(values)
    return nnx.merge(graphdef, state)
