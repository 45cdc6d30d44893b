"""The Mistral 4 text stack (transformers `models/mistral4/modeling_mistral4.py`) as Flax NNX modules.

Module and attribute names follow the reference tree (`layers.N.self_attn.q_a_proj`,
`layers.N.mlp.experts`, ...) so that loading a checkpoint is a rename table. Linear kernels are
stored [in, out] (Flax convention), i.e. transposed from the PyTorch [out, in].

The decoder layers are stacked: every parameter of `layers` has a leading depth axis and the stack
runs under `jax.lax.scan`, so compile time does not grow with depth. Layers before
`first_k_dense_replace` use a dense MLP and live in a second stack, `dense_layers`.

There is one decoder-layer forward (`Mistral4DecoderLayer.__call__`) and one scan driver
(`Mistral4Model.__call__`): the teacher-forced forward, the research-hooked forward and the cached
decode / prefill forward (`Mistral4Model.forward_cached`, `.prefill`) all run it. A cache switches
the attention step from the expanded full-sequence form to the absorbed form against the latent
cache; a `hooks.Hooks` object (a no-op by default) is what research captures and interventions
attach to.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from . import attention, moe, ops, weights
from ..config import TextConfig
from ..errors import InputError
from ..sharding import ACT_BTD, constrain
from .cache import Cache, write_layer
from .hooks import NO_HOOKS, Hooks
from .layers import (DENSE_STACK, MOE_STACK, Mistral4MLP, RMSNorm, init_normal, linear, param, param_meta, stack_layers,
                     text_stacks)


class Mistral4TopkRouter(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, rngs: nnx.Rngs):
        self.kernel = param(init_normal(rngs.params(), (cfg.hidden_size, cfg.n_routed_experts), dtype), (None, None))
        self.cfg = cfg

    def __call__(self, x_th: jax.Array, allowed_te: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (router_logits [T, E], weights [T, K], expert ids [T, K]); allowed_te: see moe.route."""
        c = self.cfg
        logits = x_th @ self.kernel[...]
        w, idx = moe.route(logits, top_k=c.num_experts_per_tok, n_group=c.n_group, topk_group=c.topk_group,
                           norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor,
                           softmax_fp32=c.router_softmax_fp32, allowed_te=allowed_te)
        return logits, w, idx


# Tokens per routed-expert call at long T: the sorted (token, expert) rows of a call ([T * K, hidden], 256 MiB
# in bf16 at 8,192 tokens) grow with T, so long sequences run in chunks; each chunk reads every expert it
# routes to once, so chunks are long enough that re-reading the experts costs little beside their matmuls.
EXPERT_TOKEN_CHUNK = 8192


