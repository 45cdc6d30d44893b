"""Blockwise attention: online softmax over key blocks, so memory is linear in the sequence length.

`ops.attention` and `ops.mla_absorbed_attention` build the whole fp32 score matrix [B, H, T, S]; they
stay as the simple reference path. The functions here compute the same values one
[block_q, block_k] tile at a time (FlashAttention-2, Dao 2023):

    m_j = max(m_{j-1}, rowmax(s_j)),   l_j = e^(m_{j-1} - m_j) l_{j-1} + rowsum(e^(s_j - m_j)),
    acc_j = e^(m_{j-1} - m_j) acc_{j-1} + e^(s_j - m_j) v_j,       out = acc_n / l_n,

with the running max m, sum l and accumulator acc in float32. A key block is visited only if some
query of the block may attend to some key in it, and the loop over key blocks is a `while` whose trip
count comes from the positions at run time: for causal attention the blocks above the diagonal cost
nothing. Masks are those of `ops.causal_mask` (key position <= query position, and the key is valid),
so per-row positions, offsets and padding behave as in the reference path; rows with no allowed key
give zeros.

Shape suffixes as in ops.py: b batch, t/s query/key time, h heads, d head dim, c latent (kv_lora_rank).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from . import ops

# Tile sizes: one fp32 score tile is B * H * BLOCK_Q * BLOCK_K * 4 bytes (32 MiB per row at 32 heads).
BLOCK_Q = 512
BLOCK_K = 512
# Decode has one query per row: larger key blocks, fewer loop steps (the tile is H * 2048 * 4 bytes).
DECODE_BLOCK_K = 2048
IMPLS = ("auto", "blockwise", "reference")

_NEG_INF = -jnp.inf
_POS_MAX = jnp.iinfo(jnp.int32).max
_POS_MIN = jnp.iinfo(jnp.int32).min


# ---------------------------------------------------------------------- pieces of the online softmax
def _block(x, i, size, axis):
    """Block i (of `size` entries) along `axis` of x."""
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis)


def _pad(x, axis, length, value):
    """x padded along `axis` with `value` to `length` entries (no copy when already that long)."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _online_update(carry, s_bhts, v_weighted):
    """One key block folded into (m, l, acc); s: masked fp32 scores (-inf where not allowed).

    v_weighted(p) -> the block's contribution p @ v in acc's layout. Returns the new carry."""
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(s_bhts, axis=-1))
    m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)  # a row with nothing allowed yet: keep exp finite
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s_bhts - m_safe[..., None])
    return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + v_weighted(p)


def _normalise(l_bht, acc):
    """acc / l, zero where no key was allowed (l = 0)."""
    return jnp.where(l_bht[..., None] > 0, acc / jnp.where(l_bht > 0, l_bht, 1.0)[..., None], 0.0)


