"""NVFP4 weights in memory: packed 4-bit E2M1 codes with E4M3 block scales and a global scale (docs/nvfp4.md).

A weight kind (`weights.py`) for a kernel W [..., in, out] in our layout, kept as the release stores it:

    codes         uint8   [..., in/2, out]   two E2M1 codes per byte along the input axis; byte j holds input 2j
                                             in its low nibble and input 2j + 1 in its high nibble (as on disk)
    scales        uint8   [..., in/16, out]  E4M3 block scales as bit patterns, one per 16 consecutive inputs
    global_scale  float32 [..., 1, out]      the global scale of the matrix each output column comes from, as
                                             stored: a DIVISOR (compressed-tensors' convention)

    W[..., k, o] = E2M1(code[..., k, o]) * (E4M3(scale[..., k // 16, o]) / global_scale[..., 0, o])

computed in float32 in exactly this order, then cast to `dtype`: compressed-tensors' decompression
(`NVFP4PackedCompressor.decompress`: `scale / global_scale`, then `x_q * scale`, then the cast), so the
dequantised values are bit-identical to its own. Keeping the stored divisor rather than its reciprocal is what
makes that exact: `e4m3 * (1 / g)` rounds differently from `e4m3 / g`.

The global scale is per output column, not per matrix, because one of our kernels can hold several of the
release's matrices side by side: the routed experts' fused `gate_up` [E, H, 2I] takes w1's codes in its gate
columns and w3's in its up columns, and the file gives w1 and w3 separate global scales (whether they are
equal is not known, docs/nvfp4.md 3), so each half keeps its own and the fused kernel stays exact.

Every leaf keeps the weight's leading axes (layers, experts), so `weights.index` / `weights.take` select
experts on the packed bytes and `dense()` dequantises only the slice a matmul uses. Packed data stays in
integer dtypes for the reason `fp8.py` gives (XLA:CPU widens whole E4M3 stacks a loop slices). Parameter
bytes per weight: 1/2 (codes) + 1/16 (scales) + 4 / in (global) = about 0.56.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

GROUP = 16  # inputs per block scale
E2M1_MAX = 6.0
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
# E2M1 code -> value: bit 3 is the sign, bits 0-2 index the magnitudes (docs/nvfp4.md 5)
E2M1 = np.asarray([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def packed_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(codes, scales, global_scale) shapes of a kernel of logical `shape` [..., in, out]."""
    *lead, d_in, d_out = shape
    if d_in % GROUP:
        raise ValueError(f"an NVFP4 kernel needs an input width divisible by {GROUP}, got shape {tuple(shape)}")
    return (*lead, d_in // 2, d_out), (*lead, d_in // GROUP, d_out), (*lead, 1, d_out)


def leaf_shardings(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple:
    """Shardings of the three leaves of a kernel laid out by `sharding`: the kernel's spec, with the input axis
    replicated where a packed leaf's shorter input axis does not divide (and always for the global scale)."""
    if not (isinstance(sharding, NamedSharding) and len(sharding.spec) >= 2):
        return sharding, sharding, sharding
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    mesh = sharding.mesh

    def on(n_in):
        axes = spec[-2] if isinstance(spec[-2], tuple) else (spec[-2],) if spec[-2] else ()
        ways = int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))
        keep = n_in % ways == 0 and n_in >= ways
        return NamedSharding(mesh, PartitionSpec(*spec[:-2], spec[-2] if keep else None, spec[-1]))

    codes, scales, _ = packed_shapes(shape)
    return on(codes[-2]), on(scales[-2]), NamedSharding(mesh, PartitionSpec(*spec[:-2], None, spec[-1]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Nvfp4Weight:
    """A kernel [..., in, out] kept as NVFP4: packed E2M1 `codes`, E4M3 block `scales` (bits) and the per-column
    `global_scale` divisor (module docstring); read as the dequantised kernel in `dtype`."""

    codes: jax.Array
    scales: jax.Array
    global_scale: jax.Array
    dtype: str = dataclasses.field(metadata=dict(static=True))

    def dense(self) -> jax.Array:
        return dequantize(self.codes, self.scales, self.global_scale, self.dtype)

    def __getitem__(self, key):
        if key is not Ellipsis:
            raise TypeError("an NVFP4 weight is read whole, as param[...]")
        return self.dense()

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, half, d_out = self.codes.shape
        return (*lead, 2 * half, d_out)

    @property
    def nbytes(self) -> int:
        return int(sum(x.size * np.dtype(x.dtype).itemsize for x in (self.codes, self.scales, self.global_scale)))

    @classmethod
    def abstract(cls, shape: tuple[int, ...], dtype, sharding=None) -> Nvfp4Weight:
        """ShapeDtypeStruct leaves of a kernel of logical `shape` (nothing allocated), laid out like `sharding`."""
        shards = leaf_shardings(sharding, shape) if sharding is not None else (None,) * 3
        dts = (jnp.uint8, jnp.uint8, jnp.float32)
        return cls(*(jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d, sh in zip(packed_shapes(shape), dts, shards)),
                   jnp.dtype(dtype).name)


# ---------------------------------------------------------------------- dequantisation
def unpack(codes: jax.Array) -> jax.Array:
    """uint8 [..., n/2, out] -> the E2M1 codes [..., n, out] (uint8 0..15): the low nibble first."""
    lo, hi = codes & 0xF, codes >> 4
    *lead, half, d_out = codes.shape
    return jnp.stack([lo, hi], axis=-2).reshape(*lead, 2 * half, d_out)


def _divide(a: jax.Array, b) -> jax.Array:
    """a / b as one IEEE division per element. XLA rewrites a division by a broadcast (or a constant) into a
    multiplication by the reciprocal, which rounds twice and is off by an ulp from compressed-tensors' results;
    the barrier hides the broadcast. It costs a float32 copy of the divisor at a's shape (in `dequantize`,
    the block scales' shape: 1/16 of the weights)."""
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, jnp.float32), a.shape))


