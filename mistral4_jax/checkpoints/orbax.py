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
from ..model import fp8, nvfp4
from . import read, scheme
from .names import COPY, split_stack
from .plan import Piece
from .safetensors_io import DTYPES as ST_DTYPES

FORMAT = "mistral4_jax/orbax-layers"
VERSION = 2  # 2 added NVFP4 arrays ("kind": "nvfp4"); a checkpoint without any is still written as version 1
NVFP4 = "nvfp4"
NVFP4_PARTS = ("params", "block_scales", "global_scales")  # trees of an NVFP4 parameter's three leaves
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


def group_tree(members, plan: dict[str, list[Piece]], shapes: dict[str, tuple], dtype, progress=None,
               nvfp4_paths=frozenset()) -> dict:
    """The Orbax tree of one group, read slot by slot; `progress(nbytes)` after each slot. The values are
    the host (CPU) jax arrays `read.read_slot` returns: Orbax writes those without the defensive copy it
    makes of numpy arrays.

    dtype: a numpy dtype to dequantise to, or "float8": a weight stored as E4M3 with per-tensor /
    per-expert scales stays E4M3 and gets its per-output-column scale; any other keeps its source dtype.
    nvfp4_paths: parameters written as NVFP4 whatever `dtype` (`read.nvfp4_slot`: kept when stored so,
    quantised otherwise): codes in "params", block scales in "block_scales", global scales in "global_scales"."""
    tree: dict = {"params": {}, "scales": {}, "block_scales": {}, "global_scales": {}}
    for path, layer in members:
        pieces = read.slot_pieces(plan[path], layer)
        slot_shape = shapes[path] if layer is None else shapes[path][1:]
        if path in nvfp4_paths:
            for part, leaf in zip(NVFP4_PARTS, read.nvfp4_slot(path, pieces, slot_shape)):
                _nest(tree[part], tree_key(path, layer), leaf)
            if progress is not None:
                progress(slot_bytes(pieces))
            continue
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
    return {k: v for k, v in tree.items() if v or k == "params"}


def array_specs(plan: dict[str, list[Piece]], shapes: dict[str, tuple], dtype,
                nvfp4_paths=frozenset()) -> dict[str, dict]:
    """{parameter path: {"shape", "dtype", "scaled"[, "kind"]}} of what a conversion to `dtype` writes (full
    shapes; an NVFP4 parameter's "shape" is its logical one, "dtype" that of its codes, "kind" "nvfp4")."""
    out = {}
    for path, shape in shapes.items():
        if path in nvfp4_paths:
            out[path] = {"shape": list(shape), "dtype": "uint8", "scaled": False, "kind": NVFP4}
            continue
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
    # version 1 unless an array needs version 2's reader (NVFP4 leaves), so that older readers still open
    # everything they can restore
    version = VERSION if any(s.get("kind") == NVFP4 for s in specs.values()) else 1
    meta = {"format": FORMAT, "version": version, "dtype": dtype, "config_overrides": cfg_overrides, "arrays": specs}
    (directory / MARKER).write_text(json.dumps(meta, indent=1))


