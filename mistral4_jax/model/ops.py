"""Pure functions for the model's math. Modules hold parameters and call these.

Shape suffixes: b batch, t/s query/key time, h heads, d head dim, r rope dim, e experts.
Each formula cites the section of `docs/model.md` it implements.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back to x's dtype, *then* times the weight (docs/model.md 3.2)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _gelu_erf(x):
    return jax.nn.gelu(x, approximate=False)


# transformers' ACT2FN names (activations.py) of the parameter-free elementwise functions
_ACTIVATIONS = {
    "silu": jax.nn.silu, "swish": jax.nn.silu,
    "gelu": _gelu_erf, "gelu_python": _gelu_erf,
    "gelu_pytorch_tanh": _gelu_tanh, "gelu_python_tanh": _gelu_tanh, "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh, "gelu_accurate": _gelu_tanh,
    "gelu_10": lambda x: jnp.clip(_gelu_erf(x), -10.0, 10.0),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu, "relu2": lambda x: jnp.square(jax.nn.relu(x)), "relu6": jax.nn.relu6,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)), "hardswish": jax.nn.hard_swish,
    "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "linear": lambda x: x,
}


def activation(name: str):
    """The activation function transformers' ACT2FN calls `name` (`gelu` is the exact erf form;
    `gelu_new`, `gelu_fast`, `gelu_accurate` are the tanh form)."""
    return _ACTIVATIONS[name]


# ---------------------------------------------------------------------- text RoPE (docs/model.md 3.3.2)
def yarn_inv_freq(dim: int, base: float, factor: float, original_max: int, beta_fast: float,
                  beta_slow: float, truncate: bool = True) -> np.ndarray:
    """YaRN inverse frequencies omega_i, i = 0..dim/2-1, as float32 (computed in float64 first).

    omega = omega_inter * ramp + omega_extra * (1 - ramp), omega_extra = base^(-2i/dim),
    omega_inter = omega_extra / factor, ramp = clamp((i - low) / (high - low), 0, 1), where low/high
    are the correction dims of beta_fast/beta_slow rotations over `original_max` positions.
    """

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as the reference: avoid a zero-width ramp
    # float32 throughout, in the reference's order of operations, so frequencies agree to the bit
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extra = np.float32(1.0) / pos_freqs
    inter = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extra_factor = np.float32(1.0) - ramp
    return (inter * (1 - extra_factor) + extra * extra_factor).astype(np.float32)


def rope_cos_sin(positions_bt: jax.Array, inv_freq: jax.Array, attention_factor: float, dtype):
    """cos/sin of pos * omega, [B, T, R/2], in fp32 times the YaRN attention factor, cast to dtype."""
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    return ((jnp.cos(angles) * attention_factor).astype(dtype), (jnp.sin(angles) * attention_factor).astype(dtype))


def apply_rope_interleaved(x_bthr: jax.Array, cos_btr: jax.Array, sin_btr: jax.Array) -> jax.Array:
    """Rotate pairs (x[2i], x[2i+1]) by angle i; write evens' then odds' (the reference's layout).

    The output layout is de-interleaved, as transformers writes it; q and k get the same layout so
    their dot products are unchanged (docs/model.md 3.3.2).
    """
    x1, x2 = x_bthr[..., 0::2], x_bthr[..., 1::2]
    c, s = cos_btr[:, :, None, :], sin_btr[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def apply_rope_half(x_bthr: jax.Array, cos_btr: jax.Array, sin_btr: jax.Array) -> jax.Array:
    """Rotate pairs (x[i], x[i + R/2]) by angle i (`rotate_half`, for rope_interleave=False)."""
    half = x_bthr.shape[-1] // 2
    x1, x2 = x_bthr[..., :half], x_bthr[..., half:]
    c, s = cos_btr[:, :, None, :], sin_btr[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def llama4_query_scale(positions_bt: jax.Array, beta: float, original_max: int) -> jax.Array:
    """1 + beta * ln(1 + floor(pos / original_max)), [B, T] float32 (docs/model.md 3.3.4)."""
    pos = positions_bt.astype(jnp.float32)
    return 1.0 + beta * jnp.log1p(jnp.floor(pos / original_max))


# ---------------------------------------------------------------------- attention
def attention(q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array, mask_bts: jax.Array,
              scale: float, return_probs: bool = False):
    """softmax(q k^T * scale, masked) v with the softmax in fp32; returns [B, T, H, Dv].

    `mask_bts` (or [B, H, T, S]) is True where a query may attend. Rows with no allowed key (padding)
    give zeros rather than NaN. return_probs: also return the fp32 probabilities [B, H, T, S].
    """
    scores = jnp.einsum("bthd,bshd->bhts", q_bthd, k_bshd) * jnp.asarray(scale, q_bthd.dtype)
    if mask_bts.ndim == 3:
        mask_bts = mask_bts[:, None]
    scores = jnp.where(mask_bts, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask_bts, probs, 0.0)
    out = jnp.einsum("bhts,bshd->bthd", probs.astype(v_bshd.dtype), v_bshd)
    return (out, probs) if return_probs else out


def mla_absorbed_attention(q_nope_bthn: jax.Array, q_pe_bthr: jax.Array, w_uk_chn: jax.Array,
                           w_uv_chv: jax.Array, c_kv_bsc: jax.Array, k_pe_bsr: jax.Array,
                           mask_bts: jax.Array, scale: float) -> jax.Array:
    """MLA attention against the latent cache, keys and values never expanded (docs/model.md 3.3.6).

    With W_UK [C, H, N] and W_UV [C, H, V] the per-head blocks of kv_b_proj (C = kv_lora_rank):
      score[b,h,t,s] = ((W_UK^T q_nope)[b,t,h] . c[b,s] + q_pe[b,t,h] . k_pe[b,s]) * scale
      out[b,t,h]     = W_UV (sum_s softmax(score)[b,h,t,s] c[b,s])                      -> [B, T, H, V]
    which equals the expanded form exactly in real arithmetic. The softmax is fp32; rows with no
    allowed key give zeros.
    """
    q_lat = jnp.einsum("bthn,chn->bthc", q_nope_bthn, w_uk_chn)
    scores = (jnp.einsum("bthc,bsc->bhts", q_lat, c_kv_bsc) + jnp.einsum("bthr,bsr->bhts", q_pe_bthr, k_pe_bsr))
    scores = scores.astype(jnp.float32) * jnp.float32(scale)
    m = mask_bts[:, None]
    probs = jax.nn.softmax(jnp.where(m, scores, jnp.finfo(jnp.float32).min), axis=-1)
    probs = jnp.where(m, probs, 0.0).astype(c_kv_bsc.dtype)
    o_lat = jnp.einsum("bhts,bsc->bthc", probs, c_kv_bsc)
    return jnp.einsum("bthc,chv->bthv", o_lat, w_uv_chv)


def causal_mask(q_positions_bt: jax.Array, k_positions_bs: jax.Array,
                k_valid_bs: jax.Array | None = None, q_valid_bt: jax.Array | None = None) -> jax.Array:
    """[B, T, S] True where key position <= query position and the key is a real token.

    The valid arrays are bool, or int segments: 0 padding, 1 seen by every query, s >= 2 seen only by queries
    of segment s (continuations packed after a shared context, each seeing the context and itself)."""
    m = k_positions_bs[:, None, :] <= q_positions_bt[:, :, None]
    if k_valid_bs is not None:
        seg = k_valid_bs.astype(jnp.int32)[:, None, :]
        m = m & (seg > 0)
        if q_valid_bt is not None:
            m = m & ((seg == 1) | (seg == q_valid_bt.astype(jnp.int32)[:, :, None]))
    return m


# ---------------------------------------------------------------------- vision RoPE (docs/model.md 3.6 step 4)
def pixtral_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """[head_dim/2] frequencies: the even base frequencies (rows) then the odd ones (columns)."""
    base = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    return np.concatenate([base[0::2], base[1::2]]).astype(np.float32)


def pixtral_cos_sin(rows_p: jax.Array, cols_p: jax.Array, inv_freq: jax.Array, dtype):
    """cos/sin [P, head_dim] for rotate-half RoPE: angles [r*f0, r*f2, .., c*f1, c*f3, ..], twice."""
    n_rows = (inv_freq.shape[0] + 1) // 2  # as torch.chunk(2): the first part is the larger
    ang = jnp.concatenate([rows_p[:, None].astype(jnp.float32) * inv_freq[:n_rows],
                           cols_p[:, None].astype(jnp.float32) * inv_freq[n_rows:]], axis=-1)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang).astype(dtype), jnp.sin(ang).astype(dtype)


def rotate_half_rope(x_phd: jax.Array, cos_pd: jax.Array, sin_pd: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin on [P, H, D] with cos/sin [P, D]."""
    half = x_phd.shape[-1] // 2
    rot = jnp.concatenate([-x_phd[..., half:], x_phd[..., :half]], axis=-1)
    return x_phd * cos_pd[:, None, :] + rot * sin_pd[:, None, :]