def dequantize(codes: jax.Array, scales: jax.Array, global_scale: jax.Array, dtype) -> jax.Array:
    """W = E2M1(codes) * (E4M3(scales) / global_scale) in float32, cast to `dtype` (module docstring)."""
    values = jnp.asarray(E2M1)[unpack(codes)]  # a 16-entry table lookup
    block = _divide(jax.lax.bitcast_convert_type(scales, jnp.float8_e4m3fn).astype(jnp.float32), global_scale)
    block = jnp.repeat(block, GROUP, axis=-2)  # one scale per 16 inputs
    return (values * block).astype(dtype)


def dequantize_disk(packed: np.ndarray, scale: np.ndarray, global_scale) -> np.ndarray:
    """One on-disk matrix [out, in] in float32 from the release's tensors (numpy, host side):
    `weight_packed` uint8 [out, in/2], `weight_scale` E4M3 [out, in/16], `weight_global_scale` (a divisor)."""
    out, half = packed.shape
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(out, 2 * half)
    block = np.asarray(scale).astype(np.float32) / np.float32(np.asarray(global_scale, np.float32).reshape(()))
    return E2M1[codes] * np.repeat(block, GROUP, axis=-1)


# ---------------------------------------------------------------------- quantisation
def _round_e2m1(x: jax.Array) -> jax.Array:
    """x (already scaled into [-6, 6]) to the nearest E2M1 code, ties to even mantissa (compressed-tensors'
    `_round_to_fp4` thresholds: <= 0.25 -> 0, < 0.75 -> 0.5, <= 1.25 -> 1, ...). The sign bit is x < 0, as there:
    a small negative value becomes -0 (code 8), a -0.0 input +0."""
    a = jnp.abs(x)
    mag = ((a > 0.25).astype(jnp.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5)
           + (a > 5.0)).astype(jnp.uint8)
    return mag | jnp.where(x < 0, jnp.uint8(8), jnp.uint8(0))


def quantize(w: jax.Array, dtype=None, column_groups: int = 1) -> Nvfp4Weight:
    """NVFP4 quantisation of a kernel w [..., in, out] as llm-compressor / compressed-tensors do it.

    Per matrix (each leading index, and each of `column_groups` equal column blocks: 2 for a fused gate_up,
    whose gate and up halves are separate matrices in the release) the global scale is
    g = 448 * 6 / max |w| (1 for an all-zero matrix); per 16 inputs of a column the block scale is
    E4M3(g * max |w_block| / 6) (0 -> 0.125, the smallest positive E4M3 step); the codes are
    round-to-nearest-even E2M1 of w / (scale / g), clamped to +-6. The exact inverse of `dequantize` on a
    tensor whose values it can represent."""
    w = jnp.asarray(w, jnp.float32)
    *lead, d_in, d_out = w.shape
    packed_shapes(w.shape)  # checks the input width
    wg = w.reshape(*lead, d_in, column_groups, d_out // column_groups)
    amax = jnp.max(jnp.abs(wg), axis=(-3, -1), keepdims=True)  # [..., 1, groups, 1]
    top = jnp.broadcast_to(jnp.float32(E4M3_MAX * E2M1_MAX), amax.shape)
    g = jnp.where(amax > 0, _divide(top, jnp.maximum(amax, jnp.finfo(jnp.float32).tiny)), 1.0)
    g = jnp.where(jnp.isfinite(g), g, 1.0)
    g_col = jnp.broadcast_to(g, (*lead, 1, column_groups, d_out // column_groups)).reshape(*lead, 1, d_out)
    blocks = w.reshape(*lead, d_in // GROUP, GROUP, d_out)
    local = _divide(jnp.max(jnp.abs(blocks), axis=-2), E2M1_MAX)  # [..., in/16, out]
    s = jnp.clip(g_col * local, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    s = jnp.where(s.astype(jnp.float32) == 0, jnp.float8_e4m3fn(0.125), s)
    step = jnp.repeat(_divide(s.astype(jnp.float32), g_col), GROUP, axis=-2)
    codes = _round_e2m1(jnp.clip(_divide(w, step), -E2M1_MAX, E2M1_MAX))
    pairs = codes.reshape(*lead, d_in // 2, 2, d_out)
    packed = pairs[..., 0, :] | (pairs[..., 1, :] << 4)
    return Nvfp4Weight(packed, jax.lax.bitcast_convert_type(s, jnp.uint8), g_col.astype(jnp.float32),
                       jnp.dtype(dtype or jnp.float32).name)
