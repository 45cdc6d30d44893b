"""The converted checkpoint: parameters as Orbax checkpoints, one per decoder layer (docs/model.md 2.4 for FP8).

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

Slots are read from the source by `read.read_slot` and stacked parameters rebuilt by `read.assemble`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from .. import sharding as shard_lib
from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import fp8
from . import read
from .names import COPY, split_stack
from .plan import Piece
from .safetensors_io import DTYPES as ST_DTYPES

FORMAT = "mistral4_jax/orbax-layers"
VERSION = 1
MARKER = "mistral4_jax.json"
OTHER = "other"


# ---------------------------------------------------------------------- groups
def groups(shapes: dict[str, tuple[int, ...]], stacked: frozenset[str]) -> dict[str, list[tuple[str, int | None]]]:
    """{group directory (relative to params/): [(parameter path, layer or None)]}, in loading order.

    stacked: the parameters with a leading layer axis (`read.stacked_paths`); each of their layers goes to
    its stack's group of that layer."""
    out: dict[str, list[tuple[str, int | None]]] = {OTHER: []}
    for path, shape in shapes.items():
        if path not in stacked:
            out[OTHER].append((path, None))
            continue
        stack = split_stack(path)[0]
        for layer in range(shape[0]):
            out.setdefault(group_dir(stack, layer), []).append((path, layer))
    return out


def group_dir(stack: str, layer: int) -> str:
    return f"{stack.replace('/', '.')}/{layer:05d}"


def tree_key(path: str, layer: int | None) -> list[str]:
    """The keys of a parameter in its group's tree: its path inside one layer for a layer of a stacked one."""
    return (path if layer is None else split_stack(path)[1]).split("/")


def _nest(tree: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree: dict, keys: list[str]):
    for k in keys:
        tree = tree[k]
    return tree


# ---------------------------------------------------------------------- reading the source, one slot at a time
def kept_dtype(pieces: list[Piece]) -> np.dtype:
    """Storage dtype of a parameter not kept in FP8 under "float8": its source float dtype (the widest of its
    pieces), bfloat16 for FP8 sources that cannot stay FP8."""
    names = {p.file.dtype_name(p.key) for p in pieces}
    if names <= {"F32", "BF16", "F16"}:
        return np.result_type(*(ST_DTYPES[n] for n in sorted(names))) if len(names) > 1 else ST_DTYPES[names.pop()]
    return np.dtype(ml_dtypes.bfloat16)


def slot_bytes(pieces: list[Piece]) -> int:
    """Bytes read from disk for one slot (fused experts: the whole tensor once)."""
    return sum(p.file.nbytes(p.key) for p in pieces)


def group_tree(members, plan: dict[str, list[Piece]], shapes: dict[str, tuple], dtype, progress=None) -> dict:
    """The Orbax tree of one group, read slot by slot; `progress(nbytes)` after each slot. The values are
    the host (CPU) jax arrays `read.read_slot` returns: Orbax writes those without the defensive copy it
    makes of numpy arrays.

    dtype: a numpy dtype to dequantise to, or "float8": a weight stored as E4M3 with per-tensor /
    per-expert scales stays E4M3 and gets its per-output-column scale; any other keeps its source dtype."""
    tree: dict = {"params": {}, "scales": {}}
    for path, layer in members:
        pieces = read.slot_pieces(plan[path], layer)
        slot_shape = shapes[path] if layer is None else shapes[path][1:]
        if dtype == "float8":
            if read.block_scaled(pieces):
                raise CheckpointError(f"{pieces[0].file.path}: tensor {pieces[0].key!r} has block-wise scales; "
                                      "--dtype float8 keeps only per-tensor / per-expert ones (use --dtype bfloat16)")
            keep = read.keeps_fp8(pieces)
            value, scale = read.read_slot(pieces, slot_shape, kept_dtype(pieces), keep_fp8=keep)
        else:
            value, scale = read.read_slot(pieces, slot_shape, np.dtype(dtype))
        _nest(tree["params"], tree_key(path, layer), value)
        if scale is not None:
            _nest(tree["scales"], tree_key(path, layer), scale)
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
            scaled = read.keeps_fp8(plan[path])
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
    """Every expected array (and scale) present in the Orbax metadata with its shape and dtype; problems found.
    Which arrays are stacked comes from the model the directory's config.json describes."""
    import orbax.checkpoint as ocp

    shapes = {p: tuple(s["shape"]) for p, s in specs.items()}
    stacked = read.stacked_paths(read.abstract_model(ModelConfig.from_json_file(Path(directory) / "config.json"),
                                                     np.float32))
    problems = []
    with ocp.StandardCheckpointer() as ckptr:
        for gdir, members in groups(shapes, stacked).items():
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
                    want.append(("scales", fp8.scale_shape(shape), "float32"))
                for part, shp, dt in want:
                    try:
                        m = _get(tree[part], tree_key(path, layer))
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


