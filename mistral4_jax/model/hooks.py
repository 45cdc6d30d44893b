"""Research access: what a forward pass captures and how it is changed (one place for both).

    out = model.probe(input_ids, capture=Capture(hidden_states=True, router=True),
                      intervene=Intervention(expert_mask=mask_le, patch=ResidualPatch.at(3, 5, v_h)))
    out.logits, out.hidden_states, out.router_logits, out.topk_ids, out.topk_weights, out.attentions

(`model(input_ids, capture=..., intervene=...)` is sugar for `model.probe`.)

`Capture` is static (which arrays to return: a different request is a different program);
`Intervention` holds arrays only, so new mask or patch values (layers, positions, experts included)
reuse the compiled program.

The decoder stack calls one hook object at fixed points (`Hooks`: the embeddings, each layer's
output, the router, the attention probabilities). The default, `NO_HOOKS`, does nothing, so
`model(ids)` compiles to exactly the program it compiled to before hooks existed
(`bench/default_program.py`). `Probe` is the research implementation: layers sow what is requested
as `nnx.Intermediate` values, the scanned stacks return them stacked on the layer axis and
`Probe.collect` pops them.

Layer axes: hidden states and the residual patch points run over all L layers (plus the embeddings);
router outputs and the expert mask over the MoE layers only (the `layers` stack, `layers.moe_stack`), as
transformers' `output_router_logits`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import TextConfig
from ..errors import InputError
from .layers import moe_stack


@dataclasses.dataclass(frozen=True)
class Capture:
    """Which per-layer arrays a forward returns besides the logits (static: part of the program).

    hidden_states: [L+1, B, T, H], as transformers' `output_hidden_states`: the embeddings (after a
        point-0 patch), the output of layers 0..L-2, and the final-norm output of the last layer.
    router: router logits [L_moe, B*T, E] (as `output_router_logits`), the chosen expert ids and
        their weights [L_moe, B*T, K] (after any expert mask; weights include routed_scaling_factor).
    attentions: softmax probabilities [L, B, heads, T, T] (fp32; for short sequences: T^2 per head).
    """

    hidden_states: bool = False
    router: bool = False
    attentions: bool = False

    @classmethod
    def everything(cls) -> Capture:
        return cls(True, True, True)

    def __bool__(self) -> bool:
        return self.hidden_states or self.router or self.attentions


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ResidualPatch:
    """P sites, each changing the residual stream at one (point, row, position).

    point int [P]: 0 = the embeddings (input of layer 0), i = the output of layer i-1 (1..L).
    row, position int [P]; value [P, H]; replace bool [P]: True writes `value` there, False adds it.
    Replacements apply before additions; a site whose point is outside 0..L changes nothing (a way
    to pad the site count so the program is reused).
    """

    point: jax.Array
    row: jax.Array
    position: jax.Array
    value: jax.Array
    replace: jax.Array

    @classmethod
    def at(cls, point, position, value, *, row=0, replace=False) -> ResidualPatch:
        """One site: `value` [H] added to (or written at) residual point `point`, batch row `row`."""
        value = np.asarray(value, np.float32)
        if value.ndim != 1:
            raise InputError(f"ResidualPatch.at: value must be one hidden vector [H], got shape {value.shape}")
        return cls(np.asarray([point], np.int32), np.asarray([row], np.int32), np.asarray([position], np.int32),
                   value[None], np.asarray([replace], bool))

    @classmethod
    def concat(cls, *patches: ResidualPatch) -> ResidualPatch:
        return cls(*(np.concatenate([np.asarray(getattr(p, f.name)) for p in patches])
                     for f in dataclasses.fields(cls)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Intervention:
    """Changes to a forward pass, all given as arrays (new values do not recompile).

    expert_mask: bool [L_moe, E] (per MoE layer) or [L_moe, B, T, E] (per token); False disables an
        expert. Disabled experts are never chosen; with fewer than K enabled the missing picks get
        weight 0, so enabling exactly k <= K experts forces that set (weights renormalised over it).
    patch: a `ResidualPatch`.
    """

    expert_mask: Any = None
    patch: ResidualPatch | None = None

    @classmethod
    def disable_experts(cls, cfg: TextConfig, experts: dict[int, list[int]], patch=None) -> Intervention:
        """A mask disabling `experts[layer]` (layer = absolute layer index) everywhere."""
        return cls(expert_mask=_layer_mask(cfg, experts, enabled=False), patch=patch)

    @classmethod
    def force_experts(cls, cfg: TextConfig, experts: dict[int, list[int]], patch=None) -> Intervention:
        """A mask enabling only `experts[layer]` (at most num_experts_per_tok of them) in those layers."""
        for layer, ids in experts.items():
            if len(ids) > cfg.num_experts_per_tok:
                raise InputError(f"force_experts: layer {layer} lists {len(ids)} experts, more than "
                                 f"num_experts_per_tok = {cfg.num_experts_per_tok}")
        return cls(expert_mask=_layer_mask(cfg, experts, enabled=True), patch=patch)


def _layer_mask(cfg: TextConfig, experts: dict[int, list[int]], enabled: bool) -> np.ndarray:
    first, n = moe_stack(cfg)[1:]
    e = cfg.n_routed_experts
    mask = np.ones((n, e), bool)
    for layer, ids in experts.items():
        if not first <= layer < first + n:
            raise InputError(f"expert mask: layer {layer} is not a MoE layer (those are {first}.."
                             f"{first + n - 1})")
        bad = [i for i in ids if not 0 <= i < e]
        if bad:
            raise InputError(f"expert mask: layer {layer}: expert ids {bad} outside [0, {e})")
        if enabled:
            mask[layer - first] = False
        mask[layer - first, list(ids)] = enabled
    return mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ForwardOutput:
    """Logits [B, T, V] (None from `final_hidden`) and the arrays a `Capture` asked for (None otherwise);
    shapes in `Capture`."""

    logits: jax.Array
    hidden_states: jax.Array | None = None
    router_logits: jax.Array | None = None
    topk_ids: jax.Array | None = None
    topk_weights: jax.Array | None = None
    attentions: jax.Array | None = None


def apply_patch(x_btd: jax.Array, patch: ResidualPatch, point) -> jax.Array:
    """x with the sites of `patch` at residual point `point` applied: replaced, then added to."""
    b, t, d = x_btd.shape
    hit = patch.point == point  # [P]
    rep = hit & patch.replace
    add = hit & ~patch.replace
    value = patch.value.astype(x_btd.dtype)
    rows, pos = patch.row, patch.position
    replace_bt = jnp.zeros((b, t), bool).at[rows, pos].max(rep)
    replace_btd = jnp.zeros_like(x_btd).at[rows, pos].add(jnp.where(rep[:, None], value, 0))
    add_btd = jnp.zeros_like(x_btd).at[rows, pos].add(jnp.where(add[:, None], value, 0))
    return jnp.where(replace_bt[..., None], replace_btd, x_btd) + add_btd


def check_intervention(iv: Intervention, cfg: TextConfig, batch: int, time: int) -> None:
    """Shapes always; values (points, rows, positions in range) when they are host values."""
    lm, e = cfg.num_moe_layers, cfg.n_routed_experts
    if iv.expert_mask is not None:
        shape = tuple(np.shape(iv.expert_mask))
        if shape not in ((lm, e), (lm, batch, time, e)):
            raise InputError(f"Intervention.expert_mask must be [moe_layers={lm}, experts={e}] or "
                             f"[{lm}, batch={batch}, time={time}, {e}], got shape {shape}")
    p = iv.patch
    if p is None:
        return
    n = np.shape(p.point)
    if any(np.shape(a) != n for a in (p.row, p.position, p.replace)) or len(n) != 1 \
            or np.shape(p.value) != (n[0] if n else 0, cfg.hidden_size):
        raise InputError(f"ResidualPatch: point, row, position, replace must be [P] and value [P, "
                         f"hidden={cfg.hidden_size}], got {[np.shape(a) for a in (p.point, p.row, p.position, p.replace)]}"
                         f" and value {np.shape(p.value)}")
    for name, arr, hi in (("point", p.point, cfg.num_hidden_layers + 1), ("row", p.row, batch),
                          ("position", p.position, time)):
        if isinstance(arr, jax.core.Tracer) or name == "point":
            continue  # points outside 0..L are documented as no-ops (padding)
        a = np.asarray(arr)
        if ((a < 0) | (a >= hi)).any():
            raise InputError(f"ResidualPatch.{name} = {a.tolist()} has values outside [0, {hi})")


class Hooks:
    """The hook points the decoder stack calls; this base does nothing, so an unhooked forward is the plain
    program (nothing extra is traced). `Probe` is the research implementation.

    Per-layer data (the layer index, the expert-mask slice) arrives as scan inputs: the stack asks
    `layer_inputs` for them when `active`, and each layer runs with `at_layer(xs_l)`.
    """

    active = False  # whether the stack must pass per-layer scan inputs (the layer index) to `at_layer`
    attention_probs_wanted = False  # whether attention must also return its probabilities

    def layer_inputs(self, moe: bool) -> dict:
        """Extra per-layer scan inputs (depth-leading arrays) for one stack, besides "index"."""
        return {}

    def at_layer(self, xs_l: dict | None) -> Hooks:
        """The hooks bound to one layer's scan inputs."""
        return self

    def embeddings(self, model: nnx.Module, x_btd: jax.Array) -> jax.Array:
        """The stack's input (residual point 0)."""
        return x_btd

    def layer_output(self, layer: nnx.Module, x_btd: jax.Array) -> jax.Array:
        """A layer's output (residual point index + 1)."""
        return x_btd

    def allowed_experts(self, batch: int, time: int) -> jax.Array | None:
        """bool [B*T, E] experts a token may be routed to (None: all)."""
        return None

    def router(self, moe: nnx.Module, logits_te: jax.Array, weights_tk: jax.Array, idx_tk: jax.Array) -> None:
        """The router's logits and its choice."""

    def attention_probs(self, attn: nnx.Module, probs_bhts: jax.Array) -> None:
        """Softmax probabilities [B, heads, T, S] (called only when `attention_probs_wanted`)."""


