"""The cached forward used by generation: the MLA latent cache, absorbed attention, chunked prefill.

The cache holds, per layer and token, only what MLA needs to rebuild keys and values (spec 3.3.6):
the normalised latent c_kv (kv_lora_rank values) and the rotated shared rope key k_pe
(qk_rope_head_dim values). For the released model that is (256 + 64) * 2 bytes * 36 layers =
23,040 bytes per token in bf16. Attention against it uses the absorbed form
(`Mistral4Attention.attend_latent`): W_UK folded into the query, W_UV applied after the softmax, so
keys and values are never expanded per head. Prefill uses the same form chunk by chunk: activation
memory is chunk x cache length, never quadratic in the prompt.

Cache slot s of a row holds the token at absolute position s of that row. Each row has its own
positions (rows of different lengths share one batch); a query at position p attends to slots <= p,
so slots past a row's end (padding, or not yet written) are never read before they are overwritten.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from . import ops
from ..config import TextConfig
from ..sharding import ACT_BTD, CACHE_LBSC, constrain, logical_sharding


class Cache(NamedTuple):
    """The latent cache of all decoder layers (dense layers first, then MoE layers, as they run)."""

    c_kv: jax.Array  # [L, B, S, kv_lora_rank], after kv_a_layernorm
    k_pe: jax.Array  # [L, B, S, qk_rope_head_dim], RoPE applied


def init_cache(cfg: TextConfig, batch: int, length: int, dtype, mesh=None) -> Cache:
    """A zero cache for `batch` rows of `length` slots, batch split over the mesh's `data` axis."""
    shapes = ((cfg.num_hidden_layers, batch, length, cfg.kv_lora_rank),
              (cfg.num_hidden_layers, batch, length, cfg.qk_rope_head_dim))
    if mesh is None:
        return Cache(*(jnp.zeros(s, dtype) for s in shapes))
    return Cache(*(jax.jit(lambda s=s: jnp.zeros(s, dtype), out_shardings=logical_sharding(mesh, CACHE_LBSC, s))()
                   for s in shapes))


def cache_bytes_per_token(cfg: TextConfig, dtype) -> int:
    """(kv_lora_rank + qk_rope_head_dim) * itemsize * layers."""
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * jnp.dtype(dtype).itemsize * cfg.num_hidden_layers


def rope_tables(cfg: TextConfig, positions_bt: jax.Array, dtype):
    """cos/sin [B, T, rope/2] of the text RoPE at absolute per-row positions (as Mistral4Model)."""
    r = cfg.rope
    inv = ops.yarn_inv_freq(cfg.qk_rope_head_dim, r.rope_theta, r.factor, r.original_max_position_embeddings,
                            r.beta_fast, r.beta_slow, r.truncate)
    return ops.rope_cos_sin(positions_bt, jnp.asarray(inv), cfg.rope_attention_factor, dtype)


def write_rows(cache_bsc: jax.Array, new_btc: jax.Array, start_b: jax.Array) -> jax.Array:
    """cache[b, start[b] : start[b] + T] = new[b]: each row writes at its own offset."""
    return jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice_in_dim(c, u, s, axis=0))(cache_bsc, new_btc, start_b)


def _layer_cached(layer, x_btd, cos, sin, positions_bt, cache: Cache, li, mesh):
    """One decoder layer on T new tokens per row at `positions_bt` (consecutive per row)."""
    attn = layer.self_attn
    h_in = layer.input_layernorm(x_btd)
    c_kv, k_pe = attn.latent(h_in, cos, sin)
    start = positions_bt[:, 0]
    ckv_l = write_rows(jax.lax.dynamic_index_in_dim(cache.c_kv, li, 0, keepdims=False), c_kv.astype(cache.c_kv.dtype), start)
    kpe_l = write_rows(jax.lax.dynamic_index_in_dim(cache.k_pe, li, 0, keepdims=False), k_pe.astype(cache.k_pe.dtype), start)
    slots = jnp.broadcast_to(jnp.arange(ckv_l.shape[1], dtype=positions_bt.dtype), (x_btd.shape[0], ckv_l.shape[1]))
    mask = ops.causal_mask(positions_bt, slots)
    q = attn.query(h_in, cos, sin, positions_bt)
    h = x_btd + attn.attend_latent(q, ckv_l.astype(q.dtype), kpe_l.astype(q.dtype), mask)
    out = h + layer.mlp(layer.post_attention_layernorm(h))
    cache = Cache(jax.lax.dynamic_update_index_in_dim(cache.c_kv, ckv_l, li, 0),
                  jax.lax.dynamic_update_index_in_dim(cache.k_pe, kpe_l, li, 0))
    return constrain(out, mesh, ACT_BTD), cache


def forward_cached(model, x_btd: jax.Array, positions_bt: jax.Array, cache: Cache, mesh=None):
    """Final-norm hidden states [B, T, D] of T new tokens per row, and the cache with them written.

    `model` is a `Mistral3ForConditionalGeneration`; `x_btd` are input embeddings (`model.embed`);
    row b's tokens sit at positions_bt[b] = p_b, p_b + 1, ..., which are also their cache slots.
    """
    lm = model.language_model
    cos, sin = rope_tables(lm.cfg, positions_bt, x_btd.dtype)
    carry = (constrain(x_btd, mesh, ACT_BTD), cache, jnp.int32(0))
    for stack in (lm.dense_layers, lm.layers):
        if stack is None:
            continue
        graphdef, state = nnx.split(stack)

        def body(carry, layer_state, graphdef=graphdef):
            x, cache, li = carry
            x, cache = _layer_cached(nnx.merge(graphdef, layer_state), x, cos, sin, positions_bt, cache, li, mesh)
            return (x, cache, li + 1), None

        carry, _ = jax.lax.scan(body, carry, state)
    x, cache, _ = carry
    return lm.norm(x), cache


def prefill(model, embeds_btd: jax.Array, cache: Cache, chunk: int, mesh=None):
    """Run a right-padded prompt batch [B, T] (T a multiple of `chunk`) through the model chunk by chunk.

    Positions are 0..T-1 in every row (slot = position). Returns the hidden states [B, T, D] and the
    filled cache; a row's padding slots hold junk that its later tokens overwrite before reading.
    """
    b, t, d = embeds_btd.shape
    n = t // chunk
    xs = embeds_btd.reshape(b, n, chunk, d).swapaxes(0, 1)

    def body(cache, inp):
        x, start = inp
        pos = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
        h, cache = forward_cached(model, x, pos, cache, mesh)
        return cache, h

    cache, hs = jax.lax.scan(body, cache, (xs, jnp.arange(n, dtype=jnp.int32) * chunk))
    return hs.swapaxes(0, 1).reshape(b, t, d), cache
