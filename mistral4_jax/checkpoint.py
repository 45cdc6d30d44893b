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
FP8 matmul `(x @ W_fp8) * scale`. Until that path exists, `restore` dequantises to the requested dtype.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from . import sharding as shard_lib
from .config import ModelConfig
from .errors import CheckpointError
from .loading import Piece, _is_stacked, _normalize, _set_layer, _slot_value, abstract_model, resolve_dtype

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


def _scalar_or(piece: Piece, n: int) -> np.ndarray:
    """A piece's scale as n per-leading-axis values (n = 1 for a per-tensor scale)."""
    s = np.asarray(piece.scale[0].get(piece.scale[1]), np.float32)
    if s.size == 1:
        return np.full((n,), s.reshape(()), np.float32)
    if s.size == n and n > 1:
        return s.reshape(n)
    raise CheckpointError(f"{piece.scale[0].path}: scale {piece.scale[1]!r} of shape {list(s.shape)} is not per-tensor "
                          f"or per-expert; --dtype float8 keeps only those (use --dtype bfloat16 to dequantise)")


def fp8_slot(pieces: list[Piece], slot_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One slot of a parameter kept in E4M3: (weights `slot_shape`, float32 scale `scale_shape(slot_shape)`)."""
    full = _normalize((), slot_shape)
    q = _slot_value([dataclasses.replace(p, scale=None) for p in pieces], slot_shape, E4M3, full)
    s = np.empty(scale_shape(slot_shape), np.float32)
    first = pieces[0]
    if first.kind == "linear":
        s[...] = _scalar_or(first, 1)[0]
    elif first.kind == "experts":
        s[...] = _scalar_or(first, slot_shape[0]).reshape(-1, 1, 1)
    else:
        half = slot_shape[2] // 2
        cols = {"expert_gate_proj": slice(0, half), "expert_up_proj": slice(half, None), "expert_down_proj": slice(None)}
        for p in pieces:
            s[p.expert, :, cols[p.kind]] = _scalar_or(p, 1)[0]
    return q, s


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


def group_tree(members, plan: dict[str, list[Piece]], shapes: dict[str, tuple], dtype) -> tuple[dict, int]:
    """The Orbax tree of one group (numpy arrays) and the source bytes it read.

    dtype: a numpy dtype to dequantise to, or "float8" to keep E4M3 weights (others become bfloat16)."""
    tree: dict = {"params": {}, "scales": {}}
    nbytes = 0
    for path, layer in members:
        pieces = plan[path] if layer is None else [p for p in plan[path] if p.layer == layer]
        slot_shape = shapes[path] if layer is None else shapes[path][1:]
        nbytes += slot_bytes(pieces)
        key = tree_key(path)
        if dtype == "float8" and keeps_fp8(pieces):
            q, s = fp8_slot(pieces, slot_shape)
            _nest(tree["params"], key, q)
            _nest(tree["scales"], key, s)
        else:
            np_dtype = kept_dtype(pieces) if dtype == "float8" else np.dtype(dtype)
            _nest(tree["params"], key, _slot_value(pieces, slot_shape, np_dtype, _normalize((), slot_shape)))
    if not tree["scales"]:
        del tree["scales"]
    return tree, nbytes


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


def restore(path: str | os.PathLike, dtype="bfloat16", mesh=None, **config_overrides) -> nnx.Module:
    """A converted checkpoint as a `Mistral3ForConditionalGeneration`, each array restored on its sharding."""
    import orbax.checkpoint as ocp

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
    shardings = {p: shard_lib.param_sharding(p, s, mesh) for p, s in shapes.items()}
    values: dict[str, jax.Array] = {}
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
                    ssh = shard_lib.param_sharding(p, full, mesh)
                    ssh = ssh if layer is None else shard_lib.drop_leading_axis(ssh)
                    _nest(target["scales"], tree_key(p),
                          jax.ShapeDtypeStruct(full if layer is None else full[1:], np.float32, sharding=ssh))
            if not target["scales"]:
                del target["scales"]
            got = ckptr.restore((path / "params" / gdir).absolute(), target)
            for p, layer in members:
                x = _get(got["params"], tree_key(p))
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
    out = [(k, var.replace(values["/".join(map(str, k))]) if hasattr(var, "replace") else values["/".join(map(str, k))])
           for k, var in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(out))
