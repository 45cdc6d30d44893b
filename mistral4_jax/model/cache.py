"""The MLA latent cache that generation fills and reads (the cached forward is `Mistral4Model.forward_cached`).

The cache holds, per layer and token, only what MLA needs to rebuild keys and values (docs/model.md 3.3.6):
the normalised latent c_kv (kv_lora_rank values) and the rotated shared rope key k_pe
(qk_rope_head_dim values). For the released model that is (256 + 64) * 2 bytes * 36 layers =
23,040 bytes per token in bf16. Attention against it uses the absorbed form
(`Mistral4Attention.attend_latent`): W_UK folded into the query, W_UV applied after the softmax, so
keys and values are never expanded per head. Prefill (`Mistral4Model.prefill`) uses the same form
chunk by chunk, and the attention (`attention.latent_attention`) reads key blocks only up to the
largest query position: activation memory is chunk x block, and work grows with the filled length,
not the cache's size.

Cache slot s of a row holds the token at absolute position s of that row. Each row has its own
positions (rows of different lengths share one batch); a query at position p attends to slots <= p,
so slots past a row's end (padding, or not yet written) are never read before they are overwritten.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..config import TextConfig
from ..sharding import CACHE_LBSC, logical_sharding


class Cache(NamedTuple):
    """The latent cache of all decoder layers (dense layers first, then MoE layers, as they run): one
    contiguous row of S slots per batch row."""

    c_kv: jax.Array  # [L, B, S, kv_lora_rank], after kv_a_layernorm
    k_pe: jax.Array  # [L, B, S, qk_rope_head_dim], RoPE applied

    @property
    def table(self) -> None:
        return None


class PagedCache(NamedTuple):
    """The latent cache as a pool of pages shared by all rows (PagedAttention, Kwon et al. 2023): page n holds
    PS consecutive slots of whichever row's block table names it. Slot s of row b lives in page
    table[b, s // PS] at offset s % PS; rows hold pages only for the slots they use, and rows with the same
    prompt prefix may name the same pages (`inference/pages.py` hands them out)."""

    c_kv: jax.Array  # [L, N, PS, kv_lora_rank]
    k_pe: jax.Array  # [L, N, PS, qk_rope_head_dim]
    table: jax.Array  # [B, M] int32 page ids: row b's slots are M * PS at most
    trash: jax.Array  # [B] int32: the page a row writes to when it holds none (idle rows, padding slots)


def init_cache(cfg: TextConfig, batch: int, length: int, dtype, mesh=None) -> Cache:
    """A zero cache for `batch` rows of `length` slots, batch split over the mesh's `data` axis."""
    shapes = ((cfg.num_hidden_layers, batch, length, cfg.kv_lora_rank),
              (cfg.num_hidden_layers, batch, length, cfg.qk_rope_head_dim))
    # made in place on each device (jnp.zeros compiles one cached program per shape and sharding)
    return Cache(*(jnp.zeros(s, dtype, device=None if mesh is None else logical_sharding(mesh, CACHE_LBSC, s))
                   for s in shapes))


def cache_bytes_per_token(cfg: TextConfig, dtype) -> int:
    """(kv_lora_rank + qk_rope_head_dim) * itemsize * layers."""
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * jnp.dtype(dtype).itemsize * cfg.num_hidden_layers


def write_layer(cache: Cache | PagedCache, layer, c_kv_btc: jax.Array, k_pe_btr: jax.Array, start_b: jax.Array,
                rows_b: jax.Array | None = None) -> Cache | PagedCache:
    """Write T new tokens per row (row b at slots start[b]..) into layer `layer` (a traced index).

    rows_b: the cache row of each input row (default: row b is cache row b); a row index past the cache is
    padding and writes nothing. One scatter into the stacked cache (or page pool), which XLA does in place:
    no layer, row or page of the cache is copied."""
    b, t = c_kv_btc.shape[:2]
    rows = (jnp.arange(b) if rows_b is None else rows_b)[:, None]
    slots = start_b[:, None] + jnp.arange(t, dtype=start_b.dtype)[None, :]
    if isinstance(cache, PagedCache):
        ps = cache.c_kv.shape[2]
        (n_rows, width), n_pages = cache.table.shape, cache.c_kv.shape[1]
        page = cache.table[jnp.minimum(rows, n_rows - 1), jnp.minimum(slots // ps, width - 1)]
        page = jnp.where((rows < n_rows) & (slots // ps < width), page, n_pages)  # padding: written nowhere
        at = (layer, page, slots % ps)
    else:
        at = (layer, rows, slots)
    return cache._replace(**{name: full.at[at].set(new.astype(full.dtype), mode="drop")
                             for name, full, new in (("c_kv", cache.c_kv, c_kv_btc), ("k_pe", cache.k_pe, k_pe_btr))})