def over_token_chunks(fn, chunk: int, *xs_t):
    """fn(*xs) on arrays sharing a leading token axis, `chunk` tokens at a time under `lax.map` when
    there are more (the last chunk zero-padded, its rows dropped); one call otherwise."""
    t = xs_t[0].shape[0]
    if t <= chunk:
        return fn(*xs_t)
    n = -(-t // chunk)
    padded = [jnp.pad(x, [(0, n * chunk - t)] + [(0, 0)] * (x.ndim - 1)).reshape(n, chunk, *x.shape[1:])
              for x in xs_t]
    out = jax.lax.map(lambda a: fn(*a), padded)
    return out.reshape(n * chunk, *out.shape[2:])[:t]


class Mistral4Experts(nnx.Module):
    """The routed experts, stacked: gate_up_proj [E, H, 2I] (gate first), down_proj [E, I, H]."""

    def __init__(self, cfg: TextConfig, dtype, rngs: nnx.Rngs):
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        tags = dict(fp8=True, lora="experts")
        self.gate_up_proj = param(init_normal(rngs.params(), (e, h, 2 * i), dtype), ("expert", None, None), **tags)
        self.down_proj = param(init_normal(rngs.params(), (e, i, h), dtype), ("expert", None, None), **tags)
        self.act = cfg.hidden_act
        self.impl = cfg.expert_impl
        self.n_experts = e

    def __call__(self, x_th, weights_tk, idx_tk):
        # the values as stored (arrays or weight kinds, e.g. FP8 bits and scales): the dispatch selects experts
        # before anything is dequantised
        gate_up, down = self.gate_up_proj.get_value(), self.down_proj.get_value()
        return over_token_chunks(lambda x, w, i: moe.experts_forward(x, w, i, gate_up, down, self.act, self.impl),
                                 EXPERT_TOKEN_CHUNK, x_th, weights_tk, idx_tk)


class Mistral4MoE(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, rngs: nnx.Rngs):
        self.gate = Mistral4TopkRouter(cfg, dtype, rngs)
        self.experts = Mistral4Experts(cfg, dtype, rngs)
        width = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = (Mistral4MLP(cfg.hidden_size, width, cfg.hidden_act, dtype, rngs, width_axis="mlp",
                                           fp8=True, lora="shared_experts") if width else None)

    def __call__(self, x_btd: jax.Array, hooks: Hooks = NO_HOOKS, valid_bt: jax.Array | None = None) -> jax.Array:
        """Route, run the chosen experts, add the shared expert. hooks: may restrict the experts a token
        may use (`allowed_experts`) and sees the router's output. valid_bt: the tokens whose output is used;
        the others (padding, idle cache slots) are sent to no expert, so they read no expert weights."""
        b, t, d = x_btd.shape
        x_th = x_btd.reshape(b * t, d)
        logits, w, idx = self.gate(x_th, hooks.allowed_experts(b, t))
        hooks.router(self, logits, w, idx)
        if valid_bt is not None:
            used = (valid_bt != 0).reshape(-1, 1)
            w, idx = jnp.where(used, w, 0), jnp.where(used, idx, self.experts.n_experts)  # id E: no expert
        y = self.experts(x_th, w, idx).reshape(b, t, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_btd)
        return y


class Mistral4Attention(nnx.Module):
    """Multi-head latent attention (docs/model.md 3.3), expanded form for the full-sequence forward.

    The work is split so that a latent cache fits: `latent` gives what a cache stores per token
    (normalised c_kv [B, T, kv_lora_rank] and the rotated shared rope key [B, T, rope_dim]); `query`
    gives the scaled queries; `attend` expands the latent to per-head keys/values and attends.
    """

    def __init__(self, cfg: TextConfig, dtype, rngs: nnx.Rngs):
        h, nh = cfg.hidden_size, cfg.num_attention_heads
        self.cfg = cfg
        # Heads sit on the output side of q / kv_b and on the input side of o_proj.
        tags = dict(fp8=True, lora="attention")
        if cfg.q_lora_rank is None:
            self.q_proj = linear(h, nh * cfg.qk_head_dim, dtype, rngs, axes=(None, "heads"), **tags)
        else:
            self.q_a_proj = linear(h, cfg.q_lora_rank, dtype, rngs, bias=cfg.attention_bias, **tags)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, dtype)  # eps hard-coded in the reference
            self.q_b_proj = linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, dtype, rngs, axes=(None, "heads"), **tags)
        self.kv_a_proj_with_mqa = linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype, rngs,
                                         bias=cfg.attention_bias, **tags)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6, dtype)
        self.kv_b_proj = linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), dtype, rngs,
                                axes=(None, "heads"), **tags)
        self.o_proj = linear(nh * cfg.v_head_dim, h, dtype, rngs, bias=cfg.attention_bias, axes=("heads", None),
                             **tags)

    def _rope(self, x_bthr, cos, sin):
        fn = ops.apply_rope_interleaved if self.cfg.rope_interleave else ops.apply_rope_half
        return fn(x_bthr, cos, sin)

    def latent(self, x_btd, cos, sin) -> tuple[jax.Array, jax.Array]:
        c = self.cfg
        ckv = self.kv_a_proj_with_mqa(x_btd)
        c_kv, k_pe = ckv[..., : c.kv_lora_rank], ckv[..., c.kv_lora_rank:]
        k_pe = self._rope(k_pe[:, :, None, :], cos, sin)[:, :, 0, :]
        return self.kv_a_layernorm(c_kv), k_pe

    def query(self, x_btd, cos, sin, positions_bt) -> jax.Array:
        """Q = concat(q_nope, rope(q_pe)) * llama4_scale(pos): [B, T, H, qk_head_dim]."""
        c = self.cfg
        b, t, _ = x_btd.shape
        q = self.q_proj(x_btd) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_btd)))
        q = q.reshape(b, t, c.num_attention_heads, c.qk_head_dim)
        q = jnp.concatenate([q[..., : c.qk_nope_head_dim], self._rope(q[..., c.qk_nope_head_dim:], cos, sin)], -1)
        scale = ops.llama4_query_scale(positions_bt, c.rope.llama_4_scaling_beta, c.rope.original_max_position_embeddings)
        return q * scale.astype(q.dtype)[:, :, None, None]

    def attend(self, q_bthd, c_kv_bsc, k_pe_bsr, positions_bt, valid_bt, hooks: Hooks = NO_HOOKS) -> jax.Array:
        """Expanded attention: the latent c_kv [B, S, kv_lora_rank] -> per-head keys [B, S, H, qk_head_dim]
        (with the shared k_pe [B, S, rope]) and values [B, S, H, v_head_dim]; output [B, T, hidden].

        Causal over positions_bt [B, T], keys restricted to valid_bt [B, T] (None: all), by
        `cfg.attention_impl` (model/attention.py); probability captures take the materialised path."""
        c = self.cfg
        b, s, _ = c_kv_bsc.shape
        kv = self.kv_b_proj(c_kv_bsc).reshape(b, s, c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim)
        k_nope, v = kv[..., : c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim:]
        k_pe = jnp.broadcast_to(k_pe_bsr[:, :, None, :], (*k_nope.shape[:3], c.qk_rope_head_dim))
        k = jnp.concatenate([k_nope, k_pe], axis=-1)
        if hooks.attention_probs_wanted:
            check_probs_size(b, c.num_attention_heads, q_bthd.shape[1], s)
            mask = ops.causal_mask(positions_bt, positions_bt, valid_bt, valid_bt)
            o, probs = ops.attention(q_bthd, k, v, mask, c.softmax_scale, return_probs=True)
            hooks.attention_probs(self, probs)
        else:
            o = attention.expanded_attention(q_bthd, k, v, positions_bt, positions_bt, valid_bt, c.softmax_scale,
                                             c.attention_impl, q_valid_bt=valid_bt)
        return self.o_proj(o.reshape(*o.shape[:2], -1))

    def attend_latent(self, q_bthd, cache: Cache, index, positions_bt, rows_b=None, valid_bt=None) -> jax.Array:
        """`attend` against layer `index` of the latent cache (c_kv [L, B, S, kv_lora_rank], k_pe [L, B, S,
        rope]), rows rows_b of it (default: row b); a query at position p attends to slots <= p. valid_bt:
        the queries whose output is used (default all): only their positions decide how many blocks are read.

        Decode and short chunks use the absorbed form (docs/model.md 3.3.6): W_UK folded into the query, W_UV after
        attention, the cache read once for all heads. Chunks longer than `attention.expanded_pays_from`
        expand each key block to per-head keys and values instead (fewer multiply-adds there). Both read
        only the key blocks up to the largest position, straight from the stacked cache."""
        c = self.cfg
        w = self.kv_b_proj.kernel[...].reshape(c.kv_lora_rank, c.num_attention_heads,
                                                c.qk_nope_head_dim + c.v_head_dim)
        q_nope, q_pe = q_bthd[..., : c.qk_nope_head_dim], q_bthd[..., c.qk_nope_head_dim:]
        w_uk, w_uv = w[..., : c.qk_nope_head_dim], w[..., c.qk_nope_head_dim:]
        if c.attention_impl == "reference":  # every slot of the rows, materialised
            c_kv, k_pe = (attention.read_cache_block(x, 0, attention.cache_slots(x, cache.table), index, rows_b,
                                                     q_bthd.dtype, cache.table) for x in (cache.c_kv, cache.k_pe))
            slots = jnp.broadcast_to(jnp.arange(c_kv.shape[1], dtype=positions_bt.dtype), c_kv.shape[:2])
            mask = ops.causal_mask(positions_bt, slots)
            o = ops.mla_absorbed_attention(q_nope, q_pe, w_uk, w_uv, c_kv, k_pe, mask, c.softmax_scale)
        else:
            expanded = q_bthd.shape[1] > attention.expanded_pays_from(c.kv_lora_rank, c.qk_nope_head_dim, c.v_head_dim)
            attend = attention.expanded_cache_attention if expanded else attention.latent_attention
            o = attend(q_nope, q_pe, w_uk, w_uv, cache.c_kv, cache.k_pe, positions_bt, c.softmax_scale, layer=index,
                       rows_b=rows_b, q_valid_bt=valid_bt, table=cache.table)
        return self.o_proj(o.reshape(*o.shape[:2], -1))

    def __call__(self, x_btd, cos, sin, positions_bt, valid_bt=None, cache: Cache | None = None, index=None,
                 hooks: Hooks = NO_HOOKS, rows_b=None) -> tuple[jax.Array, Cache | None]:
        """(output [B, T, hidden], cache). Without a cache: expanded attention over the T tokens
        themselves, causal over positions_bt, keys limited to valid_bt [B, T] (None: all). With one:
        the tokens' latents are written into layer `index` (a traced scan input) of cache rows rows_b
        (default: row b) at their positions (consecutive per row), then attention reads that layer's slots
        up to each token's position, in place; valid_bt then marks the queries whose output is used."""
        c_kv, k_pe = self.latent(x_btd, cos, sin)
        if cache is None:
            return self.attend(self.query(x_btd, cos, sin, positions_bt), c_kv, k_pe, positions_bt, valid_bt,
                               hooks), None
        cache = write_layer(cache, index, c_kv, k_pe, positions_bt[:, 0], rows_b)
        q = self.query(x_btd, cos, sin, positions_bt)
        return self.attend_latent(q, cache, index, positions_bt, rows_b, valid_bt), cache


