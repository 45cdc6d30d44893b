"""generate(): validate a batch of requests on the host, then run them through an `Engine`.

Nothing is compiled for a bad request. The requests are submitted to an `engine.Engine` sized for them:
`batch_size` slots decode at once and a finished request's slot is refilled from the waiting ones
(continuous batching), within a page pool of `cache_tokens`; outputs come back in input order. Sampling
parameters and stop ids are traced values: changing them does not recompile; prompt chunks, cache length,
pool size and slot counts are bucketed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from ..errors import InputError
from ..inputs import check_image_tokens, check_int, validate_ids, validate_prompts
from ..sharding import batch_divisor, model_mesh
from . import engine
from .batching import pow2
from .engine import MAX_STOP_SEQUENCES, MAX_STOP_TOKENS, STOP_WIDTH, cut_at_stop_strings

__all__ = ["generate", "generated_text", "cut_at_stop_strings"]

_image_features = engine.image_features  # the vision program (one per image bucket; tests count its compiles)


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, pixel_values=None, image_sizes=None,
             callback: Callable | None = None, prefill_chunk: int = 512, *, batch_size: int | None = None,
             stop_sequences: Sequence[Sequence[int]] | None = None, stop_strings=None,
             tokenizer=None, cache_tokens: int | None = None) -> list[list[int]]:
    """New token ids for each prompt, in input order (a list per prompt, ending with the token that
    stopped it, if one did).

    prompts: token-id lists of any lengths (at least one token each). max_new_tokens: one int for
    all, or one per prompt. temperature 0 is greedy; top_k 0 keeps every token; top_p in (0, 1].
    seed makes sampling reproducible: prompt i draws its k-th token with fold_in(fold_in(key(seed), i),
    k), whatever else is in the batch. pixel_values [N, C, H, W] / image_sizes [N, 2] fill the `[IMG]`
    tokens of the prompts in order, as `model(...)` does.

    batch_size: the most sequences decoded at once; the other prompts wait and take the slot of the first
    request to finish, their prefill inserted chunk by chunk between decode steps. Default
    (`engine.default_batch_size`): the prompts rounded up to a power of two, capped at 32 on the CPU and
    256 on an accelerator, and on an accelerator at the rows whose cache and the compiled programs'
    temporaries fit in the device's free memory. cache_tokens: the capacity in tokens of the page pool the
    running requests share (default: batch_size times the longest request, rounded up); a request needs
    pages for its prompt and new tokens, identical prompt prefixes share theirs, and when the pool runs out
    a request waits (or, decoding, is recomputed later). A request longer than cache_tokens is an InputError.

    Stops (a request ends at the first that applies; its output keeps what ended it):
    - stop_tokens: ids (default: the config's eos ids; [] for none), at most 8;
    - stop_sequences: token-id lists (at most 8): the request's last generated tokens equal one;
    - stop_strings with `tokenizer`: strings (for every prompt) or one list of strings per prompt:
      the text of the generated ids (tokenizer.decode(ids, skip_special_tokens=True)) contains one.
      Checked on the host after every token, so the ids end with the token that completed the string
      (its slot is freed within STEPS_PER_CALL_WATCHED = 8 decode steps); `generated_text(tokenizer,
      ids, strings)` gives the text cut exactly as lm-eval's generate_until cuts it.

    callback(step, tokens): called on the host as tokens arrive, once per engine step, with one entry
    per prompt: the prompt's new token, or None (it is waiting, being prefilled, or has stopped).
    step 0 carries the first tokens of the prompts that start at once. prefill_chunk (a power of two)
    bounds prefill activation memory.
    """
    cfg = model.config
    t = cfg.text
    prompts = validate_prompts(prompts, t.vocab_size)
    limits = _limits(max_new_tokens, len(prompts))
    check_int("top_k", top_k, 0)
    check_int("seed", seed, 0)
    check_int("prefill_chunk", prefill_chunk, 1)
    if batch_size is not None:
        check_int("batch_size", batch_size, 1)
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
    seqs = [] if stop_sequences is None else list(stop_sequences)
    if len(seqs) > MAX_STOP_SEQUENCES:
        raise InputError(f"stop_sequences: at most {MAX_STOP_SEQUENCES} sequences, got {len(seqs)}")
    seqs = [validate_ids(q, t.vocab_size, f"stop_sequences[{i}]") for i, q in enumerate(seqs)]
    text_stops = _text_stops(stop_strings, tokenizer, len(prompts))
    for i, (p, m) in enumerate(zip(prompts, limits)):
        if len(p) + m > t.max_position_embeddings:
            raise InputError(f"prompts[{i}] ({len(p)} tokens) plus max_new_tokens ({m}) exceeds the context "
                             f"limit max_position_embeddings = {t.max_position_embeddings}")
    if cache_tokens is not None:
        check_int("cache_tokens", cache_tokens, 1)
    images = _images_per_prompt(model, prompts, pixel_values, image_sizes)

    data = batch_divisor(model_mesh(model))
    lens = [len(p) for p in prompts]
    chunk = min(prefill_chunk, pow2(max(lens), 8))
    cache_len = engine.cache_length(lens, limits, chunk)
    rows = None if batch_size is None else -(-min(batch_size, pow2(len(prompts))) // data) * data
    eng = engine.Engine(model, batch_size=rows, cache_tokens=cache_tokens, max_len=cache_len, prefill_chunk=chunk,
                        stop_width=max(STOP_WIDTH, pow2(max((len(q) for q in seqs), default=1))),
                        watch=callback is not None or any(text_stops or []), expected_requests=len(prompts))
    base = jax.random.PRNGKey(seed)
    requests = [eng.submit(p, max_new_tokens=m, temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop,
                           stop_sequences=seqs, images=images[i],
                           key=np.asarray(jax.random.key_data(jax.random.fold_in(base, i))))
                for i, (p, m) in enumerate(zip(prompts, limits))]
    for r, ts in zip(requests, text_stops or [None] * len(prompts)):
        r.text_stop = ts
    index = {r.id: i for i, r in enumerate(requests)}
    step = 0
    while eng.busy:
        eng.step()
        for events in eng.events:
            if callback is not None:
                toks = [None] * len(prompts)
                for req, tok in events:
                    toks[index[req.id]] = tok
                callback(step, toks)
            step += 1
    return [r.tokens for r in requests]


def _images_per_prompt(model, prompts, pixel_values, image_sizes) -> list:
    """(pixel_values, image_sizes) of each prompt's images, or None: images fill the [IMG] tokens in order, batch
    row by batch row, as `model(...)` consumes them."""
    if pixel_values is None:
        return [None] * len(prompts)
    layout = model.layout_for(pixel_values, image_sizes)  # validates the shapes and sizes
    check_image_tokens(np.concatenate([np.asarray(p) for p in prompts]), model.config.image_token_id,
                       sum(layout.tokens_per_image))
    px = np.asarray(pixel_values)
    sizes = np.asarray(image_sizes) if image_sizes is not None else np.asarray([px.shape[2:]] * len(px))
    out, j = [], 0
    for i, p in enumerate(prompts):
        want, k = int(np.sum(np.asarray(p) == model.config.image_token_id)), j
        while want > 0 and k < len(layout.tokens_per_image):
            want -= layout.tokens_per_image[k]
            k += 1
        if want != 0:
            raise InputError(f"prompts[{i}]: its [IMG] tokens do not match whole images of pixel_values (images are "
                             "consumed in order, prompt by prompt)")
        out.append(None if k == j else (px[j:k], sizes[j:k]))
        j = k
    return out


def generated_text(tokenizer, ids: Sequence[int], stop_strings: Sequence[str] = ()) -> str:
    """The text of generated ids as lm-eval's generate_until returns it: decoded with
    skip_special_tokens=True, then cut before the first occurrence of each stop string in turn."""
    return cut_at_stop_strings(tokenizer.decode(list(ids), skip_special_tokens=True), stop_strings)


def _limits(max_new_tokens, n: int) -> list[int]:
    """max_new_tokens as one int per prompt."""
    if isinstance(max_new_tokens, (list, tuple, np.ndarray)):
        limits = list(max_new_tokens)
        if len(limits) != n:
            raise InputError(f"max_new_tokens has {len(limits)} entries for {n} prompts: give one int, or one "
                             "per prompt")
        for i, m in enumerate(limits):
            check_int(f"max_new_tokens[{i}]", m, 1)
        return [int(m) for m in limits]
    check_int("max_new_tokens", max_new_tokens, 1)
    return [int(max_new_tokens)] * n


def _text_stops(stop_strings, tokenizer, n: int):
    """One `TextStop` (or None) per prompt, from strings for all prompts or one list per prompt."""
    if stop_strings is None:
        return None
    if isinstance(stop_strings, str) or not isinstance(stop_strings, (list, tuple)):
        raise InputError("stop_strings must be a list of strings, or one list of strings per prompt")
    per_prompt = bool(stop_strings) and all(isinstance(s, (list, tuple)) for s in stop_strings)
    lists = list(stop_strings) if per_prompt else [stop_strings] * n
    if len(lists) != n:
        raise InputError(f"stop_strings has {len(lists)} lists for {n} prompts")
    for i, ss in enumerate(lists):
        if not all(isinstance(s, str) for s in ss):
            raise InputError(f"stop_strings[{i}] must hold only strings, got {ss!r}")
    if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
        raise InputError("stop_strings need tokenizer= (an object with decode(ids, skip_special_tokens=...))")
    return [engine.TextStop(tokenizer, ss) if any(ss) else None for ss in lists]
