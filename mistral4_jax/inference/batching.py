"""Buckets: request shapes rounded up (powers of two, the mesh's data axis) so that new sizes reuse
compiled programs. Used by generation, scoring and the expert statistics."""

from __future__ import annotations

import numpy as np

from ..model.pixtral import PatchLayout, pad_layout, patch_layout


def pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def batch_bucket(batch: int, data: int = 1) -> int:
    """A batch of `batch` rows padded to a power of two, then to a multiple of the mesh's data axis."""
    return -(-pow2(batch) // data) * data


def bucketed_images(model, pixel_values, image_sizes) -> tuple[np.ndarray, PatchLayout]:
    """pixel_values zero-padded to a power-of-two image count and patch grid, and its layout padded
    to a power-of-two patch count: image batches of similar sizes share one vision program."""
    layout = model.layout_for(pixel_values, image_sizes)  # validates the shapes and sizes
    px = np.asarray(pixel_values)
    n, c, h, w = px.shape
    p = model.config.vision.patch_size
    hb, wb = pow2(-(-h // p)) * p, pow2(-(-w // p)) * p
    padded = np.zeros((pow2(n), c, hb, wb), px.dtype)
    padded[:n, :, :h, :w] = px
    sizes = [(h, w)] * n if image_sizes is None else np.asarray(image_sizes)
    m = model.config.spatial_merge_size
    layout = patch_layout(sizes, (hb, wb), p, m)
    patches = pow2(len(layout.patch_index), m * m)
    return padded, pad_layout(layout, patches, patches // (m * m))  # each token merges m*m patches