# The largest [B, heads, T, S] fp32 probability tensor an attention capture may build per layer.
MAX_CAPTURED_PROBS_BYTES = 16 * 2**30


def check_probs_size(b: int, h: int, t: int, s: int) -> None:
    """Attention captures materialise the probabilities: refuse sizes that cannot be held."""
    n = b * h * t * s * 4
    if n > MAX_CAPTURED_PROBS_BYTES:
        raise InputError(f"capture=Capture(attentions=True) materialises [batch {b}, heads {h}, {t}, {s}] fp32 "
                         f"probabilities per layer ({n / 2**30:.1f} GiB, more than the "
                         f"{MAX_CAPTURED_PROBS_BYTES / 2**30:.0f} GiB limit): capture attentions on a shorter "
                         f"sequence or a smaller batch")


class Mistral4DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, dense: bool, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Mistral4Attention(cfg, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if dense:
            self.mlp = Mistral4MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype, rngs,
                                   width_axis="mlp", fp8=True, lora="dense_mlp")
        else:
            self.mlp = Mistral4MoE(cfg, dtype, rngs)

    def __call__(self, x_btd, cos, sin, positions_bt, valid_bt=None, cache: Cache | None = None, index=None,
                 hooks: Hooks = NO_HOOKS, rows_b=None) -> tuple[jax.Array, Cache | None]:
        """x + attn(norm(x)), then + mlp(norm(.)): (output [B, T, hidden], cache).

        cache / index / rows_b: the latent cache, this layer's absolute index (a traced scan input) and the
        cache rows of the batch rows (see `Mistral4Attention.__call__`); hooks: bound to this layer
        (`Hooks.at_layer`)."""
        a, cache = self.self_attn(self.input_layernorm(x_btd), cos, sin, positions_bt, valid_bt, cache, index, hooks,
                                  rows_b)
        h = x_btd + a
        x = self.post_attention_layernorm(h)
        y = self.mlp(x, hooks, valid_bt) if isinstance(self.mlp, Mistral4MoE) else self.mlp(x)
        return hooks.layer_output(self, h + y), cache