def restore(path: str | os.PathLike, dtype="bfloat16", mesh=None, weights=None, **config_overrides) -> nnx.Module:
    """A converted checkpoint as a `Mistral3ForConditionalGeneration`, each array restored on its sharding.

    weights="fp8": the parameters tagged `fp8` become `fp8.Fp8Weight`s (kept E4M3 arrays with
    their scales; arrays converted to another dtype are quantised per output column)."""
    import orbax.checkpoint as ocp

    fp8.check_weights(weights)
    path = Path(path)
    dtype = read.resolve_dtype(dtype)
    meta = read_marker(path)
    cfg = read.with_overrides(ModelConfig.from_json_file(path / "config.json"),
                              {**meta.get("config_overrides", {}), **config_overrides})
    specs = meta["arrays"]
    model = read.abstract_model(cfg, dtype)
    shapes = read.param_shapes(model)
    bad = [f"{p}: checkpoint has {specs[p]['shape'] if p in specs else 'nothing'}, the config needs {list(s)}"
           for p, s in shapes.items() if p not in specs or tuple(specs[p]["shape"]) != s]
    if bad:
        raise CheckpointError(f"{path}: checkpoint does not match its config.json:\n  " + "\n  ".join(bad))
    shardings, keep_fp8 = read.planned_shardings(model, mesh, weights, path)
    scale_shardings = {p: fp8.scale_sharding(shardings[p]) for p in shapes if specs[p]["scaled"] or weights == "fp8"}
    values: dict[str, jax.Array] = {}
    scales: dict[str, jax.Array] = {}  # FP8 parameters (weights="fp8"): values[p] holds E4M3 bits, scales[p] float32

    def at(sharding, layer):
        return sharding if layer is None else shard_lib.drop_leading_axis(sharding)

    with ocp.StandardCheckpointer() as ckptr:
        for gdir, members in groups(shapes, read.stacked_paths(model)).items():
            target: dict = {"params": {}, "scales": {}}
            for p, layer in members:
                shp = shapes[p] if layer is None else shapes[p][1:]
                _nest(target["params"], tree_key(p, layer),
                      jax.ShapeDtypeStruct(shp, np.dtype(specs[p]["dtype"]), sharding=at(shardings[p], layer)))
                if specs[p]["scaled"]:
                    _nest(target["scales"], tree_key(p, layer), jax.ShapeDtypeStruct(
                        fp8.scale_shape(shp), np.float32, sharding=at(scale_shardings[p], layer)))
            if not target["scales"]:
                del target["scales"]
            got = ckptr.restore((path / "params" / gdir).absolute(), target)
            for p, layer in members:
                x = _get(got["params"], tree_key(p, layer))
                s = _get(got["scales"], tree_key(p, layer)) if specs[p]["scaled"] else None
                if p in keep_fp8:
                    if s is None:
                        w = jax.jit(fp8.quantize)(x)
                        x, s = w.q, w.scale
                    x = fp8.bits(x)
                    read.assemble(scales, p, layer, s, fp8.scale_shape(shapes[p]), scale_shardings[p])
                elif s is not None:
                    x = read.to_layout(x, s, COPY, dtype)
                elif x.dtype != dtype:
                    x = x.astype(dtype)
                read.assemble(values, p, layer, x, shapes[p], shardings[p])
    for p in keep_fp8:
        values[p] = fp8.Fp8Weight(values[p], scales[p], dtype.name)
    return read.filled(model, values)
