"""Batch scoring: log-likelihood of continuations and sliding-window perplexity.

`score(model, requests)` is the log-likelihood request of evaluation harnesses: for each
(context_ids, continuation_ids) it returns the summed log-probability of the continuation given the
context and whether the continuation is the greedy one (argmax at every position). Requests are
grouped into batches padded to power-of-two sizes and lengths, so a whole evaluation compiles a
handful of programs; each batch is one jitted teacher-forced forward (the full-sequence model).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .errors import InputError
from .generate import _check_int, _pow2, validate_ids
from .sharding import model_mesh, to_global


def continuation_logprobs(logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array):
    """sum_t w[b,t] * log_softmax(logits[b,t])[target[b,t]] and all_t(w -> argmax == target); fp32."""
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    tok_lp = jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0]
    greedy = (jnp.argmax(logits_btv, axis=-1) == targets_bt) | (weights_bt == 0)
    return (tok_lp * weights_bt).sum(-1), greedy.all(-1)


@partial(jax.jit, static_argnames=("graphdef",))
def _score_batch(graphdef, state, ids_bt, mask_bt, targets_bt, weights_bt):
    model = nnx.merge(graphdef, state)
    logits = model(ids_bt, attention_mask=mask_bt)
    return continuation_logprobs(logits, targets_bt, weights_bt)


def score(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8) -> list[tuple[float, bool]]:
    """[(sum of log p(continuation | context), is_greedy)] per (context_ids, continuation_ids) request.

    The context needs at least one token (the first token has nothing to be predicted from).
    """
    t = model.config.text
    if not isinstance(requests, (list, tuple)) or not requests:
        raise InputError("requests must be a non-empty list of (context_ids, continuation_ids)")
    _check_int("batch_size", batch_size, 1)
    ctxs, conts = [], []
    for i, r in enumerate(requests):
        if not isinstance(r, (list, tuple)) or len(r) != 2:
            raise InputError(f"requests[{i}] must be a (context_ids, continuation_ids) pair")
        ctxs.append(validate_ids(r[0], t.vocab_size, f"requests[{i}].context"))
        conts.append(validate_ids(r[1], t.vocab_size, f"requests[{i}].continuation"))
        n = len(ctxs[-1]) + len(conts[-1])
        if n > t.max_position_embeddings:
            raise InputError(f"requests[{i}]: context + continuation = {n} tokens exceeds the context limit "
                             f"max_position_embeddings = {t.max_position_embeddings}")
    mesh = model_mesh(model)
    data = mesh.shape["data"] if mesh is not None else 1
    graphdef, state = nnx.split(model)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: len(ctxs[i]) + len(conts[i]))  # similar lengths together
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        b = -(-_pow2(len(idx)) // data) * data
        tl = _pow2(max(len(ctxs[i]) + len(conts[i]) - 1 for i in idx), 8)
        ids, mask, tgt, w = (np.zeros((b, tl), np.int32) for _ in range(4))
        for row, i in enumerate(idx):
            full = ctxs[i] + conts[i]
            n = len(full) - 1
            ids[row, :n], mask[row, :n], tgt[row, :n] = full[:-1], 1, full[1:]
            w[row, len(ctxs[i]) - 1:n] = 1
        lp, greedy = _score_batch(graphdef, state, *(to_global(x, mesh, ("batch",)) for x in (ids, mask, tgt, w)))
        lp, greedy = np.asarray(jax.device_get(lp)), np.asarray(jax.device_get(greedy))
        for row, i in enumerate(idx):
            results[i] = (float(lp[row]), bool(greedy[row]))
    return results


def perplexity(model, tokens: Sequence[int], window: int = 2048, stride: int | None = None,
               batch_size: int = 8) -> dict:
    """Perplexity of a long token stream with a sliding window (the transformers recipe).

    Windows of `window` tokens start every `stride` tokens (default window // 2); each window scores
    only the tokens no earlier window scored, with the rest of the window as context. Token 0 is
    context only. Returns {"nll": total negative log-likelihood, "tokens": tokens scored, "ppl"}.
    """
    t = model.config.text
    tokens = validate_ids(tokens, t.vocab_size, "tokens")
    _check_int("window", window, 2, t.max_position_embeddings)
    stride = window // 2 if stride is None else stride
    _check_int("stride", stride, 1, window - 1)
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
    nll = -sum(lp for lp, _ in score(model, requests, batch_size))
    n = len(tokens) - 1
    return {"nll": nll, "tokens": n, "ppl": math.exp(nll / n)}
