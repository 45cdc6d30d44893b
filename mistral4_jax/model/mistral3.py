"""`Mistral3ForConditionalGeneration`: Pixtral tower + projector around the Mistral 4 text stack.

Reference: transformers `models/mistral3/modeling_mistral3.py`. The module tree is flattened by one
level relative to transformers 5 (`model.language_model` is `language_model` here); the loader's
rename table maps both on-disk prefixes onto it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import ops
from ..config import ModelConfig
from ..errors import InputError
from ..inputs import check_image_tokens, check_token_ids
from .cache import Cache
from .hooks import NO_HOOKS, Capture, ForwardOutput, Hooks, Intervention, Probe
from .layers import RMSNorm, linear
from .mistral4 import Mistral4Model
from .pixtral import PatchLayout, PixtralVisionModel, patch_layout


class Mistral3PatchMerger(nnx.Module):
    """Concatenate each m x m window of patch features (channel-major, as torch `unfold`) and project."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, m = cfg.vision.hidden_size, cfg.spatial_merge_size
        self.merging_layer = linear(d * m * m, d, dtype, rngs)

    def __call__(self, x_pd: jax.Array, merge_index_mk: jax.Array) -> jax.Array:
        windows = x_pd[merge_index_mk]  # [M, m*m, D]
        # unfold's channel layout: index = c * m*m + k
        return self.merging_layer(jnp.swapaxes(windows, 1, 2).reshape(windows.shape[0], -1))


