"""The converted checkpoint: parameters as Orbax checkpoints, one per decoder layer (spec 2.4 for FP8).

Layout of a directory written by `mistral4-jax convert`:

    config.json            the HF-layout config (`quantization_config` only when FP8 weights are kept)
    mistral4_jax.json      format marker: dtype, port-switch overrides, every array's shape and dtype
    params/other/          Orbax checkpoint of the unstacked parameters (embeddings, norms, head, projector)
    params/<stack>/<i>/    Orbax checkpoint of layer i of a stacked parameter group, e.g.
                           params/language_model.layers/00003/ (its tree has no leading layer axis)
    tokenizer / processor files copied from the source

Each Orbax tree is {"params": {...}, "scales": {...}}, nested by module path. One checkpoint per layer
is what bounds memory: writing holds one layer, and restoring fills each stacked parameter layer by
layer on its target sharding (Orbax reads only the slices each process's devices hold).

FP8 (`dtype` "float8"): a weight stored as E4M3 on disk stays E4M3 (the others keep their source dtype) and gets a float32 scale of the
kernel's shape with the input axis set to 1 (`[..., 1, out]`): W = f32(W_fp8) * scale. Per-output-column
scales represent per-tensor, per-expert and the native per-expert gate/up scales exactly, and suit an
FP8 matmul `(x @ W_fp8) * scale`. `restore` dequantises to the requested dtype, or with weights="fp8" keeps
the parameters tagged `fp8` as `fp8.Fp8Weight`s (E4M3 values and these scales).
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from ..model import fp8
from .. import sharding as shard_lib
from ..config import ModelConfig
from ..errors import CheckpointError
from .load import Piece, _is_stacked, _normalize, _set_layer, _slot_value, abstract_model, resolve_dtype

FORMAT = "mistral4_jax/orbax-layers"
VERSION = 1
MARKER = "mistral4_jax.json"
OTHER = "other"
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_KINDS = ("linear", "experts", "expert_gate_proj", "expert_up_proj", "expert_down_proj")


# ---------------------------------------------------------------------- groups
def stack_of(path: str) -> tuple[str, str] | None:
    """(stack, path inside one layer) of a stacked parameter, e.g. ('language_model/layers', 'mlp/gate/kernel')."""
    if not _is_stacked(path):
        return None
    parts = path.split("/")
    i = max(k for k, p in enumerate(parts) if p in ("layers", "dense_layers"))
    return "/".join(parts[: i + 1]), "/".join(parts[i + 1:])


def groups(shapes: dict[str, tuple[int, ...]]) -> dict[str, list[tuple[str, int | None]]]:
    """{group directory (relative to params/): [(parameter path, layer or None)]}, in loading order."""
    out: dict[str, list[tuple[str, int | None]]] = {OTHER: []}
    for path, shape in shapes.items():
        st = stack_of(path)
        if st is None:
            out[OTHER].append((path, None))
            continue
        for layer in range(shape[0]):
            out.setdefault(group_dir(st[0], layer), []).append((path, layer))
    return out


def group_dir(stack: str, layer: int) -> str:
    return f"{stack.replace('/', '.')}/{layer:05d}"


def tree_key(path: str) -> list[str]:
    st = stack_of(path)
    return (st[1] if st else path).split("/")


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-output-column scale of a kernel `[..., in, out]`: `[..., 1, out]`."""
    return (*shape[:-2], 1, shape[-1])


def _nest(tree: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree: dict, keys: list[str]):
    for k in keys:
        tree = tree[k]
    return tree


# ---------------------------------------------------------------------- reading the source, one slot at a time
def keeps_fp8(pieces: list[Piece]) -> bool:
    """Whether a parameter can stay E4M3: every piece is an E4M3 weight with a scale of a supported kind."""
    return all(p.scale is not None and p.kind in FP8_KINDS and p.file.dtype_name(p.key) == "F8_E4M3" for p in pieces)


