"""Token sampling from logits (pure functions): greedy, temperature, top-k and top-p."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_logits(logits_v: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """One token id from logits [V]: greedy when temperature == 0, else softmax(logits / T)
    restricted to the top_k most likely tokens (top_k = 0: all) and to the smallest set whose
    probability reaches top_p (nucleus; the most likely token always stays)."""

    def sampled(_):
        x = logits_v.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
        order = jnp.argsort(-x)
        xs = x[order]
        rank = jnp.arange(x.shape[0])
        keep = (top_k <= 0) | (rank < top_k)
        probs = jax.nn.softmax(jnp.where(keep, xs, -jnp.inf))
        before = jnp.cumsum(probs) - probs  # mass of the more likely tokens
        keep = keep & (before < top_p)
        return order[jax.random.categorical(key, jnp.where(keep, xs, -jnp.inf))].astype(jnp.int32)

    def greedy(_):
        return jnp.argmax(logits_v).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sampled, greedy, None)


def sample_rows(logits_bv, key, ids_b, steps_b, temperature, top_k, top_p):
    """A token per row; row b draws with key fold_in(fold_in(key, ids_b[b]), steps_b[b]): a request's
    id and its own step, so its samples do not depend on the row or the batch it is in."""
    keys = jax.vmap(lambda i, s: jax.random.fold_in(jax.random.fold_in(key, i), s))(ids_b, steps_b)
    return jax.vmap(sample_logits, in_axes=(0, 0, None, None, None))(logits_bv, keys, temperature, top_k, top_p)
