"""LoRA adapters (Hu et al. 2021) on a frozen base, kept as a separate parameter tree.

For a targeted weight W (our layout: x @ W, W [..., in, out]) the adapter is A [..., in, r] (random
normal, std 1/sqrt(in)) and B [..., r, out] (zeros, so training starts at the base model), and the
effective weight is

    W_eff = W + (alpha / r) * A @ B

with the matmul batched over the leading axes (layers, and experts for the routed experts: each
expert gets its own adapter pair).

W_eff is formed where the model reads the weight: a targeted parameter's value is replaced by a
`LoRAWeight` pytree (W, A, B) whose `[...]` read returns W_eff. Stacked layers run under
`jax.lax.scan`, which slices every leaf of that pytree, so W_eff exists for one layer at a time
inside the scan body (and, with remat, is recomputed in the backward pass), never for the whole
model. The model code is unchanged: every module reads its weights with `param[...]`.

Which weights a target group adapts is declared where each parameter is created (the `lora=GROUP` tag of
`model/layers.py`): "attention" (the six attention projections of every decoder layer), "shared_experts",
"experts" (the routed experts of the MoE layers) and "dense_mlp" (the MLPs of the dense layers).
Adapters are keyed by the adapted parameter's path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import InputError
from ..model import weights
from ..model.layers import LORA_GROUPS

DEFAULT_TARGETS = ("attention",)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise InputError(f"LoRA rank must be >= 1, got {self.rank}")
        bad = [t for t in self.targets if t not in LORA_GROUPS]
        if bad or not self.targets:
            raise InputError(f"LoRA targets must be a non-empty subset of {sorted(LORA_GROUPS)}, "
                             f"got {list(self.targets)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoRAWeight:
    """A weight kind (`model/weights.py`) read as W + scale * A @ B (A [..., in, r], B [..., r, out]); the
    base W is a plain array or another kind (FP8), `scale` is static."""

    w: object
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True))

    def dense(self) -> jax.Array:
        return effective_weight(weights.dense(self.w), self.a, self.b, self.scale)

    def __getitem__(self, key):
        if key is not Ellipsis:
            raise TypeError("a LoRA weight is read whole, as param[...]")
        return self.dense()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)


def effective_weight(w, a, b, scale: float) -> jax.Array:
    """W + scale * A @ B, computed in float32 and cast to W's dtype."""
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * scale
    return (w.astype(jnp.float32) + delta).astype(w.dtype)


def init_adapters(params: nnx.State, cfg: LoRAConfig, key: jax.Array, dtype=jnp.float32) -> dict[str, dict]:
    """{param path: {"a": A, "b": B}} for every targeted parameter (A random, B zero)."""
    out = {}
    for i, (p, v) in enumerate(nnx.to_flat_state(params)):
        path = "/".join(map(str, p))
        if v.get_metadata().get("lora") not in cfg.targets:
            continue
        shape = v.get_value().shape
        lead, d_in, d_out = shape[:-2], shape[-2], shape[-1]
        a = jax.random.normal(jax.random.fold_in(key, i), (*lead, d_in, cfg.rank), dtype) / jnp.sqrt(d_in)
        out[path] = {"a": a, "b": jnp.zeros((*lead, cfg.rank, d_out), dtype)}
    if not out:
        raise InputError(f"LoRA targets {list(cfg.targets)} match no parameter of this model")
    return out


def apply_adapters(params: nnx.State, adapters: dict[str, dict], scale: float) -> nnx.State:
    """The parameter state with each adapted weight's value replaced by a LoRAWeight (no copy of W)."""
    flat = []
    for p, v in nnx.to_flat_state(params):
        ad = adapters.get("/".join(map(str, p)))
        flat.append((p, v if ad is None else v.replace(LoRAWeight(v.get_value(), ad["a"], ad["b"], scale))))
    return nnx.from_flat_state(flat)


def merge_adapters(params: nnx.State, adapters: dict[str, dict], scale: float) -> nnx.State:
    """The base parameters with the adapters folded in (W_eff), for export; same dtypes as the base."""
    merged = jax.jit(lambda ads, ws: {k: effective_weight(ws[k], ad["a"], ad["b"], scale) for k, ad in ads.items()})
    base = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(params) if "/".join(map(str, p)) in adapters}
    new = merged(adapters, base)
    return nnx.from_flat_state([(p, v.replace(new["/".join(map(str, p))]) if "/".join(map(str, p)) in new else v)
                                for p, v in nnx.to_flat_state(params)])
