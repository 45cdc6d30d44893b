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


def sample_rows(logits_bv, keys_b2, steps_b, temperature_b, top_k_b, top_p_b):
    """A token per row, each with its own settings; row b draws with key fold_in(keys_b2[b], steps_b[b]): its
    request's key and its own step, so its samples do not depend on the row or the batch it is in. A batch
    with no sampled row takes only the argmax (no sort of the vocabulary)."""

    def sampled(_):
        keys = jax.vmap(jax.random.fold_in)(keys_b2, steps_b)
        return jax.vmap(sample_logits)(logits_bv, keys, temperature_b, top_k_b, top_p_b)

    def greedy(_):
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    return jax.lax.cond(jnp.any(temperature_b > 0), sampled, greedy, None)
