"""FP8 weights in memory: an E4M3 kernel with a float32 scale per output column (docs/model.md 2.4).

A quantised weight is an `Fp8Weight` pytree (q [..., in, out] float8_e4m3fn, scale [..., 1, out] float32)
stored as the value of the parameter it replaces. Every consumer reads weights with `param[...]`
(`nnx.Linear`, the routed experts, the absorbed decode's `kv_b_proj.kernel[...]`), and
`Fp8Weight[...]` returns the dequantised kernel

    W = q.astype(dtype) * scale.astype(dtype)          [..., in, out]

so this is the one place where FP8 weights are turned into matmul operands, and the model code is the
same for both kinds of weights. The scale is folded on the weight side (convert and multiply as the
producer of the dot operand) because that form is exactly `x @ W` for any consumer, including the
gathered, grouped (ragged_dot) and absorbed-attention matmuls whose output columns are not the kernel's.
XLA fuses such elementwise producers into the GEMM fusion on GPU; whether it does on the pinned jaxlib
(rather than writing a bf16 copy of the weight) is checked by the GPU benchmark (`bench/bench_gpu.py`,
bytes per step against the roofline), not assumed. The routed experts are gathered or grouped on `q`
and `scale` before dequantising (`moe.take_experts`), so at small batch only the selected experts'
FP8 bytes are read.

Which parameters are kept in FP8: those created with the `fp8=True` tag (`layers.param_meta`; read by
`fp8_paths`): the attention projections, the shared-expert and dense-layer MLPs and the routed experts
of the text decoder layers. Embeddings, norms, the router, the lm_head and the vision tower stay in the
model dtype.
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

WEIGHTS = (None, "fp8")  # from_pretrained(weights=...): None keeps every parameter in `dtype`


def check_weights(weights) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be None (every parameter in dtype) or 'fp8' (E4M3 projections and "
                         f"experts with float32 scales), got {weights!r}")


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Fp8Weight:
    """A kernel kept as E4M3 `q` [..., in, out] and float32 `scale` [..., 1, out]; read as q * scale in `dtype`."""

    q: jax.Array
    scale: jax.Array
    dtype: str = dataclasses.field(metadata=dict(static=True))

    def __getitem__(self, key):
        if key is not Ellipsis:
            raise TypeError("an FP8 weight is read whole, as param[...]")
        return dequantize(self.q, self.scale, self.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return int(self.q.size * self.q.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """W = q.astype(dtype) * scale.astype(dtype): q [..., in, out] E4M3, scale [..., 1, out]."""
    return q.astype(dtype) * scale.astype(dtype)


def quantize(w: jax.Array, dtype=None) -> Fp8Weight:
    """Per-output-column E4M3 quantisation of a kernel w [..., in, out]: scale = max_in |w| / 448.

    Used for sources that are not FP8 on disk (a bf16 checkpoint loaded with weights="fp8", random
    benchmark weights); FP8 checkpoints keep their own E4M3 values and scales. All-zero columns get scale 1."""
    amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=-2, keepdims=True)
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    q = (w.astype(jnp.float32) / scale).astype(E4M3)
    return Fp8Weight(q, scale, jnp.dtype(dtype or w.dtype).name)


def weight(param):
    """A parameter's value for the expert matmuls: the `Fp8Weight` itself (so that experts can be
    selected before dequantising), else `param[...]` (plain arrays and wrapped values such as LoRA's)."""
    v = param.get_value() if hasattr(param, "get_value") else param
    return v if isinstance(v, Fp8Weight) else param[...]


def materialize(w) -> jax.Array:
    """An expert weight as an array in its compute dtype (dequantised if FP8)."""
    return w[...] if isinstance(w, Fp8Weight) else w


def take(w, idx: jax.Array):
    """w[idx] along the leading (expert) axis; for FP8 the gather runs on q and scale (1-byte reads)."""
    if isinstance(w, Fp8Weight):
        return Fp8Weight(w.q[idx], w.scale[idx], w.dtype)
    return w[idx]


def param_bytes(state) -> int:
    """Bytes held by every array leaf of a state (FP8 weights count q and scale)."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)
                   if hasattr(x, "dtype")))