def _read_per_expert(v) -> bool:
    """A stacked parameter whose second axis is the expert axis: the routed experts."""
    axes = v.get_metadata().get("out_sharding") or ()
    return isinstance(v, nnx.Param) and len(axes) > 1 and axes[1] == "expert"


def scan_layers(stack: nnx.Module, carry, fn: Callable, remat: bool = False, xs=None, experts_in_place: bool = True):
    """Run `carry = fn(layer, carry)` over a stacked module with `jax.lax.scan` (one compiled layer body).

    remat: recompute each layer's activations in the backward pass (`jax.checkpoint` of the body).
    xs: optional per-layer inputs (a pytree with the depth as leading axis); then `fn(layer, carry, xs_l)`.
    experts_in_place: the routed experts are not sliced per layer: the layer sees each as a
    `weights.Stacked` view of the whole stack, from which the expert dispatch reads the experts it routes
    to (a scan slice is a copy of the layer's whole expert stack once a loop reads it). Training passes
    False: gradients then come back per layer, as scan slices them.
    `nnx.Intermediate` values a layer stores come back stacked on the stack module.
    """
    graphdef, state = nnx.split(stack)
    flat = list(nnx.to_flat_state(state))
    whole = [(p, v) for p, v in flat if experts_in_place and _read_per_expert(v)]
    scanned = nnx.from_flat_state([(p, v) for p, v in flat if not (experts_in_place and _read_per_expert(v))])
    depth = jax.tree.leaves(scanned)[0].shape[0]

    def body(carry, inputs):
        layer_state, i, xs_l = inputs
        if whole:
            views = [(p, v.replace(weights.Stacked(v.get_value(), i))) for p, v in whole]
            layer_state = nnx.from_flat_state(list(nnx.to_flat_state(layer_state)) + views)
        layer = nnx.merge(graphdef, layer_state)
        out = fn(layer, carry) if xs is None else fn(layer, carry, xs_l)
        return out, nnx.state(layer, nnx.Intermediate)

    out, sown = jax.lax.scan(jax.checkpoint(body) if remat else body, carry,
                             (scanned, jnp.arange(depth, dtype=jnp.int32), xs))
    if len(sown):
        nnx.update(stack, sown)
    return out


