"""Continuous batching: a fixed set of cache rows (slots), each refilled as soon as its request ends.

Two compiled programs, both with the cache and the slot state donated, and a host loop between them:

- `_insert`: one prefill chunk for each of P slots, written into their cache rows in place (each layer
  writes the chunk's latents at their slots and reads only the filled blocks before them). On a prompt's
  last chunk it samples the request's first token and makes the slot live.
- `_decode_steps`: up to n steps of one token for every slot, in a `lax.while_loop` that exits early
  when slots finish while requests wait (a few at once, or a few steps after the first), so that the
  host can give them to the next requests.

The host (`run`) assigns waiting requests to free slots, feeds their prompts chunk by chunk between
decode calls (while a prompt is being inserted the others decode one step per chunk), collects the
tokens and checks stop strings. Inactive slots decode junk at the cache's last slot, which no request
ever reaches, so they never disturb a row being filled.

Request r draws its k-th token with key fold_in(fold_in(key, r), k) (`sample_rows`), so its samples do
not depend on the slot it got or on its neighbours.
"""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import InputError
from .. import memory
from ..memory import PLAN_MARGIN, gib
from ..model.cache import Cache, cache_bytes_per_token, init_cache
from ..sharding import ACT_BV, CACHE_LBSC, batch_divisor, constrain, for_host, logical_sharding, to_global
from .batching import batch_bucket, pow2
from .sampling import sample_rows

MAX_STOP_TOKENS = 8  # stop ids are padded to this many so their number does not change the compile
MAX_STOP_SEQUENCES = 8  # likewise for token-id stop sequences
STEPS_PER_CALL = 32  # most decode steps per call (the token buffer the host reads back)
STEPS_PER_CALL_WATCHED = 8  # ... when the host must see tokens soon: streaming, stop strings
REFILL_PATIENCE = 4  # steps a freed slot may idle while the decode loop waits for more to free
REFILL_SHARE = 4  # ... and it waits for 1 / REFILL_SHARE of the slots to free (one insert refills them)
CPU_BATCH_CAP, DEVICE_BATCH_CAP = 32, 256  # default batch_size caps (see default_batch_size)


# ---------------------------------------------------------------------- state of the slots
class Slots(NamedTuple):
    """Per-slot decode state [B] (hist [B, M]); a slot that is not live is ignored."""

    tok: jax.Array  # the request's last token: the next input
    pos: jax.Array  # its position, which is also its cache slot
    n: jax.Array  # tokens the request has produced
    limit: jax.Array  # its max_new_tokens
    req: jax.Array  # its index in the prompts (sampling key)
    live: jax.Array  # bool: decoding
    hist: jax.Array  # its last M tokens, -1 before the first (stop sequences)


class Sampling(NamedTuple):
    key: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


class Stops(NamedTuple):
    ids: jax.Array  # [MAX_STOP_TOKENS], -1 padded
    seqs: jax.Array  # [MAX_STOP_SEQUENCES, M], each right-aligned, -1 padded on the left
    lens: jax.Array  # [MAX_STOP_SEQUENCES], 0 for an unused entry


def empty_slots(b: int, m: int) -> Slots:
    z = np.zeros(b, np.int32)
    return Slots(z, z, z, z, z, np.zeros(b, bool), np.full((b, m), -1, np.int32))


def stop_arrays(stop_tokens: Sequence[int], stop_sequences: Sequence[Sequence[int]]) -> Stops:
    """Host arrays of the stop ids and right-aligned stop sequences (width M = pow2 of the longest)."""
    m = pow2(max((len(s) for s in stop_sequences), default=1))
    seqs = np.full((MAX_STOP_SEQUENCES, m), -1, np.int32)
    lens = np.zeros(MAX_STOP_SEQUENCES, np.int32)
    for i, s in enumerate(stop_sequences):
        seqs[i, m - len(s):] = s
        lens[i] = len(s)
    return Stops(np.asarray(list(stop_tokens) + [-1] * (MAX_STOP_TOKENS - len(stop_tokens)), np.int32), seqs, lens)


def stopped(tok_b, hist_bm, n_b, limit_b, stops: Stops):
    """A request ends on a stop id, when its last tokens equal a stop sequence, or at its limit."""
    m = hist_bm.shape[1]
    on_id = (tok_b[:, None] == stops.ids[None, :]).any(-1)
    tail = jnp.arange(m)[None, :] >= (m - stops.lens)[:, None]  # [S, M]: the positions a sequence covers
    same = (hist_bm[:, None, :] == stops.seqs[None]) | ~tail[None]  # [B, S, M]
    on_seq = (same.all(-1) & (stops.lens > 0)[None]).any(-1)
    return on_id | on_seq | (n_b >= limit_b)


