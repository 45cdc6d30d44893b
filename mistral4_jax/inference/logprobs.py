"""Log-probabilities of target tokens through the lm_head, a chunk of the sequence at a time.

Scoring and the fine-tuning loss need, per position, only the log-probability of one target token
(and whether it is the argmax), but the full logits are [B, T, V] float32: 34 GB for 8 x 8192 tokens
at the released vocabulary (131072). `target_logprobs` applies the head to the final hidden states
`chunk` positions at a time under `lax.map`, so only [B, chunk, V] logits exist at once. The chunk
body is `jax.checkpoint`ed: the backward pass recomputes a chunk's logits from its hidden states
instead of keeping every chunk's, so gradients are memory-bounded in the vocabulary too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..errors import InputError

# [B, 512, V] float32 logits at a time: 256 MB per batch row at V = 131072, and [B * 512, H] x [H, V]
# is a matmul large enough to run at full speed (bench/score_memory.py measures the chunk sizes).
DEFAULT_CHUNK = 512


def chunk_layout(t: int, chunk: int) -> tuple[int, int]:
    """(n, c): T positions cut into n = ceil(T / chunk) chunks of c = ceil(T / n) <= chunk positions.

    Equal chunks, the last one padded: n * c - T < n padded positions, however `chunk` divides T.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"chunk must be an integer >= 1 (positions per lm_head chunk), got {chunk!r}")
    n = -(-t // chunk)
    return n, -(-t // n)


def target_logprobs(hidden_btd: jax.Array, kernel_dv: jax.Array, targets_bt: jax.Array, *,
                    chunk: int = DEFAULT_CHUNK) -> tuple[jax.Array, jax.Array]:
    """(log p [B, T] float32, is_argmax [B, T] bool) of each position's target under logits h @ W.

    log p[b,t] = z[b,t,y] - logsumexp_v z[b,t,v] and is_argmax[b,t] = (argmax_v z[b,t,v] == y), with
    z = h @ W, y = targets[b,t]; hidden [B, T, D], kernel W [D, V] (the lm_head kernel, x @ W layout),
    targets int [B, T] in [0, V). The matmul runs in the operands' promoted dtype (what `lm_head`
    computes), the softmax in float32. Only [B, c, V] logits exist at a time (`chunk_layout`).
    """
    b, t, d = hidden_btd.shape
    n, c = chunk_layout(t, chunk)
    pad = n * c - t
    dtype = jnp.result_type(hidden_btd.dtype, kernel_dv.dtype)
    h_nbcd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, d).swapaxes(0, 1)
    y_nbc = jnp.pad(targets_bt, ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def one(w_dv, h_bcd, y_bc):
        z_bcv = jnp.einsum("bcd,dv->bcv", h_bcd.astype(dtype), w_dv.astype(dtype)).astype(jnp.float32)
        # select by comparison rather than gather: stays elementwise when the vocab axis is sharded
        hit_bcv = jnp.arange(z_bcv.shape[-1], dtype=y_bc.dtype) == y_bc[..., None]
        z_y = jnp.sum(jnp.where(hit_bcv, z_bcv, 0.0), axis=-1)
        return z_y - jax.nn.logsumexp(z_bcv, axis=-1), jnp.argmax(z_bcv, axis=-1) == y_bc

    lp_nbc, top_nbc = jax.lax.map(lambda xs: one(kernel_dv, *xs), (h_nbcd, y_nbc))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * c)[:, :t]  # noqa: E731
    return unchunk(lp_nbc), unchunk(top_nbc)


def target_top_logprobs(hidden_btd: jax.Array, kernel_dv: jax.Array, targets_bt: jax.Array, k: int, *,
                        chunk: int = DEFAULT_CHUNK) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log p(target) [B, T], the k largest log p [B, T, k] float32, their ids [B, T, k] int32) per position.

    As `target_logprobs`, plus `lax.top_k` of each position's logits (ties: the lower id first, as argmax).
    Both come from the same z - logsumexp(z), so where the target is the argmax its log p equals the
    first top value exactly (an OpenAI client reads "greedy" as that equality). k >= 1, static.
    """
    b, t, d = hidden_btd.shape
    n, c = chunk_layout(t, chunk)
    pad = n * c - t
    dtype = jnp.result_type(hidden_btd.dtype, kernel_dv.dtype)
    h_nbcd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, d).swapaxes(0, 1)
    y_nbc = jnp.pad(targets_bt, ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)

    def one(w_dv, h_bcd, y_bc):
        z_bcv = jnp.einsum("bcd,dv->bcv", h_bcd.astype(dtype), w_dv.astype(dtype)).astype(jnp.float32)
        lp_bcv = z_bcv - jax.nn.logsumexp(z_bcv, axis=-1, keepdims=True)
        hit_bcv = jnp.arange(z_bcv.shape[-1], dtype=y_bc.dtype) == y_bc[..., None]
        top_lp, top_id = jax.lax.top_k(lp_bcv, k)
        return jnp.sum(jnp.where(hit_bcv, lp_bcv, 0.0), axis=-1), top_lp, top_id.astype(jnp.int32)

    lp_nbc, top_nbck, ids_nbck = jax.lax.map(lambda xs: one(kernel_dv, *xs), (h_nbcd, y_nbc))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * c, *x.shape[3:])[:, :t]  # noqa: E731
    return unchunk(lp_nbc), unchunk(top_nbck), unchunk(ids_nbck)
