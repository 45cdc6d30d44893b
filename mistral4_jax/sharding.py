"""Where each parameter lives on a device mesh.

One rules table maps a parameter (by its path in the module tree) to logical axis names, and one
mapping sends logical axes to mesh axes. Routed experts split over `expert` (expert parallelism);
everything else is replicated until tensor-parallel rules are added here.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

# (path regex, logical axes of the parameter; a stacked parameter's leading axis is "layers")
PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"language_model/(dense_)?layers/mlp/experts/(gate_up_proj|down_proj)$", ("layers", "expert", None, None)),
]

# logical axis -> mesh axis
LOGICAL_TO_MESH: dict[str, str | None] = {"layers": None, "expert": "expert"}


def make_mesh(expert: int | None = None, devices=None) -> Mesh:
    """A 1-axis mesh ("expert",) over `devices` (default: all), expert-parallel across them."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if expert is None else expert
    return Mesh(np.asarray(devices[:n]).reshape(n), ("expert",))


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of a parameter; an axis that does not divide evenly stays replicated."""
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path) and len(axes) == len(shape):
            spec = []
            for size, logical in zip(shape, axes):
                mesh_axis = LOGICAL_TO_MESH.get(logical) if logical else None
                ok = mesh_axis in mesh.shape and size % mesh.shape[mesh_axis] == 0
                spec.append(mesh_axis if ok else None)
            return PartitionSpec(*spec)
    return PartitionSpec()


def param_sharding(path: str, shape: tuple[int, ...], mesh: Mesh | None) -> jax.sharding.Sharding:
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, param_spec(path, shape, mesh))


def drop_leading_axis(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one slice along a (replicated) leading axis."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding
