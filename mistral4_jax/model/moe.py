"""Routing and the routed-expert computation (docs/model.md 3.4), as pure functions.

Expert weights are stacked: `gate_up_ehf` [E, H, 2I] (gate columns first, then up) and `down_efh`
[E, I, H], i.e. the transposes of the HF tensors so that every matmul is x @ W.

`experts_forward` is the one dispatch point. Its implementations compute the same function:
  * "dense": every expert on every token, combined with a [T, E] weight matrix. Simple and exact; the
    test reference, and reasonable for tiny models.
  * "grouped": tokens sorted by expert, two `jax.lax.ragged_dot` grouped matmuls, unsorted and
    weighted. Touches each (token, expert) pair once; the default.
  * "gather": the K selected experts' weight slices gathered per token and applied as batched
    matmuls. Reads only the selected experts (at most T*K slices), which is what small-batch decode
    needs; at large T it reads experts many times over.
  * "auto": "gather" when T*K <= `gather_max_pairs`, else "grouped" (T is static at trace time).

Expert weights may be `fp8.Fp8Weight`s: selection (gather) runs on the E4M3 values and scales, and
each path dequantises just before its matmuls (`fp8.materialize`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import fp8
from .ops import activation

EXPERT_IMPLS = ("grouped", "dense", "gather", "auto")
# "auto" switches to "gather" at or below this many (token, expert) pairs per call. Provisional: 64 pairs
# = 16 tokens at top-4, from the uniform-routing arithmetic in docs/gpu.md 2.3 (at 16 tokens ~50 of
# 128 experts are touched); to be replaced by the crossover bench/bench_gpu.py measures on GPU.
GATHER_MAX_PAIRS = 64


def route(logits_te: jax.Array, *, top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool,
          routed_scaling_factor: float, softmax_fp32: bool = True,
          allowed_te: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Softmax over all experts, group-limited top-k, renormalise, scale (Mistral4TopkRouter).

    Returns (weights_tk, indices_tk). Weights are float32 when `softmax_fp32`, else logits' dtype.
    With n_group = topk_group = 1 (the released model) the group step is the identity. Groups are
    ranked by the sum of their two best scores; experts outside the kept groups get score 0.

    allowed_te: optional bool [T, E] intervention mask (False = expert disabled). Disabled experts
    rank below every enabled one and get weight 0 (when fewer than top_k are enabled), so the
    weights renormalise over the enabled picks; the softmax itself still runs over all experts.
    """
    t, e = logits_te.shape
    scores = jax.nn.softmax(logits_te.astype(jnp.float32) if softmax_fp32 else logits_te, axis=-1)
    choice = scores if allowed_te is None else jnp.where(allowed_te, scores, -1.0)
    if n_group > 1:
        grouped = choice.reshape(t, n_group, e // n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [T, G]
        _, group_idx = jax.lax.top_k(group_scores, topk_group)
        keep = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], group_idx].set(True)
        choice = jnp.where(jnp.repeat(keep, e // n_group, axis=1), choice, 0.0)
        if allowed_te is not None:
            choice = jnp.where(allowed_te, choice, -1.0)
    _, idx = jax.lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if allowed_te is not None:
        weights = jnp.where(jnp.take_along_axis(allowed_te, idx, axis=-1), weights, 0.0)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * routed_scaling_factor, idx


def swiglu(h_f2: jax.Array, act: str) -> jax.Array:
    """act(gate) * up on a fused [..., 2I] projection whose first half is gate."""
    gate, up = jnp.split(h_f2, 2, axis=-1)
    return activation(act)(gate) * up


def experts_dense(x_th: jax.Array, weights_tk: jax.Array, idx_tk: jax.Array, gate_up_ehf: jax.Array,
                  down_efh: jax.Array, act: str) -> jax.Array:
    """Reference path: run all E experts on all T tokens, keep the routed ones. O(T*E) work."""
    e = gate_up_ehf.shape[0]
    gate_up_ehf, down_efh = fp8.materialize(gate_up_ehf), fp8.materialize(down_efh)
    combine_te = jnp.zeros((x_th.shape[0], e), x_th.dtype).at[
        jnp.arange(x_th.shape[0])[:, None], idx_tk].add(weights_tk.astype(x_th.dtype))
    h = swiglu(jnp.einsum("th,ehf->tef", x_th, gate_up_ehf), act)
    y_teh = jnp.einsum("tef,efh->teh", h, down_efh)
    return jnp.einsum("teh,te->th", y_teh, combine_te)


def experts_grouped(x_th: jax.Array, weights_tk: jax.Array, idx_tk: jax.Array, gate_up_ehf: jax.Array,
                    down_efh: jax.Array, act: str) -> jax.Array:
    """Sort the T*K (token, expert) pairs by expert and run two grouped matmuls (ragged_dot)."""
    t, k = idx_tk.shape
    e = gate_up_ehf.shape[0]
    flat = idx_tk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of = order // k
    group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    gate_up_ehf, down_efh = fp8.materialize(gate_up_ehf), fp8.materialize(down_efh)
    xs = x_th[token_of]
    h = swiglu(jax.lax.ragged_dot(xs, gate_up_ehf, group_sizes), act)
    ys = jax.lax.ragged_dot(h, down_efh, group_sizes)
    ys = ys * weights_tk.reshape(-1)[order][:, None].astype(ys.dtype)
    return jnp.zeros_like(x_th).at[token_of].add(ys.astype(x_th.dtype))


def experts_gather(x_th: jax.Array, weights_tk: jax.Array, idx_tk: jax.Array, gate_up_ehf, down_efh,
                   act: str) -> jax.Array:
    """Gather each token's K experts (W[idx] [T, K, H, 2I] and [T, K, I, H]) and apply them as batched
    matmuls. O(T*K) weight slices read: the small-batch path."""
    gu_tkhf = fp8.materialize(fp8.take(gate_up_ehf, idx_tk))
    dn_tkfh = fp8.materialize(fp8.take(down_efh, idx_tk))
    h_tkf = swiglu(jnp.einsum("th,tkhf->tkf", x_th, gu_tkhf), act)
    y_tkh = jnp.einsum("tkf,tkfh->tkh", h_tkf, dn_tkfh)
    return jnp.einsum("tkh,tk->th", y_tkh, weights_tk.astype(y_tkh.dtype)).astype(x_th.dtype)


def resolve_impl(impl: str, n_tokens: int, top_k: int, gather_max_pairs: int = GATHER_MAX_PAIRS) -> str:
    """The concrete implementation for `impl` at n_tokens tokens per call ("auto" picks by T*K)."""
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"expert_impl must be one of {EXPERT_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "gather" if n_tokens * top_k <= gather_max_pairs else "grouped"
    return impl


def experts_forward(x_th: jax.Array, weights_tk: jax.Array, idx_tk: jax.Array, gate_up_ehf, down_efh, act: str,
                    impl: str = "grouped") -> jax.Array:
    """sum_k w[t,k] * down[e] @ (act(x @ gate[e]) * (x @ up[e])), e = idx[t,k]; [T, H].

    gate_up_ehf / down_efh: arrays or `fp8.Fp8Weight`s."""
    impl = resolve_impl(impl, *idx_tk.shape)
    if impl == "gather":
        return experts_gather(x_th, weights_tk, idx_tk, gate_up_ehf, down_efh, act)
    if impl == "grouped":
        return experts_grouped(x_th, weights_tk, idx_tk, gate_up_ehf, down_efh, act)
    if impl == "dense":
        return experts_dense(x_th, weights_tk, idx_tk, gate_up_ehf, down_efh, act)
    raise ValueError(f"expert_impl must be one of {EXPERT_IMPLS}, got {impl!r}")