NO_HOOKS = Hooks()


def _sow(module: nnx.Module, name: str, value: jax.Array) -> None:
    """Keep `value` on `module` as an `nnx.Intermediate`; the scan returns it stacked on the layer axis."""
    setattr(module, name, nnx.Intermediate(value))


class Probe(Hooks):
    """One forward's `Capture` and `Intervention`, as hooks: layers sow what is captured and apply the
    intervention; `collect` assembles the `ForwardOutput` afterwards."""

    active = True

    def __init__(self, capture: Capture | None, intervene: Intervention | None, cfg: TextConfig,
                 xs_l: dict | None = None):
        self.capture = capture or Capture()
        self.intervene = intervene or Intervention()
        self.cfg = cfg
        self.xs_l = xs_l  # this layer's scan inputs, once bound by `at_layer`
        self.attention_probs_wanted = self.capture.attentions

    @classmethod
    def make(cls, capture, intervene, cfg: TextConfig, batch: int, time: int) -> Probe:
        if capture is not None and not isinstance(capture, Capture):
            raise InputError(f"capture must be a mistral4_jax.model.hooks.Capture, got {type(capture).__name__}")
        if intervene is not None and not isinstance(intervene, Intervention):
            raise InputError(f"intervene must be a mistral4_jax.model.hooks.Intervention, "
                             f"got {type(intervene).__name__}")
        if intervene is not None:
            check_intervention(intervene, cfg, batch, time)
        return cls(capture, intervene, cfg)

    # ---------------------------------------------------------- inside the text stack
    def _patch(self, x_btd: jax.Array, point) -> jax.Array:
        p = self.intervene.patch
        return x_btd if p is None else apply_patch(x_btd, p, point)

    def layer_inputs(self, moe: bool) -> dict:
        if moe and self.intervene.expert_mask is not None:
            return {"expert_mask": jnp.asarray(self.intervene.expert_mask).astype(bool)}
        return {}

    def at_layer(self, xs_l: dict | None) -> Probe:
        return Probe(self.capture, self.intervene, self.cfg, xs_l)

    def embeddings(self, model, x_btd):
        x = self._patch(x_btd, 0)
        if self.capture.hidden_states:
            _sow(model, "input_hidden_state", x)
        return x

    def layer_output(self, layer, x_btd):
        x = self._patch(x_btd, self.xs_l["index"] + 1)
        if self.capture.hidden_states:
            _sow(layer, "hidden_state", x)
        return x

    def allowed_experts(self, batch, time):
        mask = self.xs_l.get("expert_mask")
        if mask is None:
            return None
        e = mask.shape[-1]
        return jnp.broadcast_to(mask, (batch, time, e)).reshape(batch * time, e)

    def router(self, moe, logits_te, weights_tk, idx_tk):
        if self.capture.router:
            _sow(moe, "router_logits", logits_te)
            _sow(moe, "topk_ids", idx_tk)
            _sow(moe, "topk_weights", weights_tk)

    def attention_probs(self, attn, probs_bhts):
        _sow(attn, "attn_probs", probs_bhts)

    # ---------------------------------------------------------- after the forward
    def collect(self, model: nnx.Module, logits: jax.Array, final_hidden_btd: jax.Array) -> ForwardOutput:
        """Pop the sown intermediates off `model` and assemble the `ForwardOutput`."""
        sown = nnx.pop(model, nnx.Intermediate)
        lm = sown.get("language_model", {})
        stacks = [lm[k] for k in ("dense_layers", "layers") if k in lm]
        c, out = self.capture, {}

        def val(node, *path):
            for k in path:
                node = node[k]
            return node.get_value()

        if c.hidden_states:
            layers = jnp.concatenate([val(s, "hidden_state") for s in stacks], axis=0)  # [L, B, T, H]
            out["hidden_states"] = jnp.concatenate(
                [val(lm, "input_hidden_state")[None], layers[:-1], final_hidden_btd[None]], axis=0)
        if c.attentions:
            out["attentions"] = jnp.concatenate([val(s, "self_attn", "attn_probs") for s in stacks], axis=0)
        if c.router and "layers" in lm:
            for name in ("router_logits", "topk_ids", "topk_weights"):
                out[name] = val(lm["layers"], "mlp", name)
        return ForwardOutput(logits=logits, **out)