class Mistral4Model(nnx.Module):
    """Embedding, the decoder stack and the final norm (`Mistral4Model`); returns hidden states."""

    def __init__(self, cfg: TextConfig, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype,
                                      embedding_init=init_normal, embedding_metadata=param_meta(("vocab", None)),
                                      rngs=rngs)
        made = {s.name: stack_layers(lambda r, dense=s.name == DENSE_STACK: Mistral4DecoderLayer(cfg, dense, dtype, r),
                                     s.depth, rngs) for s in text_stacks(cfg)}
        self.dense_layers = made.get(DENSE_STACK)
        self.layers = made.get(MOE_STACK)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def stacks(self) -> list[tuple[nnx.Module, int, int]]:
        """(stack, absolute index of its first layer, depth) of each layer stack, in the order they run."""
        return [(getattr(self, s.name), s.first, s.depth) for s in text_stacks(self.cfg)]

    def rope(self, positions_bt: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        """cos/sin [B, T, rope/2] of the text YaRN RoPE at absolute per-row positions, built once per
        forward and shared by every layer (as the reference's `rotary_emb`)."""
        r = self.cfg.rope
        inv_freq = ops.yarn_inv_freq(self.cfg.qk_rope_head_dim, r.rope_theta, r.factor,
                                     r.original_max_position_embeddings, r.beta_fast, r.beta_slow, r.truncate)
        return ops.rope_cos_sin(positions_bt, jnp.asarray(inv_freq), self.cfg.rope_attention_factor, dtype)

    def __call__(self, inputs_embeds_btd: jax.Array, positions_bt: jax.Array, valid_bt: jax.Array | None = None,
                 cache: Cache | None = None, hooks: Hooks = NO_HOOKS, remat: bool = False,
                 mesh=None, train: bool = False, rows_b=None) -> tuple[jax.Array, Cache | None]:
        """(final-norm hidden states [B, T, hidden], cache): the one scan driver over both stacks.

        valid_bt: [B, T] bool, the real tokens (None: all): without a cache the keys a token may attend to;
        with one (where a token attends to the slots at or before its position) the tokens whose output is
        used. Other tokens read no routed expert. rows_b: with a cache, the cache
        row of each batch row (default: row b). remat: recompute each layer in the backward pass. train:
        the forward is differentiated (the layer scan slices the routed experts per layer, see
        `scan_layers`). mesh: keep activations batch-split between layers.
        """
        cos, sin = self.rope(positions_bt, inputs_embeds_btd.dtype)

        def layer_fn(layer, carry, xs_l=None):
            x, cache = carry
            index = None if xs_l is None else xs_l["index"]
            x, cache = layer(x, cos, sin, positions_bt, valid_bt, cache, index, hooks.at_layer(xs_l), rows_b)
            return constrain(x, mesh, ACT_BTD), cache

        carry = (hooks.embeddings(self, constrain(inputs_embeds_btd, mesh, ACT_BTD)), cache)
        for stack, first, n in self.stacks():
            xs = None  # the layer index is a scan input only where something needs it
            if cache is not None or hooks.active:
                xs = {"index": jnp.arange(first, first + n, dtype=jnp.int32),
                      **hooks.layer_inputs(stack is self.layers)}
            carry = scan_layers(stack, carry, layer_fn, remat, xs, experts_in_place=not train)
        x, cache = carry
        return self.norm(x), cache

    def forward_cached(self, x_btd: jax.Array, positions_bt: jax.Array, cache: Cache,
                       mesh=None, rows_b=None, valid_bt=None) -> tuple[jax.Array, Cache]:
        """Final-norm hidden states [B, T, D] of T new tokens per row, and the cache with them written.

        x_btd: input embeddings; row b's tokens sit at positions_bt[b] = p_b, p_b + 1, ..., which are
        also their cache slots, in cache row rows_b[b] (default b; an index past the cache is padding:
        written nowhere). A token attends to the slots at or before its position. The cache is written
        and read in place: a chunk touches its own slots and the filled blocks before them, nothing else.
        valid_bt: the tokens whose output is used (default all; padding and idle slots need no experts).
        """
        return self(x_btd, positions_bt, valid_bt, cache, mesh=mesh, rows_b=rows_b)

    def prefill(self, embeds_btd: jax.Array, cache: Cache, chunk: int, mesh=None) -> tuple[jax.Array, Cache]:
        """Run a right-padded prompt batch [B, T] (T a multiple of `chunk`) through the stack chunk by chunk.

        Positions are 0..T-1 in every row (slot = position). Returns the hidden states [B, T, D] and the
        filled cache; a row's padding slots hold junk that its later tokens overwrite before reading.
        """
        b, t, d = embeds_btd.shape
        n = t // chunk
        xs = embeds_btd.reshape(b, n, chunk, d).swapaxes(0, 1)

        def body(cache, inp):
            x, start = inp
            pos = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
            h, cache = self.forward_cached(x, pos, cache, mesh)
            return cache, h

        cache, hs = jax.lax.scan(body, cache, (xs, jnp.arange(n, dtype=jnp.int32) * chunk))
        return hs.swapaxes(0, 1).reshape(b, t, d), cache

