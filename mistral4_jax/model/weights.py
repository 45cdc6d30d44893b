"""What a matmul reads: a weight is a plain array or a *kind*, one small protocol for every format.

A kind is a registered pytree dataclass (FP8 `fp8.Fp8Weight`, NVFP4 `nvfp4.Nvfp4Weight`, LoRA over any
other `lora.LoRAWeight`, the layer view `Stacked` below) with two rules:

- every array leaf shares the weight's leading axes (layers, experts), so a slice of a weight along
  them is a slice of each leaf: `index(w, e)` and `take(w, idx)` work for any kind, and a kind stays
  packed (E4M3 bits, adapter factors) until it is used;
- `w.dense()` returns the matmul operand `W` [..., in, out] in the compute dtype (dequantised, adapters
  added), and `w[...]` is the same, so modules read every parameter with `param[...]`. A kind may also
  define `matmul(x)` when `x @ W` is cheaper than forming `W` (LoRA: `x @ W0 + s (x @ A) @ B`).

The routed experts use only this protocol (`moe.py`): they select experts on the packed leaves, then
dequantise one expert's slice right before its matmuls. Adding a weight format is a new kind with these
methods; nothing else changes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def is_kind(w) -> bool:
    return hasattr(w, "dense")


def dense(w) -> jax.Array:
    """The matmul operand `W` of `w` (a plain array is its own)."""
    return w.dense() if is_kind(w) else w


def matmul(x: jax.Array, w) -> jax.Array:
    """x @ W for a weight of any kind (its own `matmul` when it has one)."""
    if is_kind(w) and hasattr(w, "matmul"):
        return w.matmul(x)
    return x @ dense(w)


def _index_leaf(a: jax.Array, idx: tuple) -> jax.Array:
    """a[idx] for scalar (traced) indices of the leading axes, as one dynamic slice (no gather)."""
    starts = (*idx, *(0,) * (a.ndim - len(idx)))
    sizes = (*(1,) * len(idx), *a.shape[len(idx):])
    return jax.lax.dynamic_slice(a, starts, sizes).reshape(a.shape[len(idx):])


def index(w, *idx):
    """w[i, j, ...] along its leading axes (scalar, possibly traced indices): the same kind, one slice."""
    if isinstance(w, Stacked):
        return index(w.value, w.layer, *idx)
    return jax.tree.map(lambda a: _index_leaf(a, idx), w)


def take(w, idx: jax.Array):
    """w[idx] along its first axis for an index array (a gather on the packed leaves)."""
    if isinstance(w, Stacked):
        return jax.tree.map(lambda a: a[w.layer, idx], w.value)
    return jax.tree.map(lambda a: a[idx], w)


def unstacked(w) -> tuple[object, tuple]:
    """(the weight whose leaves hold the data, the leading indices a view fixes): a `Stacked` view is
    its stack and its layer; anything else is itself, with none."""
    return (w.value, (w.layer,)) if isinstance(w, Stacked) else (w, ())


def add_at(acc, delta, *idx):
    """acc with `delta` (a slice of it, as `index` returns) added at [idx]; leaves of delta that are None
    (no cotangent: integer or packed leaves) are skipped."""

    def add(a, d):
        if d is None:
            return a
        starts = (*idx, *(0,) * (a.ndim - len(idx)))
        cur = jax.lax.dynamic_slice(a, starts, (*(1,) * len(idx), *a.shape[len(idx):]))
        return jax.lax.dynamic_update_slice(a, cur + d.reshape(cur.shape).astype(a.dtype), starts)

    return jax.tree.map(add, acc, delta, is_leaf=lambda x: x is None)


def float_leaves_only(tree):
    """`tree` with every leaf that cannot carry a gradient (integer or packed bits) replaced by None."""
    return jax.tree.map(lambda a: a if jnp.issubdtype(a.dtype, jnp.inexact) else None, tree)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Stacked:
    """Layer `layer` of a weight stacked over layers, read lazily: `index(view, e)` slices [layer, e]
    straight out of the stack. Inside the layer scan the routed experts are seen this way, so a decode
    step reads the experts it routes to and never copies a layer's whole expert stack (a scan slice
    would: a loop over experts needs its operand as a buffer)."""

    value: object  # a plain array or a kind, with leading [layers, ...] axes
    layer: jax.Array  # int32 scalar

    def dense(self) -> jax.Array:
        return dense(index(self.value, self.layer))

    def __getitem__(self, key):
        if key is not Ellipsis:
            raise TypeError("a stacked weight view is read whole, as param[...]")
        return self.dense()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape[1:])