def key_block_counts(q_pos_bt, k_pos_bs, k_valid_bs, block_q: int, block_k: int) -> jax.Array:
    """[T / block_q] int32: for each query block, 1 + the last key block holding a key that some
    query of the block may attend (valid and k_pos <= q_pos); 0 when there is none.

    Only blocks before that count are visited; blocks inside the range that are fully masked (rare:
    only with non-monotonic positions) are computed and masked, so the result is exact for any
    positions. T and S must be multiples of the block sizes."""
    b, t = q_pos_bt.shape
    s = k_pos_bs.shape[1]
    q_max = jnp.max(q_pos_bt.reshape(b, t // block_q, block_q), axis=(0, 2))
    k_min = jnp.min(jnp.where(k_valid_bs, k_pos_bs, _POS_MAX).reshape(b, s // block_k, block_k), axis=(0, 2))
    needed = k_min[None, :] <= q_max[:, None]
    return jnp.max(jnp.where(needed, jnp.arange(1, s // block_k + 1, dtype=jnp.int32), 0), axis=1)


def _scores(q_bthd, k_bshd, scale):
    return jnp.einsum("bthd,bshd->bhts", q_bthd, k_bshd, preferred_element_type=jnp.float32) * jnp.float32(scale)


def _mask(q_pos_bt, k_pos_bs, k_seg_bs, q_seg_bt):
    """[B, 1, T, S]: as ops.causal_mask, with a head axis. Segments: a key of segment 0 is padding, of segment 1
    seen by every query, of segment s >= 2 only by queries of segment s (several continuations packed after
    one shared context)."""
    seen = (k_seg_bs[:, None, :] == 1) | (k_seg_bs[:, None, :] == q_seg_bt[:, :, None])
    return ((k_pos_bs[:, None, :] <= q_pos_bt[:, :, None]) & (k_seg_bs[:, None, :] > 0) & seen)[:, None]


# ---------------------------------------------------------------------- expanded form, with its VJP
def _flash_forward(q, k, v, q_pos, k_pos, k_seg, q_seg, scale, bq, bk):
    """(out [B, T, H, Dv] in v's dtype, logsumexp [B, H, T] fp32) for block-aligned inputs.

    Each query block's result is written in place into the output buffers (no stacked copy)."""
    b, t, h, _ = q.shape
    dv = v.shape[-1]
    counts = key_block_counts(q_pos, k_pos, k_seg > 0, bq, bk)

    def q_block(i, bufs):
        out_buf, lse_buf = bufs
        q_i, qp_i, qs_i = _block(q, i, bq, 1), _block(q_pos, i, bq, 1), _block(q_seg, i, bq, 1)

        def body(j, carry):
            k_j, v_j = _block(k, j, bk, 1), _block(v, j, bk, 1)
            m = _mask(qp_i, _block(k_pos, j, bk, 1), _block(k_seg, j, bk, 1), qs_i)
            s = jnp.where(m, _scores(q_i, k_j, scale), _NEG_INF)
            pv = lambda p: jnp.einsum("bhts,bshd->bhtd", p.astype(v.dtype), v_j,  # noqa: E731
                                      preferred_element_type=jnp.float32)
            return _online_update(carry, s, pv)

        init = (jnp.full((b, h, bq), _NEG_INF), jnp.zeros((b, h, bq)), jnp.zeros((b, h, bq, dv)))
        m, l, acc = jax.lax.fori_loop(0, counts[i], body, init)
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), _NEG_INF)
        out_i = _normalise(l, acc).astype(v.dtype).swapaxes(1, 2)  # [B, bq, H, Dv]
        return (jax.lax.dynamic_update_slice_in_dim(out_buf, out_i, i * bq, 1),
                jax.lax.dynamic_update_slice_in_dim(lse_buf, lse, i * bq, 2))

    bufs = (jnp.zeros((b, t, h, dv), v.dtype), jnp.zeros((b, h, t), jnp.float32))
    return jax.lax.fori_loop(0, t // bq, q_block, bufs)


@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(q, k, v, q_pos, k_pos, k_seg, q_seg, scale, bq, bk):
    return _flash_forward(q, k, v, q_pos, k_pos, k_seg, q_seg, scale, bq, bk)[0]


def _flash_fwd(q, k, v, q_pos, k_pos, k_seg, q_seg, scale, bq, bk):
    out, lse = _flash_forward(q, k, v, q_pos, k_pos, k_seg, q_seg, scale, bq, bk)
    return out, (q, k, v, q_pos, k_pos, k_seg, q_seg, out, lse)


def _flash_bwd(scale, bq, bk, res, d_out):
    """FlashAttention-2 backward: per tile, p = exp(s - lse) is recomputed from the saved logsumexp;
    ds = p * (dp - rowsum(dO * O)); dq += ds k, dk += ds^T q, dv += p^T dO (times scale for dq, dk).
    Residuals are q, k, v, out and lse: memory linear in T; dk and dv accumulate in fp32 buffers."""
    q, k, v, q_pos, k_pos, k_seg, q_seg, out, lse = res
    b, t, h, d = q.shape
    counts = key_block_counts(q_pos, k_pos, k_seg > 0, bq, bk)
    delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
    sc = jnp.float32(scale)

    def q_block(i, grads):
        dq, dk, dv = grads
        q_i, qp_i, do_i = _block(q, i, bq, 1), _block(q_pos, i, bq, 1), _block(d_out, i, bq, 1)
        qs_i = _block(q_seg, i, bq, 1)
        lse_i, delta_i = _block(lse, i, bq, 2), _block(delta, i, bq, 2)

        def body(j, inner):
            dq_i, dk, dv = inner
            k_j, v_j = _block(k, j, bk, 1), _block(v, j, bk, 1)
            m = _mask(qp_i, _block(k_pos, j, bk, 1), _block(k_seg, j, bk, 1), qs_i)
            p = jnp.where(m, jnp.exp(_scores(q_i, k_j, scale) - lse_i[..., None]), 0.0)  # [B, H, bq, bk]
            dp = jnp.einsum("bthd,bshd->bhts", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None]) * sc
            dq_i = dq_i + jnp.einsum("bhts,bshd->bthd", ds, k_j.astype(jnp.float32))
            dk_j = _block(dk, j, bk, 1) + jnp.einsum("bhts,bthd->bshd", ds, q_i.astype(jnp.float32))
            dv_j = _block(dv, j, bk, 1) + jnp.einsum("bhts,bthd->bshd", p, do_i.astype(jnp.float32))
            dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, j * bk, 1)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_j, j * bk, 1)
            return dq_i, dk, dv

        dq_i, dk, dv = jax.lax.fori_loop(0, counts[i], body, (jnp.zeros((b, bq, h, d)), dk, dv))
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_i.astype(q.dtype), i * bq, 1), dk, dv

    grads = (jnp.zeros(q.shape, q.dtype), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = jax.lax.fori_loop(0, t // bq, q_block, grads)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _block_size(n: int, preferred: int) -> int:
    """`preferred`, or n rounded up to a multiple of 8 when the whole length is shorter."""
    return min(preferred, -(-n // 8) * 8)


def blockwise_attention(q_bthd, k_bshd, v_bshd, q_pos_bt, k_pos_bs, k_valid_bs, scale: float,
                        block_q: int | None = None, block_k: int | None = None, q_valid_bt=None) -> jax.Array:
    """softmax(q k^T * scale, masked) v -> [B, T, H, Dv], as `ops.attention` with
    `ops.causal_mask(q_pos, k_pos, k_valid, q_valid)`, in memory linear in T and S. k_valid / q_valid: bool, or
    int segments (0 padding, 1 shared, s >= 2 private to segment s; see `_mask`).

    Differentiable in q, k, v with a custom VJP (FlashAttention-2): the backward recomputes each tile
    from q, k, v and the saved fp32 logsumexp [B, H, T], so neither pass keeps a [T, S] matrix.
    (`jax.checkpoint`ed blocks would not do: reverse-mode differentiation cannot go through the
    `while` loops whose run-time trip counts skip the masked blocks.) T and S are padded to
    multiples of the block sizes (default BLOCK_Q, BLOCK_K); padded keys are invalid, padded queries
    are dropped.
    """
    b, t, _, _ = q_bthd.shape
    s = k_bshd.shape[1]
    k_seg = jnp.ones((b, s), jnp.int32) if k_valid_bs is None else k_valid_bs.astype(jnp.int32)
    q_seg = jnp.zeros((b, t), jnp.int32) if q_valid_bt is None else q_valid_bt.astype(jnp.int32)
    bq, bk = _block_size(t, block_q or BLOCK_Q), _block_size(s, block_k or BLOCK_K)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    out = _flash(_pad(q_bthd, 1, tp, 0), _pad(k_bshd, 1, sp, 0), _pad(v_bshd, 1, sp, 0),
                 _pad(q_pos_bt.astype(jnp.int32), 1, tp, _POS_MIN), _pad(k_pos_bs.astype(jnp.int32), 1, sp, _POS_MAX),
                 _pad(k_seg, 1, sp, 0), _pad(q_seg, 1, tp, 0), float(scale), bq, bk)
    return out[:, :t]


# ---------------------------------------------------------------------- backend choice (fused on GPU)
def cudnn_eligible(backend: str, q_shape, k_shape, v_shape, dtype) -> bool:
    """Whether `jax.nn.dot_product_attention(implementation="cudnn")` can compute attention of these
    shapes: a GPU, a 16-bit dtype, q/k and v head dims of 128 (Mistral 4's 64 + 64 and 128) and as
    many keys as queries (self-attention over the sequence)."""
    return (backend == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and q_shape[-1] == 128 and v_shape[-1] == 128 and q_shape[1] == k_shape[1])


def choose_impl(impl: str, q_bthd, k_bshd, v_bshd) -> str:
    """The implementation `expanded_attention` runs, decided at trace time from the backend and the
    shapes: "auto" is "cudnn" where `cudnn_eligible`, else "blockwise" (always on CPU)."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    ok = cudnn_eligible(jax.default_backend(), q_bthd.shape, k_bshd.shape, v_bshd.shape, q_bthd.dtype)
    return "cudnn" if ok else "blockwise"


def cudnn_mask_form(q_pos_bt, k_pos_bs, k_valid_bs) -> jax.Array:
    """Scalar bool: the mask is cuDNN's (causal over positions 0..T-1 in every row, keys valid up to a
    per-row length, i.e. right padding only). Other masks (offsets, left padding) take the blockwise
    path at run time."""
    ar = jnp.arange(q_pos_bt.shape[1], dtype=q_pos_bt.dtype)
    ok = jnp.all(q_pos_bt == ar) & jnp.all(k_pos_bs == ar)
    if k_valid_bs is not None:
        valid = k_valid_bs.astype(jnp.int32)  # segments >= 2 (packed continuations) are not cuDNN's form
        ok &= jnp.all(valid == (ar < jnp.sum(valid > 0, axis=1, keepdims=True)))
    return ok


def expanded_attention(q_bthd, k_bshd, v_bshd, q_pos_bt, k_pos_bs, k_valid_bs, scale: float,
                       impl: str = "auto", q_valid_bt=None) -> jax.Array:
    """Full-sequence attention [B, T, H, Dv] by `impl` ("auto", "blockwise" or "reference").

    "reference" is the materialised `ops.attention` (O(T S) memory: the test reference and the path
    for probability captures). "auto" on GPU with cuDNN-eligible shapes runs the fused cuDNN kernel
    when the mask has its form (`cudnn_mask_form`, checked at run time) and the blockwise path
    otherwise."""
    which = choose_impl(impl, q_bthd, k_bshd, v_bshd)
    if which == "reference":
        return ops.attention(q_bthd, k_bshd, v_bshd, ops.causal_mask(q_pos_bt, k_pos_bs, k_valid_bs, q_valid_bt), scale)

    def blockwise(q, k, v, q_pos, k_pos, k_valid):
        return blockwise_attention(q, k, v, q_pos, k_pos, k_valid, scale, q_valid_bt=q_valid_bt)

    if which == "blockwise":
        return blockwise(q_bthd, k_bshd, v_bshd, q_pos_bt, k_pos_bs, k_valid_bs)

    def cudnn(q, k, v, q_pos, k_pos, k_valid):
        lengths = None if k_valid is None else jnp.sum(k_valid != 0, axis=1, dtype=jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, key_value_seq_lengths=lengths,
                                            implementation="cudnn").astype(v.dtype)

    args = (q_bthd, k_bshd, v_bshd, q_pos_bt, k_pos_bs, k_valid_bs)
    return jax.lax.cond(cudnn_mask_form(q_pos_bt, k_pos_bs, k_valid_bs), cudnn, blockwise, *args)


# ---------------------------------------------------------------------- against the latent cache
def read_cache_block(x, start, size: int, layer=None, rows_b=None, dtype=None, table=None) -> jax.Array:
    """Slots start .. start + size of the cache rows, [B, size, dim], read in place.

    x: one layer's [B, S, dim], or the stacked [L, B, S, dim] with `layer` the index to read; with a block
    `table` [B, M], x is a page pool [L, N, PS, dim] and a row's slots are in the pages its table row names
    (start and size are then multiples of PS). rows_b: the cache row of each query row (default: row b is
    cache row b); indices past the cache read its last row (padding rows, whose results nobody uses). Only
    this block is read: never a whole row, page pool or layer."""
    lead = () if layer is None else (layer,)
    if table is not None:
        ps, b = x.shape[-2], table.shape[0]
        rows = jnp.arange(b) if rows_b is None else jnp.minimum(rows_b, b - 1)
        pages = jax.lax.dynamic_slice_in_dim(table[rows], start // ps, size // ps, axis=1)  # [B, size / PS]
        blk = x[(*lead, pages)]
        blk = blk.reshape(blk.shape[0], size, x.shape[-1])
    elif rows_b is None:
        b = x.shape[-3]
        blk = jax.lax.dynamic_slice(x, (*lead, 0, start, 0), (*(1,) * len(lead), b, size, x.shape[-1]))
        blk = blk.reshape(b, size, x.shape[-1])
    else:
        rows = jnp.minimum(rows_b, x.shape[-3] - 1)[:, None]
        blk = x[(*lead, rows, start + jnp.arange(size, dtype=jnp.int32)[None, :])]
    return blk if dtype is None else blk.astype(dtype)


def cache_slots(x, table=None) -> int:
    """Slots per row of a cache array (a page pool: its table's pages times the page size)."""
    return x.shape[-2] if table is None else table.shape[1] * x.shape[-2]


def _key_blocks(q_pos_bt, s: int, block_k: int, q_valid_bt=None, page: int = 1):
    """(block size, number of blocks to visit) for a query batch against S cache slots: the blocks up to the
    largest position of a used query (q_valid_bt; default all: an idle row parked at the last slot must
    not make every row read the whole buffer). The last block may overhang the buffer: it is read ending at
    S, and `_block_slots` masks the slots a previous block already covered."""
    bk = min(s, max(page, block_k // page * page))  # whole pages
    pos = q_pos_bt if q_valid_bt is None else jnp.where(q_valid_bt, q_pos_bt, 0)
    return bk, jnp.minimum(jnp.max(pos) // bk + 1, -(-s // bk))


def _block_slots(j, bk: int, s: int):
    """(start of block j as read, its slots [bk], mask of slots not covered by an earlier block [bk])."""
    start = jnp.minimum(j * bk, s - bk)
    slots = start + jnp.arange(bk, dtype=jnp.int32)
    return start, slots, slots >= j * bk


def latent_attention(q_nope_bthn, q_pe_bthr, w_uk_chn, w_uv_chv, c_kv, k_pe, q_pos_bt, scale: float,
                     layer=None, block_k: int | None = None, rows_b=None, q_valid_bt=None, table=None) -> jax.Array:
    """`ops.mla_absorbed_attention` against the latent cache, one key block at a time -> [B, T, H, V].

    Cache slot s holds the token at position s, and a query at position p attends to slots <= p (the
    mask `ops.causal_mask(q_pos, slots)`), so only blocks up to the largest query position are read:
    a prefill chunk reads the slots up to its last token, a decode step the filled length, never the
    whole buffer. Per block (docs/model.md 3.3.6), with q_lat = W_UK^T q_nope [B, T, H, C]:
      s = (q_lat . c[s] + q_pe . k_pe[s]) * scale,   o_lat = online-softmax(s) @ c,
    and out = W_UV o_lat. c_kv [B, S, C] and k_pe [B, S, R], or [L, B, S, .] with `layer` the index
    to read; with a block `table`, c_kv and k_pe are page pools (`read_cache_block`); rows_b: the cache rows
    the queries belong to; q_valid_bt: the queries whose output is used (`_key_blocks`). Blocks are sliced
    straight out of the stacked cache, which is never copied.
    block_k: default BLOCK_K, or DECODE_BLOCK_K for a single query. Inference only (no VJP through
    the run-time trip count).
    """
    b, t, h, _ = q_nope_bthn.shape
    s, page = cache_slots(c_kv, table), 1 if table is None else c_kv.shape[-2]
    bk, n_blocks = _key_blocks(q_pos_bt, s, block_k or (DECODE_BLOCK_K if t == 1 else BLOCK_K), q_valid_bt, page)
    q_lat = jnp.einsum("bthn,chn->bthc", q_nope_bthn, w_uk_chn)
    q_pos = q_pos_bt.astype(jnp.int32)

    def body(j, carry):
        start, slots, fresh = _block_slots(j, bk, s)
        c_j, kpe_j = (read_cache_block(x, start, bk, layer, rows_b, q_nope_bthn.dtype, table) for x in (c_kv, k_pe))
        m = ((slots[None, None, :] <= q_pos[:, :, None]) & fresh[None, None, :])[:, None]
        sc = (jnp.einsum("bthc,bsc->bhts", q_lat, c_j, preferred_element_type=jnp.float32)
              + jnp.einsum("bthr,bsr->bhts", q_pe_bthr, kpe_j, preferred_element_type=jnp.float32))
        sc = jnp.where(m, sc * jnp.float32(scale), _NEG_INF)
        pc = lambda p: jnp.einsum("bhts,bsc->bhtc", p.astype(c_j.dtype), c_j,  # noqa: E731
                                  preferred_element_type=jnp.float32)
        return _online_update(carry, sc, pc)

    c = c_kv.shape[-1]
    init = (jnp.full((b, h, t), _NEG_INF), jnp.zeros((b, h, t)), jnp.zeros((b, h, t, c)))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    o_lat = _normalise(l, acc).astype(q_nope_bthn.dtype).swapaxes(1, 2)  # [B, T, H, C]
    return jnp.einsum("bthc,chv->bthv", o_lat, w_uv_chv)


def expanded_cache_attention(q_nope_bthn, q_pe_bthr, w_uk_chn, w_uv_chv, c_kv, k_pe, q_pos_bt, scale: float,
                             layer=None, block_k: int | None = None, rows_b=None, q_valid_bt=None,
                             table=None) -> jax.Array:
    """The same attention as `latent_attention`, in the expanded form: each key block's latents are expanded
    to per-head keys k_nope = c W_UK [B, bk, H, N] and values v = c W_UV [B, bk, H, V], then
      s = (q_nope . k_nope + q_pe . k_pe) * scale,   out = online-softmax(s) @ v.
    Per (query, key) pair this costs H (N + R + V) multiply-adds against the absorbed form's H (2C + R), plus
    H C (N + V) per key and block to expand: cheaper once a chunk has more than `expanded_pays_from` queries
    (the serving engines prefill this way and decode absorbed). Reads the cache as `latent_attention` does."""
    b, t, h, _ = q_nope_bthn.shape
    s, page = cache_slots(c_kv, table), 1 if table is None else c_kv.shape[-2]
    bk, n_blocks = _key_blocks(q_pos_bt, s, block_k or BLOCK_K, q_valid_bt, page)
    q_pos = q_pos_bt.astype(jnp.int32)
    dt = q_nope_bthn.dtype

    def body(j, carry):
        start, slots, fresh = _block_slots(j, bk, s)
        c_j, kpe_j = (read_cache_block(x, start, bk, layer, rows_b, dt, table) for x in (c_kv, k_pe))
        k_nope = jnp.einsum("bsc,chn->bshn", c_j, w_uk_chn)
        v = jnp.einsum("bsc,chv->bshv", c_j, w_uv_chv)
        m = ((slots[None, None, :] <= q_pos[:, :, None]) & fresh[None, None, :])[:, None]
        sc = (jnp.einsum("bthn,bshn->bhts", q_nope_bthn, k_nope, preferred_element_type=jnp.float32)
              + jnp.einsum("bthr,bsr->bhts", q_pe_bthr, kpe_j, preferred_element_type=jnp.float32))
        sc = jnp.where(m, sc * jnp.float32(scale), _NEG_INF)
        pv = lambda p: jnp.einsum("bhts,bshv->bhtv", p.astype(dt), v,  # noqa: E731
                                  preferred_element_type=jnp.float32)
        return _online_update(carry, sc, pv)

    init = (jnp.full((b, h, t), _NEG_INF), jnp.zeros((b, h, t)), jnp.zeros((b, h, t, w_uv_chv.shape[-1])))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    return _normalise(l, acc).astype(dt).swapaxes(1, 2)  # [B, T, H, V]


def expanded_pays_from(kv_lora_rank: int, qk_nope_head_dim: int, v_head_dim: int) -> float:
    """The chunk length above which `expanded_cache_attention` does fewer multiply-adds than the absorbed
    form: T (N + R + V) + C (N + V) < T (2C + R)  <=>  T > C (N + V) / (2C - N - V) (per head; infinite when
    2C <= N + V, where expanding never pays). 153.6 for Mistral Small 4."""
    c, nv = kv_lora_rank, qk_nope_head_dim + v_head_dim
    return c * nv / (2 * c - nv) if 2 * c > nv else float("inf")
