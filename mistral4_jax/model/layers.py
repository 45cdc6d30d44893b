"""Building blocks shared by the text stack and the vision tower: parameters that declare themselves,
`linear`, `RMSNorm`, the gated MLP, and building and viewing stacked layers.

Every parameter states three things on the line that creates it, as NNX variable metadata:

- its logical axes (`out_sharding`, one name or None per array axis; the metadata `nnx.get_partition_spec`
  reads). `sharding.LOGICAL_TO_MESH` sends the names to mesh axes; None stays replicated.
- `fp8=True` when `from_pretrained(weights="fp8")` may keep it as E4M3 with scales (`fp8.fp8_paths`).
- `lora=GROUP` when it is a LoRA target of that group (`train.lora`).

A stacked layer's parameters get the leading "layers" axis from the `nnx.vmap` that stacks them
(`stack_layers`), not from the creating line.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import TextConfig
from . import ops

init_normal = nnx.initializers.normal(0.02)  # every weight matrix starts as N(0, 0.02^2)

STACK_AXIS = "layers"  # logical name of the depth axis of stacked layers
LORA_GROUPS = ("attention", "shared_experts", "experts", "dense_mlp")
Axes = tuple[str | None, ...]


def param_meta(axes: Axes, *, fp8: bool = False, lora: str | None = None) -> dict:
    """The variable metadata of a parameter with logical `axes` (see the module docstring).

    eager_sharding=False: the axes are logical names, laid out on a mesh by `sharding.param_shardings`
    when weights are loaded, not by flax when the variable is created."""
    if lora is not None and lora not in LORA_GROUPS:
        raise ValueError(f"LoRA group must be one of {LORA_GROUPS}, got {lora!r}")
    meta = dict(out_sharding=tuple(axes), eager_sharding=False)
    if fp8:
        meta["fp8"] = True
    if lora is not None:
        meta["lora"] = lora
    return meta


def param(value: jax.Array, axes: Axes, *, fp8: bool = False, lora: str | None = None) -> nnx.Param:
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match a parameter of shape {value.shape}")
    return nnx.Param(value, **param_meta(axes, fp8=fp8, lora=lora))


def linear(d_in: int, d_out: int, dtype, rngs: nnx.Rngs, bias: bool = False, *, axes: Axes = (None, None),
           fp8: bool = False, lora: str | None = None) -> nnx.Linear:
    """x @ kernel [+ bias]; kernel [d_in, d_out] with logical `axes`, bias on the kernel's output axis.

    The fp8 and lora tags go on the kernel only."""
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype, kernel_init=init_normal, rngs=rngs,
                      kernel_metadata=param_meta(axes, fp8=fp8, lora=lora), bias_metadata=param_meta(axes[1:]))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = param(jnp.ones((dim,), dtype), (None,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.rms_norm(x, self.weight[...], self.eps)


class Mistral4MLP(nnx.Module):
    """down(act(gate(x)) * up(x)): the shared expert, the dense layers' MLP and Pixtral's feed-forward.

    width_axis: logical axis of the intermediate width ("mlp" in the text stack, None in Pixtral);
    fp8 / lora: tags of the three kernels."""

    def __init__(self, hidden: int, intermediate: int, act: str, dtype, rngs: nnx.Rngs, *,
                 width_axis: str | None = None, fp8: bool = False, lora: str | None = None):
        tags = dict(fp8=fp8, lora=lora)
        self.gate_proj = linear(hidden, intermediate, dtype, rngs, axes=(None, width_axis), **tags)
        self.up_proj = linear(hidden, intermediate, dtype, rngs, axes=(None, width_axis), **tags)
        self.down_proj = linear(intermediate, hidden, dtype, rngs, axes=(width_axis, None), **tags)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(ops.activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """n copies of a module whose parameters are stacked along a new leading axis named "layers"."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: STACK_AXIS})
    def create(r: nnx.Rngs):
        return make(r)

    return create(rngs)


def is_stacked(var: nnx.Variable) -> bool:
    """Whether a parameter belongs to a layer stack: its leading logical axis is the stack's "layers" axis
    (the metadata `stack_layers` adds), whatever its path."""
    axes = var.get_metadata().get("out_sharding") or ()
    return len(axes) > 0 and axes[0] == STACK_AXIS


def layer_at(stack: nnx.Module, i: int) -> nnx.Module:
    """Layer `i` of a stacked module, as an ordinary module (a view for inspection and tests)."""
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))


class LayerStack(NamedTuple):
    """One stack of decoder layers: the `Mistral4Model` attribute holding it, the absolute number of its
    first layer and its depth."""

    name: str
    first: int
    depth: int


DENSE_STACK, MOE_STACK = "dense_layers", "layers"


def text_stacks(cfg: TextConfig) -> tuple[LayerStack, ...]:
    """The layer stacks of the text model in the order they run (empty ones left out): the one place that
    turns absolute layer numbers into (stack, index) and back. Layers before `first_k_dense_replace` use a
    dense MLP and live in `dense_layers`; the MoE layers follow in `layers`."""
    k = cfg.first_k_dense_replace
    stacks = (LayerStack(DENSE_STACK, 0, k), LayerStack(MOE_STACK, k, cfg.num_hidden_layers - k))
    return tuple(s for s in stacks if s.depth)


def moe_stack(cfg: TextConfig) -> LayerStack:
    """The stack of the MoE layers (depth 0 when there are none): what router captures, expert masks and
    expert statistics are indexed by."""
    return next((s for s in text_stacks(cfg) if s.name == MOE_STACK), LayerStack(MOE_STACK, cfg.num_hidden_layers, 0))
