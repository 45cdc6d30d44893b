"""`from_pretrained(weights=...)`: which parameters are held quantised in memory, and in which kind.

The quantisable parameters are the matmul kernels tagged `fp8=True` where they are created
(`model/layers.py`); each belongs to one role, its LoRA group: "attention" (the MLA projections),
"shared_experts", "experts" (the routed experts) and "dense_mlp" (the dense layers' MLP). Embeddings, norms,
the router, `lm_head` and the vision tower are always in the model dtype.

    weights=None      as stored, in `dtype`, except NVFP4 weights, which stay packed (widening 4-bit experts
                      only multiplies their memory by four)
    weights="dense"   every parameter in `dtype` (NVFP4 dequantised too)
    weights="fp8"     every role in FP8 (E4M3 sources kept exactly, others quantised per output column);
                      weights stored as NVFP4 stay NVFP4
    weights="nvfp4"   the routed and shared experts in NVFP4 (NVFP4 sources kept exactly, others quantised
                      as llm-compressor does), the rest as stored in `dtype`: the NVFP4 release's own scheme
    weights="hybrid"  the routed experts in NVFP4, the other roles in FP8 (the one-80-GB-card layout);
                      weights stored as NVFP4 stay NVFP4
    weights={role: "fp8" | "nvfp4" | None, ...}
                      the general form: each named role in that kind (kept exactly when stored so, quantised
                      otherwise), unnamed roles in `dtype`

A kind is a weight class of `model/` (`weights.py`'s protocol) listed in `KINDS`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx

from ..model.fp8 import Fp8Weight
from ..model.layers import LORA_GROUPS
from ..model.nvfp4 import Nvfp4Weight

KINDS = {"fp8": Fp8Weight, "nvfp4": Nvfp4Weight}
ROLES = LORA_GROUPS
PRESETS: dict[str, dict[str, str]] = {
    "dense": {},
    "fp8": {r: "fp8" for r in ROLES},
    "nvfp4": {"experts": "nvfp4", "shared_experts": "nvfp4"},
    "hybrid": {"attention": "fp8", "shared_experts": "fp8", "dense_mlp": "fp8", "experts": "nvfp4"},
}
NVFP4 = "nvfp4"


def check(weights) -> None:
    """Refuse a `weights` value outside the vocabulary of the module docstring."""
    if weights is None or (isinstance(weights, str) and weights in PRESETS):
        return
    if isinstance(weights, Mapping):
        bad = {k: v for k, v in weights.items() if k not in ROLES or v not in (None, *KINDS)}
        if not bad:
            return
        raise ValueError(f"weights: roles must be among {list(ROLES)} and kinds among {[None, *KINDS]}, got {bad}")
    raise ValueError(f"weights must be None (as stored in dtype, NVFP4 kept packed), one of {sorted(PRESETS)}, or "
                     f"{{role: kind}} with roles {list(ROLES)} and kinds {list(KINDS)}; got {weights!r}")


def role(var: nnx.Variable) -> str | None:
    """The role of a quantisable parameter (its LoRA group), None for the others."""
    meta = var.get_metadata()
    return meta.get("lora") if meta.get("fp8", False) else None


def targets(params, weights, stored: Mapping[str, str]) -> dict[str, str]:
    """{path: kind} of the parameters held quantised. params: (path, variable) pairs (`read.flat_params`);
    stored: {path: kind} of the parameters the checkpoint stores quantised (only "nvfp4" changes the result)."""
    check(weights)
    out = {}
    for path, var in params:
        r = role(var)
        if r is None:
            continue
        if isinstance(weights, Mapping):
            kind = weights.get(r)
        else:
            kind = PRESETS[weights or "dense"].get(r)
            if stored.get(path) == NVFP4 and weights != "dense":
                kind = NVFP4  # 4-bit weights stay 4-bit unless asked otherwise
        if kind is not None:
            out[path] = kind
    return out


def abstract(kind: str | None, shape: tuple[int, ...], dtype, sharding=None):
    """The value of a parameter held as `kind` (None: a plain array), with ShapeDtypeStruct leaves."""
    if kind is None:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return KINDS[kind].abstract(shape, dtype, sharding)
