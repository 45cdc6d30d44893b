"""The loss, the optimizer and the jitted, sharded train step.

The model is split once into a static graph and a parameter tree (`nnx.split`); the loss merges
them inside the traced function, so the step is a pure function of arrays:

    state = {"trainable": params or LoRA adapters, "opt_state": ..., "step": int32 []}
    new_state, metrics = step_fn(state, frozen, batch)

`frozen` is the base parameter tree when training LoRA adapters (no gradient, no optimizer state),
else None. Parameters keep their dtype (bf16 or fp32); gradients, the optimizer state and the update
are float32, and the updated value is rounded back to the parameter dtype.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..checkpoints import scheme
from ..model import moe, weights
from ..model.hooks import Capture
from ..errors import InputError
from .. import sharding as shard_lib
from ..config import TextConfig
from ..inference.logprobs import DEFAULT_CHUNK, target_logprobs
from .lora import LoRAConfig, apply_adapters


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a run (all of them are checked on resume)."""

    steps: int
    lr: float = 1e-4
    warmup_steps: int | None = None  # None: 10% of the steps, at most 100
    end_lr_ratio: float = 0.1  # cosine decay from lr to lr * end_lr_ratio at the last step
    weight_decay: float = 0.0  # AdamW decoupled decay, on matrices only (not norms, biases)
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0  # global gradient-norm clipping (0: off)
    batch_size: int = 8
    max_len: int = 512
    remat: bool = False  # rematerialise each decoder layer in the backward pass
    loss_chunk: int = DEFAULT_CHUNK  # positions per lm_head chunk in the loss: [batch, loss_chunk, vocab] fp32
    # None: bfloat16 for checkpoints stored in 16-bit or FP8, float32 for float32 ones (`finetune` decides,
    # `checkpoints.load.stored_float_dtype`); the optimizer state is float32 either way
    param_dtype: str | None = None
    # How `finetune` holds the base: a `from_pretrained(weights=...)` preset (`checkpoints/scheme.py`): None (as
    # stored: plain arrays in param_dtype, NVFP4 kept packed), "dense" (plain arrays), or "fp8" / "nvfp4" /
    # "hybrid", a quantised frozen base that LoRA trains over; full fine-tuning needs plain parameters
    weights: str | None = None
    router_aux_weight: float = 0.0  # load-balancing loss weight (off, as for the released model)
    lora: LoRAConfig | None = None
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.max_len < 2 or self.loss_chunk < 1:
            raise InputError("steps, batch_size and loss_chunk must be >= 1 and max_len >= 2, got "
                             f"steps={self.steps}, batch_size={self.batch_size}, loss_chunk={self.loss_chunk}, "
                             f"max_len={self.max_len}")
        if self.weights is not None and (not isinstance(self.weights, str) or self.weights not in scheme.PRESETS):
            raise InputError(f"weights must be None or one of {sorted(scheme.PRESETS)}, got {self.weights!r}")
        if self.weights not in (None, "dense") and self.lora is None:
            raise InputError(f"weights={self.weights!r} keeps the base quantised and frozen, so only LoRA adapters can "
                             "be trained over it: set lora (--lora-rank R), or weights='dense' for full fine-tuning")

    @property
    def warmup(self) -> int:
        return min(100, self.steps // 10) if self.warmup_steps is None else self.warmup_steps


# ---------------------------------------------------------------------- losses
def masked_cross_entropy(logits_btv: jax.Array, input_ids_bt: jax.Array, targets_bt: jax.Array):
    """Mean next-token cross-entropy over target tokens: (loss, number of targets).

    loss = sum_{b,t>0: targets[b,t]} -log softmax(logits[b, t-1])[ids[b, t]] / #targets, in float32.
    """
    logits = logits_btv[:, :-1].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, input_ids_bt[:, 1:])
    w = targets_bt[:, 1:].astype(jnp.float32)
    n = w.sum()
    return (nll * w).sum() / jnp.maximum(n, 1.0), n


