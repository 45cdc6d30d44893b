"""Batch scoring: log-likelihood of continuations and sliding-window perplexity.

`score(model, requests)` is the log-likelihood request of evaluation harnesses: for each
(context_ids, continuation_ids) it returns the summed log-probability of the continuation given the
context and whether the continuation is the greedy one (argmax at every position).

Shared contexts are computed once. Requests with the same context token ids (a multiple-choice question's
choices) are packed into one row: the context, then each continuation but its last token, with positions
restarting after the context for every continuation, and a mask by which each continuation sees the
context and itself only (segments, `ops.causal_mask`). The context's last position predicts every
continuation's first token, and each continuation's positions its own next tokens: exactly the values of
scoring the requests one by one, for the context's tokens once. (Packing was chosen over reusing cached
context pages because it keeps scoring one teacher-forced program with the training forward's numerics and
no cache round trip; lm-eval's HF backend shares only when choices differ in their last token.)

Rows are grouped into batches padded to power-of-two sizes and lengths, so a whole evaluation compiles a
handful of programs; each batch is one jitted forward (the full-sequence model) up to the final hidden
states, then the lm_head and log-softmax at the scored positions a chunk at a time
(`logprobs.target_logprobs`), so no [B, T, vocab] logits are ever held.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import InputError
from ..inputs import check_image_tokens, check_int, validate_ids
from .batching import batch_bucket, pow2
from .logprobs import DEFAULT_CHUNK, chunk_layout, target_logprobs, target_top_logprobs
from ..model.hooks import Capture, ForwardOutput, Intervention, ResidualPatch
from ..sharding import batch_divisor, for_host, mesh_context, model_mesh, to_global


def continuation_sums(logp_bt: jax.Array, is_argmax_bt: jax.Array, weights_bt: jax.Array):
    """(sum_t w[b,t] * logp[b,t] [B], all_t(w[b,t] == 0 or is_argmax[b,t]) [B]) of per-token values."""
    return (logp_bt * weights_bt).sum(-1), (is_argmax_bt | (weights_bt == 0)).all(-1)


def continuation_logprobs(logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array):
    """sum_t w[b,t] * log_softmax(logits[b,t])[target[b,t]] and all_t(w -> argmax == target); fp32.

    The whole-logits form; `score` computes the same from hidden states in chunks (`target_logprobs`).
    """
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    tok_lp = jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0]
    return continuation_sums(tok_lp, jnp.argmax(logits_btv, axis=-1) == targets_bt, weights_bt)


@partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _score_batch(graphdef, state, ids_bt, mask_bt, targets_bt, weights_bt, chunk=DEFAULT_CHUNK):
    model = nnx.merge(graphdef, state)
    h = model.final_hidden(ids_bt, attention_mask=mask_bt)
    sums = continuation_sums(*target_logprobs(h, model.lm_head.kernel[...], targets_bt, chunk=chunk), weights_bt)
    return jax.tree.map(for_host, sums)


@partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _score_packed(graphdef, state, ids_bt, seg_bt, pos_bt, at_bp, targets_bp, chunk=DEFAULT_CHUNK):
    """(log p(target) [B, P], target is the argmax [B, P]) at positions at_bp of packed rows (`score`)."""
    model = nnx.merge(graphdef, state)
    h = model.final_hidden(ids_bt, attention_mask=seg_bt, positions=pos_bt)
    h = jnp.take_along_axis(h, at_bp[..., None], axis=1)
    return jax.tree.map(for_host, target_logprobs(h, model.lm_head.kernel[...], targets_bp, chunk=chunk))


@dataclasses.dataclass
class _Row:
    """A packed row: one context and the continuations that share it; `pairs` are (request, position, target)."""

    ids: list[int]
    seg: list[int]
    pos: list[int]
    pairs: list[tuple[int, int, int]]


def _pack(ctx: list[int], conts: list[tuple[int, list[int]]], shared: bool) -> _Row:
    """The row of a context and its continuations [(request, ids)]: each continuation sees the context and
    itself (segment 2 + k), or, alone, the whole row (segment 1)."""
    c = len(ctx)
    row = _Row(list(ctx), [1] * c, list(range(c)), [])
    for k, (req, cont) in enumerate(conts):
        row.pairs.append((req, c - 1, cont[0]))  # the context's last position predicts the first token
        at = len(row.ids)
        row.ids += cont[:-1]
        row.seg += [2 + k if shared else 1] * (len(cont) - 1)
        row.pos += list(range(c, c + len(cont) - 1))
        row.pairs += [(req, at + j, cont[j + 1]) for j in range(len(cont) - 1)]
    return row


def _rows(ctxs, conts, share: bool, budget: int) -> list[_Row]:
    """Requests grouped by identical context into packed rows of at most `budget` tokens (a request alone
    always fits)."""
    groups: dict[tuple, list[int]] = {}
    for i, ctx in enumerate(ctxs):
        groups.setdefault(tuple(ctx) if share else (i,), []).append(i)
    rows = []
    for members in groups.values():
        ctx, batch, size = ctxs[members[0]], [], len(ctxs[members[0]])
        for i in members:
            if batch and size + len(conts[i]) - 1 > budget:
                rows.append(_pack(ctx, batch, len(batch) > 1))
                batch, size = [], len(ctx)
            batch.append((i, conts[i]))
            size += len(conts[i]) - 1
        rows.append(_pack(ctx, batch, len(batch) > 1))
    return rows


@partial(jax.jit, static_argnames=("graphdef", "capture", "chunk"))
def _score_batch_probed(graphdef, state, ids_bt, mask_bt, targets_bt, weights_bt, capture, intervene,
                        chunk=DEFAULT_CHUNK):
    """As `_score_batch`, plus the `ForwardOutput` of the captures (its logits None: nothing reads them)."""
    model = nnx.merge(graphdef, state)
    h, out = model.probe_hidden(ids_bt, attention_mask=mask_bt, capture=capture, intervene=intervene)
    lp, top = target_logprobs(h, model.lm_head.kernel[...], targets_bt, chunk=chunk)
    return jax.tree.map(for_host, (continuation_sums(lp, top, weights_bt), out))


def _captured_row(out: ForwardOutput, row: int, n: int, b: int) -> dict:
    """One request's captured arrays (numpy), cut to its n input tokens; router arrays [L_moe, n, .]."""
    got = {}
    if out.hidden_states is not None:
        got["hidden_states"] = np.asarray(out.hidden_states[:, row, :n])
    for name in ("router_logits", "topk_ids", "topk_weights"):
        a = getattr(out, name)
        if a is not None:
            got[name] = np.asarray(a.reshape(a.shape[0], b, -1, a.shape[-1])[:, row, :n])
    if out.attentions is not None:
        got["attentions"] = np.asarray(out.attentions[:, row, :, :n, :n])
    return got


