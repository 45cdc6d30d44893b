"""Routing and the routed-expert computation (docs/model.md 3.4), as pure functions.

Expert weights are stacked: `gate_up_ehf` [E, H, 2I] (gate columns first, then up) and `down_efh`
[E, I, H], i.e. the transposes of the HF tensors so that every matmul is x @ W. They are plain arrays or
weight kinds (`weights.py`: FP8, LoRA, the layer view `weights.Stacked`); every path selects experts on
the packed values and dequantises only what it multiplies.

`experts_forward` is the one dispatch point. Its implementations compute the same function:
  * "routed": the (token, expert) pairs sorted by expert; a loop over the experts that received tokens
    reads each one's weights once (`weights.index`, dequantised there) and runs its rows in tiles of
    `tile_rows` rows. Reads and multiplies only routed work, on any backend, with a custom VJP (the
    same loop backwards) for training. Under an ambient mesh with an `expert` axis it runs inside
    `shard_map`: each device loops over its own experts and the partial outputs are summed.
  * "gather": each token's K expert slices gathered and applied as batched matmuls: one fused step,
    the fastest at a few pairs per call (decode); reads an expert once per pair that uses it.
  * "auto" (default): "gather" when T*K <= GATHER_MAX_PAIRS, else "routed" (T is static at trace time).
  * "grouped": `jax.lax.ragged_dot` over the sorted pairs. XLA:CPU, and XLA:GPU without the cuDNN
    ragged-dot fusion, lower it to a dense dot over all experts (E times the work, and every expert
    dequantised): kept for comparison on GPUs where the fusion is enabled.
  * "dense": every expert on every token, combined with a [T, E] weight matrix. The test reference.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import weights
from .ops import activation

EXPERT_IMPLS = ("auto", "routed", "gather", "grouped", "dense")
# "auto" takes "gather" at or below this many (token, expert) pairs per call: 64 pairs = 16 tokens at top-4,
# where uniform routing touches ~50 of 128 experts (docs/gpu.md 2.3) and the gather still reads each expert
# about once. Above it the routed loop reads each used expert exactly once.
GATHER_MAX_PAIRS = 64
MAX_TILE = 256  # most rows per tile of the routed loop (its matmuls are [tile, H] @ [H, 2I])


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
    weights_tk = jnp.take_along_axis(scores, idx, axis=-1)
    if allowed_te is not None:
        weights_tk = jnp.where(jnp.take_along_axis(allowed_te, idx, axis=-1), weights_tk, 0.0)
    if norm_topk_prob:
        weights_tk = weights_tk / (weights_tk.sum(-1, keepdims=True) + 1e-20)
    return weights_tk * routed_scaling_factor, idx


def swiglu(h_f2: jax.Array, act: str) -> jax.Array:
    """act(gate) * up on a fused [..., 2I] projection whose first half is gate."""
    gate, up = jnp.split(h_f2, 2, axis=-1)
    return activation(act)(gate) * up


# ---------------------------------------------------------------------- reference and gathered paths
def experts_dense(x_th: jax.Array, weights_tk: jax.Array, idx_tk: jax.Array, gate_up, down, act: str) -> jax.Array:
    """Reference path: run all E experts on all T tokens, keep the routed ones. O(T*E) work."""
    gate_up_ehf, down_efh = weights.dense(gate_up), weights.dense(down)
    e = gate_up_ehf.shape[0]
    combine_te = jnp.zeros((x_th.shape[0], e), x_th.dtype).at[
        jnp.arange(x_th.shape[0])[:, None], idx_tk].add(weights_tk.astype(x_th.dtype))
    h = swiglu(jnp.einsum("th,ehf->tef", x_th, gate_up_ehf), act)
    y_teh = jnp.einsum("tef,efh->teh", h, down_efh)
    return jnp.einsum("teh,te->th", y_teh, combine_te)


def experts_gather(x_th: jax.Array, weights_tk: jax.Array, idx_tk: jax.Array, gate_up, down, act: str) -> jax.Array:
    """Gather each token's K experts (W[idx] [T, K, H, 2I] and [T, K, I, H]) and apply them as batched
    matmuls. O(T*K) weight slices read: the small-batch path."""
    gu_tkhf = weights.dense(weights.take(gate_up, idx_tk))
    dn_tkfh = weights.dense(weights.take(down, idx_tk))
    h_tkf = swiglu(jnp.einsum("th,tkhf->tkf", x_th, gu_tkhf), act)
    y_tkh = jnp.einsum("tkf,tkfh->tkh", h_tkf, dn_tkfh)
    return jnp.einsum("tkh,tk->th", y_tkh, weights_tk.astype(y_tkh.dtype)).astype(x_th.dtype)


def experts_grouped(x_th: jax.Array, weights_tk: jax.Array, idx_tk: jax.Array, gate_up, down, act: str) -> jax.Array:
    """Sort the T*K (token, expert) pairs by expert and run two grouped matmuls (ragged_dot)."""
    t, k = idx_tk.shape
    gate_up_ehf, down_efh = weights.dense(gate_up), weights.dense(down)
    e = gate_up_ehf.shape[0]
    flat = idx_tk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of = order // k
    group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    h = swiglu(jax.lax.ragged_dot(x_th[token_of], gate_up_ehf, group_sizes), act)
    ys = jax.lax.ragged_dot(h, down_efh, group_sizes)
    owned = jnp.arange(flat.size) < group_sizes.sum()  # pairs sent to no expert (id >= E) sort last
    ys = jnp.where(owned[:, None], ys * weights_tk.reshape(-1)[order][:, None].astype(ys.dtype), 0)
    return jnp.zeros_like(x_th).at[token_of].add(ys.astype(x_th.dtype))


# ---------------------------------------------------------------------- the routed loop
class Groups(NamedTuple):
    """The T*K (token, expert) pairs sorted by expert: pair `order[r]` is row r of the sorted rows;
    expert e owns rows starts[e] .. starts[e] + sizes[e]; `active[:n_active]` are the experts with rows,
    in increasing order (the loop's schedule)."""

    order: jax.Array  # [M] int32
    sizes: jax.Array  # [E] int32
    starts: jax.Array  # [E] int32
    active: jax.Array  # [E] int32, padded with 0
    n_active: jax.Array  # [] int32


def group_pairs(expert_m: jax.Array, n_experts: int) -> Groups:
    """Groups of the flat expert ids `expert_m` [M] (ids >= n_experts belong to no group: they sort last and
    no expert owns their rows)."""
    order = jnp.argsort(expert_m, stable=True).astype(jnp.int32)
    sizes = jnp.bincount(expert_m, length=n_experts).astype(jnp.int32)
    starts = (jnp.cumsum(sizes) - sizes).astype(jnp.int32)
    used = sizes > 0
    active = jnp.argsort(~used, stable=True).astype(jnp.int32)  # used experts first, in increasing order
    return Groups(order, sizes, starts, active, used.sum().astype(jnp.int32))


def tile_rows(n_pairs: int, n_experts: int) -> int:
    """Rows per tile: the power of two at or above the mean group size (at most MAX_TILE), so that the
    padding of the last tile of each group adds at most about one mean group per expert."""
    mean = -(-n_pairs // n_experts)
    return min(MAX_TILE, 1 << max(0, mean - 1).bit_length())


def _over_tiles(groups: Groups, tile: int, open_expert, per_tile, close_expert, carry):
    """carry after visiting every tile of every active expert, experts in increasing order: for expert e,
    `ctx, inner = open_expert(e, carry)`, then `inner = per_tile(ctx, row0, n_valid, inner)` for each of its
    tiles (rows row0 .. row0 + tile, the first n_valid of them its own), then `carry = close_expert(e, ctx,
    inner, carry)`."""

    def expert_body(a, carry):
        e = groups.active[a]
        start, size = groups.starts[e], groups.sizes[e]
        ctx, inner = open_expert(e, carry)
        inner = jax.lax.fori_loop(0, -(-size // tile),
                                  lambda j, inner: per_tile(ctx, start + j * tile, size - j * tile, inner), inner)
        return close_expert(e, ctx, inner, carry)

    return jax.lax.fori_loop(0, groups.n_active, expert_body, carry)


def _tile_ffn(x_mh, w1_hf, w2_fh, act):
    return swiglu(x_mh @ w1_hf, act) @ w2_fh


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def routed_ffn(act: str, tile: int, xs_mh, gate_up, down, groups: Groups):
    """down[e] @ swiglu(gate_up[e] @ x) for every sorted row x of expert e's rows -> [M, H]. Rows of no
    group come back zero. Each active expert's weights are read and dequantised once (`weights.index`)."""
    return _routed_forward(act, tile, xs_mh, gate_up, down, groups)


def _owned(groups: Groups, rows_mh):
    """The first M rows, zero where no expert owns them (ids outside every group sort last)."""
    m = groups.order.shape[0]
    return jnp.where((jnp.arange(m) < groups.sizes.sum())[:, None], rows_mh[:m], 0)


def _routed_forward(act, tile, xs_mh, gate_up, down, groups):
    m, h = xs_mh.shape
    xs = jnp.pad(xs_mh, ((0, tile), (0, 0)))  # a group's last tile may run past M

    def open_expert(e, ys):
        return (weights.dense(weights.index(gate_up, e)), weights.dense(weights.index(down, e))), ys

    def per_tile(ws, row0, n_valid, ys):
        # rows past the group (n_valid) belong to later groups, which overwrite them when their turn comes
        y = _tile_ffn(jax.lax.dynamic_slice_in_dim(xs, row0, tile), *ws, act)
        return jax.lax.dynamic_update_slice_in_dim(ys, y.astype(ys.dtype), row0, 0)

    ys = _over_tiles(groups, tile, open_expert, per_tile, lambda e, ws, ys, _: ys,
                     jnp.zeros((m + tile, h), xs_mh.dtype))
    return _owned(groups, ys)


def _routed_fwd(act, tile, xs_mh, gate_up, down, groups):
    return _routed_forward(act, tile, xs_mh, gate_up, down, groups), (xs_mh, gate_up, down, groups)


def _routed_bwd(act, tile, res, dys_mh):
    """The same loop backwards: per expert, W1 and W2 dequantised once; per tile the forward recomputed,
    dx written like the forward writes y, dW1 / dW2 summed over the expert's rows, then turned into the
    cotangent of the weight's own leaves (`jax.vjp` of `weights.dense`, so any kind works) and added at e."""
    xs_mh, gate_up, down, groups = res
    m, h = xs_mh.shape
    xs = jnp.pad(xs_mh, ((0, tile), (0, 0)))
    dys = jnp.pad(dys_mh, ((0, tile), (0, 0)))
    (base1, lead1), (base2, lead2) = weights.unstacked(gate_up), weights.unstacked(down)

    def open_expert(e, carry):
        w1, vjp1 = jax.vjp(weights.dense, weights.index(gate_up, e))
        w2, vjp2 = jax.vjp(weights.dense, weights.index(down, e))
        return (w1, w2, vjp1, vjp2), (carry[0], jnp.zeros_like(w1), jnp.zeros_like(w2))

    def per_tile(ctx, row0, n_valid, inner):
        (w1, w2, _, _), (dxs, dw1, dw2) = ctx, inner
        x = jax.lax.dynamic_slice_in_dim(xs, row0, tile)
        dy = jnp.where((jnp.arange(tile) < n_valid)[:, None], jax.lax.dynamic_slice_in_dim(dys, row0, tile), 0)
        _, vjp = jax.vjp(lambda x_, w1_, w2_: _tile_ffn(x_, w1_, w2_, act), x, w1, w2)
        dx, d1, d2 = vjp(dy.astype(x.dtype))
        return jax.lax.dynamic_update_slice_in_dim(dxs, dx, row0, 0), dw1 + d1, dw2 + d2

    def close_expert(e, ctx, inner, carry):
        (_, _, vjp1, vjp2), (dxs, dw1, dw2) = ctx, inner
        (g1,), (g2,) = vjp1(dw1), vjp2(dw2)
        return (dxs, weights.add_at(carry[1], weights.float_leaves_only(g1), *lead1, e),
                weights.add_at(carry[2], weights.float_leaves_only(g2), *lead2, e))

    zeros = (jnp.zeros((m + tile, h), xs_mh.dtype), *(weights.float_leaves_only(jax.tree.map(jnp.zeros_like, b))
                                                      for b in (base1, base2)))
    dxs, acc1, acc2 = _over_tiles(groups, tile, open_expert, per_tile, close_expert, zeros)
    d_gate_up = weights.Stacked(acc1, None) if lead1 else acc1
    d_down = weights.Stacked(acc2, None) if lead2 else acc2
    return _owned(groups, dxs), d_gate_up, d_down, None


routed_ffn.defvjp(_routed_fwd, _routed_bwd)


def experts_routed(x_th: jax.Array, weights_tk: jax.Array, idx_tk: jax.Array, gate_up, down, act: str, *,
                   first_expert=0, tile: int | None = None) -> jax.Array:
    """The routed loop over the experts of `gate_up` / `down`, which are experts first_expert, first_expert + 1,
    ... of the model; pairs routed to others contribute nothing (`expert_parallel` sums the parts)."""
    t, k = idx_tk.shape
    n = gate_up.shape[0]
    local = idx_tk.reshape(-1) - first_expert
    local = jnp.where((local >= 0) & (local < n), local, n)  # other experts: the group nobody owns
    groups = group_pairs(local, n)
    token_of = groups.order // k
    ys = routed_ffn(act, tile or tile_rows(t * k, n), x_th[token_of], gate_up, down, groups)
    ys = ys * weights_tk.reshape(-1)[groups.order][:, None].astype(ys.dtype)
    return jnp.zeros_like(x_th).at[token_of].add(ys.astype(x_th.dtype))


# ---------------------------------------------------------------------- expert parallelism
def expert_axis_size() -> int:
    """Size of the ambient mesh's `expert` axis (1 without a mesh, `jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "expert" not in mesh.axis_names:
        return 1
    return mesh.shape["expert"]


def _expert_spec(w):
    """PartitionSpecs of a weight's leaves: the expert axis (the first, or the second under a layer view)
    split over `expert`."""
    lead = (None,) if isinstance(w, weights.Stacked) else ()
    return jax.tree.map(lambda a: P(*lead, "expert") if a.ndim > len(lead) else P(), w)


def expert_parallel(x_th, weights_tk, idx_tk, gate_up, down, act: str) -> jax.Array:
    """`experts_routed` with the experts split over the ambient mesh's `expert` axis: each device runs the
    loop over its own experts for every token (tokens are replicated over `expert`), and one psum adds
    the parts. No expert weight moves between devices."""
    n_dev, n_experts = expert_axis_size(), gate_up.shape[0]
    tile = tile_rows(idx_tk.size, n_experts)

    def local(x, w, idx, gu, dn):
        first = jax.lax.axis_index("expert") * (n_experts // n_dev)
        y = experts_routed(x.astype(x_th.dtype), w, idx, gu, dn, act, first_expert=first, tile=tile)
        return jax.lax.psum(y.astype(jnp.float32), "expert")

    # The tokens go in, and the parts are summed, in float32: the sum of n_dev partial outputs keeps its
    # precision, and XLA:CPU cannot promote the bf16 all-reduces of this program (nor of its gradient) itself.
    f = jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                      in_specs=(P(), P(), P(), _expert_spec(gate_up), _expert_spec(down)), out_specs=P(),
                      axis_names={"expert"}, check_vma=False)
    return f(x_th.astype(jnp.float32), weights_tk, idx_tk, gate_up, down).astype(x_th.dtype)


# ---------------------------------------------------------------------- dispatch
def resolve_impl(impl: str, n_tokens: int, top_k: int, gather_max_pairs: int = GATHER_MAX_PAIRS) -> str:
    """The concrete implementation for `impl` at n_tokens tokens per call ("auto" picks by T*K)."""
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"expert_impl must be one of {EXPERT_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "gather" if n_tokens * top_k <= gather_max_pairs else "routed"
    return impl


def experts_forward(x_th: jax.Array, weights_tk: jax.Array, idx_tk: jax.Array, gate_up, down, act: str,
                    impl: str = "auto") -> jax.Array:
    """sum_k w[t,k] * down[e] @ (act(x @ gate[e]) * (x @ up[e])), e = idx[t,k]; [T, H].

    gate_up / down: arrays or weight kinds (`weights.py`) with the expert axis first."""
    impl = resolve_impl(impl, *idx_tk.shape)
    if impl == "routed":
        n_dev = expert_axis_size()
        if n_dev > 1 and gate_up.shape[0] % n_dev == 0:
            return expert_parallel(x_th, weights_tk, idx_tk, gate_up, down, act)
        return experts_routed(x_th, weights_tk, idx_tk, gate_up, down, act)
    if impl == "gather":
        return experts_gather(x_th, weights_tk, idx_tk, gate_up, down, act)
    if impl == "grouped":
        return experts_grouped(x_th, weights_tk, idx_tk, gate_up, down, act)
    return experts_dense(x_th, weights_tk, idx_tk, gate_up, down, act)