def chunked_cross_entropy(hidden_btd: jax.Array, kernel_dv: jax.Array, input_ids_bt: jax.Array,
                          targets_bt: jax.Array, chunk: int = DEFAULT_CHUNK):
    """`masked_cross_entropy` of the logits hidden @ kernel without forming them: (loss, #targets).

    hidden [B, T, D] (the final-norm states), kernel [D, V] (lm_head). Position t predicts ids[t+1];
    the last position has no target and weight 0. The head runs `chunk` positions at a time, forward
    and backward (`logprobs.target_logprobs`), so memory is [B, chunk, V] rather than [B, T, V].
    """
    ids = jnp.asarray(input_ids_bt)
    last = jnp.zeros_like(ids[:, :1])
    next_bt = jnp.concatenate([ids[:, 1:], last], axis=1)
    w = jnp.concatenate([jnp.asarray(targets_bt)[:, 1:].astype(jnp.float32), last.astype(jnp.float32)], axis=1)
    logp, _ = target_logprobs(hidden_btd, kernel_dv, next_bt, chunk=chunk)
    n = w.sum()
    return -(logp * w).sum() / jnp.maximum(n, 1.0), n


def load_balancing_loss(router_logits_lte: jax.Array, valid_t: jax.Array, cfg: TextConfig) -> jax.Array:
    """E * sum_e f_e * P_e, averaged over layers (the Switch / Mixtral form), over valid tokens.

    f_e: routed (token, slot) pairs that go to expert e per token (sums to top_k, from the model's own
    group-limited top-k); P_e: the mean router softmax probability of e. Balanced routing gives top_k.
    Only P carries a gradient.
    """
    e, w = router_logits_lte.shape[-1], valid_t.astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)

    def one_layer(logits_te):
        _, idx = moe.route(logits_te, top_k=cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
                           norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor)
        f = (jax.nn.one_hot(idx, e).sum(1) * w[:, None]).sum(0) / n
        p = (jax.nn.softmax(logits_te.astype(jnp.float32), -1) * w[:, None]).sum(0) / n
        return e * jnp.sum(f * p)

    return jax.vmap(one_layer)(router_logits_lte).mean()


def loss_fn(trainable, frozen, batch, graphdef, cfg: TrainConfig, images=None):
    """(total loss, (cross-entropy, aux loss, #targets)) of one batch.

    The cross-entropy applies lm_head cfg.loss_chunk positions at a time (`chunked_cross_entropy`).
    images: optional (pixel_values, image_sizes) for image data (host values; not jitted here).
    """
    params = trainable if cfg.lora is None else apply_adapters(frozen, trainable, cfg.lora.scale)
    model = nnx.merge(graphdef, params)
    pixels, sizes = images if images is not None else (None, None)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    aux = jnp.zeros((), jnp.float32)
    if cfg.router_aux_weight > 0 and model.language_model.layers is not None:  # the aux loss reads the router
        h, out = model.probe_hidden(ids, pixels, sizes, attention_mask=mask, capture=Capture(router=True),
                                    remat=cfg.remat, train=True)
        aux = load_balancing_loss(out.router_logits, mask.reshape(-1), model.config.text)
    else:
        h = model.final_hidden(ids, pixels, sizes, attention_mask=mask, remat=cfg.remat, train=True)
    ce, n = chunked_cross_entropy(h, model.lm_head.kernel[...], ids, batch["targets"], cfg.loss_chunk)
    return ce + cfg.router_aux_weight * aux, (ce, aux, n)


