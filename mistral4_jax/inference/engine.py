"""The inference engine: a long-lived `Engine` that owns a model's compiled programs, its mesh, a paged latent
cache and a queue of requests, and serves them by continuous batching.

    engine = Engine(model, batch_size=8, cache_tokens=65536)
    req = engine.submit(prompt_ids, max_new_tokens=64, temperature=0.7, seed=1, on_tokens=print)
    while engine.step():                # or: engine.run(), or `for req in engine: ...` (finished requests)
        ...
    req.tokens, req.finish_reason

Device side: two compiled programs, both with the cache and the slot state donated.
- `_insert`: one prefill chunk for each of P slots, written into their pages in place (each layer writes the
  chunk's latents at their slots and reads only the filled blocks before them). On a prompt's last chunk it
  samples the request's first token (or takes the token a preempted request had reached) and makes the slot
  live.
- `_decode_steps`: up to k steps of one token for every slot, in a `lax.while_loop` that exits early when
  slots finish while requests wait (a few at once, or a few steps after the first), so that the host can give
  them to the next requests. Rows that are not live write to their group's trash page.

Host side (`Engine.step`, one scheduling round): take what `submit` / `cancel` queued (thread-safe), admit
waiting requests to free slots as pages allow (a prompt's cached prefix pages are named, not recomputed:
`pages.py`), insert the next chunk of the prompts being filled, give live slots pages for their next steps
(when the pool runs out, the most recently admitted request is preempted: its pages go back and it waits to
be recomputed, never dropped), decode, collect the tokens, apply stop strings, call `on_tokens`, finish.
The results of an insert are read back with the next decode's, so an insert costs no wait of its own.

Request r draws its k-th token with key fold_in(key_r, k) (`sampling.sample_rows`; `generate` gives prompt i
key_r = fold_in(PRNGKey(seed), i)), so its samples do not depend on the slot it got, on its neighbours or on
a preemption.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import deque
from functools import partial
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import memory
from ..errors import InputError
from ..inputs import check_image_tokens, check_int, validate_ids
from ..memory import PLAN_MARGIN, gib
from ..model.cache import PagedCache, cache_bytes_per_token
from ..model.pixtral import PatchLayout
from ..sharding import (ACT_BV, CACHE_LBSC, batch_divisor, constrain, for_host, logical_sharding, mesh_context,
                        model_mesh, to_global)
from .batching import batch_bucket, bucketed_images, pow2
from .pages import PagePool, page_keys
from .sampling import sample_rows

MAX_STOP_TOKENS = 8  # stop ids per request (padded to this many so their number does not change the compile)
MAX_STOP_SEQUENCES = 8  # token-id stop sequences per request
STOP_WIDTH = 16  # tokens a stop sequence may have (the width of each slot's token history) unless set
STEPS_PER_CALL = 32  # most decode steps per call (the token buffer the host reads back)
STEPS_PER_CALL_WATCHED = 8  # ... when the host must see tokens soon: streaming, stop strings
REFILL_PATIENCE = 4  # steps a freed slot may idle while the decode loop waits for more to free
REFILL_SHARE = 4  # ... and it waits for 1 / REFILL_SHARE of the slots to free (one insert refills them)
CPU_BATCH_CAP, DEVICE_BATCH_CAP = 32, 256  # default batch_size caps (see default_batch_size)
PAGE_TOKENS = 64  # slots per page of the latent cache


# ---------------------------------------------------------------------- device state
class Slots(NamedTuple):
    """Per-slot decode state [B] (hist [B, M]); a slot that is not live is ignored."""

    tok: jax.Array  # the request's last token: the next input
    pos: jax.Array  # its position, which is also its cache slot
    n: jax.Array  # tokens the request has produced
    live: jax.Array  # bool: decoding
    hist: jax.Array  # its last M tokens, -1 before the first (stop sequences)


class SlotParams(NamedTuple):
    """Per-slot request settings [B, ...], written by the host when requests are admitted."""

    key: jax.Array  # [B, 2] uint32: the request's sampling key
    temperature: jax.Array  # [B] float32 (0: greedy)
    top_k: jax.Array  # [B] int32 (0: all)
    top_p: jax.Array  # [B] float32
    limit: jax.Array  # [B] int32: max_new_tokens
    stop_ids: jax.Array  # [B, MAX_STOP_TOKENS], -1 padded
    stop_seqs: jax.Array  # [B, MAX_STOP_SEQUENCES, M], right-aligned, -1 padded on the left
    stop_lens: jax.Array  # [B, MAX_STOP_SEQUENCES], 0 for an unused entry


def stopped(tok_b, hist_bm, n_b, p: SlotParams):
    """A request ends on one of its stop ids, when its last tokens equal one of its stop sequences, or at its
    limit (p holds the rows' settings)."""
    m = hist_bm.shape[1]
    on_id = (tok_b[:, None] == p.stop_ids).any(-1)
    tail = jnp.arange(m)[None, None, :] >= (m - p.stop_lens)[:, :, None]  # [B, S, M]: what a sequence covers
    same = (hist_bm[:, None, :] == p.stop_seqs) | ~tail
    on_seq = (same.all(-1) & (p.stop_lens > 0)).any(-1)
    return on_id | on_seq | (n_b >= p.limit)


def _rows(p: SlotParams, rows) -> SlotParams:
    return SlotParams(*(a[rows] for a in p))


def _sample(model, h_bd, mesh, p: SlotParams, n_b):
    logits = constrain(model.lm_head(h_bd).astype(jnp.float32), mesh, ACT_BV)
    return sample_rows(logits, p.key, n_b, p.temperature, p.top_k, p.top_p)


def _paged(cache: PagedCache, live_b) -> PagedCache:
    """The cache as rows that are not live see it: their table names only their trash page, so whatever they
    compute is written there (never into a page a request holds)."""
    return cache._replace(table=jnp.where(live_b[:, None], cache.table, cache.trash[:, None]))


# ---------------------------------------------------------------------- the compiled pieces
def _insert(graphdef, treedef, leaves, cache: PagedCache, slots: Slots, params: SlotParams, ids, feats, rows_p,
            starts_p, lens_p, final_p, first_p, n_p, hist_p, *, mesh):
    """Prefill one chunk (ids [P, c]; `feats` [P, c, D] replaces the image tokens' embeddings, or None) into
    cache rows rows_p at starts_p.

    Entries with rows_p == B are padding (read clipped, written nowhere). A row whose chunk ends its prompt
    (final_p) gets its first token, sampled at prompt position lens_p - 1, or first_p when that is >= 0 (a
    preempted request resuming with n_p tokens made and history hist_p), and goes live unless that token ends
    it; the other rows stay not live until their last chunk."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    x = model.embed(ids)
    if feats is not None:
        x = jnp.where((ids == model.config.image_token_id)[..., None], feats.astype(x.dtype), x)
    p, c = ids.shape
    b = slots.live.shape[0]
    pos = starts_p[:, None] + jnp.arange(c, dtype=jnp.int32)
    h, cache = model.forward_cached(x, pos, cache, mesh, rows_p, valid_bt=(pos < lens_p[:, None]) & (rows_p < b)[:, None])
    last = jnp.clip(lens_p - 1 - starts_p, 0, c - 1)
    mine = _rows(params, jnp.minimum(rows_p, b - 1))
    fresh = first_p < 0
    tok = jnp.where(fresh, _sample(model, h[jnp.arange(p), last], mesh, mine, n_p), first_p)
    hist = jnp.where(fresh[:, None], jnp.concatenate([hist_p[:, 1:], tok[:, None]], 1), hist_p)
    n = n_p + fresh
    stop = stopped(tok, hist, n, mine) & fresh
    at = jnp.where(final_p, rows_p, b)

    def put(a, v):
        return a.at[at].set(v, mode="drop")

    slots = Slots(put(slots.tok, tok), put(slots.pos, lens_p), put(slots.n, n),
                  slots.live.at[rows_p].set(final_p & ~stop, mode="drop"), put(slots.hist, hist))
    return cache, slots, for_host(tok), for_host(stop)


def _decode_steps(graphdef, treedef, leaves, cache: PagedCache, slots: Slots, params: SlotParams, kill_b, n_steps,
                  refill, *, k, mesh):
    """Up to n_steps (<= k) decode steps over all slots; exits early once every slot is done, or, when
    refill > 0, once `refill` slots have finished or REFILL_PATIENCE steps after the first did (so
    that one insert refills several slots, and none idles long). Returns the tokens [B, k] (-1 where
    a slot produced none), the number of steps run and the rows still live."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    slots = slots._replace(live=slots.live & ~kill_b)
    live0 = slots.live

    def cond(c):
        j, first_free, s, _, _ = c
        freed = (live0 & ~s.live).sum()
        refilling = (refill > 0) & ((freed >= refill) | ((freed > 0) & (j - first_free >= REFILL_PATIENCE)))
        return (j < n_steps) & s.live.any() & ~refilling

    def body(c):
        j, first_free, s, out, cache = c
        pos = jnp.where(s.live, s.pos, 0)
        h, cache = model.forward_cached(model.embed(s.tok[:, None]), pos[:, None], _paged(cache, s.live), mesh,
                                        valid_bt=s.live[:, None])
        new = _sample(model, h[:, 0], mesh, params, s.n)
        out = out.at[:, j].set(jnp.where(s.live, new, -1))
        live = s.live
        hist = jnp.where(live[:, None], jnp.concatenate([s.hist[:, 1:], new[:, None]], 1), s.hist)
        n = s.n + live
        s = Slots(jnp.where(live, new, s.tok), s.pos + live, n, live & ~stopped(new, hist, n, params), hist)
        first_free = jnp.where((first_free < 0) & (live0 & ~s.live).any(), j + 1, first_free)
        return j + 1, first_free, s, out, cache

    out = jnp.full((slots.live.shape[0], k), -1, jnp.int32)
    table = cache.table
    j, _, slots, out, cache = jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.int32(-1), slots, out, cache))
    return cache._replace(table=table), slots, for_host(out), j, for_host(slots.live)


