"""Where parameters, activations and caches live on a device mesh.

Each parameter names its logical axes where it is created (`model/layers.py`, NNX variable metadata);
one mapping, `LOGICAL_TO_MESH`, sends logical axes to the mesh axes `data`, `expert` and `tensor`.
Routed experts split over `expert` (expert parallelism); attention heads, the shared expert's (and
dense layers') FFN width and the vocabulary over `tensor`; the batch of activations and the rows of the
latent cache over `data` and `expert` together, so that N devices hold N times the cache rows and each
runs attention for its own rows (the routed experts gather the tokens of an `expert` group, run each
device's experts and sum: `model/moe.py`). The indirection exists so that a sharding strategy is tried
by changing one mapping. The same code runs on one device, on a mesh, and on several hosts
(`jax.distributed`). Programs that run the model enter their mesh (`mesh_context`), which the expert
dispatch reads.

A parameter axis that does not divide by its mesh axis is an error naming the parameter
(`param_shardings`); it used to stay silently replicated. Activations and caches (`logical_sharding`,
`constrain`, `to_global`) still fall back to replication, as their batch sizes vary call by call.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from .errors import InputError

MESH_AXES = ("data", "expert", "tensor")

# Logical axes of activations and caches (used with `constrain` / `logical_sharding`).
ACT_BTD = ("batch", None, None)  # hidden states [B, T, D]
ACT_BV = ("batch", "vocab")  # logits of one step [B, V]
CACHE_LBSC = ("layers", "batch", None, None)  # latent cache [L, B, S, C]

# logical axis -> mesh axis, or mesh axes split together (None: replicated)
LOGICAL_TO_MESH: dict[str, str | tuple[str, ...] | None] = {
    "layers": None, "expert": "expert", "heads": "tensor", "mlp": "tensor", "vocab": "tensor",
    "batch": ("data", "expert"),
}


def make_mesh(expert: int | None = None, *, data: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ("data", "expert", "tensor") mesh over `devices` (default: every device of every process).

    `expert` defaults to what is left after `data` and `tensor`: make_mesh() puts all devices on
    the expert axis (expert parallelism), make_mesh(data=2, tensor=2) on 8 devices gives 2x2x2.
    """
    devices = list(jax.devices() if devices is None else devices)
    if expert is None:
        if len(devices) % (data * tensor):
            raise InputError(f"make_mesh: {len(devices)} devices do not divide into data={data} x tensor={tensor}")
        expert = len(devices) // (data * tensor)
    n = data * expert * tensor
    if n > len(devices) or n < 1:
        raise InputError(f"make_mesh: data={data} x expert={expert} x tensor={tensor} = {n} devices, "
                         f"but {len(devices)} are available")
    return Mesh(np.asarray(devices[:n]).reshape(data, expert, tensor), MESH_AXES)


def as_auto_mesh(mesh) -> Mesh | None:
    """The mesh the model runs on: `mesh` with every axis Auto (None stays None).

    `jax.make_mesh` gives Explicit axes, under which jax asks each gather (the embedding lookup) for an
    output sharding; the parameters' declared axes already say where everything lives, so the same
    devices and axis names as Auto axes mean the same layout. Axis names must come from MESH_AXES.
    """
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise InputError(f"mesh must be a jax.sharding.Mesh (e.g. mistral4_jax.sharding.make_mesh() or "
                         f"jax.make_mesh((1, 8, 1), {MESH_AXES})), got {type(mesh).__name__}")
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown:
        raise InputError(f"mesh axis names {tuple(mesh.axis_names)}: {unknown} are not mesh axes of this model; "
                         f"name them from {MESH_AXES} (e.g. jax.make_mesh((1, 8, 1), {MESH_AXES}))")
    if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        raise InputError(f"mesh axes {tuple(mesh.axis_names)} have types {tuple(mesh.axis_types)}: pass a mesh with "
                         "Auto or Explicit axes, not one inside shard_map (Manual)")
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    if tuple(mesh.axis_types) == auto:
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def spec_for(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of an activation: each axis over the longest run of its mesh axes whose sizes divide it
    (none: replicated)."""
    spec = []
    for size, name in zip(shape, logical):
        axes = _mesh_axes(name, mesh)
        while axes and size % _size(axes, mesh):
            axes = axes[:-1]
        spec.append(_entry(axes))
    return PartitionSpec(*spec)


def _mesh_axes(name: str | None, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a logical axis splits over (unmapped ones, absent ones and those of size 1 left out)."""
    target = LOGICAL_TO_MESH.get(name) if name else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)


def _size(axes: tuple[str, ...], mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def _entry(axes: tuple[str, ...]):
    """A PartitionSpec entry: None, one axis, or several split together."""
    return None if not axes else axes[0] if len(axes) == 1 else axes


def batch_divisor(mesh) -> int:
    """How many ways the batch is split on `mesh` (1 without one): batches are padded to a multiple."""
    return 1 if mesh is None else _size(_mesh_axes("batch", mesh), mesh)


def mesh_context(mesh):
    """The context in which a program runs the model on `mesh` (`jax.set_mesh`; nothing without one): the
    expert dispatch and activation constraints read the ambient mesh while tracing."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def _params(tree) -> dict[str, nnx.Param]:
    """{path: variable} of every `nnx.Param` of a module or state."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree, nnx.Param)
    return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state) if isinstance(v, nnx.Param)}