# ---------------------------------------------------------------------- optimizer
def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to lr, then cosine decay to lr * end_lr_ratio at `steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, max(cfg.steps, cfg.warmup + 1),
                                              cfg.lr * cfg.end_lr_ratio)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    decay_mask = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)  # noqa: E731
    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm > 0 else adamw


def _f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def init_state(trainable, tx: optax.GradientTransformation) -> dict:
    """The train state: trainable leaves as given, float32 optimizer state, step 0."""
    return {"trainable": trainable, "opt_state": tx.init(_f32(trainable)), "step": jnp.zeros((), jnp.int32)}


def train_step(state, frozen, batch, pixel_values=None, image_sizes=None, *, graphdef, cfg: TrainConfig, tx):
    """One optimizer step; returns (new state, metrics). Images of the batch: pixel_values [N, 3, H, W]
    and image_sizes, a static tuple of (height, width) (the patch layout is built on the host)."""
    images = None if pixel_values is None else (pixel_values, np.asarray(image_sizes))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (ce, aux, n)), grads = grad_fn(state["trainable"], frozen, batch, graphdef, cfg, images)
    grads = _f32(grads)
    params32 = _f32(state["trainable"])
    updates, opt_state = tx.update(grads, state["opt_state"], params32)
    new = jax.tree.map(lambda p, p32, u: (p32 + u).astype(p.dtype), state["trainable"], params32, updates)
    metrics = {"loss": loss, "ce": ce, "aux": aux, "tokens": n, "grad_norm": optax.global_norm(grads),
               "lr": lr_schedule(cfg)(state["step"])}
    return {"trainable": new, "opt_state": opt_state, "step": state["step"] + 1}, metrics


# ---------------------------------------------------------------------- sharding
def _param_shardings(params: nnx.State, mesh: Mesh) -> nnx.State:
    """The sharding of each parameter from the logical axes it declares, as a tree like `params` (a weight
    kind's value gets one sharding per leaf: `_leaf_shardings`)."""
    sh = shard_lib.param_shardings(params, mesh)
    return nnx.from_flat_state([(p, v.replace(_leaf_shardings(v.get_value(), sh["/".join(map(str, p))])))
                                for p, v in nnx.to_flat_state(params)])


def _leaf_shardings(value, sharding: NamedSharding):
    """`sharding` for a plain array; for a weight kind (FP8 bits and scales, `model/weights.py`), a tree like it
    whose leaves keep the weight's split on the axes where they have the weight's size and are replicated on
    the others (an FP8 scale's size-1 input axis; packed axes)."""
    if not weights.is_kind(value):
        return sharding
    shape = tuple(value.shape)
    spec = (*sharding.spec, *(None,) * (len(shape) - len(sharding.spec)))

    def one(leaf):
        same = leaf.ndim == len(shape)
        return NamedSharding(sharding.mesh, PartitionSpec(*(s if same and n == m else None
                                                            for s, n, m in zip(spec, leaf.shape, shape))))

    return jax.tree.map(one, value)


def _adapter_shardings(adapters: dict[str, dict], frozen: nnx.State, mesh: Mesh) -> dict[str, dict]:
    """A [..., in, r] is split like its weight's input side, B [..., r, out] like its output side; the
    rank axis is replicated (`sharding.adapter_specs`)."""
    axes = shard_lib.param_axes(frozen)

    def one(path, ad):
        sa, sb = shard_lib.adapter_specs(path, axes[path], ad["a"].shape, ad["b"].shape, mesh)
        return {"a": NamedSharding(mesh, sa), "b": NamedSharding(mesh, sb)}

    return {path: one(path, ad) for path, ad in adapters.items()}


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
    """Batch rows split over every mesh axis together (data parallel), when they divide evenly."""
    axes = tuple(mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes) if batch_size % mesh.size == 0 else PartitionSpec())


def state_shardings(state, tx, mesh: Mesh, frozen: nnx.State | None = None):
    """Shardings of the train state: parameters (or, with `frozen`, LoRA adapters) by their logical
    axes, optimizer moments like their parameter."""
    trainable = (_param_shardings(state["trainable"], mesh) if frozen is None
                 else _adapter_shardings(state["trainable"], frozen, mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(tx, lambda _, s: s, state["opt_state"], trainable,
                                transform_non_params=lambda _: replicated)
    return {"trainable": trainable, "opt_state": opt, "step": replicated}


def compile_step(graphdef, cfg: TrainConfig, tx, mesh: Mesh | None, state, frozen):
    """The jitted step; with a mesh, state/batch/frozen shardings pinned and the state donated."""
    fn = partial(train_step, graphdef=graphdef, cfg=cfg, tx=tx)
    if mesh is None:
        return jax.jit(fn, donate_argnums=0, static_argnums=4)
    st = state_shardings(state, tx, mesh, frozen)
    fr = None if frozen is None else _param_shardings(frozen, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    b = batch_sharding(mesh, cfg.batch_size)
    return jax.jit(fn, in_shardings=(st, fr, {"input_ids": b, "attention_mask": b, "targets": b}, replicated),
                   out_shardings=(st, replicated), donate_argnums=0, static_argnums=4)
