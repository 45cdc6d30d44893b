"""Host-side checks of what callers pass in: integers, token ids, prompts, image-token counts.

Each check raises one `InputError` naming the argument and the bad entry. The model calls
`check_token_ids` / `check_image_tokens` at its outer boundary only, and only on concrete (host or
committed device) values: inside `jit` they see tracers and do nothing.
"""

from __future__ import annotations

import jax
import numpy as np

from .errors import InputError


def check_int(name, v, lo, hi=None):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InputError(f"{name} must be an integer {rng}, got {v!r}")


def validate_ids(ids, vocab_size: int, name: str) -> list[int]:
    """A non-empty flat list of ints in [0, vocab); the error names the argument and the bad entry."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0:
        raise InputError(f"{name} is empty or not a flat list of token ids (shape {arr.shape}); "
                         "it needs at least one token")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        raise InputError(f"{name}[{bad[0]}] = {int(arr[bad[0]])} is outside the vocabulary [0, {vocab_size})")
    return [int(x) for x in arr]


def validate_prompts(prompts, vocab_size: int, name: str = "prompts") -> list[list[int]]:
    """Refuses an empty batch, an empty prompt and ids outside the vocabulary."""
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InputError(f"{name} must be a non-empty list of token-id lists")
    return [validate_ids(p, vocab_size, f"{name}[{i}]") for i, p in enumerate(prompts)]


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_token_ids(input_ids, vocab_size: int) -> None:
    if not is_concrete(input_ids):
        return
    ids = np.asarray(input_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must be integers, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"input_ids{list(where)} = {int(ids[where])} is outside the vocabulary [0, {vocab_size})")


def check_image_tokens(input_ids, image_token_id: int, n_features: int) -> None:
    if not is_concrete(input_ids):
        return
    n_tokens = int((np.asarray(input_ids) == image_token_id).sum())
    if n_tokens != n_features:
        raise InputError(f"input_ids hold {n_tokens} image tokens (id {image_token_id}) but the images give "
                         f"{n_features} features: each image of height h and width w needs "
                         "(h // (patch*merge)) * (w // (patch*merge)) image tokens")