def read_marker(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MARKER
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint marker ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") not in range(1, VERSION + 1):
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint marker of version 1 to {VERSION} (a newer "
                              "mistral4_jax may have written it)")
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
                if spec.get("kind") == NVFP4:
                    want = list(zip(NVFP4_PARTS, nvfp4.packed_shapes(shape), ("uint8", "uint8", "float32")))
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


def _stored(got: dict, spec: dict, path: str, layer: int | None, dtype):
    """One restored slot as the checkpoint holds it: NVFP4 leaves, E4M3 values with their scale, or an array."""
    key = tree_key(path, layer)
    if spec.get("kind") == NVFP4:
        return nvfp4.Nvfp4Weight(*(_get(got[part], key) for part in NVFP4_PARTS), dtype.name)
    if spec["scaled"]:
        return fp8.Fp8Weight.of_e4m3(_get(got["params"], key), _get(got["scales"], key), dtype.name)
    return _get(got["params"], key)


def _as_kind(value, kind: str | None, dtype, path: str):
    """A restored slot held as `kind` (None: an array in `dtype`): kept when it already is one, else
    dequantised (FP8 in float32 as the direct loader does, NVFP4 as compressed-tensors does) and re-quantised."""
    if kind is None:
        if isinstance(value, fp8.Fp8Weight):
            return read.to_layout(fp8.e4m3(value.q), value.scale, COPY, dtype)
        return value.dense() if isinstance(value, nvfp4.Nvfp4Weight) else value.astype(dtype)
    if kind == "fp8" and not isinstance(value, fp8.Fp8Weight):
        w = value.dense().astype(np.float32) if isinstance(value, nvfp4.Nvfp4Weight) else value
        return jax.jit(fp8.quantize)(w)
    if kind == NVFP4 and not isinstance(value, nvfp4.Nvfp4Weight):
        w = read.to_layout(fp8.e4m3(value.q), value.scale, COPY, np.float32) if isinstance(value, fp8.Fp8Weight) \
            else value.astype(np.float32)
        return jax.jit(nvfp4.quantize, static_argnums=(1, 2))(w, np.float32, read.column_groups(path))
    return value


def config_of(path: str | os.PathLike, **config_overrides) -> ModelConfig:
    """The config of a converted checkpoint: its config.json with the marker's and the caller's port switches."""
    return read.with_overrides(ModelConfig.from_json_file(Path(path) / "config.json"),
                               {**read_marker(path).get("config_overrides", {}), **config_overrides})


def restore(path: str | os.PathLike, dtype="bfloat16", mesh=None, weights=None, replace=None,
            **config_overrides) -> nnx.Module:
    """A converted checkpoint as a `Mistral3ForConditionalGeneration`, each array restored on its sharding.

    weights: which parameters are held in which kind (`scheme.py`, as `from_pretrained`): arrays stored in that
    kind are kept as they are (E4M3 values with their scales, NVFP4 leaves), others are quantised on the
    device. replace: {parameter path: [Piece]} of parameters read from safetensors instead (`from_pretrained`'s
    `experts_from`)."""
    import orbax.checkpoint as ocp

    scheme.check(weights)
    path = Path(path)
    dtype = read.resolve_dtype(dtype)
    cfg, specs = config_of(path, **config_overrides), read_marker(path)["arrays"]
    model = read.abstract_model(cfg, dtype)
    shapes = read.param_shapes(model)
    bad = [f"{p}: checkpoint has {specs[p]['shape'] if p in specs else 'nothing'}, the config needs {list(s)}"
           for p, s in shapes.items() if p not in specs or tuple(specs[p]["shape"]) != s]
    if bad:
        raise CheckpointError(f"{path}: checkpoint does not match its config.json:\n  " + "\n  ".join(bad))
    replace = replace or {}
    stored = {p: NVFP4 for p, s in specs.items() if s.get("kind") == NVFP4 and p not in replace}
    stored.update(read.stored_kinds(replace))
    targets = scheme.targets(read.flat_params(model), weights, stored)
    shardings = read.planned_shardings(model, mesh, targets, path)
    values = read.read_values(model, replace, dtype, shardings, targets, paths=set(replace)) if replace else {}
    full = {p: scheme.abstract(targets.get(p), shapes[p], dtype, shardings[p]) for p in shapes if p not in replace}
    acc: dict[str, list[dict]] = {p: [{} for _ in jax.tree.leaves(v)] for p, v in full.items()}

    def at(sharding, layer):
        return sharding if layer is None else shard_lib.drop_leading_axis(sharding)

    with ocp.StandardCheckpointer() as ckptr:
        for gdir, members in groups(shapes, read.stacked_paths(model)).items():
            members = [(p, layer) for p, layer in members if p not in replace]
            if not members:
                continue
            target: dict = {}
            for p, layer in members:
                shp, sh, spec = shapes[p] if layer is None else shapes[p][1:], at(shardings[p], layer), specs[p]
                if spec.get("kind") == NVFP4:
                    parts = zip(NVFP4_PARTS, nvfp4.packed_shapes(shp), (np.uint8, np.uint8, np.float32),
                                nvfp4.leaf_shardings(sh, shp))
                else:
                    parts = [("params", shp, np.dtype(spec["dtype"]), sh)]
                    if spec["scaled"]:
                        parts.append(("scales", fp8.scale_shape(shp), np.float32, fp8.scale_sharding(sh)))
                for part, s, dt, psh in parts:
                    _nest(target.setdefault(part, {}), tree_key(p, layer), jax.ShapeDtypeStruct(s, dt, sharding=psh))
            got = ckptr.restore((path / "params" / gdir).absolute(), target)
            for p, layer in members:
                value = _as_kind(_stored(got, specs[p], p, layer, dtype), targets.get(p), dtype, p)
                for into, leaf, whole in zip(acc[p], jax.tree.leaves(value), jax.tree.leaves(full[p])):
                    read.assemble(into, p, layer, leaf, whole.shape, whole.sharding)
    for p, v in full.items():
        values[p] = jax.tree.unflatten(jax.tree.structure(v), [a[p] for a in acc[p]])
    return read.filled(model, values)