def _batch_intervention(iv: Intervention | None, rows: dict[int, int]) -> Intervention | None:
    """`iv` for one batch: patch sites move to their request's batch row; sites of other requests
    get point -1 (no effect), so every batch has the same site count (one program)."""
    if iv is None or iv.patch is None:
        return iv
    p = iv.patch
    req = np.asarray(p.row)
    inside = np.asarray([int(r) in rows for r in req], bool)
    row = np.asarray([rows.get(int(r), 0) for r in req], np.int32)
    point = np.where(inside, np.asarray(p.point), -1).astype(np.int32)
    return Intervention(iv.expert_mask, ResidualPatch(point, row, p.position, p.value, p.replace))


def score(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8, *,
          capture: Capture | None = None, intervene: Intervention | None = None,
          chunk: int = DEFAULT_CHUNK, share_contexts: bool = True) -> list[tuple]:
    """[(sum of log p(continuation | context), is_greedy)] per (context_ids, continuation_ids) request.

    The context needs at least one token (the first token has nothing to be predicted from).
    chunk: positions per lm_head application (memory [batch, chunk, vocab] float32; see logprobs.py).
    batch_size: rows per forward (a row holds one request, or a shared context with its continuations).
    share_contexts: pack requests with identical context ids into one row (the context computed once; the
    values are those of scoring each alone); False scores every request in its own row.
    Research access (model/hooks.py): `capture` adds a third element per request, a dict of numpy arrays cut
    to the request's input tokens (context + continuation minus the last token, n of them):
    hidden_states [L+1, n, H], router_logits / topk_ids / topk_weights [L_moe, n, .], attentions
    [L, heads, n, n]. `intervene` applies to every batch: expert_mask must be per layer [L_moe, E];
    a patch site's `row` is the request's index in `requests` and `position` its token index.
    """
    t = model.config.text
    if not isinstance(requests, (list, tuple)) or not requests:
        raise InputError("requests must be a non-empty list of (context_ids, continuation_ids)")
    check_int("batch_size", batch_size, 1)
    chunk_layout(1, chunk)  # refuses a bad chunk before any compile
    ctxs, conts = [], []
    for i, r in enumerate(requests):
        if not isinstance(r, (list, tuple)) or len(r) != 2:
            raise InputError(f"requests[{i}] must be a (context_ids, continuation_ids) pair")
        ctxs.append(validate_ids(r[0], t.vocab_size, f"requests[{i}].context"))
        conts.append(validate_ids(r[1], t.vocab_size, f"requests[{i}].continuation"))
        n = len(ctxs[-1]) + len(conts[-1]) - 1  # the last token is only predicted, never fed
        if n > t.max_position_embeddings:
            raise InputError(f"requests[{i}]: context + continuation - 1 = {n} tokens fed exceeds the context limit "
                             f"max_position_embeddings = {t.max_position_embeddings}")
    if intervene is not None:
        if not isinstance(intervene, Intervention):
            raise InputError(f"intervene must be a mistral4_jax.Intervention, got {type(intervene).__name__}")
        if intervene.expert_mask is not None and np.ndim(intervene.expert_mask) != 2:
            raise InputError("score: intervene.expert_mask must be per layer [moe_layers, experts]; per-token "
                             f"masks do not survive batching (got shape {np.shape(intervene.expert_mask)})")
        if intervene.patch is not None:
            rows = np.asarray(intervene.patch.row)
            if ((rows < 0) | (rows >= len(requests))).any():
                raise InputError(f"score: intervene.patch.row = {rows.tolist()} must index requests [0, {len(requests)})")
    probed = capture is not None or intervene is not None
    mesh = model_mesh(model)
    data = batch_divisor(mesh)
    graphdef, state = nnx.split(model)
    if not probed:
        return _score_shared(graphdef, state, ctxs, conts, batch_size, chunk, mesh, data, share_contexts,
                             t.max_position_embeddings)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: len(ctxs[i]) + len(conts[i]))  # similar lengths together
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        b = batch_bucket(len(idx), data)
        tl = pow2(max(len(ctxs[i]) + len(conts[i]) - 1 for i in idx), 8)
        ids, mask, tgt, w = (np.zeros((b, tl), np.int32) for _ in range(4))
        for row, i in enumerate(idx):
            full = ctxs[i] + conts[i]
            n = len(full) - 1
            ids[row, :n], mask[row, :n], tgt[row, :n] = full[:-1], 1, full[1:]
            w[row, len(ctxs[i]) - 1:n] = 1
        args = [to_global(x, mesh, ("batch",)) for x in (ids, mask, tgt, w)]
        with mesh_context(mesh):
            iv = _batch_intervention(intervene, {i: row for row, i in enumerate(idx)})
            (lp, greedy), out = _score_batch_probed(graphdef, state, *args, capture, iv, chunk=chunk)
        lp, greedy = np.asarray(jax.device_get(lp)), np.asarray(jax.device_get(greedy))
        for row, i in enumerate(idx):
            results[i] = (float(lp[row]), bool(greedy[row]))
            if capture is not None:
                results[i] += (_captured_row(out, row, len(ctxs[i]) + len(conts[i]) - 1, b),)
    return results


