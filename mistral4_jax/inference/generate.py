"""Batched generation: prefill and the whole token loop inside one compiled function.

`generate(model, prompts, ...)` validates everything on the host first (nothing is compiled for a
bad request), pads the batch to buckets (batch size and prompt length to powers of two,
`max_new_tokens` to a power of two) so that new sizes reuse compiled code, prefills the MLA latent
cache in chunks (`model.prefill`) and runs the decode loop as one `lax.while_loop` that exits as
soon as every row has produced a stop token. Sampling parameters are traced values: changing the
temperature, top-k, top-p, seed or stop tokens does not recompile.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..model.cache import init_cache
from ..errors import InputError
from ..inputs import check_image_tokens, check_int, validate_prompts
from .batching import bucket_sizes, bucketed_images
from .sampling import sample_rows
from ..sharding import ACT_BV, constrain, model_mesh, to_global
from ..model.pixtral import PatchLayout

MAX_STOP_TOKENS = 8  # stop ids are padded to this many so their number does not change the compile


# ---------------------------------------------------------------------- streaming
# The compiled loop calls one fixed function (so a new callback does not recompile); it runs on a
# runtime thread, so the current callback sits in a module-level slot guarded by a lock.
_stream: dict = {"callback": None, "n_rows": 0}
_stream_lock = threading.Lock()


def _stream_dispatch(step, tokens, done_before):
    cb, n = _stream["callback"], _stream["n_rows"]
    if cb is not None:
        cb(int(step), [None if d else int(t) for t, d in zip(tokens[:n], done_before[:n])])


# ---------------------------------------------------------------------- the compiled loop
@partial(jax.jit, static_argnames=("graphdef", "n_new", "chunk", "mesh", "stream"), donate_argnames=("cache",))
def _generate_core(graphdef, state, embeds_btd, lens_b, active_b, cache, key, temperature, top_k, top_p,
                   stop_ids, max_new, *, n_new, chunk, mesh, stream):
    model = nnx.merge(graphdef, state)
    b = embeds_btd.shape[0]
    rows = jnp.arange(b)

    def logits_of(h_bd):
        return constrain(model.lm_head(h_bd).astype(jnp.float32), mesh, ACT_BV)

    def is_stop(tok_b):
        return (tok_b[:, None] == stop_ids[None, :]).any(-1)

    def emit(i, tok, out, done):
        if stream:
            jax.debug.callback(_stream_dispatch, i, tok, done)
        out = out.at[:, i].set(jnp.where(done, -1, tok))
        return out, done | is_stop(tok)

    hs, cache = model.prefill(embeds_btd, cache, chunk, mesh)
    tok = sample_rows(logits_of(hs[rows, lens_b - 1]), key, 0, temperature, top_k, top_p)
    out, done = emit(0, tok, jnp.full((b, n_new), -1, jnp.int32), ~active_b)

    def cond(c):
        i, _, _, done, _ = c
        return (i < max_new) & ~done.all()

    def body(c):
        i, tok, out, done, cache = c
        pos = (lens_b + i - 1)[:, None]  # the last emitted token sits at position len + i - 1
        h, cache = model.forward_cached(model.embed(tok[:, None]), pos, cache, mesh)
        tok = sample_rows(logits_of(h[:, 0]), key, i, temperature, top_k, top_p)
        out, done = emit(i, tok, out, done)
        return i + 1, tok, out, done, cache

    _, _, out, _, cache = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, out, done, cache))
    return out, cache


# ---------------------------------------------------------------------- host side
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] | None = None,
             pixel_values=None, image_sizes=None, callback: Callable | None = None,
             prefill_chunk: int = 512) -> list[list[int]]:
    """New token ids for each prompt (a list per prompt, ending with the stop token when one came).

    prompts: token-id lists of any lengths (at least one token each). temperature 0 is greedy;
    top_k 0 keeps every token; top_p in (0, 1]. seed makes sampling reproducible. stop_tokens
    default to the config's eos ids. pixel_values [N, C, H, W] / image_sizes [N, 2] fill the `[IMG]`
    tokens of the prompts in order, as `model(...)` does. callback(step, tokens) is called from the
    compiled loop after every step with one entry per prompt: the new token, or None for a prompt
    that had already stopped. prefill_chunk (a power of two) bounds prefill activation memory.
    """
    cfg = model.config
    t = cfg.text
    prompts = validate_prompts(prompts, t.vocab_size)
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("top_k", top_k, 0)
    check_int("seed", seed, 0)
    check_int("prefill_chunk", prefill_chunk, 1)
    if prefill_chunk & (prefill_chunk - 1):
        raise InputError(f"prefill_chunk must be a power of two, got {prefill_chunk}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and np.isfinite(temperature)):
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    if callback is not None and not callable(callback):
        raise InputError(f"callback must be callable, got {type(callback).__name__}")
    stop = list(t.eos_token_id) if stop_tokens is None else [int(s) for s in stop_tokens]
    if len(stop) > MAX_STOP_TOKENS:
        raise InputError(f"stop_tokens: at most {MAX_STOP_TOKENS} ids, got {len(stop)}")
    for s in stop:
        if not 0 <= s < t.vocab_size:
            raise InputError(f"stop_tokens holds {s}, outside the vocabulary [0, {t.vocab_size})")
    longest = max(map(len, prompts))
    if longest + max_new_tokens > t.max_position_embeddings:
        raise InputError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                         f"the context limit max_position_embeddings = {t.max_position_embeddings}")
    images = None
    if pixel_values is not None:
        images = bucketed_images(model, pixel_values, image_sizes)
        check_image_tokens(np.concatenate([np.asarray(p) for p in prompts]), cfg.image_token_id,
                           sum(images[1].tokens_per_image))

    mesh = model_mesh(model)
    data = mesh.shape["data"] if mesh is not None else 1
    b, tp, n_new, chunk = bucket_sizes(len(prompts), longest, max_new_tokens, prefill_chunk, data)
    ids = np.zeros((b, tp), np.int32)
    lens = np.ones(b, np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
        lens[i] = len(p)
    active = np.arange(b) < len(prompts)

    graphdef, state = nnx.split(model)
    features = None
    if images is not None:
        px, layout = images
        arrays = (layout.patch_index, layout.rows, layout.cols, layout.segment, layout.merge_index)
        features = _image_features(graphdef, state, to_global(px, mesh), tuple(to_global(a, mesh) for a in arrays))
    embeds = _embed(graphdef, state, to_global(ids, mesh, ("batch",)), features)
    cache = init_cache(t, b, tp + n_new, model.dtype, mesh)
    args = [to_global(x, mesh, lg) for x, lg in (
        (lens, ("batch",)), (active, ("batch",)), (np.asarray(jax.random.key_data(jax.random.PRNGKey(seed))), ()),
        (np.float32(temperature), ()), (np.int32(top_k), ()), (np.float32(top_p), ()),
        (np.asarray(stop + [-1] * (MAX_STOP_TOKENS - len(stop)), np.int32), ()), (np.int32(max_new_tokens), ()))]
    lens_a, active_a, key_a, *rest = args
    with _stream_lock:
        _stream.update(callback=callback, n_rows=len(prompts))
        try:
            out, _ = _generate_core(graphdef, state, embeds, lens_a, active_a, cache, key_a, *rest,
                                    n_new=n_new, chunk=chunk, mesh=mesh, stream=callback is not None)
            out = np.asarray(jax.device_get(out))
        finally:
            _stream["callback"] = None
    return [_trim(row[:max_new_tokens], stop) for row in out[:len(prompts)]]


@partial(jax.jit, static_argnames=("graphdef",))
def _image_features(graphdef, state, pixel_values, layout_arrays):
    layout = PatchLayout(*layout_arrays, tokens_per_image=())
    return nnx.merge(graphdef, state).image_features(pixel_values, layout)


@partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, state, ids_bt, features):
    return nnx.merge(graphdef, state).embed(ids_bt, features)


def _trim(row: np.ndarray, stop: list[int]) -> list[int]:
    out = []
    for tok in row.tolist():
        if tok < 0:
            break
        out.append(tok)
        if tok in stop:
            break
    return out