def _per_piece_scale(piece: Piece, n: int) -> np.ndarray | None:
    """A piece's scale as n per-leading-axis values (n = 1: per tensor); None if it is neither (block-wise)."""
    s = np.asarray(piece.scale[0].get(piece.scale[1]), np.float32)
    if s.size == 1:
        return np.full((n,), s.reshape(()), np.float32)
    if s.size == n and n > 1:
        return s.reshape(n)
    return None


def slot_scale(pieces: list[Piece], slot_shape: tuple[int, ...]) -> np.ndarray | None:
    """Float32 scale `scale_shape(slot_shape)` of one slot of an FP8 parameter, per output column; None when
    a scale is not per tensor / per expert."""
    s = np.empty(scale_shape(slot_shape), np.float32)
    first = pieces[0]
    if first.kind == "experts":
        v = _per_piece_scale(first, slot_shape[0])
        if v is None:
            return None
        s[...] = v.reshape(-1, 1, 1)
    elif first.kind.startswith("expert_"):
        half = slot_shape[2] // 2
        cols = {"expert_gate_proj": slice(0, half), "expert_up_proj": slice(half, None), "expert_down_proj": slice(None)}
        for p in pieces:
            v = _per_piece_scale(p, 1)
            if v is None:
                return None
            s[p.expert, :, cols[p.kind]] = v[0]
    else:
        v = _per_piece_scale(first, 1)
        if v is None:
            return None
        s[...] = v[0]
    return s


@partial(jax.jit, static_argnames=("kind", "dtype"))
def _to_layout(x, scale, kind: str, dtype):
    """On-disk tensor -> parameter layout (kernels [in, out], conv [p, p, C, D], experts [E, in, out]),
    times its per-output-column scale if given, in `dtype`. XLA does the casts and transposes: numpy's
    float8 casts and strided 1-byte transposes are an order of magnitude slower."""
    if kind in ("linear", "tied"):
        x = x.T
    elif kind == "conv":
        x = jnp.transpose(x, (2, 3, 1, 0))
    elif kind == "experts":
        x = jnp.swapaxes(x, 1, 2)
    if scale is not None:
        x = x.astype(jnp.float32) * scale
    return x.astype(dtype)


def _raw_slot(pieces: list[Piece]) -> tuple[np.ndarray, str]:
    """The slot's source tensor(s) as one array in on-disk orientation, and the layout kind to apply.
    Per-expert tensors are stacked into the fused layout [E, out, in] (gate rows before up rows)."""
    first = pieces[0]
    if not first.kind.startswith("expert_"):
        return first.file.read(first.key), first.kind
    by = {(p.expert, p.kind): p for p in pieces}
    n = max(p.expert for p in pieces) + 1
    if first.kind == "expert_down_proj":
        parts = [by[(e, "expert_down_proj")].file.read(by[(e, "expert_down_proj")].key) for e in range(n)]
        return np.stack(parts), "experts"
    rows = []
    for e in range(n):
        g, u = by[(e, "expert_gate_proj")], by[(e, "expert_up_proj")]
        rows.append(np.concatenate([g.file.read(g.key), u.file.read(u.key)], axis=0))
    return np.stack(rows), "experts"


def slot_value(pieces: list[Piece], slot_shape: tuple[int, ...],
               dtype) -> tuple[jax.Array | np.ndarray, np.ndarray | None]:
    """One slot (a layer, or an unstacked parameter) read from the source: (value, scale or None).

    dtype "float8": an E4M3 weight with per-tensor / per-expert scales stays E4M3 and comes with its
    scale; anything else is returned in its source dtype. Otherwise the value is dequantised to `dtype`."""
    fp8_ok = keeps_fp8(pieces)
    scale = slot_scale(pieces, slot_shape) if fp8_ok or any(p.scale is not None for p in pieces) else None
    scaled = any(p.scale is not None for p in pieces)
    if scaled and scale is None:  # block-wise scales: the loader's general path
        if dtype == "float8":
            raise CheckpointError(f"{pieces[0].file.path}: tensor {pieces[0].key!r} has block-wise scales; --dtype "
                                  "float8 keeps only per-tensor / per-expert ones (use --dtype bfloat16)")
        return _slot_value(pieces, slot_shape, np.dtype(dtype), _normalize((), slot_shape)), None
    raw, kind = _raw_slot(pieces)
    if dtype == "float8":
        if fp8_ok:
            return _to_layout(raw, None, kind, E4M3), scale
        return _to_layout(raw, scale, kind, kept_dtype(pieces)), None
    return _to_layout(raw, scale, kind, np.dtype(dtype)), None