def param_axes(tree) -> dict[str, tuple[str | None, ...]]:
    """{path: logical axes} of every `nnx.Param` of a module or state, e.g.
    'language_model/layers/self_attn/o_proj/kernel': ('layers', 'heads', None).

    A parameter without axes, or with a different number of axes than dimensions, is an error."""
    out, bad = {}, []
    for path, v in _params(tree).items():
        axes, shape = v.get_metadata().get("out_sharding"), tuple(v.shape)
        if axes is None or len(axes) != len(shape):
            bad.append(f"{path} {shape}: logical axes {axes}")
        out[path] = tuple(axes or ())
    if bad:
        raise ValueError("parameters must declare one logical axis per dimension where they are created "
                         "(model/layers.py):\n  " + "\n  ".join(bad))
    return out


def param_spec(path: str, axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of parameter `path` of `shape` with logical `axes`.

    Raises InputError when an axis does not divide by its mesh axes, or when two axes map to one mesh axis."""
    spec = [_mesh_axes(name, mesh) for name in axes]
    for i, (size, name, mapped) in enumerate(zip(shape, axes, spec)):
        if mapped and size % _size(mapped, mesh):
            axis = "x".join(mapped)
            raise InputError(f"parameter {path} of shape {shape}: axis {i} ({name!r}, size {size}) does not divide "
                             f"over mesh axis {axis!r} of size {_size(mapped, mesh)}; choose a mesh whose {axis!r} "
                             f"size divides {size}")
    used = [a for mapped in spec for a in mapped]
    if len(used) != len(set(used)):
        raise InputError(f"parameter {path}: logical axes {axes} put one mesh axis on two dimensions "
                         f"({[_entry(m) for m in spec]})")
    return PartitionSpec(*(_entry(m) for m in spec))


def adapter_specs(path: str, axes: tuple[str | None, ...], a_shape: tuple[int, ...], b_shape: tuple[int, ...],
                  mesh: Mesh) -> tuple[PartitionSpec, PartitionSpec]:
    """PartitionSpecs of the LoRA factors of parameter `path` [..., in, out] with logical `axes`: A [..., in, r]
    split like the weight's input side, B [..., r, out] like its output side, the rank axis replicated."""
    *lead, d_in, d_out = axes
    return (param_spec(f"{path} (LoRA A)", (*lead, d_in, None), tuple(a_shape), mesh),
            param_spec(f"{path} (LoRA B)", (*lead, None, d_out), tuple(b_shape), mesh))


def param_shardings(tree, mesh: Mesh | None) -> dict[str, jax.sharding.Sharding]:
    """{path: sharding} of every parameter of a module or state (an abstract model will do), from the
    logical axes it declares; without a mesh, every parameter on the default device.

    Behaviour: a parameter axis that does not divide by its mesh axis raises InputError naming the
    parameter, its shape and the mesh axis (it used to be replicated silently)."""
    axes, params = param_axes(tree), _params(tree)
    if mesh is None:
        return {p: SingleDeviceSharding(jax.devices()[0]) for p in axes}
    return {p: NamedSharding(mesh, param_spec(p, a, tuple(params[p].shape), mesh)) for p, a in axes.items()}


def logical_sharding(mesh: Mesh, logical: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical, shape, mesh))


def constrain(x: jax.Array, mesh: Mesh | None, logical: tuple[str | None, ...]) -> jax.Array:
    """Annotate an activation inside jit so XLA keeps it split as the rules say (no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, logical, x.shape))


def for_host(x):
    """Inside a program under `mesh_context`: x replicated on every device, so that every process can read it
    (batch-split results would span other hosts' devices). Without a mesh: x."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec())


def model_mesh(model) -> Mesh | None:
    """The mesh a loaded model's parameters live on (None when they sit on one device)."""
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        leaves = jax.tree.leaves(v.get_value())  # not v[...]: that would dequantise an FP8 weight
        s = getattr(leaves[0], "sharding", None) if leaves else None
        if isinstance(s, NamedSharding):
            return s.mesh
    return None


def drop_leading_axis(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one slice along a (replicated) leading axis."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def to_global(x, mesh: Mesh | None, logical: tuple[str | None, ...] = ()) -> jax.Array:
    """A host array (the same on every process) as a global jax.Array laid out by logical axes.

    Works with several processes, where jit refuses plain numpy inputs for non-addressable devices. The array is
    copied first: a transfer may read the host buffer after this returns (on the CPU it may even keep it), and
    callers reuse their buffers (the engine's block table and flags).
    """
    x = np.array(x)
    if mesh is None:
        return jax.device_put(x)
    sharding = logical_sharding(mesh, tuple(logical) + (None,) * (x.ndim - len(logical)), x.shape)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