def _logits(model, h_bd, mesh):
    return constrain(model.lm_head(h_bd).astype(jnp.float32), mesh, ACT_BV)


def _sample(model, h_bd, mesh, sampling: Sampling, req_b, n_b):
    return sample_rows(_logits(model, h_bd, mesh), sampling.key, req_b, n_b, sampling.temperature,
                       sampling.top_k, sampling.top_p)


# ---------------------------------------------------------------------- the compiled pieces
def _insert(graphdef, treedef, leaves, cache, slots: Slots, x, rows_p, starts_p, lens_p, final_p, reqs_p, limits_p,
            sampling: Sampling, stops: Stops, *, mesh):
    """Prefill one chunk (ids [P, c] or embeddings [P, c, D]) into cache rows rows_p at starts_p.

    Entries with rows_p == B are padding (read clipped, written nowhere). A row whose chunk ends its
    prompt (final_p) gets its first token, sampled at prompt position lens_p - 1, and goes live unless
    that token already ends it; the other rows stay not live until their last chunk.
    """
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    if x.ndim == 2:
        x = model.embed(x)
    p, c = x.shape[:2]
    b = slots.live.shape[0]
    pos = starts_p[:, None] + jnp.arange(c, dtype=jnp.int32)
    h, cache = model.forward_cached(x, pos, cache, mesh, rows_p, valid_bt=(pos < lens_p[:, None]) & (rows_p < b)[:, None])
    last = jnp.clip(lens_p - 1 - starts_p, 0, c - 1)
    tok = _sample(model, h[jnp.arange(p), last], mesh, sampling, reqs_p, jnp.zeros_like(reqs_p))
    hist = jnp.full((p, slots.hist.shape[1]), -1, jnp.int32).at[:, -1].set(tok)
    ones = jnp.ones_like(reqs_p)
    stop = stopped(tok, hist, ones, limits_p, stops)
    at = jnp.where(final_p, rows_p, b)

    def put(a, v):
        return a.at[at].set(v, mode="drop")

    slots = Slots(put(slots.tok, tok), put(slots.pos, lens_p), put(slots.n, ones), put(slots.limit, limits_p),
                  put(slots.req, reqs_p), slots.live.at[rows_p].set(final_p & ~stop, mode="drop"),
                  put(slots.hist, hist))
    return cache, slots, for_host(tok), for_host(stop)