def _score_shared(graphdef, state, ctxs, conts, batch_size, chunk, mesh, data, share, max_len) -> list[tuple]:
    """`score` without captures: requests packed into rows by shared context (module docstring)."""
    longest = max(len(c) + len(x) - 1 for c, x in zip(ctxs, conts))
    rows = _rows(ctxs, conts, share, min(max_len, max(2 * longest, 1024)))
    rows.sort(key=lambda r: len(r.ids))
    lp_sum, greedy = [0.0] * len(ctxs), [True] * len(ctxs)
    for s in range(0, len(rows), batch_size):
        batch = rows[s:s + batch_size]
        b = batch_bucket(len(batch), data)
        tl = pow2(max(len(r.ids) for r in batch), 8)
        tp = pow2(max(len(r.pairs) for r in batch), 8)
        ids, seg, pos = (np.zeros((b, tl), np.int32) for _ in range(3))
        at, tgt = np.zeros((b, tp), np.int32), np.zeros((b, tp), np.int32)
        for k, r in enumerate(batch):
            n = len(r.ids)
            ids[k, :n], seg[k, :n], pos[k, :n] = r.ids, r.seg, r.pos
            at[k, :len(r.pairs)] = [p for _, p, _ in r.pairs]
            tgt[k, :len(r.pairs)] = [x for _, _, x in r.pairs]
        args = [to_global(x, mesh, ("batch",)) for x in (ids, seg, pos, at, tgt)]
        with mesh_context(mesh):
            lp, top = jax.device_get(_score_packed(graphdef, state, *args, chunk=chunk))
        for k, r in enumerate(batch):
            for j, (req, _, _) in enumerate(r.pairs):
                lp_sum[req] += float(lp[k, j])
                greedy[req] = greedy[req] and bool(top[k, j])
    return list(zip(lp_sum, greedy))


