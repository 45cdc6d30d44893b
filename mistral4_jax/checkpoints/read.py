"""Reading parameters: one slot reader, one stacked-parameter assembler, the abstract model (docs/model.md 2.4).

A slot is a whole unstacked parameter or one layer of a stacked one. `read_slot` is the one way a slot
is read from safetensors: its tensor(s) in on-disk layout, dequantised with their FP8 scale if they have
one (`_piece_scale` is the one place scales are read: per tensor, per expert, block-wise) or from NVFP4
(`nvfp4.dequantize_disk`), then put in our layout by the slot's `names.Transform`, or kept as E4M3 with a
per-output-column scale. `read_packed` reads an NVFP4 slot without dequantising it. `assemble` builds
every stacked parameter layer by layer, in place on its sharding, whether the layers come from
safetensors or from a converted Orbax checkpoint. Which parameters are held in which kind is
`scheme.targets`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from .. import sharding as shard_lib
from ..config import ModelConfig
from ..errors import CheckpointError
from ..memory import check_params_fit, shard_bytes
from ..model import fp8, nvfp4
from ..model.layers import is_stacked
from ..model.mistral3 import Mistral3ForConditionalGeneration
from . import scheme
from .names import EXPERTS, Transform
from .plan import NVFP4, Piece

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


# ---------------------------------------------------------------------- the abstract model
def abstract_model(cfg: ModelConfig, dtype) -> Mistral3ForConditionalGeneration:
    """The module tree with ShapeDtypeStruct leaves: no memory is allocated."""
    return nnx.eval_shape(lambda: Mistral3ForConditionalGeneration(cfg, dtype, rngs=nnx.Rngs(0)))


def flat_params(model: nnx.Module) -> list[tuple[str, nnx.Variable]]:
    """(path, variable) of every parameter, in the module tree's order."""
    return [("/".join(map(str, p)), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    return {path: tuple(v.shape) for path, v in flat_params(model)}


def stacked_paths(model: nnx.Module) -> frozenset[str]:
    """The parameters of a layer stack: those whose own leading logical axis is "layers" (`layers.is_stacked`)."""
    return frozenset(path for path, v in flat_params(model) if is_stacked(v))


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def with_overrides(cfg: ModelConfig, overrides: dict) -> ModelConfig:
    """`cfg` with port switches of the text config replaced (e.g. `apply_yarn_mscale=True`)."""
    if not overrides:
        return cfg
    try:
        return cfg.replace_text(**overrides)
    except TypeError as e:
        raise ValueError(f"unknown config override: {e}") from None


def filled(model: nnx.Module, values: dict) -> nnx.Module:
    """`model` (abstract) with every parameter's value taken from `values` {path: array or Fp8Weight}."""
    graphdef, state = nnx.split(model)
    out = []
    for k, var in nnx.to_flat_state(state):
        value = values["/".join(map(str, k))]
        out.append((k, var.replace(value) if hasattr(var, "replace") else value))
    return nnx.merge(graphdef, nnx.from_flat_state(out))


# ---------------------------------------------------------------------- one slot
def stored_kinds(plan: dict[str, list[Piece]]) -> dict[str, str]:
    """{path: "nvfp4"} of the parameters a checkpoint stores as NVFP4 (every piece packed)."""
    return {path: NVFP4 for path, pieces in plan.items() if pieces and all(p.kind == NVFP4 for p in pieces)}


def keeps_fp8(pieces: list[Piece]) -> bool:
    """Whether a slot can stay E4M3: every piece is an E4M3 kernel with a scale."""
    return all(p.scale is not None and p.transform.kernel and p.file.dtype_name(p.key) == "F8_E4M3" for p in pieces)


def slot_transform(pieces: list[Piece]) -> Transform:
    """The layout transform of a slot read as one tensor: per-expert tensors are read as fused experts."""
    return EXPERTS if pieces[0].transform.per_expert else pieces[0].transform


def _piece_scale(piece: Piece, rows: slice) -> np.ndarray:
    """The float32 multiplier that dequantises `piece`, broadcastable to its on-disk tensor (fused experts:
    to its `rows`); 1 when it has no scale. The one place FP8 scales are read: per tensor (one value), per
    expert (one per row of fused experts), block-wise ([ceil(out/b), ceil(in/b)], expanded to [out, in])."""
    shape = piece.file.shape(piece.key)
    if piece.scale is None or piece.kind == NVFP4:
        return np.ones((1,) * len(shape), np.float32)
    s = np.asarray(piece.scale[0].get(piece.scale[1]), np.float32)
    if s.size == 1:
        return s.reshape((1,) * len(shape))
    if piece.transform is EXPERTS and s.size == shape[0]:
        return s.reshape(-1)[rows].reshape(-1, *([1] * (len(shape) - 1)))
    if s.ndim == 2 and len(shape) == 2:
        bo, bi = -(-shape[0] // s.shape[0]), -(-shape[1] // s.shape[1])
        return np.repeat(np.repeat(s, bo, 0), bi, 1)[: shape[0], : shape[1]]
    raise CheckpointError(f"{piece.file.path}: scale {piece.scale[1]!r} of shape {list(s.shape)} does not fit "
                          f"tensor {piece.key!r} of shape {list(shape)}")


def block_scaled(pieces: list[Piece]) -> bool:
    """Whether a piece of the slot has block-wise scales (not one per tensor or per expert)."""
    return any(p.scale is not None and p.kind != NVFP4 and _piece_scale(p, slice(None)).shape[-1] != 1 for p in pieces)


def _per_expert(pieces: list[Piece], experts: range) -> list[list[Piece]]:
    """Per-expert pieces by expert, each expert's halves in order (gate before up)."""
    by = {(p.expert, p.transform.half): p for p in pieces}
    halves = (0, 1) if pieces[0].transform.half is not None else (None,)
    return [[by[(e, h)] for h in halves] for e in experts]


def _stack_rows(blocks: list[list[np.ndarray]]) -> np.ndarray:
    """[[a, b], ...] -> [concat(a, b) along rows, ...] stacked: per-expert tensors in the fused layout."""
    return np.stack([b[0] if len(b) == 1 else np.concatenate(b, axis=0) for b in blocks])


def _tensor(p: Piece, rows: slice = slice(None)) -> np.ndarray:
    """A piece's tensor in on-disk layout (the `rows` of a fused one); NVFP4 codes come back dequantised to
    float32 [out, in], exactly as compressed-tensors decompresses them."""
    if p.kind == NVFP4:
        return nvfp4.dequantize_disk(p.file.read(p.key), p.scale[0].read(p.scale[1]),
                                     p.global_scale[0].read(p.global_scale[1]))
    return p.file.read(p.key, rows)


def _disk_slot(pieces: list[Piece], slot_shape: tuple[int, ...], experts: slice) -> tuple[np.ndarray, np.ndarray | None]:
    """The slot's tensor(s) as one array in on-disk layout (per-expert ones stacked into the fused
    [E, out, in]), restricted to `experts` for expert slots, and its scale (None: nothing is scaled)."""
    first = pieces[0]
    scaled = any(p.scale is not None and p.kind != NVFP4 for p in pieces)
    if not first.transform.per_expert:
        rows = experts if first.transform is EXPERTS else slice(None)
        return _tensor(first, rows), _piece_scale(first, rows) if scaled else None
    blocks = _per_expert(pieces, range(*experts.indices(slot_shape[0])))
    x = _stack_rows([[_tensor(p) for p in b] for b in blocks])
    if not scaled:
        return x, None
    scales = [[_piece_scale(p, slice(None)) for p in b] for b in blocks]
    cols = 1 if all(s.shape[-1] == 1 for b in scales for s in b) else x.shape[-1]
    return x, _stack_rows([[np.broadcast_to(s, (p.file.shape(p.key)[0], cols)) for p, s in zip(b, bs)]
                           for b, bs in zip(blocks, scales)])


@partial(jax.jit, static_argnames=("transform", "dtype"))
def to_layout(x, scale, transform: Transform, dtype):
    """(x * scale in float32, if scaled) in our layout, in `dtype`. XLA does the casts and transposes:
    numpy's float8 casts and strided 1-byte transposes are an order of magnitude slower."""
    if scale is not None:
        x = x.astype(jnp.float32) * scale
    return transform.to_ours(x).astype(dtype)


def read_slot(pieces: list[Piece], slot_shape: tuple[int, ...], dtype, *, keep_fp8: bool = False,
              experts: slice = slice(None)) -> tuple[jax.Array, np.ndarray | None]:
    """One slot in our layout, as a host (CPU) array: (value, None), dequantised to `dtype`.

    keep_fp8: an E4M3 kernel with per-tensor / per-expert scales comes back as it is stored, as
    (E4M3 value, float32 scale `fp8.scale_shape(slot_shape)` per output column); any other slot is still
    dequantised to `dtype`. experts: for expert slots, the range of experts to read (leading axis)."""
    transform = slot_transform(pieces)
    x, scale = _disk_slot(pieces, slot_shape, experts)
    # Per output column: the scale is constant along the on-disk input axis (the last).
    column = keep_fp8 and keeps_fp8(pieces) and scale.shape[-1] == 1
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        if column:
            s = np.broadcast_to(scale.transpose(transform.perm), fp8.scale_shape(slot_shape))
            return to_layout(x, None, transform, E4M3), np.ascontiguousarray(s, np.float32)
        return to_layout(x, scale, transform, np.dtype(dtype)), None


def read_packed(pieces: list[Piece], slot_shape: tuple[int, ...],
                experts: slice = slice(None)) -> tuple[jax.Array, jax.Array, jax.Array]:
    """An NVFP4 slot kept packed, in our layout, as host arrays (`nvfp4.Nvfp4Weight`'s leaves): codes uint8
    [..., in/2, out], block scales as E4M3 bits uint8 [..., in/16, out] and the global scale float32
    [..., 1, out] (each matrix's divisor over its own output columns: w1's over the gate half of a fused
    gate_up, w3's over the up half). The three go through the slot's layout transform as the matrix would."""
    transform = slot_transform(pieces)

    def leaves(p: Piece) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        codes = p.file.read(p.key)
        g = np.asarray(p.global_scale[0].read(p.global_scale[1]), np.float32).reshape(())
        return codes, fp8.bits(p.scale[0].read(p.scale[1])), np.full((codes.shape[0], 1), g, np.float32)

    if pieces[0].transform.per_expert:
        per = [[leaves(p) for p in b] for b in _per_expert(pieces, range(*experts.indices(slot_shape[0])))]
        disk = [_stack_rows([[lv[i] for lv in b] for b in per]) for i in range(3)]
    else:
        disk = leaves(pieces[0])
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return tuple(to_layout(x, None, transform, x.dtype) for x in disk)


def slot_pieces(pieces: list[Piece], layer: int | None) -> list[Piece]:
    return pieces if layer is None else [p for p in pieces if p.layer == layer]


# ---------------------------------------------------------------------- whole parameters
@partial(jax.jit, donate_argnums=0)
def _set_layer(stack, value, layer):
    return jax.lax.dynamic_update_index_in_dim(stack, value, layer, 0)


def assemble(into: dict, path: str, layer: int | None, value: jax.Array, shape: tuple[int, ...], sharding) -> None:
    """The one stacked-parameter assembler: into[path] = value for an unstacked parameter (layer None);
    otherwise layer `layer` of the parameter of full `shape`, allocated as zeros on `sharding` at its first
    layer and updated in place (donated), so host and device hold at most one extra layer."""
    if layer is None:
        into[path] = value
        return
    if path not in into:
        # made in place on the device(s) (jnp.zeros compiles one cached program per shape and sharding; a
        # new jax.jit here compiled again for every parameter of every load)
        into[path] = jnp.zeros(shape, value.dtype, device=sharding)
    into[path] = _set_layer(into[path], value, layer)


def _normalize(index, shape) -> tuple[slice, ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def _device_slice(pieces: list[Piece], slot_shape: tuple[int, ...], dtype, index) -> np.ndarray:
    """The part `index` of a dequantised slot that one device holds; of an expert slot only the
    experts of `index` are read."""
    index = _normalize(index, slot_shape)
    if slot_transform(pieces) is EXPERTS:
        value, _ = read_slot(pieces, slot_shape, dtype, experts=index[0])
        return np.ascontiguousarray(np.asarray(value)[(slice(None), *index[1:])])
    value, _ = read_slot(pieces, slot_shape, dtype)
    return np.ascontiguousarray(np.asarray(value)[index])


def layers_of(shape: tuple[int, ...], stacked: bool) -> list[int | None]:
    """The slots of a parameter: each layer of a stacked one, or the whole (None)."""
    return list(range(shape[0])) if stacked else [None]


def _placed(x: np.ndarray, sharding) -> jax.Array:
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _read_param(into: dict, path: str, pieces: list[Piece], shape: tuple[int, ...], stacked: bool, dtype,
                sharding) -> None:
    """Parameter `path` dequantised onto its sharding; each process reads only the slices its devices hold."""
    np_dtype = np.dtype(dtype)
    for layer in layers_of(shape, stacked):
        slot_shape = shape if layer is None else shape[1:]
        slot_sharding = sharding if layer is None else shard_lib.drop_leading_axis(sharding)
        ps = slot_pieces(pieces, layer)
        value = jax.make_array_from_callback(slot_shape, slot_sharding,
                                             lambda idx, ps=ps, ss=slot_shape: _device_slice(ps, ss, np_dtype, idx))
        assemble(into, path, layer, value, shape, sharding)


def _read_fp8_param(path: str, pieces: list[Piece], shape: tuple[int, ...], stacked: bool, dtype,
                    sharding) -> fp8.Fp8Weight:
    """An FP8-target parameter as an `Fp8Weight` on its sharding: E4M3 sources with per-tensor / per-expert
    scales keep their exact values and scales; anything else is read in float32 and quantised per output
    column (`fp8.quantize`)."""
    qsh, ssh = sharding, fp8.scale_sharding(sharding)
    q_all: dict = {}
    s_all: dict = {}
    for layer in layers_of(shape, stacked):
        slot_shape = shape if layer is None else shape[1:]
        q, s = read_slot(slot_pieces(pieces, layer), slot_shape, np.float32, keep_fp8=True)
        if s is None:
            w = fp8.quantize(jnp.asarray(q))
            q, s = w.q, w.scale
        at = (lambda sh: sh) if layer is None else shard_lib.drop_leading_axis
        assemble(q_all, path, layer, _placed(fp8.bits(np.asarray(q)), at(qsh)), shape, qsh)
        assemble(s_all, path, layer, _placed(s, at(ssh)), fp8.scale_shape(shape), ssh)
    return fp8.Fp8Weight(q_all[path], s_all[path], jnp.dtype(dtype).name)


EXPERT_CHUNK = 16  # experts quantised to NVFP4 at a time: bounds the float32 copy of a layer's experts


def column_groups(path: str) -> int:
    """How many of the release's matrices sit side by side in a kernel's columns: the fused gate_up holds a
    gate matrix (w1) and an up matrix (w3), each with its own NVFP4 global scale."""
    return 2 if path.endswith("/experts/gate_up_proj") else 1


_quantize_nvfp4 = jax.jit(nvfp4.quantize, static_argnums=(1, 2))


def nvfp4_slot(path: str, pieces: list[Piece], slot_shape: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """One slot as NVFP4 leaves (host arrays): an NVFP4 source as stored (`read_packed`), any other read in
    float32 and quantised (`nvfp4.quantize`, experts a few at a time)."""
    if all(p.kind == NVFP4 for p in pieces):
        return read_packed(pieces, slot_shape)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        if slot_transform(pieces) is not EXPERTS:
            w = _quantize_nvfp4(read_slot(pieces, slot_shape, np.float32)[0], jnp.float32, column_groups(path))
            return w.codes, w.scales, w.global_scale
        parts = []
        for e in range(0, slot_shape[0], EXPERT_CHUNK):
            x, _ = read_slot(pieces, slot_shape, np.float32, experts=slice(e, e + EXPERT_CHUNK))
            w = _quantize_nvfp4(x, jnp.float32, column_groups(path))
            parts.append((np.asarray(w.codes), np.asarray(w.scales), np.asarray(w.global_scale)))
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def _read_nvfp4_param(path: str, pieces: list[Piece], shape: tuple[int, ...], stacked: bool, dtype,
                      sharding) -> nvfp4.Nvfp4Weight:
    """A parameter held as NVFP4 on its sharding (`nvfp4_slot` per layer)."""
    shardings = nvfp4.leaf_shardings(sharding, shape)
    full = nvfp4.packed_shapes(shape)
    acc: list[dict] = [{}, {}, {}]
    for layer in layers_of(shape, stacked):
        slot_shape = shape if layer is None else shape[1:]
        leaves = nvfp4_slot(path, slot_pieces(pieces, layer), slot_shape)
        for into, leaf, sh, fs in zip(acc, leaves, shardings, full):
            at = sh if layer is None else shard_lib.drop_leading_axis(sh)
            assemble(into, path, layer, _placed(np.asarray(leaf), at), fs, sh)
    return nvfp4.Nvfp4Weight(*(a[path] for a in acc), jnp.dtype(dtype).name)


def bytes_per_device(model: nnx.Module, shardings: dict, targets: dict[str, str]) -> int:
    """What one device will hold of the abstract `model`'s parameters laid out by `shardings`, those of
    `targets` ({path: kind}) as that kind's leaves."""
    total = 0
    for path, var in flat_params(model):
        value = scheme.abstract(targets.get(path), tuple(var.shape), var.dtype, shardings[path])
        total += sum(shard_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(value))
    return total


def planned_shardings(model: nnx.Module, mesh, targets: dict[str, str], where) -> dict:
    """The parameter shardings of loading `model` onto `mesh`, after checking that the parameters, those of
    `targets` held quantised, fit the device (`memory.check_params_fit`; `where` names the checkpoint)."""
    shardings = shard_lib.param_shardings(model, mesh)
    check_params_fit(bytes_per_device(model, shardings, targets), f"the parameters of {where}")
    return shardings


def read_values(model: nnx.Module, plan: dict[str, list[Piece]], dtype, shardings: dict, targets: dict[str, str],
                paths=None) -> dict:
    """{path: value} of the parameters `paths` (default all) read from the `plan` onto their shardings, each
    held as the kind `targets` names (a plain array in its dtype when none)."""
    values: dict = {}
    for path, var in flat_params(model):
        if paths is not None and path not in paths:
            continue
        shape, stacked, kind = tuple(var.shape), is_stacked(var), targets.get(path)
        if kind == "fp8":
            values[path] = _read_fp8_param(path, plan[path], shape, stacked, dtype, shardings[path])
        elif kind == NVFP4:
            values[path] = _read_nvfp4_param(path, plan[path], shape, stacked, dtype, shardings[path])
        else:
            _read_param(values, path, plan[path], shape, stacked, var.dtype, shardings[path])
    return values


def read_params(model: nnx.Module, plan: dict[str, list[Piece]], dtype, mesh, weights,
                where="the checkpoint") -> nnx.Module:
    """The abstract `model` with every parameter read from the `plan` onto its sharding (the logical axes the
    parameter declares), each in the kind `scheme.targets` gives it for `weights`."""
    targets = scheme.targets(flat_params(model), weights, stored_kinds(plan))
    shardings = planned_shardings(model, mesh, targets, where)
    return filled(model, read_values(model, plan, dtype, shardings, targets))