class Programs(NamedTuple):
    insert: Callable
    decode_steps: Callable


_programs: dict = {}


def programs_for(graphdef, treedef) -> Programs:
    """The two jitted pieces for one model structure, made once per process and shared by every Engine of
    that model (jit keeps their executables per shape): hashing a graphdef as a static argument costs
    milliseconds, too much for every call of the host loop. The parameters go in as a flat list of arrays
    (`treedef` rebuilds the state)."""
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


@partial(jax.jit, static_argnames=("graphdef",))
def image_features(graphdef, state, pixel_values, layout_arrays):
    layout = PatchLayout(*layout_arrays, tokens_per_image=())
    return nnx.merge(graphdef, state).image_features(pixel_values, layout)


@partial(jax.jit, static_argnames=("graphdef",))
def _prompt_embeds(graphdef, state, ids_bt, features):
    """The prompt's input embeddings with its images' features in the [IMG] rows [B, T, D]."""
    return nnx.merge(graphdef, state).embed(ids_bt, features)


@partial(jax.jit, static_argnames=("c",))
def _take_chunks(embeds, starts_p, *, c):
    """embeds[p, starts[p] : starts[p] + c] for every p [P, c, D]."""
    return jax.vmap(lambda e, s: jax.lax.dynamic_slice_in_dim(e, s, c, axis=0))(embeds, starts_p)