def _decode_steps(graphdef, treedef, leaves, cache, slots: Slots, sampling: Sampling, stops: Stops, kill_b, n_steps,
                  refill, *, k, mesh):
    """Up to n_steps (<= k) decode steps over all slots; exits early once every slot is done, or, when
    refill > 0, once `refill` slots have finished or REFILL_PATIENCE steps after the first did (so
    that one insert refills several slots, and none idles long). Returns the tokens [B, k] (-1 where
    a slot produced none), the slots and the number of steps run."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    scratch = cache.c_kv.shape[2] - 1  # no request reaches it: inactive slots write their junk here
    slots = slots._replace(live=slots.live & ~kill_b)
    live0 = slots.live

    def cond(c):
        j, first_free, s, _, _ = c
        freed = (live0 & ~s.live).sum()
        refilling = (refill > 0) & ((freed >= refill) | ((freed > 0) & (j - first_free >= REFILL_PATIENCE)))
        return (j < n_steps) & s.live.any() & ~refilling

    def body(c):
        j, first_free, s, out, cache = c
        pos = jnp.where(s.live, s.pos, scratch)
        h, cache = model.forward_cached(model.embed(s.tok[:, None]), pos[:, None], cache, mesh, valid_bt=s.live[:, None])
        new = _sample(model, h[:, 0], mesh, sampling, s.req, s.n)
        out = out.at[:, j].set(jnp.where(s.live, new, -1))
        live = s.live
        hist = jnp.where(live[:, None], jnp.concatenate([s.hist[:, 1:], new[:, None]], 1), s.hist)
        n = s.n + live
        s = Slots(jnp.where(live, new, s.tok), s.pos + live, n, s.limit, s.req,
                  live & ~stopped(new, hist, n, s.limit, stops), hist)
        first_free = jnp.where((first_free < 0) & (live0 & ~s.live).any(), j + 1, first_free)
        return j + 1, first_free, s, out, cache

    out = jnp.full((slots.live.shape[0], k), -1, jnp.int32)
    j, _, slots, out, cache = jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.int32(-1), slots, out, cache))
    return cache, slots, for_host(out), j, for_host(slots.live)


@partial(jax.jit, static_argnames=("c",))
def _take_chunks(embeds_ntd, reqs_p, starts_p, *, c):
    """embeds[reqs[p], starts[p] : starts[p] + c] for every p (prompts embedded ahead, with images)."""
    return jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(embeds_ntd[r], s, c, axis=0))(reqs_p, starts_p)


class Programs(NamedTuple):
    insert: Callable
    decode_steps: Callable


_programs: dict = {}


def programs_for(graphdef, treedef) -> Programs:
    """The two jitted pieces for one model structure, made once and kept: hashing a graphdef as a
    static argument costs milliseconds, too much for every call of the host loop. The parameters go
    in as a flat list of arrays (`treedef` rebuilds the state)."""
    key = (graphdef, treedef)
    if key not in _programs:
        donate = ("cache", "slots")
        _programs[key] = Programs(
            jax.jit(partial(_insert, graphdef, treedef), static_argnames=("mesh",), donate_argnames=donate),
            jax.jit(partial(_decode_steps, graphdef, treedef), static_argnames=("k", "mesh"), donate_argnames=donate))
    return _programs[key]


def compiled_programs() -> int:
    """How many programs the engine has compiled (tests check that new sizes in a bucket add none)."""
    return sum(p.insert._cache_size() + p.decode_steps._cache_size() for p in _programs.values())


# ---------------------------------------------------------------------- sizes
def cache_length(lens: Sequence[int], limits: Sequence[int], chunk: int) -> int:
    """Slots per cache row: every request's prompt (padded to whole chunks) and new tokens, plus the
    scratch slot inactive rows write to; a power of two so that nearby sizes share programs."""
    need = max(max(n + m for n, m in zip(lens, limits)), max(-(-n // chunk) * chunk for n in lens))
    return pow2(need + 1, 16)


def abstract_args(cfg, dtype, rows: int, cache_len: int, chunk: int, seq_width: int, mesh):
    """ShapeDtypeStructs of the engine programs' arguments at `rows` slots (the insert at `rows` prompts
    of a `chunk`), laid out as `run` lays them out: (cache, slots, sampling, stops, ids, per-prompt [rows])."""
    S = jax.ShapeDtypeStruct
    t = cfg.text

    def at(shape, dtype_, logical=("batch",)):
        sharding = None if mesh is None else logical_sharding(mesh, logical + (None,) * (len(shape) - len(logical)),
                                                              shape)
        return S(shape, dtype_, sharding=sharding)

    cache = Cache(*(at((t.num_hidden_layers, rows, cache_len, d), dtype, CACHE_LBSC)
                    for d in (t.kv_lora_rank, t.qk_rope_head_dim)))
    i32 = partial(at, dtype_=jnp.int32)
    slots = Slots(i32((rows,)), i32((rows,)), i32((rows,)), i32((rows,)), i32((rows,)), at((rows,), bool),
                  i32((rows, seq_width)))
    sampling = Sampling(at((2,), jnp.uint32, ()), at((), jnp.float32, ()), at((), jnp.int32, ()),
                        at((), jnp.float32, ()))
    stops = Stops(at((MAX_STOP_TOKENS,), jnp.int32, ()), at((MAX_STOP_SEQUENCES, seq_width), jnp.int32, ()),
                  at((MAX_STOP_SEQUENCES,), jnp.int32, ()))
    return cache, slots, sampling, stops, i32((rows, chunk)), i32((rows,))


def program_temp_bytes(prog: Programs, leaves, cfg, dtype, rows: int, cache_len: int, chunk: int, seq_width: int,
                       mesh) -> int:
    """The larger per-device temporaries of the decode and insert programs at `rows` slots, from XLA's
    memory analysis of the compiled programs (nothing runs)."""
    cache, slots, sampling, stops, ids, per_row = abstract_args(cfg, dtype, rows, cache_len, chunk, seq_width, mesh)
    flag = jax.ShapeDtypeStruct((rows,), bool, sharding=per_row.sharding)
    decode = prog.decode_steps.lower(leaves, cache, slots, sampling, stops, flag, jnp.int32(1), jnp.int32(0),
                                     k=STEPS_PER_CALL, mesh=mesh)
    insert = prog.insert.lower(leaves, cache, slots, ids, per_row, per_row, per_row, flag, per_row, per_row,
                               sampling, stops, mesh=mesh)
    return max(p.compile().memory_analysis().temp_size_in_bytes for p in (decode, insert))


def default_batch_size(model, n_prompts: int, cache_len: int, data: int = 1, temp_bytes=None) -> int:
    """The number of slots when the caller gives none.

    min(the prompts rounded up to a power of two, a cap (CPU_BATCH_CAP on the CPU, DEVICE_BATCH_CAP on an
    accelerator)), rounded to a multiple of the mesh's row split `data`; on a device that reports its pool
    (`memory.device_memory`), halved until the cache rows one device holds plus `temp_bytes(rows)` (the
    compiled programs' temporaries at that size, `program_temp_bytes`) fit in its free memory, less
    `memory.PLAN_MARGIN`. A single row that does not fit is an InputError saying how much is missing.
    """
    cap = CPU_BATCH_CAP if jax.local_devices()[0].platform == "cpu" else DEVICE_BATCH_CAP
    b = max(data, batch_bucket(min(pow2(n_prompts), cap), data))
    mem = memory.device_memory()
    if mem is None:
        return b
    free = (mem[0] - mem[1]) * (1 - PLAN_MARGIN)
    row = cache_bytes_per_token(model.config.text, model.dtype) * cache_len

    def need(rows):  # per device: the rows are split over `data` devices
        return row * rows // data + (temp_bytes(rows) if temp_bytes else 0)

    while b > data and need(b) > free:
        b = batch_bucket(b // 2, data)
    if need(b) > free:
        raise InputError(f"{b} cache rows of {cache_len} tokens ({gib(row * b)}) and the programs' temporaries "
                         f"need {gib(need(b))} per device, but the device has {gib(free)} free: shorten the "
                         "prompts or max_new_tokens, or use a mesh with more devices")
    return b


# ---------------------------------------------------------------------- stop strings (host)
def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """`text` cut as lm-eval's generate_until cuts it: for each non-empty stop string in order, keep
    what comes before its first occurrence (lm_eval.models.utils.postprocess_generated_text)."""
    for s in stop_strings:
        if s:
            text = text.split(s)[0]
    return text


class TextStop:
    """Watches one request's tokens for its stop strings: the text of the generated ids (decoded with
    skip_special_tokens=True, as lm-eval decodes) contains one of them."""

    def __init__(self, tokenizer, strings: Sequence[str]):
        self.tok, self.strings = tokenizer, [s for s in strings if s]
        # a character is at most 4 UTF-8 bytes and a token at least one byte: a stop string lies in the
        # last 4 * len tokens (+ a margin for a token decoded together with its neighbour)
        self.window = 4 * max((len(s) for s in self.strings), default=0) + 4

    def hit(self, ids: list[int]) -> bool:
        if not self.strings:
            return False
        text = self.tok.decode(ids[-self.window:], skip_special_tokens=True)
        return any(s in text for s in self.strings)


# ---------------------------------------------------------------------- the host loop
def run(model, graphdef, state, prompts: list[list[int]], limits: list[int], *, rows: int, chunk: int,
        cache_len: int, sampling: Sampling, stops: Stops, mesh, embeds=None,
        text_stops: list[TextStop | None] | None = None, callback: Callable | None = None) -> list[list[int]]:
    """Every prompt's new tokens through `rows` slots (see the module docstring)."""
    n_req, data = len(prompts), batch_divisor(mesh)
    lens = [len(p) for p in prompts]
    padded = max(-(-n // chunk) * chunk for n in lens)
    ids = None
    if embeds is None:
        ids = np.zeros((n_req, padded), np.int32)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
    text_stops = text_stops or [None] * n_req
    watched = callback is not None or any(text_stops)
    steps_per_call = STEPS_PER_CALL_WATCHED if watched else STEPS_PER_CALL

    g = partial(to_global, mesh=mesh)
    leaves, treedef = jax.tree.flatten(state)
    prog = programs_for(graphdef, treedef)
    cache = init_cache(model.config.text, rows, cache_len, model.dtype, mesh)
    slots = Slots(*(g(a, logical=("batch",)) for a in empty_slots(rows, stops.seqs.shape[1])))
    if mesh is None:  # committed like the programs' outputs, so later calls hit the same compiled entry
        cache, slots = jax.device_put((cache, slots), jax.devices()[0])
    sampling = Sampling(*(g(a) for a in sampling))
    stops = Stops(*(g(a) for a in stops))

    outs: list[list[int]] = [[] for _ in range(n_req)]
    slot_req = [-1] * rows  # request in each slot (-1: none)
    live = [False] * rows  # host view: the slot's request is decoding
    filling: dict[int, int] = {}  # slot -> start of its next prefill chunk
    waiting, free = deque(range(n_req)), deque(range(rows))
    kill = np.zeros(rows, bool)
    n_done, step = 0, 0

    def finish(s):
        nonlocal n_done
        live[s] = False
        slot_req[s] = -1
        free.append(s)
        n_done += 1

    def take(s, tok) -> bool:
        """Append a token to the slot's request; True when a stop string ends it here."""
        r = slot_req[s]
        outs[r].append(int(tok))
        return text_stops[r] is not None and text_stops[r].hit(outs[r])

    def emit(pairs):
        nonlocal step
        if callback is not None:
            toks = [None] * n_req
            for r, t in pairs:
                toks[r] = t
            callback(step, toks)
        step += 1

    while n_done < n_req:
        while free and waiting:
            s, r = free.popleft(), waiting.popleft()
            slot_req[s], filling[s], kill[s] = r, 0, False
        if filling:
            fill = sorted(filling)
            # fresh prompts that fit in less than a chunk share a smaller one (fewer padded tokens)
            c = chunk if any(filling.values()) else min(chunk, pow2(max(lens[slot_req[s]] for s in fill), 8))
            p = batch_bucket(len(fill), data)
            rows_p = np.full(p, rows, np.int32)
            rows_p[:len(fill)] = fill
            reqs = np.zeros(p, np.int32)
            reqs[:len(fill)] = [slot_req[s] for s in fill]
            starts = np.zeros(p, np.int32)
            starts[:len(fill)] = [filling[s] for s in fill]
            lens_p = np.asarray([lens[r] for r in reqs], np.int32)
            final = (starts + c >= lens_p) & (rows_p < rows)
            limits_p = np.asarray([limits[r] for r in reqs], np.int32)
            if ids is not None:
                x = g(np.stack([ids[r, a:a + c] for r, a in zip(reqs, starts)]), logical=("batch",))
            else:
                x = _take_chunks(embeds, g(reqs), g(starts), c=c)
            cache, slots, tok, stop = prog.insert(
                leaves, cache, slots, x, *(g(a, logical=("batch",)) for a in (
                    rows_p, starts, lens_p, final, reqs, limits_p)), sampling, stops, mesh=mesh)
            for s in fill:
                filling[s] += c
            if final.any():
                tok, stop = np.asarray(jax.device_get(tok)), np.asarray(jax.device_get(stop))
                started = []
                for i in np.flatnonzero(final):
                    s = int(rows_p[i])
                    del filling[s]
                    started.append((slot_req[s], int(tok[i])))
                    if take(s, tok[i]) or stop[i]:
                        kill[s] = True  # a text stop: the device still thinks it live
                        finish(s)
                    else:
                        live[s] = True
                emit(started)
        if free and waiting:
            continue  # a request ended at its first token: refill its slot before decoding
        if not any(live):
            continue
        n = 1 if filling else steps_per_call  # a prompt being inserted gets its next chunk after one step
        refill = min(len(waiting), max(1, rows // REFILL_SHARE))  # 0: nobody waits
        cache, slots, out, j, dev_live = prog.decode_steps(leaves, cache, slots, sampling, stops,
                                             g(kill, logical=("batch",)), jnp.int32(n), jnp.int32(refill),
                                             k=STEPS_PER_CALL, mesh=mesh)
        kill[:] = False
        out, dev_live, j = (np.asarray(a) for a in jax.device_get((out, dev_live, j)))
        for i in range(int(j)):
            pairs = []
            for s in range(rows):
                if live[s] and out[s, i] >= 0:
                    pairs.append((slot_req[s], int(out[s, i])))
                    if take(s, out[s, i]):
                        kill[s] = True
                        finish(s)
            emit(pairs)
        for s in range(rows):
            if live[s] and not dev_live[s]:
                finish(s)
    return outs