class Mistral3MultiModalProjector(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        v, t = cfg.vision, cfg.text
        self.norm = RMSNorm(v.hidden_size, t.rms_norm_eps, dtype)  # text eps, as transformers (docs/model.md 3.2)
        self.patch_merger = Mistral3PatchMerger(cfg, dtype, rngs)
        self.linear_1 = linear(v.hidden_size, t.hidden_size, dtype, rngs, bias=cfg.multimodal_projector_bias)
        self.linear_2 = linear(t.hidden_size, t.hidden_size, dtype, rngs, bias=cfg.multimodal_projector_bias)
        self.act = cfg.projector_hidden_act

    def __call__(self, x_pd: jax.Array, merge_index_mk: jax.Array) -> jax.Array:
        x = self.patch_merger(self.norm(x_pd), merge_index_mk)
        return self.linear_2(ops.activation(self.act)(self.linear_1(x)))


class Mistral3ForConditionalGeneration(nnx.Module):
    """The whole model. `model(input_ids, pixel_values, image_sizes)` returns logits [B, T, vocab].

    Entry points, all over the one text-stack forward (`Mistral4Model.__call__`):
      * `__call__` -> logits, `final_hidden` -> final-norm hidden states (full sequence, no cache);
      * `probe` -> `ForwardOutput`, `probe_hidden` -> (hidden, `ForwardOutput`): the same forward with
        research captures / interventions (`hooks.py`); `model(ids, capture=..., intervene=...)` is
        sugar for `model.probe(ids, ...)`;
      * `forward_cached`, `prefill`: the cached forward generation runs (embeddings in, latent cache
        threaded through).
    """

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, *, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        if cfg.vision is not None:
            v = cfg.vision
            n_layers = cfg.vision_feature_layer % (v.num_hidden_layers + 1)
            self.vision_tower = PixtralVisionModel(v, dtype, rngs, n_layers)
            self.multi_modal_projector = Mistral3MultiModalProjector(cfg, dtype, rngs)
        else:
            self.vision_tower = self.multi_modal_projector = None
        self.language_model = Mistral4Model(cfg.text, dtype, rngs)
        self.lm_head = linear(cfg.text.hidden_size, cfg.text.vocab_size, dtype, rngs, axes=(None, "vocab"))

    # ------------------------------------------------------------------ pieces
    def image_features(self, pixel_values: jax.Array, layout: PatchLayout) -> jax.Array:
        """Projected image features [M, hidden], images in order, each merged grid row-major."""
        if self.vision_tower is None:
            raise InputError("pixel_values given, but this is a text-only model (no vision_config)")
        feats = self.vision_tower(pixel_values, layout)
        return self.multi_modal_projector(feats, jnp.asarray(layout.merge_index))

    def embed(self, input_ids_bt: jax.Array, image_features_md: jax.Array | None = None) -> jax.Array:
        """Token embeddings with the `[IMG]` rows replaced by image features, in row-major order."""
        x = self.language_model.embed_tokens(input_ids_bt)
        if image_features_md is None:
            return x
        is_img = (input_ids_bt == self.config.image_token_id).reshape(-1)
        slot = jnp.clip(jnp.cumsum(is_img) - 1, 0, image_features_md.shape[0] - 1)
        feats = image_features_md.astype(x.dtype)[slot].reshape(x.shape)
        return jnp.where(is_img.reshape(*x.shape[:2], 1), feats, x)

    def hidden_states(self, inputs_embeds_btd, positions_bt, attention_mask_bt=None, hooks: Hooks = NO_HOOKS,
                      remat: bool = False, train: bool = False):
        """Final-norm hidden states of the text stack for a full (uncached) sequence."""
        valid = None if attention_mask_bt is None else jnp.asarray(attention_mask_bt)
        if valid is not None and valid.dtype != jnp.bool_:  # 0/1 masks, or segments (`ops.causal_mask`)
            valid = valid.astype(jnp.int32)
        return self.language_model(inputs_embeds_btd, positions_bt, valid, hooks=hooks, remat=remat, train=train)[0]

    def forward_cached(self, x_btd: jax.Array, positions_bt: jax.Array, cache: Cache, mesh=None, rows_b=None,
                       valid_bt=None):
        """(final-norm hidden states [B, T, D], cache) of T new tokens per row whose embeddings (`embed`)
        are x_btd, at per-row consecutive positions positions_bt (also their cache slots) of cache rows
        rows_b (default: row b); valid_bt: the tokens whose output is used (default all)."""
        return self.language_model.forward_cached(x_btd, positions_bt, cache, mesh, rows_b, valid_bt)

    def prefill(self, embeds_btd: jax.Array, cache: Cache, chunk: int, mesh=None):
        """(hidden states [B, T, D], filled cache) of a right-padded prompt batch, `chunk` tokens at a time."""
        return self.language_model.prefill(embeds_btd, cache, chunk, mesh)

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids, pixel_values=None, image_sizes=None, *, attention_mask=None,
                 positions=None, capture: Capture | None = None, intervene: Intervention | None = None):
        """Logits [B, T, vocab] of a full sequence.

        input_ids int [B, T]; pixel_values float [N, C, H, W] (padded as the HF processor pads);
        image_sizes int [N, 2] (height, width) of each image (host values; default: the padded
        size); attention_mask [B, T] (1 = real token; padded keys are never attended); positions
        [B, T] (default 0..T-1). capture / intervene: sugar for `self.probe(...)`, which returns a
        `ForwardOutput` (logits plus the captured per-layer arrays) instead of logits.
        """
        if capture is not None or intervene is not None:
            return self.probe(input_ids, pixel_values, image_sizes, attention_mask=attention_mask,
                              positions=positions, capture=capture, intervene=intervene)
        return self.lm_head(self.final_hidden(input_ids, pixel_values, image_sizes, attention_mask=attention_mask,
                                              positions=positions))

    def final_hidden(self, input_ids, pixel_values=None, image_sizes=None, *, attention_mask=None,
                     positions=None, remat: bool = False, train: bool = False) -> jax.Array:
        """The final-norm hidden states [B, T, H] that `__call__` applies `lm_head` to, without the head.

        Arguments as `__call__`. Losses that need one log-probability per position apply the head a
        chunk at a time from here (`logprobs.target_logprobs`), so no [B, T, vocab] logits exist.
        remat: recompute each decoder layer in the backward pass (training memory). train: the call is
        differentiated (the routed experts' gradients come back per layer; `Mistral4Model.__call__`).
        """
        x, positions = self._embed_inputs(input_ids, pixel_values, image_sizes, positions)
        return self.hidden_states(x, positions, attention_mask, remat=remat, train=train)

    def probe(self, input_ids, pixel_values=None, image_sizes=None, *, attention_mask=None, positions=None,
              capture: Capture | None = None, intervene: Intervention | None = None) -> ForwardOutput:
        """The forward with research access (`hooks.py`): logits and the arrays `capture` asks for, with
        `intervene` applied. Arguments as `__call__`."""
        h, out = self.probe_hidden(input_ids, pixel_values, image_sizes, attention_mask=attention_mask,
                                   positions=positions, capture=capture, intervene=intervene)
        return dataclasses.replace(out, logits=self.lm_head(h))

    def probe_hidden(self, input_ids, pixel_values=None, image_sizes=None, *, attention_mask=None,
                     positions=None, capture: Capture | None = None, intervene: Intervention | None = None,
                     remat: bool = False, train: bool = False) -> tuple[jax.Array, ForwardOutput]:
        """(`final_hidden`, `ForwardOutput` with logits None and the captured arrays), `intervene` applied."""
        x, positions = self._embed_inputs(input_ids, pixel_values, image_sizes, positions)
        probe = Probe.make(capture, intervene, self.config.text, *x.shape[:2])
        h = self.hidden_states(x, positions, attention_mask, probe, remat, train)
        return h, probe.collect(self, None, h)

    def _embed_inputs(self, input_ids, pixel_values, image_sizes, positions) -> tuple[jax.Array, jax.Array]:
        """(input embeddings [B, T, H] with image features merged in, positions [B, T]), inputs checked."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise InputError(f"input_ids must be [batch, time], got shape {input_ids.shape}")
        b, t = input_ids.shape
        check_token_ids(input_ids, self.config.text.vocab_size)
        features = None
        if pixel_values is not None:
            layout = self.layout_for(pixel_values, image_sizes)
            check_image_tokens(input_ids, self.config.image_token_id, sum(layout.tokens_per_image))
            features = self.image_features(jnp.asarray(pixel_values), layout)
        # Without images, [IMG] ids are embedded as ordinary tokens, as the reference does.
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return self.embed(input_ids, features), jnp.asarray(positions)

    def layout_for(self, pixel_values, image_sizes) -> PatchLayout:
        if self.vision_tower is None:
            raise InputError("pixel_values given, but this is a text-only model (no vision_config)")
        shape = tuple(np.shape(pixel_values))
        if len(shape) != 4 or shape[1] != self.config.vision.num_channels:
            raise InputError(f"pixel_values must be [images, {self.config.vision.num_channels}, height, width], "
                             f"got shape {shape}")
        if image_sizes is None:
            image_sizes = [shape[2:]] * shape[0]
        sizes = np.asarray(image_sizes)
        if sizes.shape != (shape[0], 2):
            raise InputError(f"image_sizes must be [{shape[0]}, 2] (height, width per image), got shape {sizes.shape}")
        return patch_layout(sizes, shape[2:], self.config.vision.patch_size, self.config.spatial_merge_size)