# ---------------------------------------------------------------------- sizes
def cache_length(lens: Sequence[int], limits: Sequence[int], chunk: int) -> int:
    """Slots a row needs for every request's prompt (padded to whole chunks) and new tokens; a power of two so
    that nearby sizes share programs."""
    need = max(max(n + m for n, m in zip(lens, limits)), max(-(-n // chunk) * chunk for n in lens))
    return pow2(need, 16)


def page_size(row_slots: int) -> int:
    """PAGE_TOKENS, or the row's slots when a row is shorter."""
    return min(PAGE_TOKENS, pow2(row_slots))


def abstract_args(cfg, dtype, rows: int, cache_len: int, chunk: int, seq_width: int, mesh, cache_tokens=None):
    """ShapeDtypeStructs of the engine programs' arguments at `rows` slots of `cache_len` slots each, a pool of
    `cache_tokens` (default rows * cache_len) and the insert at `rows` prompts of a `chunk`, laid out as the
    Engine lays them out: (cache, slots, params, ids, per-prompt [rows])."""
    S = jax.ShapeDtypeStruct
    t = cfg.text
    ps = page_size(cache_len)
    groups = batch_divisor(mesh)
    pages = groups * (-(-(cache_tokens or rows * cache_len) // (ps * groups)) + 1)

    def at(shape, dtype_, logical=("batch",)):
        sharding = None if mesh is None else logical_sharding(mesh, logical + (None,) * (len(shape) - len(logical)),
                                                              shape)
        return S(shape, dtype_, sharding=sharding)

    i32 = partial(at, dtype_=jnp.int32)
    cache = PagedCache(*(at((t.num_hidden_layers, pages, ps, d), dtype, CACHE_LBSC)
                         for d in (t.kv_lora_rank, t.qk_rope_head_dim)), i32((rows, cache_len // ps)), i32((rows,)))
    slots = Slots(i32((rows,)), i32((rows,)), i32((rows,)), at((rows,), bool), i32((rows, seq_width)))
    params = SlotParams(at((rows, 2), jnp.uint32), at((rows,), jnp.float32), i32((rows,)), at((rows,), jnp.float32),
                        i32((rows,)), i32((rows, MAX_STOP_TOKENS)), i32((rows, MAX_STOP_SEQUENCES, seq_width)),
                        i32((rows, MAX_STOP_SEQUENCES)))
    return cache, slots, params, i32((rows, chunk)), i32((rows,))


def program_temp_bytes(prog: Programs, leaves, cfg, dtype, rows: int, cache_len: int, chunk: int, seq_width: int,
                       mesh, cache_tokens=None) -> int:
    """The larger per-device temporaries of the decode and insert programs at `rows` slots, from XLA's
    memory analysis of the compiled programs (nothing runs)."""
    cache, slots, params, ids, per_row = abstract_args(cfg, dtype, rows, cache_len, chunk, seq_width, mesh,
                                                       cache_tokens)
    flag = jax.ShapeDtypeStruct((rows,), bool, sharding=per_row.sharding)
    hist = jax.ShapeDtypeStruct((rows, seq_width), jnp.int32, sharding=slots.hist.sharding)
    with mesh_context(mesh):
        decode = prog.decode_steps.lower(leaves, cache, slots, params, flag, jnp.int32(1), jnp.int32(0),
                                         k=STEPS_PER_CALL, mesh=mesh)
        insert = prog.insert.lower(leaves, cache, slots, params, ids, None, per_row, per_row, per_row, flag, per_row,
                                   per_row, hist, mesh=mesh)
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


# ---------------------------------------------------------------------- requests
@dataclasses.dataclass(eq=False)
class Request:
    """A submitted request: its settings and, as it runs, its tokens. `done` is set when it finishes;
    `finish_reason` is "stop" (a stop id, sequence or string), "length" (max_new_tokens) or "cancelled"."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    key: np.ndarray  # uint32[2]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    text_stop: TextStop | None = None
    images: tuple | None = None  # (pixel_values, image_sizes) of this prompt's [IMG] tokens
    on_tokens: Callable | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    # where it is: its slot, the pages it holds, the pages of its prompt that are shareable, its image embeddings
    slot: int | None = None
    pages: list[int] = dataclasses.field(default_factory=list)
    embeds: jax.Array | None = None
    salt: bytes = b""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def prefill_ids(self) -> list[int]:
        """What the cache must hold before decoding continues: the prompt, and after a preemption the tokens
        made so far but the last (which is the next decode input)."""
        return self.prompt + self.tokens[:-1]


# ---------------------------------------------------------------------- the engine
class Engine:
    """A model's serving state: compiled programs, the mesh, the paged latent cache, slots and a request queue.

    batch_size: slots decoded at once (default: `default_batch_size` for 32 requests on this device).
    cache_tokens: the page pool's capacity in tokens, shared by every running request (default:
    batch_size rows of `max_len` tokens; on an accelerator, what the free memory holds after the programs'
    temporaries). A request needs pages for its prompt and its new tokens; pages of identical prompt prefixes
    are shared. max_len: the longest prompt + max_new_tokens a request may ask for (default: the model's
    context, at most 32,768). page_tokens: slots per page (default PAGE_TOKENS). prefill_chunk: prompt
    tokens per insert (a power of two). stop_width: the longest token-id stop sequence. watch: decode at most
    STEPS_PER_CALL_WATCHED steps per call (set when callbacks want tokens promptly). expected_requests: how
    many requests the default batch_size is sized for. share_prefixes: reuse cached pages of identical prompt
    prefixes (False: every prompt is computed whole; for comparisons).

    Thread safety: `submit` and `cancel` may be called from any thread; `step` (and `run`, iteration) from
    one thread at a time: it is where the work happens and where `on_tokens` callbacks run.
    """

    def __init__(self, model, *, batch_size: int | None = None, cache_tokens: int | None = None,
                 max_len: int | None = None, page_tokens: int | None = None, prefill_chunk: int = 512,
                 stop_width: int = STOP_WIDTH, watch: bool = False, expected_requests: int = 32,
                 share_prefixes: bool = True):
        t = model.config.text
        self.model, self.config = model, model.config
        self.mesh = model_mesh(model)
        self.groups = batch_divisor(self.mesh)
        self.max_len = min(t.max_position_embeddings, 32768) if max_len is None else int(max_len)
        self.row_slots = pow2(self.max_len, 16)
        self.page = page_tokens or page_size(self.row_slots)
        if self.page & (self.page - 1) or self.row_slots % self.page:
            raise InputError(f"page_tokens must be a power of two dividing {self.row_slots}, got {self.page}")
        self.chunk = min(prefill_chunk, self.row_slots)
        self.stop_width = pow2(stop_width)
        self.steps_per_call = STEPS_PER_CALL_WATCHED if watch else STEPS_PER_CALL
        self.share_prefixes = share_prefixes
        self.graphdef, state = nnx.split(model)
        self.leaves, self.treedef = jax.tree.flatten(state)
        self.state = state
        self.prog = programs_for(self.graphdef, self.treedef)
        with mesh_context(self.mesh):
            if batch_size is None:
                temp = partial(program_temp_bytes, self.prog, self.leaves, self.config, model.dtype,
                               cache_len=self.row_slots, chunk=self.chunk, seq_width=self.stop_width, mesh=self.mesh)
                batch_size = default_batch_size(model, expected_requests, self.row_slots, self.groups, temp)
        self.rows = max(self.groups, -(-int(batch_size) // self.groups) * self.groups)
        self.cache_tokens = int(cache_tokens) if cache_tokens else self._default_cache_tokens()
        per_group = -(-self.cache_tokens // (self.page * self.groups))  # usable pages per group
        self.pool = PagePool(self.groups * (per_group + 1), self.groups)  # + each group's trash page
        self.trash = [self.pool.take(g, 1)[0] for g in range(self.groups)]
        self.capacity = per_group * self.page  # tokens one request can hold at most
        self._cache = None  # allocated at the first request that runs
        self._lock = threading.Lock()
        self._inbox: list = []
        self._next_id = 0
        self.waiting: deque[Request] = deque()
        self.slot_req: list[Request | None] = [None] * self.rows
        self.filling: dict[int, int] = {}  # slot -> prefill tokens already in its cache
        self.admitted: list[int] = []  # slots in the order their requests were admitted (preemption: last first)
        self.finished: deque[Request] = deque()
        self._pending: list = []  # inserts whose first tokens are not read back yet
        self._table = np.zeros((self.rows, self.row_slots // self.page), np.int32)
        self._params = self._empty_params()
        self._dirty = True
        self._kill = np.zeros(self.rows, bool)
        self.events: list[list[tuple[Request, int]]] = []  # tokens of the last step, one list per token step
        # prompt tokens computed, prompt tokens found in cached prefix pages, requests preempted, decode steps run
        self.stats = {"prefilled": 0, "reused": 0, "preempted": 0, "decode_steps": 0}

    # ------------------------------------------------------------------ sizes
    def _default_cache_tokens(self) -> int:
        mem = memory.device_memory()
        if mem is None:
            return self.rows * self.row_slots
        free = (mem[0] - mem[1]) * (1 - PLAN_MARGIN)
        with mesh_context(self.mesh):
            temp = program_temp_bytes(self.prog, self.leaves, self.config, self.model.dtype, self.rows,
                                      self.row_slots, self.chunk, self.stop_width, self.mesh)
        per_token = cache_bytes_per_token(self.config.text, self.model.dtype) / self.groups
        tokens = int((free - temp) // per_token)
        if tokens < self.page * self.groups:
            raise InputError(f"the device has {gib(free)} free, {gib(temp)} of it taken by the programs' "
                             "temporaries: no room for a cache; use a smaller batch_size or more devices")
        return tokens

    def _empty_params(self) -> SlotParams:
        b, m = self.rows, self.stop_width
        return SlotParams(np.zeros((b, 2), np.uint32), np.zeros(b, np.float32), np.zeros(b, np.int32),
                          np.ones(b, np.float32), np.ones(b, np.int32), np.full((b, MAX_STOP_TOKENS), -1, np.int32),
                          np.full((b, MAX_STOP_SEQUENCES, m), -1, np.int32),
                          np.zeros((b, MAX_STOP_SEQUENCES), np.int32))

    def _on_devices(self, logical, shape):
        """Where the engine's arrays live: the mesh's layout, or without one the first device, committed like
        the programs' outputs (an uncommitted input after an admission compiled every program a second time)."""
        return jax.devices()[0] if self.mesh is None else logical_sharding(self.mesh, logical, shape)

    def _g(self, a, logical=("batch",)):
        """A host array (the block table, slot flags) on the engine's devices."""
        if self.mesh is None:
            return jax.device_put(np.array(a), self._on_devices(logical, np.shape(a)))
        return to_global(a, self.mesh, logical)

    def _state(self):
        """The device cache and slots, made at first use."""
        if self._cache is None:
            t = self.config.text
            shapes = [(t.num_hidden_layers, len(self.pool.refs), self.page, d) for d in (t.kv_lora_rank,
                                                                                           t.qk_rope_head_dim)]
            trash = np.asarray([self.trash[r * self.groups // self.rows] for r in range(self.rows)], np.int32)
            pool = [jnp.zeros(s, self.model.dtype, device=self._on_devices(CACHE_LBSC, s)) for s in shapes]
            self._cache = PagedCache(*pool, self._g(self._table), self._g(trash))
            self._slots = Slots(*(self._g(a) for a in (np.zeros(self.rows, np.int32),) * 3),
                                self._g(np.zeros(self.rows, bool)),
                                self._g(np.full((self.rows, self.stop_width), -1, np.int32)))
        return self._cache, self._slots

    def cache_bytes(self) -> int:
        """Bytes of the page pool (all devices)."""
        t = self.config.text
        return len(self.pool.refs) * self.page * cache_bytes_per_token(t, self.model.dtype)

    # ------------------------------------------------------------------ the public interface
    def submit(self, prompt_ids: Sequence[int], *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] | None = None,
               stop_sequences: Sequence[Sequence[int]] | None = None, stop_strings: Sequence[str] | None = None,
               tokenizer=None, images=None, on_tokens: Callable | None = None, key=None) -> Request:
        """Queue a request; returns its handle (tokens appear on it as `step` runs). Checked here, with an
        InputError naming the argument: ids, lengths against `max_len` and `cache_tokens`, sampling settings,
        stops (default: the config's eos ids). images: (pixel_values [N, C, H, W], image_sizes) of the
        prompt's [IMG] tokens. on_tokens(request, new_ids): called from `step` as tokens arrive. key: the
        sampling key (uint32[2]; default PRNGKey(seed))."""
        t = self.config.text
        prompt = validate_ids(prompt_ids, t.vocab_size, "prompt_ids")
        check_int("max_new_tokens", max_new_tokens, 1)
        check_int("top_k", top_k, 0)
        check_int("seed", seed, 0)
        if not (isinstance(temperature, (int, float)) and temperature >= 0 and np.isfinite(temperature)):
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
        total = len(prompt) + max_new_tokens
        if total > min(self.max_len, t.max_position_embeddings):
            raise InputError(f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                             f"context limit {min(self.max_len, t.max_position_embeddings)} (max_position_embeddings "
                             f"= {t.max_position_embeddings}, the engine's max_len = {self.max_len})")
        if total > self.capacity:
            raise InputError(f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({max_new_tokens}) needs "
                             f"{total} cache tokens, more than cache_tokens = {self.cache_tokens} holds for one "
                             f"request ({self.capacity} per row group): raise cache_tokens or shorten the request")
        stops = list(t.eos_token_id) if stop_tokens is None else [int(s) for s in stop_tokens]
        if len(stops) > MAX_STOP_TOKENS:
            raise InputError(f"stop_tokens: at most {MAX_STOP_TOKENS} ids, got {len(stops)}")
        for s in stops:
            if not 0 <= s < t.vocab_size:
                raise InputError(f"stop_tokens holds {s}, outside the vocabulary [0, {t.vocab_size})")
        seqs = [] if stop_sequences is None else list(stop_sequences)
        if len(seqs) > MAX_STOP_SEQUENCES:
            raise InputError(f"stop_sequences: at most {MAX_STOP_SEQUENCES} sequences, got {len(seqs)}")
        seqs = [validate_ids(q, t.vocab_size, f"stop_sequences[{i}]") for i, q in enumerate(seqs)]
        if any(len(q) > self.stop_width for q in seqs):
            raise InputError(f"stop_sequences: at most {self.stop_width} tokens each (the engine's stop_width)")
        text_stop = None
        if stop_strings:
            if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
                raise InputError("stop_strings need tokenizer= (an object with decode(ids, skip_special_tokens=...))")
            text_stop = TextStop(tokenizer, stop_strings) if any(stop_strings) else None
        salt = b""
        if images is not None:
            px, sizes = images
            layout = self.model.layout_for(px, sizes)
            check_image_tokens(np.asarray(prompt), self.config.image_token_id, sum(layout.tokens_per_image))
            salt = hashlib.blake2b(np.ascontiguousarray(np.asarray(px, np.float32)).tobytes(), digest_size=16).digest()
        if on_tokens is not None and not callable(on_tokens):
            raise InputError(f"on_tokens must be callable, got {type(on_tokens).__name__}")
        key = np.asarray(jax.random.key_data(jax.random.PRNGKey(seed)) if key is None else key, np.uint32)
        with self._lock:
            req = Request(self._next_id, prompt, int(max_new_tokens), key, float(temperature), int(top_k), float(top_p),
                          tuple(stops), tuple(tuple(q) for q in seqs), text_stop, images, on_tokens, salt=salt)
            self._next_id += 1
            self._inbox.append(("submit", req))
        return req

    def cancel(self, request: Request) -> None:
        """Stop a request (from any thread): it finishes with reason "cancelled" at the next step."""
        with self._lock:
            self._inbox.append(("cancel", request))

    @property
    def busy(self) -> bool:
        """Whether any request is queued, waiting or running."""
        with self._lock:
            inbox = bool(self._inbox)
        return inbox or bool(self.waiting) or any(r is not None for r in self.slot_req)

    def results(self) -> list[Request]:
        """The requests finished since the last call, in the order they finished."""
        out = list(self.finished)
        self.finished.clear()
        return out

    def __iter__(self):
        """Finished requests as they finish, stepping the engine until it is idle."""
        while True:
            yield from self.results()
            if not self.busy:
                return
            self.step()

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while self.busy:
            self.step()

    # ------------------------------------------------------------------ one round
    def step(self) -> bool:
        """One scheduling round (see the module docstring); returns whether work remains. `self.events` holds the
        tokens it produced, one list of (request, token) per token step."""
        self.events = []
        self._take_inbox()
        with mesh_context(self.mesh):
            self._admit()
            if self.filling:
                self._insert()
            if any(self.slot_req[s] is not None and s not in self.filling for s in range(self.rows)):
                self._decode()
            elif self._pending:
                self._collect([])
        return self.busy

    def _take_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for what, req in inbox:
            if what == "submit":
                self.waiting.append(req)
            elif not req.finished:
                if req in self.waiting:
                    self.waiting.remove(req)
                    self._finish(req, "cancelled")
                elif req.slot is not None:
                    self._kill[req.slot] = True
                    self._release(req)
                    self._finish(req, "cancelled")

    # ------------------------------------------------------------------ admission and pages
    def _group(self, slot: int) -> int:
        return slot * self.groups // self.rows

    def _admit(self) -> None:
        """Waiting requests into free slots, in order, while their prompt pages can be had."""
        free = [s for s in range(self.rows) if self.slot_req[s] is None]
        while self.waiting and free:
            req = self.waiting[0]
            slot, group = free[0], self._group(free[0])
            ids = req.prefill_ids()
            keys = page_keys(ids[:len(ids) - 1], self.page, req.salt)  # the last token is always computed
            shared = self.pool.match(group, keys) if self.share_prefixes else []
            new = self.pool.take(group, -(-len(ids) // self.page) - len(shared))
            if new is None:
                self.pool.release(group, shared)
                break
            self.waiting.popleft()
            free.pop(0)
            req.slot, req.pages = slot, shared + new
            self.slot_req[slot] = req
            self.filling[slot] = len(shared) * self.page
            self.stats["reused"] += len(shared) * self.page
            self.admitted.append(slot)
            self._kill[slot] = False
            self._set_row(slot, req)
            if req.images is not None and req.embeds is None:
                req.embeds = self._embed_prompt(req)

    def _set_row(self, slot: int, req: Request) -> None:
        self._table[slot] = self.trash[self._group(slot)]
        self._table[slot, :len(req.pages)] = req.pages
        p = self._params
        p.key[slot], p.temperature[slot], p.top_k[slot], p.top_p[slot] = req.key, req.temperature, req.top_k, req.top_p
        p.limit[slot] = req.max_new_tokens
        p.stop_ids[slot] = list(req.stop_tokens) + [-1] * (MAX_STOP_TOKENS - len(req.stop_tokens))
        p.stop_seqs[slot], p.stop_lens[slot] = -1, 0
        for i, q in enumerate(req.stop_sequences):
            p.stop_seqs[slot, i, self.stop_width - len(q):] = q
            p.stop_lens[slot, i] = len(q)
        self._dirty = True

    def _embed_prompt(self, req: Request):
        """The prompt's embeddings with its image features [T_padded, D] (computed once, at admission)."""
        px, layout = bucketed_images(self.model, *req.images)
        arrays = (layout.patch_index, layout.rows, layout.cols, layout.segment, layout.merge_index)
        feats = image_features(self.graphdef, self.state, self._g(px, ()), tuple(self._g(a, ()) for a in arrays))
        ids = np.zeros((1, (-(-len(req.prompt) // self.chunk) + 1) * self.chunk), np.int32)  # chunks may overhang
        ids[0, :len(req.prompt)] = req.prompt
        return _prompt_embeds(self.graphdef, self.state, self._g(ids, ()), feats)[0]

    def _release(self, req: Request) -> None:
        """The request leaves its slot: its pages go back (its full prompt pages stay cached)."""
        slot = req.slot
        self.pool.release(self._group(slot), req.pages)
        req.pages, req.slot = [], None
        self.slot_req[slot] = None
        self.filling.pop(slot, None)
        self.admitted.remove(slot)
        self._table[slot] = self.trash[self._group(slot)]
        self._dirty = True

    def _grow(self, steps: int) -> None:
        """Pages for the next `steps` tokens of every decoding slot; preempts the most recently admitted requests
        while the pool cannot give them."""
        for slot in list(self.admitted):
            req = self.slot_req[slot]
            if req is None or slot in self.filling:
                continue
            end = min(len(req.prefill_ids()) + steps, len(req.prompt) + req.max_new_tokens)
            need = -(-end // self.page) - len(req.pages)
            while need > 0:
                got = self.pool.take(self._group(slot), need)
                if got is not None:
                    req.pages += got
                    self._table[slot, :len(req.pages)] = req.pages
                    self._dirty = True
                    break
                victim = next((v for v in reversed(self.admitted) if v != slot and self._group(v) == self._group(slot)),
                              None)
                if victim is None:  # the pool is smaller than this one request: refused at submit, cannot happen
                    raise RuntimeError(f"request {req.id} cannot get cache pages")
                self._preempt(self.slot_req[victim])

    def _preempt(self, req: Request) -> None:
        """Give back a request's pages; it waits (first in line) and is recomputed from its prompt and the
        tokens it made (cached prefix pages make that cheap)."""
        self._kill[req.slot] = True
        self._release(req)
        self.waiting.appendleft(req)
        self.stats["preempted"] += 1

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self.finished.append(req)
        req.done.set()

    def _publish(self, req: Request) -> None:
        """Make the request's full prompt pages findable by later requests with the same prefix."""
        group = self._group(req.slot)
        for i, key in enumerate(page_keys(req.prompt, self.page, req.salt)):
            if i < len(req.pages):
                self.pool.publish(group, req.pages[i], key)

    # ------------------------------------------------------------------ the programs
    def _upload(self):
        cache, slots = self._state()
        if self._dirty:
            cache = cache._replace(table=self._g(self._table))
            self._params_dev = SlotParams(*(self._g(a) for a in self._params))
            self._dirty = False
        return cache, slots

    def _insert(self) -> None:
        fill = sorted(self.filling)
        lens = {s: len(self.slot_req[s].prefill_ids()) for s in fill}
        # fresh prompts that fit in less than a chunk share a smaller one (fewer padded tokens)
        c = self.chunk if any(self.filling.values()) else min(self.chunk, pow2(max(lens.values()), 8))
        p = batch_bucket(len(fill), self.groups)
        rows_p = np.full(p, self.rows, np.int32)
        rows_p[:len(fill)] = fill
        starts = np.zeros(p, np.int32)
        starts[:len(fill)] = [self.filling[s] for s in fill]
        lens_p = np.zeros(p, np.int32)
        lens_p[:len(fill)] = [lens[s] for s in fill]
        final = (starts + c >= lens_p) & (rows_p < self.rows)
        ids = np.zeros((p, c), np.int32)
        first = np.full(p, -1, np.int32)
        n_p = np.zeros(p, np.int32)
        hist = np.full((p, self.stop_width), -1, np.int32)
        feats = None
        for i, s in enumerate(fill):
            req = self.slot_req[s]
            seq = req.prefill_ids()[starts[i]:starts[i] + c]
            ids[i, :len(seq)] = seq
            if req.tokens:  # resuming after a preemption
                first[i], n_p[i] = req.tokens[-1], len(req.tokens)
                tail = req.tokens[-self.stop_width:]
                hist[i, self.stop_width - len(tail):] = tail
        if any(self.slot_req[s].embeds is not None for s in fill):
            d = self.config.text.hidden_size
            pieces = []
            for i in range(p):
                req = self.slot_req[rows_p[i]] if i < len(fill) else None
                e = req.embeds if req is not None and req.embeds is not None else None
                pieces.append(e[starts[i]:starts[i] + c] if e is not None and starts[i] + c <= e.shape[0]
                              else jnp.zeros((c, d), self.model.dtype))
            feats = self._g(np.asarray(jnp.stack(pieces)), ("batch",))
        cache, slots = self._upload()
        g = self._g
        cache, slots, tok, stop = self.prog.insert(
            self.leaves, cache, slots, self._params_dev, g(ids), feats, g(rows_p), g(starts), g(lens_p), g(final),
            g(first), g(n_p), g(hist), mesh=self.mesh)
        self._cache, self._slots = cache, slots
        done = []
        for i, s in enumerate(fill):
            self.stats["prefilled"] += min(c, int(lens_p[i] - starts[i]))
            self.filling[s] += c
            if final[i]:
                del self.filling[s]
                self._publish(self.slot_req[s])
                if first[i] < 0:
                    done.append((i, s))
        if done:
            self._pending.append((tok, stop, done))

    def _decode(self) -> None:
        # a prompt being inserted gets its next chunk after one step
        n = 1 if self.filling else self.steps_per_call
        self._grow(n)
        waiting = len(self.waiting)
        refill = min(waiting, max(1, self.rows // REFILL_SHARE)) if waiting else 0
        cache, slots = self._upload()
        cache, slots, out, j, live = self.prog.decode_steps(
            self.leaves, cache, slots, self._params_dev, self._g(self._kill), jnp.int32(n), jnp.int32(refill),
            k=STEPS_PER_CALL, mesh=self.mesh)
        self._cache, self._slots = cache, slots
        self._kill[:] = False
        self._collect([(out, j, live)])

    def _collect(self, decoded) -> None:
        """Read back what the device made (the pending inserts' first tokens, then the decode steps) and hand
        it to the requests."""
        pending, self._pending = self._pending, []
        fetched = jax.device_get(([(tok, stop) for tok, stop, _ in pending], decoded))
        for (tok, stop), (_, _, done) in zip(fetched[0], pending):
            events = []
            for i, s in done:
                req = self.slot_req[s]
                if req is None or req.finished:
                    continue
                events.append((req, int(tok[i])))
                if self._take(req, int(tok[i])) or stop[i]:
                    self._end(req)
            self._emit(events)
        for out, j, live in fetched[1]:
            self.stats["decode_steps"] += int(j)
            for i in range(int(j)):
                events = []
                for s in range(self.rows):
                    req = self.slot_req[s]
                    if req is None or req.finished or s in self.filling or out[s, i] < 0:
                        continue
                    events.append((req, int(out[s, i])))
                    if self._take(req, int(out[s, i])):
                        self._end(req)
                self._emit(events)
            for s in range(self.rows):
                req = self.slot_req[s]
                if req is not None and s not in self.filling and not live[s] and not req.finished:
                    self._end(req)

    def _take(self, req: Request, tok: int) -> bool:
        """Append a token; True when a stop string ends the request here."""
        req.tokens.append(tok)
        return req.text_stop is not None and req.text_stop.hit(req.tokens)

    def _end(self, req: Request) -> None:
        """The request stopped: "length" when it made max_new_tokens without a stop id or sequence at the end."""
        toks = req.tokens
        by_stop = (toks[-1] in req.stop_tokens or any(tuple(toks[-len(q):]) == q for q in req.stop_sequences)
                   or (req.text_stop is not None and req.text_stop.hit(toks)))
        self._kill[req.slot] = True  # the device may still think it live (a stop string)
        self._release(req)
        self._finish(req, "stop" if by_stop or len(toks) < req.max_new_tokens else "length")

    def _emit(self, events: list[tuple[Request, int]]) -> None:
        if not events:
            return
        self.events.append(events)
        per_req: dict[int, tuple[Request, list[int]]] = {}
        for req, tok in events:
            per_req.setdefault(req.id, (req, []))[1].append(tok)
        for req, toks in per_req.values():
            if req.on_tokens is not None:
                req.on_tokens(req, toks)
