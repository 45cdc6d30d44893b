"""Where parameters, activations and caches live on a device mesh.

One rules table, `PARAM_AXES`, names the logical axes of each parameter (by its path in the module
tree); one mapping, `LOGICAL_TO_MESH`, sends logical axes to the mesh axes `data`, `expert` and
`tensor`. Routed experts split over `expert` (expert parallelism); attention heads, the shared
expert's (and dense layers') FFN width and the vocabulary over `tensor`; the batch of activations
and caches over `data`. An axis whose size does not divide evenly by its mesh axis stays replicated,
so the same code runs on one device, on a mesh, and on several hosts (`jax.distributed`).
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from .errors import InputError

MESH_AXES = ("data", "expert", "tensor")

_STACK = r"language_model/(dense_)?layers/"
# (path regex, logical axes of the parameter; a stacked parameter's leading axis is "layers").
# Linear kernels are [in, out]: heads sit on the output side of q/kv_b and the input side of o_proj.
PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (_STACK + r"mlp/experts/(gate_up_proj|down_proj)$", ("layers", "expert", None, None)),
    (_STACK + r"self_attn/(q_proj|q_b_proj|kv_b_proj)/kernel$", ("layers", None, "heads")),
    (_STACK + r"self_attn/(q_proj|q_b_proj|kv_b_proj)/bias$", ("layers", "heads")),
    (_STACK + r"self_attn/o_proj/kernel$", ("layers", "heads", None)),
    (_STACK + r"mlp/(shared_experts/)?(gate_proj|up_proj)/kernel$", ("layers", None, "mlp")),
    (_STACK + r"mlp/(shared_experts/)?down_proj/kernel$", ("layers", "mlp", None)),
    (r"language_model/embed_tokens/embedding$", ("vocab", None)),
    (r"^lm_head/kernel$", (None, "vocab")),
]

# Logical axes of activations and caches (used with `constrain` / `logical_sharding`).
ACT_BTD = ("batch", None, None)  # hidden states [B, T, D]
ACT_BV = ("batch", "vocab")  # logits of one step [B, V]
CACHE_LBSC = ("layers", "batch", None, None)  # latent cache [L, B, S, C]

# logical axis -> mesh axis (None: replicated)
LOGICAL_TO_MESH: dict[str, str | None] = {
    "layers": None, "expert": "expert", "heads": "tensor", "mlp": "tensor", "vocab": "tensor",
    "batch": "data",
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


def spec_for(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for logical axes; an axis that does not divide by its mesh axis stays replicated."""
    spec = []
    for size, name in zip(shape, logical):
        axis = LOGICAL_TO_MESH.get(name) if name else None
        ok = axis in mesh.shape and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0
        spec.append(axis if ok else None)
    return PartitionSpec(*spec)


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of a parameter from the rules table (replicated when no rule matches)."""
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path) and len(axes) == len(shape):
            return spec_for(axes, shape, mesh)
    return PartitionSpec()


def param_sharding(path: str, shape: tuple[int, ...], mesh: Mesh | None) -> jax.sharding.Sharding:
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, param_spec(path, shape, mesh))


def logical_sharding(mesh: Mesh, logical: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical, shape, mesh))


def constrain(x: jax.Array, mesh: Mesh | None, logical: tuple[str | None, ...]) -> jax.Array:
    """Annotate an activation inside jit so XLA keeps it split as the rules say (no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, logical, x.shape))


def model_mesh(model) -> Mesh | None:
    """The mesh a loaded model's parameters live on (None when they sit on one device)."""
    from flax import nnx

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

    Works with several processes, where jit refuses plain numpy inputs for non-addressable devices.
    """
    x = np.asarray(x)
    if mesh is None:
        return jax.device_put(x)
    sharding = logical_sharding(mesh, tuple(logical) + (None,) * (x.ndim - len(logical)), x.shape)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
