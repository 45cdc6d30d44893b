"""The Pixtral vision encoder (transformers `models/pixtral/modeling_pixtral.py`, docs/model.md 3.6).

All images of a call are patch-embedded, cropped to their own size, and concatenated into one
sequence; attention is block-diagonal so that patches attend only within their own image. Which
patches exist depends on the image sizes, so that bookkeeping is done on the host by
`patch_layout` and passed in as small index arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import ops
from ..config import VisionConfig
from ..errors import InputError
from .layers import Mistral4MLP, RMSNorm, init_normal, linear, param_meta, stack_layers
from .mistral4 import scan_layers

_EPS = 1e-5  # Pixtral's norms hard-code 1e-5 (docs/model.md 3.2)


@dataclass(frozen=True)
class PatchLayout:
    """Where each image's patches sit in the concatenated sequence (host-side numpy arrays).

    patch_index [P]: index into the flattened [N, H/p, W/p] conv output; rows/cols [P]: grid
    position; segment [P]: image number; merge_index [M, m*m]: for each merged token, the positions
    in the sequence of its m x m window, window-major and row-major inside the window.
    """

    patch_index: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    segment: np.ndarray
    merge_index: np.ndarray
    tokens_per_image: tuple[int, ...]


def patch_layout(image_sizes, padded_hw: tuple[int, int], patch_size: int, merge: int) -> PatchLayout:
    """Compute the PatchLayout for images of `image_sizes` [(height, width)] padded to `padded_hw`."""
    sizes = np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2)
    hp, wp = padded_hw[0] // patch_size, padded_hw[1] // patch_size
    pidx, rows, cols, seg, merge_idx, per_image = [], [], [], [], [], []
    start = 0
    for n, (h, w) in enumerate(sizes):
        if h > padded_hw[0] or w > padded_hw[1] or h < patch_size or w < patch_size:
            raise InputError(f"image_sizes[{n}] = ({h}, {w}) must be at least one patch ({patch_size}) and "
                             f"fit in the padded pixel_values ({padded_hw[0]}, {padded_hw[1]})")
        gh, gw = int(h) // patch_size, int(w) // patch_size
        r, c = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        r, c = r.reshape(-1), c.reshape(-1)
        pidx.append(n * hp * wp + r * wp + c)
        rows.append(r)
        cols.append(c)
        seg.append(np.full(gh * gw, n))
        # m x m windows, row-major over windows; an odd last row/column is dropped, as unfold does
        wr, wc = np.meshgrid(np.arange(gh // merge), np.arange(gw // merge), indexing="ij")
        kr, kc = np.meshgrid(np.arange(merge), np.arange(merge), indexing="ij")
        win = (wr.reshape(-1, 1) * merge + kr.reshape(1, -1)) * gw + (wc.reshape(-1, 1) * merge + kc.reshape(1, -1))
        merge_idx.append(start + win)
        per_image.append(win.shape[0])
        start += gh * gw
    cat = lambda xs, d=np.int32: np.concatenate(xs).astype(d)  # noqa: E731
    return PatchLayout(cat(pidx), cat(rows), cat(cols), cat(seg),
                       np.concatenate(merge_idx).astype(np.int32), tuple(per_image))



def pad_layout(layout: PatchLayout, patches: int, tokens: int) -> PatchLayout:
    """`layout` with its patch sequence padded to `patches` and its merged tokens to `tokens`.

    Padding patches read grid cell 0 and form their own segment (-1), so no real patch attends to
    them; padding merged tokens come after the real ones, and `embed` scatters only the real ones.
    """
    def pad(a, n, value=0):
        if n < len(a):
            raise ValueError(f"cannot pad {len(a)} entries down to {n}")
        return np.concatenate([a, np.full((n - len(a),) + a.shape[1:], value, a.dtype)])

    return PatchLayout(pad(layout.patch_index, patches), pad(layout.rows, patches), pad(layout.cols, patches),
                       pad(layout.segment, patches, -1), pad(layout.merge_index, tokens), layout.tokens_per_image)

class PixtralAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.q_proj, self.k_proj = linear(d, d, dtype, rngs), linear(d, d, dtype, rngs)
        self.v_proj, self.o_proj = linear(d, d, dtype, rngs), linear(d, d, dtype, rngs)
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim

    def __call__(self, x_pd, cos, sin, mask_pp):
        p = x_pd.shape[0]
        split = lambda y: y.reshape(p, self.num_heads, self.head_dim)  # noqa: E731
        q = ops.rotate_half_rope(split(self.q_proj(x_pd)), cos, sin)
        k = ops.rotate_half_rope(split(self.k_proj(x_pd)), cos, sin)
        o = ops.attention(q[None], k[None], split(self.v_proj(x_pd))[None], mask_pp[None], self.head_dim**-0.5)
        return self.o_proj(o[0].reshape(p, -1))


class PixtralAttentionLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(cfg.hidden_size, _EPS, dtype)
        self.attention = PixtralAttention(cfg, dtype, rngs)
        self.ffn_norm = RMSNorm(cfg.hidden_size, _EPS, dtype)
        self.feed_forward = Mistral4MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype, rngs)

    def __call__(self, x, cos, sin, mask_pp):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask_pp)
        return h + self.feed_forward(self.ffn_norm(h))


class PixtralTransformer(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, rngs: nnx.Rngs, num_layers: int):
        self.layers = stack_layers(lambda r: PixtralAttentionLayer(cfg, dtype, r), num_layers, rngs)


class PixtralVisionModel(nnx.Module):
    """Patch conv, ln_pre, 2D RoPE and the encoder blocks; returns [P, hidden] patch features.

    `num_layers` lets the caller build only the blocks it reads (vision_feature_layer).
    """

    def __init__(self, cfg: VisionConfig, dtype, rngs: nnx.Rngs, num_layers: int | None = None):
        self.cfg = cfg
        p = cfg.patch_size
        self.patch_conv = nnx.Conv(cfg.num_channels, cfg.hidden_size, (p, p), (p, p), padding="VALID",
                                   use_bias=False, dtype=dtype, param_dtype=dtype, kernel_init=init_normal,
                                   kernel_metadata=param_meta((None,) * 4), rngs=rngs)
        self.ln_pre = RMSNorm(cfg.hidden_size, _EPS, dtype)
        n = cfg.num_hidden_layers if num_layers is None else num_layers
        self.transformer = PixtralTransformer(cfg, dtype, rngs, n) if n else None

    def __call__(self, pixel_values_nchw: jax.Array, layout: PatchLayout) -> jax.Array:
        dtype = self.ln_pre.weight.dtype
        x = self.patch_conv(jnp.transpose(pixel_values_nchw.astype(dtype), (0, 2, 3, 1)))  # [N, H/p, W/p, D]
        x = x.reshape(-1, x.shape[-1])[jnp.asarray(layout.patch_index)]
        x = self.ln_pre(x)
        inv_freq = jnp.asarray(ops.pixtral_inv_freq(self.cfg.head_dim, self.cfg.rope_theta))
        cos, sin = ops.pixtral_cos_sin(jnp.asarray(layout.rows), jnp.asarray(layout.cols), inv_freq, x.dtype)
        seg = jnp.asarray(layout.segment)
        mask = seg[:, None] == seg[None, :]
        if self.transformer is not None:
            x = scan_layers(self.transformer.layers, x, lambda layer, h: layer(h, cos, sin, mask))
        return x
