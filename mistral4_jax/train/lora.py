"""LoRA adapters (Hu et al. 2021) on a frozen base, kept as a separate parameter tree.

For a targeted weight W (our layout: x @ W, W [..., in, out]) the adapter is A [..., in, r] (random
normal, std 1/sqrt(in)) and B [..., r, out] (zeros, so training starts at the base model), and the
effective weight is

    W_eff = W + (alpha / r) * A @ B

with the matmul batched over the leading axes (layers, and experts for the routed experts: each
expert gets its own adapter pair).

W_eff is formed where the model reads the weight: a targeted parameter's value is replaced by a
`LoRAWeight` pytree (W, A, B) whose `[...]` read returns W_eff (the weight kind of `model/lora.py`; W may
itself be a kind, e.g. a frozen FP8 base, dequantised at the same place). Stacked layers run under
`jax.lax.scan`, which slices every leaf of that pytree, so W_eff exists for one layer at a time
inside the scan body (and, with remat, is recomputed in the backward pass), never for the whole
model. The model code is unchanged: every module reads its weights with `param[...]`.

Which weights a target group adapts is declared where each parameter is created (the `lora=GROUP` tag of
`model/layers.py`): "attention" (the six attention projections of every decoder layer), "shared_experts",
"experts" (the routed experts of the MoE layers) and "dense_mlp" (the MLPs of the dense layers).
Adapters are keyed by the adapted parameter's path; `checkpoints/adapter.py` writes and reads them as PEFT
LoRA adapters (per module of the transformers tree).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import InputError
from ..model.layers import LORA_GROUPS
from ..model.lora import LoRAWeight, effective_weight, merge  # noqa: F401  (the kind lives with the model)

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
    """The base parameters with the adapters folded in (W_eff = dense(W) + scale * A @ B), for export: an adapted
    parameter becomes a plain array in its compute dtype (an FP8 base is dequantised to its `dtype`), formed one
    matrix at a time (`model.lora.merged`); the others are kept as they are (an unadapted FP8 weight stays FP8)."""
    flat = []
    for p, v in nnx.to_flat_state(params):
        ad = adapters.get("/".join(map(str, p)))
        flat.append((p, v if ad is None else v.replace(merge(v.get_value(), ad["a"], ad["b"], scale))))
    return nnx.from_flat_state(flat)