def fp8_slot(pieces: list[Piece], slot_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One slot as (E4M3 values, float32 scale `scale_shape(slot_shape)`) for weights="fp8".

    E4M3 sources with per-tensor / per-expert scales keep their exact values and scales; anything else
    (bf16 sources, block-wise scales) is read in float32 and quantised per output column (`fp8.quantize`)."""
    if keeps_fp8(pieces):
        scale = slot_scale(pieces, slot_shape)
        if scale is not None:
            raw, kind = _raw_slot(pieces)
            return np.asarray(_to_layout(raw, None, kind, E4M3)), scale
    w = fp8.quantize(jnp.asarray(_slot_value(pieces, slot_shape, np.dtype(np.float32), _normalize((), slot_shape))))
    return np.asarray(w.q), np.asarray(w.scale)


def _placed(x: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def load_fp8_param(path: str, pieces: list[Piece], shape: tuple[int, ...], dtype, sharding) -> fp8.Fp8Weight:
    """A parameter tagged `fp8` as an `Fp8Weight` on its `sharding`, filled one layer at a time."""
    qsh, ssh = sharding, fp8.scale_sharding(sharding)
    name = jnp.dtype(dtype).name
    if not _is_stacked(path):
        q, s = fp8_slot(pieces, shape)
        return fp8.Fp8Weight(_placed(q, qsh), _placed(s, ssh), name)
    q_all = jax.jit(partial(jnp.zeros, shape, E4M3), out_shardings=qsh)()
    s_all = jax.jit(partial(jnp.zeros, fp8.scale_shape(shape), jnp.float32), out_shardings=ssh)()
    for layer in range(shape[0]):
        q, s = fp8_slot([p for p in pieces if p.layer == layer], shape[1:])
        q_all = _set_layer(q_all, _placed(q, shard_lib.drop_leading_axis(qsh)), layer)
        s_all = _set_layer(s_all, _placed(s, shard_lib.drop_leading_axis(ssh)), layer)
    return fp8.Fp8Weight(q_all, s_all, name)


def kept_dtype(pieces: list[Piece]) -> np.dtype:
    """Storage dtype of a parameter not kept in FP8 under "float8": its source float dtype (the widest of its
    pieces), bfloat16 for FP8 sources that cannot stay FP8."""
    from .safetensors_io import DTYPES as ST

    names = {p.file.dtype_name(p.key) for p in pieces}
    if names <= {"F32", "BF16", "F16"}:
        return np.result_type(*(ST[n] for n in sorted(names))) if len(names) > 1 else ST[names.pop()]
    return np.dtype(ml_dtypes.bfloat16)


def slot_bytes(pieces: list[Piece]) -> int:
    """Bytes read from disk for one slot (fused experts: the whole tensor once)."""
    return sum(p.file.nbytes(p.key) for p in pieces)


def group_tree(members, plan: dict[str, list[Piece]], shapes: dict[str, tuple], dtype, progress=None) -> dict:
    """The Orbax tree of one group, read slot by slot; `progress(nbytes)` after each slot. The values are
    the host (CPU) jax arrays the layout transform returns: Orbax writes those without the defensive
    copy it makes of numpy arrays.

    dtype: a numpy dtype to dequantise to, or "float8" to keep E4M3 weights (see `slot_value`)."""
    tree: dict = {"params": {}, "scales": {}}
    for path, layer in members:
        pieces = plan[path] if layer is None else [p for p in plan[path] if p.layer == layer]
        slot_shape = shapes[path] if layer is None else shapes[path][1:]
        value, scale = slot_value(pieces, slot_shape, dtype)
        _nest(tree["params"], tree_key(path), value)
        if scale is not None:
            _nest(tree["scales"], tree_key(path), scale)
        if progress is not None:
            progress(slot_bytes(pieces))
    if not tree["scales"]:
        del tree["scales"]
    return tree


def array_specs(plan: dict[str, list[Piece]], shapes: dict[str, tuple], dtype) -> dict[str, dict]:
    """{parameter path: {"shape", "dtype", "scaled"}} of what a conversion to `dtype` writes (full shapes)."""
    out = {}
    for path, shape in shapes.items():
        if dtype == "float8":
            scaled = keeps_fp8(plan[path])
            dt = "float8_e4m3fn" if scaled else kept_dtype(plan[path]).name
        else:
            scaled, dt = False, np.dtype(dtype).name
        out[path] = {"shape": list(shape), "dtype": dt, "scaled": scaled}
    return out


# ---------------------------------------------------------------------- writing and checking
def save_tree(directory: Path, tree: dict) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory.absolute(), tree)
        ckptr.wait_until_finished()


def write_marker(directory: Path, cfg_overrides: dict, dtype: str, specs: dict[str, dict]) -> None:
    meta = {"format": FORMAT, "version": VERSION, "dtype": dtype, "config_overrides": cfg_overrides, "arrays": specs}
    (directory / MARKER).write_text(json.dumps(meta, indent=1))


def read_marker(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MARKER
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint marker ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} v{VERSION} checkpoint marker")
    return meta


def verify(directory: str | os.PathLike, specs: dict[str, dict]) -> list[str]:
    """Every expected array (and scale) present in the Orbax metadata with its shape and dtype; problems found."""
    import orbax.checkpoint as ocp

    shapes = {p: tuple(s["shape"]) for p, s in specs.items()}
    problems = []
    with ocp.StandardCheckpointer() as ckptr:
        for gdir, members in groups(shapes).items():
            where = Path(directory) / "params" / gdir
            try:
                tree = ckptr.metadata(where.absolute()).item_metadata.tree
            except Exception as e:  # noqa: BLE001 - any failure to read metadata means a broken group
                problems.append(f"{where}: unreadable Orbax checkpoint ({type(e).__name__}: {e})")
                continue
            for path, layer in members:
                spec = specs[path]
                shape = tuple(spec["shape"]) if layer is None else tuple(spec["shape"][1:])
                want = [("params", shape, spec["dtype"])]
                if spec["scaled"]:
                    want.append(("scales", scale_shape(shape), "float32"))
                for part, shp, dt in want:
                    try:
                        m = _get(tree[part], tree_key(path))
                    except (KeyError, TypeError):
                        problems.append(f"{where}: missing {part} array {path}")
                        continue
                    if tuple(m.shape) != shp or np.dtype(m.dtype).name != dt:
                        problems.append(f"{where}: {part} array {path} is {np.dtype(m.dtype).name}{list(m.shape)}, "
                                        f"expected {dt}{list(shp)}")
    return problems


# ---------------------------------------------------------------------- restoring
def is_orbax_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).exists()


@partial(jax.jit, static_argnames=("dtype",))
def _dequantize(q, s, dtype):
    return (q.astype(jnp.float32) * s).astype(dtype)


def restore(path: str | os.PathLike, dtype="bfloat16", mesh=None, weights=None, **config_overrides) -> nnx.Module:
    """A converted checkpoint as a `Mistral3ForConditionalGeneration`, each array restored on its sharding.

    weights="fp8": the parameters tagged `fp8` become `fp8.Fp8Weight`s (kept E4M3 arrays with
    their scales; arrays converted to another dtype are quantised per output column)."""
    import orbax.checkpoint as ocp

    fp8.check_weights(weights)
    path = Path(path)
    dtype = resolve_dtype(dtype)
    meta = read_marker(path)
    cfg = ModelConfig.from_json_file(path / "config.json")
    overrides = {**meta.get("config_overrides", {}), **config_overrides}
    if overrides:
        try:
            cfg = cfg.replace_text(**overrides)
        except TypeError as e:
            raise ValueError(f"unknown config override: {e}") from None
    specs = meta["arrays"]
    model = abstract_model(cfg, dtype)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    shapes = {"/".join(map(str, p)): tuple(v.shape) for p, v in flat}
    bad = [f"{p}: checkpoint has {specs[p]['shape'] if p in specs else 'nothing'}, the config needs {list(s)}"
           for p, s in shapes.items() if p not in specs or tuple(specs[p]["shape"]) != s]
    if bad:
        raise CheckpointError(f"{path}: checkpoint does not match its config.json:\n  " + "\n  ".join(bad))
    shardings = shard_lib.param_shardings(state, mesh)
    values: dict[str, jax.Array] = {}
    scales: dict[str, jax.Array] = {}  # FP8 parameters (weights="fp8"): values[p] holds E4M3, scales[p] float32
    keep_fp8 = fp8.fp8_paths(state) if weights == "fp8" else set()
    with ocp.StandardCheckpointer() as ckptr:
        for gdir, members in groups(shapes).items():
            target: dict = {"params": {}, "scales": {}}
            for p, layer in members:
                shape, spec = shapes[p], specs[p]
                sh = shardings[p] if layer is None else shard_lib.drop_leading_axis(shardings[p])
                shp = shape if layer is None else shape[1:]
                _nest(target["params"], tree_key(p), jax.ShapeDtypeStruct(shp, np.dtype(spec["dtype"]), sharding=sh))
                if spec["scaled"]:
                    full = scale_shape(shape)
                    ssh = fp8.scale_sharding(shardings[p])
                    ssh = ssh if layer is None else shard_lib.drop_leading_axis(ssh)
                    _nest(target["scales"], tree_key(p),
                          jax.ShapeDtypeStruct(full if layer is None else full[1:], np.float32, sharding=ssh))
            if not target["scales"]:
                del target["scales"]
            got = ckptr.restore((path / "params" / gdir).absolute(), target)
            for p, layer in members:
                x = _get(got["params"], tree_key(p))
                if p in keep_fp8:
                    if specs[p]["scaled"]:
                        s = _get(got["scales"], tree_key(p))
                    else:
                        w = jax.jit(fp8.quantize)(x)
                        x, s = w.q, w.scale
                    ssh = fp8.scale_sharding(shardings[p])
                    if layer is None:
                        values[p], scales[p] = x, s
                        continue
                    if p not in values:
                        values[p] = jax.jit(partial(jnp.zeros, shapes[p], E4M3), out_shardings=shardings[p])()
                        scales[p] = jax.jit(partial(jnp.zeros, scale_shape(shapes[p]), jnp.float32),
                                            out_shardings=ssh)()
                    values[p] = _set_layer(values[p], x, layer)
                    scales[p] = _set_layer(scales[p], s, layer)
                    continue
                if specs[p]["scaled"]:
                    x = _dequantize(x, _get(got["scales"], tree_key(p)), dtype=dtype)
                elif x.dtype != dtype:
                    x = x.astype(dtype)
                if layer is None:
                    values[p] = x
                    continue
                if p not in values:
                    values[p] = jax.jit(partial(jnp.zeros, shapes[p], dtype), out_shardings=shardings[p])()
                values[p] = _set_layer(values[p], x, layer)
    for p in keep_fp8:
        values[p] = fp8.Fp8Weight(values[p], scales[p], dtype.name)
    out = [(k, var.replace(values["/".join(map(str, k))]) if hasattr(var, "replace") else values["/".join(map(str, k))])
           for k, var in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(out))