@partial(jax.jit, static_argnames=("graphdef", "k", "image_sizes", "chunk"))
def _token_logprobs(graphdef, state, ids_bt, mask_bt, targets_bt, pixel_values, k, image_sizes, chunk=DEFAULT_CHUNK):
    model = nnx.merge(graphdef, state)
    h = model.final_hidden(ids_bt, pixel_values, image_sizes, attention_mask=mask_bt)
    return jax.tree.map(for_host, target_top_logprobs(h, model.lm_head.kernel[...], targets_bt, k, chunk=chunk))


@dataclasses.dataclass
class TokenLogprobs:
    """Per-token log-probabilities of one sequence s of n tokens (`token_logprobs`).

    logprobs[t] = log p(s[t+1] | s[:t+1]) for t < n - 1; top_ids[t] / top_logprobs[t] are the `top` most likely
    next tokens after s[:t+1] and their log p, for every t < n (the last row is the distribution after the
    whole sequence: its greedy next token is top_ids[-1][0])."""

    logprobs: list[float]
    top_ids: np.ndarray  # [n, top] int32
    top_logprobs: np.ndarray  # [n, top] float32


def token_logprobs(model, sequences: Sequence[Sequence[int]], top: int = 1, batch_size: int = 8, *,
                   pixel_values=None, image_sizes=None, chunk: int = DEFAULT_CHUNK) -> list[TokenLogprobs]:
    """The log-probability of every token of each sequence given the tokens before it, and the `top` most
    likely tokens at every position (what an OpenAI-style `logprobs` / `echo` response reports).

    Each sequence is fed whole (n tokens, n <= max_position_embeddings) in rows of `batch_size`, padded to
    power-of-two batches and lengths; the head is applied a chunk at a time (`target_top_logprobs`). The
    values equal `score`'s: the log-likelihood of a continuation is the sum of logprobs[len(context) - 1:].
    pixel_values / image_sizes: the images of a single sequence's [IMG] tokens (one sequence only).
    """
    t = model.config.text
    if not isinstance(sequences, (list, tuple)) or not sequences:
        raise InputError("sequences must be a non-empty list of token-id lists")
    check_int("top", top, 1, t.vocab_size)
    check_int("batch_size", batch_size, 1)
    chunk_layout(1, chunk)
    seqs = [validate_ids(s, t.vocab_size, f"sequences[{i}]") for i, s in enumerate(sequences)]
    for i, s in enumerate(seqs):
        if len(s) > t.max_position_embeddings:
            raise InputError(f"sequences[{i}] has {len(s)} tokens, more than the context limit "
                             f"max_position_embeddings = {t.max_position_embeddings}")
    sizes = None
    if pixel_values is not None:
        if len(seqs) != 1:
            raise InputError("token_logprobs: pixel_values go with a single sequence")
        layout = model.layout_for(pixel_values, image_sizes)
        check_image_tokens(np.asarray(seqs[0]), model.config.image_token_id, sum(layout.tokens_per_image))
        px = np.asarray(pixel_values, np.float32)
        sizes = tuple(map(tuple, np.asarray(image_sizes if image_sizes is not None
                                            else [px.shape[2:]] * len(px)).tolist()))
    mesh = model_mesh(model)
    data = batch_divisor(mesh)
    graphdef, state = nnx.split(model)
    k = min(pow2(top), t.vocab_size)  # a handful of programs for all `top` values
    out: list[TokenLogprobs | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        b = batch_bucket(len(idx), data)
        tl = pow2(max(len(seqs[i]) for i in idx), 8)
        ids, mask, tgt = (np.zeros((b, tl), np.int32) for _ in range(3))
        for row, i in enumerate(idx):
            n = len(seqs[i])
            ids[row, :n], mask[row, :n], tgt[row, :n - 1] = seqs[i], 1, seqs[i][1:]
        args = [to_global(x, mesh, ("batch",)) for x in (ids, mask, tgt)]
        px_g = None if pixel_values is None else to_global(px, mesh)
        with mesh_context(mesh):
            lp, top_lp, top_id = jax.device_get(_token_logprobs(graphdef, state, *args, px_g, k, sizes, chunk=chunk))
        for row, i in enumerate(idx):
            n = len(seqs[i])
            out[i] = TokenLogprobs([float(x) for x in lp[row, :n - 1]], np.asarray(top_id[row, :n, :top]),
                                   np.asarray(top_lp[row, :n, :top]))
    return out


def perplexity(model, tokens: Sequence[int], window: int | None = None, stride: int | None = None,
               batch_size: int = 8, chunk: int = DEFAULT_CHUNK) -> dict:
    """Perplexity of a long token stream with a sliding window (the transformers recipe).

    Windows of `window` tokens (default min(2048, max_position_embeddings)) start every `stride` tokens
    (default window // 2); each window scores
    only the tokens no earlier window scored, with the rest of the window as context. Token 0 is
    context only. Returns {"nll": total negative log-likelihood, "tokens": tokens scored, "ppl"}.
    """
    t = model.config.text
    tokens = validate_ids(tokens, t.vocab_size, "tokens")
    window = min(2048, t.max_position_embeddings) if window is None else window
    check_int("window", window, 2, t.max_position_embeddings)
    stride = window // 2 if stride is None else stride
    check_int("stride", stride, 1, window - 1)
    if len(tokens) < 2:
        raise InputError("tokens: perplexity needs at least 2 tokens")
    requests, scored = [], 1
    for begin in range(0, len(tokens), stride):
        end = min(begin + window, len(tokens))
        if end > scored:
            requests.append((tokens[begin:scored], tokens[scored:end]))
            scored = end
        if end == len(tokens):
            break
    nll = -sum(lp for lp, _ in score(model, requests, batch_size, chunk=chunk))
    n = len(tokens) - 1
    return {"nll": nll, "tokens": n, "ppl": math.exp(nll / n)}
