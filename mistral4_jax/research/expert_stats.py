"""Expert-load statistics over a dataset: which experts the router sends tokens to, per MoE layer.

    load = expert_load(model, [ids, ids, ...])      # counts [L_moe, E] over every real token
    load.to_json() / load.save_json(path) / load.save_png(path)

Sequences run through the full-sequence forward in batches padded to power-of-two sizes (a handful
of programs for a whole dataset); the counting happens inside the compiled function, so only
[L_moe, E] numbers come back per batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import InputError
from ..inference.batching import batch_bucket, pow2
from ..inputs import check_int, validate_ids
from ..model.hooks import Capture, Intervention
from ..model.layers import moe_stack
from ..sharding import batch_divisor, mesh_context, model_mesh, to_global


@dataclasses.dataclass
class ExpertLoad:
    """counts[l, e]: (token, slot) routings of MoE layer `layers[l]` to expert e over `tokens` tokens
    (each token has top_k slots, so a row sums to tokens * top_k); weight[l, e]: the summed routing
    weight expert e received."""

    layers: list[int]
    counts: np.ndarray
    weight: np.ndarray
    tokens: int
    top_k: int

    @property
    def fraction(self) -> np.ndarray:
        """[L_moe, E] fraction of tokens each expert serves (a row sums to top_k)."""
        return self.counts / max(self.tokens, 1)

    @property
    def entropy(self) -> np.ndarray:
        """[L_moe] entropy (nats) of each layer's load distribution p_e = counts_e / sum counts."""
        p = self.counts / np.maximum(self.counts.sum(-1, keepdims=True), 1)
        return -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(-1)

    def to_json(self) -> dict:
        e = self.counts.shape[1]
        mean = self.counts.mean(-1)
        return {
            "layers": self.layers, "experts": e, "tokens": self.tokens, "top_k": self.top_k,
            "counts": self.counts.tolist(),
            "fraction": self.fraction.tolist(),
            "weight": self.weight.tolist(),
            "entropy": self.entropy.tolist(),
            "entropy_normalized": (self.entropy / math.log(e)).tolist() if e > 1 else [1.0] * len(self.layers),
            "max_over_mean": (self.counts.max(-1) / np.maximum(mean, 1e-12)).tolist(),
            "unused_experts": (self.counts == 0).sum(-1).tolist(),
        }

    def save_json(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    def save_png(self, path, title: str = "expert load (fraction of tokens)") -> None:
        heatmap_png(self.fraction, path, title=title, row_labels=self.layers)


@partial(jax.jit, static_argnames=("graphdef",))
def _count_batch(graphdef, state, ids_bt, mask_bt, intervene):
    model = nnx.merge(graphdef, state)
    out = model.probe(ids_bt, attention_mask=mask_bt, capture=Capture(router=True), intervene=intervene)
    e = out.router_logits.shape[-1]
    valid = mask_bt.reshape(-1).astype(jnp.float32)  # [B*T]
    hits = jax.nn.one_hot(out.topk_ids, e, dtype=jnp.float32) * valid[None, :, None, None]  # [L, BT, K, E]
    w = out.topk_weights.astype(jnp.float32)[..., None] * hits
    return hits.sum((1, 2)), w.sum((1, 2))


def expert_load(model, sequences: Sequence[Sequence[int]], batch_size: int = 8, max_len: int | None = None,
                intervene: Intervention | None = None) -> ExpertLoad:
    """Expert-load counts over every token of `sequences` (token-id lists).

    Sequences longer than `max_len` (default: min(2048, max_position_embeddings)) are cut into
    consecutive pieces of at most `max_len` tokens (each piece attends within itself). `intervene` (per-layer expert mask) applies to every batch.
    """
    cfg = model.config.text
    if cfg.num_moe_layers == 0:
        raise InputError("expert_load: this model has no MoE layers")
    if not isinstance(sequences, (list, tuple)) or not sequences:
        raise InputError("sequences must be a non-empty list of token-id lists")
    check_int("batch_size", batch_size, 1)
    max_len = min(2048, cfg.max_position_embeddings) if max_len is None else max_len
    check_int("max_len", max_len, 1, cfg.max_position_embeddings)
    if intervene is not None and (intervene.patch is not None or
                                  (intervene.expert_mask is not None and np.ndim(intervene.expert_mask) != 2)):
        raise InputError("expert_load: intervene may only hold a per-layer expert_mask [moe_layers, experts]")
    pieces = []
    for i, s in enumerate(sequences):
        ids = validate_ids(s, cfg.vocab_size, f"sequences[{i}]")
        pieces += [ids[j:j + max_len] for j in range(0, len(ids), max_len)]
    pieces.sort(key=len)
    mesh = model_mesh(model)
    data = batch_divisor(mesh)
    graphdef, state = nnx.split(model)
    counts = np.zeros((cfg.num_moe_layers, cfg.n_routed_experts), np.float64)
    weight = np.zeros_like(counts)
    for s in range(0, len(pieces), batch_size):
        chunk = pieces[s:s + batch_size]
        b = batch_bucket(len(chunk), data)
        t = pow2(max(len(p) for p in chunk), 8)
        ids, mask = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
        for row, p in enumerate(chunk):
            ids[row, :len(p)], mask[row, :len(p)] = p, 1
        with mesh_context(mesh):
            c, w = _count_batch(graphdef, state, *(to_global(x, mesh, ("batch",)) for x in (ids, mask)), intervene)
        counts += np.asarray(jax.device_get(c))
        weight += np.asarray(jax.device_get(w))
    moe = moe_stack(cfg)
    return ExpertLoad(layers=list(range(moe.first, moe.first + moe.depth)),
                      counts=np.rint(counts).astype(np.int64), weight=weight,
                      tokens=sum(len(p) for p in pieces), top_k=cfg.num_experts_per_tok)


# ---------------------------------------------------------------------- the picture
_VIRIDIS = np.asarray([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64)


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB along five viridis anchor colours (linear in between)."""
    x = np.clip(v, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    i = np.minimum(x.astype(int), len(_VIRIDIS) - 2)
    f = (x - i)[..., None]
    return np.rint(_VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f).astype(np.uint8)


def heatmap_png(matrix: np.ndarray, path, title: str = "", row_labels: Sequence[int] | None = None,
                row_name: str = "layer", col_name: str = "expert") -> None:
    """A labelled heatmap (rows x columns, colour bar with min and max) written as PNG with PIL."""
    from PIL import Image, ImageDraw

    m = np.asarray(matrix, np.float64)
    if m.ndim != 2 or m.size == 0:
        raise InputError(f"heatmap_png: matrix must be 2-D and non-empty, got shape {m.shape}")
    rows, cols = m.shape
    cw = max(2, min(24, 1024 // cols))
    ch = max(4, min(24, 576 // rows))
    left, top, right, bottom = 56, 28, 90, 36
    w, h = left + cols * cw + right, top + rows * ch + bottom
    lo, hi = float(m.min()), float(m.max())
    norm = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    cells = np.repeat(np.repeat(colormap(norm), ch, axis=0), cw, axis=1)
    img = Image.new("RGB", (w, h), "white")
    img.paste(Image.fromarray(cells, "RGB"), (left, top))
    bar = colormap(np.linspace(1, 0, rows * ch))[:, None, :].repeat(12, axis=1)
    bx = left + cols * cw + 16
    img.paste(Image.fromarray(np.ascontiguousarray(bar), "RGB"), (bx, top))
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black")
    d.text((bx + 16, top), f"{hi:.3g}", fill="black")
    d.text((bx + 16, top + rows * ch - 10), f"{lo:.3g}", fill="black")
    labels = list(row_labels) if row_labels is not None else list(range(rows))
    step_r = max(1, -(-12 // ch))
    for r in range(0, rows, step_r):
        d.text((left - 30, top + r * ch + max(0, ch // 2 - 5)), str(labels[r]), fill="black")
    step_c = max(1, -(-32 // cw))
    for c in range(0, cols, step_c):
        d.text((left + c * cw, top + rows * ch + 4), str(c), fill="black")
    d.text((4, top - 14), row_name, fill="black")
    d.text((left + cols * cw // 2 - 16, top + rows * ch + 20), col_name, fill="black")
    img.save(path, format="PNG")
