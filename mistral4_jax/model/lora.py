"""LoRA (Hu et al. 2021) as a weight kind (`weights.py`): a frozen base W of any kind plus a low-rank update.

For a weight W [..., in, out] (our layout: x @ W) the adapter is A [..., in, r] and B [..., r, out] with the
leading axes of W (layers, and experts: each expert has its own pair), and the matmul operand is

    W_eff = W + scale * A @ B                                  scale = alpha / r

formed in float32 from `dense(W)` (a plain array, or an FP8 / NVFP4 base dequantised to its compute dtype)
and cast back to that dtype. Training keeps the adapters separate (`train/lora.py`); loading a PEFT adapter
(`checkpoints/adapter.py`) and the merged export fold them in with `merged`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from . import weights


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoRAWeight:
    """A weight kind read as W + scale * A @ B (A [..., in, r], B [..., r, out]); the base W is a plain array or
    another kind (FP8), `scale` is static."""

    w: object
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True))

    def dense(self) -> jax.Array:
        return effective_weight(weights.dense(self.w), self.a, self.b, self.scale)

    def __getitem__(self, key):
        if key is not Ellipsis:
            raise TypeError("a LoRA weight is read whole, as param[...]")
        return self.dense()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)


def effective_weight(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale * A @ B for a plain array W, computed in float32 and cast to W's dtype."""
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * scale
    return (w.astype(jnp.float32) + delta).astype(w.dtype)


def merged(w, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale * A @ B as one plain array in the base's compute dtype (`dense(W)`'s), for a base of any kind.

    Formed one [in, out] matrix at a time (a loop over the leading axes: a layer's expert, say), so the float32
    temporaries are one matrix whatever the size of the stack. A plain base is updated in its own buffer: jit
    this with the base donated and the merge needs no second copy of it."""
    lead = tuple(w.shape[:-2])
    n = math.prod(lead)
    if n <= 1:
        return effective_weight(weights.dense(w), a, b, scale)
    plain = not weights.is_kind(w)
    out_dtype = jax.eval_shape(lambda: weights.dense(weights.index(w, *(0,) * len(lead)))).dtype
    out = w if plain else jnp.zeros(w.shape, out_dtype)

    def body(i, out):
        idx = jnp.unravel_index(i, lead)
        base = weights.index(out if plain else w, *idx)
        m = effective_weight(weights.dense(base), weights.index(a, *idx), weights.index(b, *idx), scale)
        return jax.lax.dynamic_update_slice(out, m.reshape((1,) * len(lead) + m.shape), (*idx, 0, 0))

    return jax.lax.fori_loop(0, n, body, out)


merge = jax.jit(merged, static_argnums=3)  # the base kept
merge_in_place = jax.jit(merged, static_argnums=3, donate_argnums=0)  # a plain base's buffer reused
