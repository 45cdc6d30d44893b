"""FP8 weights in memory: an E4M3 kernel with a float32 scale per output column (docs/model.md 2.4).

A quantised weight is an `Fp8Weight` (a weight kind, `weights.py`): `q` [..., in, out] holds the E4M3 values
as their uint8 bit patterns and `scale` [..., 1, out] float32, stored as the value of the parameter it
replaces. `w.dense()` / `w[...]` returns the dequantised kernel

    W = e4m3(q).astype(dtype) * scale.astype(dtype)          [..., in, out]

so every consumer (`nnx.Linear`, the routed experts, the absorbed decode's `kv_b_proj.kernel[...]`) reads it
like a plain kernel. The scale is folded on the weight side (convert and multiply as the producer of the dot
operand) because that form is exactly `x @ W` for any consumer, including the routed experts' per-expert
matmuls whose output columns are not the kernel's. The routed experts select experts on `q` and `scale`
(`weights.index` / `weights.take`) and dequantise one expert's slice at a time, so a decode step reads only
the experts it routes to.

Why uint8 bits rather than an E4M3 array: a program that slices an E4M3 array inside a loop (the layer scan,
the per-expert loop) is rewritten by XLA:CPU to convert the whole array to f16 first (it has no E4M3 data
movement), which reads every expert of every layer per call. Slicing bytes and reinterpreting only the slice
(`bitcast_convert_type`, free on every backend) keeps the work to the routed experts everywhere. Checkpoints
keep E4M3 on disk; `of_e4m3` turns loaded E4M3 arrays into bits.

Which parameters may be kept in FP8: those created with the `fp8=True` tag (`layers.param_meta`; read by
`fp8_paths`): the attention projections, the shared-expert and dense-layer MLPs and the routed experts
of the text decoder layers; `checkpoints/scheme.py` decides from `from_pretrained(weights=...)` which of them
are. Embeddings, norms, the router, the lm_head and the vision tower stay in the model dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448

def fp8_paths(tree) -> set[str]:
    """Paths of the parameters of a module or state that weights="fp8" keeps in E4M3 (tagged `fp8=True`)."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree, nnx.Param)
    return {"/".join(map(str, p)) for p, v in nnx.to_flat_state(state)
            if isinstance(v, nnx.Param) and v.get_metadata().get("fp8", False)}


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-output-column scale of a kernel `[..., in, out]`: `[..., 1, out]`."""
    return (*shape[:-2], 1, shape[-1])


def scale_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of a kernel's scale `[..., 1, out]`: the kernel's, with its (size 1) input axis replicated."""
    if isinstance(sharding, NamedSharding) and len(sharding.spec) >= 2:
        spec = tuple(sharding.spec)
        return NamedSharding(sharding.mesh, PartitionSpec(*spec[:-2], None, spec[-1]))
    return sharding


def bits(q: jax.Array) -> jax.Array:
    """E4M3 values as their uint8 bit patterns (numpy arrays stay on the host, as a view)."""
    if isinstance(q, np.ndarray):
        return q.view(np.uint8) if q.dtype != np.uint8 else q
    return q if q.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(q, jnp.uint8)


def e4m3(q_bits: jax.Array) -> jax.Array:
    """uint8 bit patterns read as E4M3 values (no data movement)."""
    return jax.lax.bitcast_convert_type(q_bits, E4M3)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Fp8Weight:
    """A kernel kept as E4M3 bits `q` (uint8) [..., in, out] and float32 `scale` [..., 1, out]; read as
    e4m3(q) * scale in `dtype`."""

    q: jax.Array
    scale: jax.Array
    dtype: str = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def of_e4m3(cls, q: jax.Array, scale: jax.Array, dtype) -> Fp8Weight:
        """From E4M3 values (or their bits) and scales, as checkpoints hold them."""
        return cls(bits(q), scale, jnp.dtype(dtype).name)

    def dense(self) -> jax.Array:
        return dequantize(self.q, self.scale, self.dtype)

    def __getitem__(self, key):
        if key is not Ellipsis:
            raise TypeError("an FP8 weight is read whole, as param[...]")
        return self.dense()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return int(self.q.size * self.q.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)

    @classmethod
    def abstract(cls, shape: tuple[int, ...], dtype, sharding=None) -> Fp8Weight:
        """ShapeDtypeStruct leaves of a kernel of `shape` (nothing allocated), laid out like `sharding`."""
        return cls(jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=sharding),
                   jax.ShapeDtypeStruct(scale_shape(shape), jnp.float32,
                                        sharding=None if sharding is None else scale_sharding(sharding)),
                   jnp.dtype(dtype).name)


def dequantize(q_bits: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """W = e4m3(q).astype(dtype) * scale.astype(dtype): q [..., in, out] E4M3 bits, scale [..., 1, out]."""
    return e4m3(q_bits).astype(dtype) * scale.astype(dtype)


def quantize(w: jax.Array, dtype=None) -> Fp8Weight:
    """Per-output-column E4M3 quantisation of a kernel w [..., in, out]: scale = max_in |w| / 448.

    Used for sources that are not FP8 on disk (a bf16 checkpoint loaded with weights="fp8", random
    benchmark weights); FP8 checkpoints keep their own E4M3 values and scales. All-zero columns get scale 1."""
    amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=-2, keepdims=True)
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    q = (w.astype(jnp.float32) / scale).astype(E4M3)
    return Fp8Weight.of_e4m3(q, scale, dtype or w.dtype)


def param_bytes(state) -> int:
    """Bytes held by every array leaf of a state (FP8 weights count q and scale)."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)
                   if hasattr(x, "dtype")))
