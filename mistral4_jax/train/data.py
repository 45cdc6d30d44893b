"""Training data: JSONL lines -> token ids with a loss mask -> fixed-shape batches.

Each line is one JSON object, one of:

  {"ids": [1, 3, 17, ...]}                     token ids; every token after the first is a target
  {"text": "..."}                              plain text (needs a tokenizer); every token is a target
  {"messages": [...], "reasoning_effort": "none" | "high", "tools": [...]}
                                               a finished chat (needs the model's tokenizer)

A chat is rendered by the one v15 renderer, `mistral4_jax.text.chat` (the same ids `chat`, `generate`
and the servers write): `[MODEL_SETTINGS]` block, tools, `[THINK]` parts and tool calls included.
`messages`, `reasoning_effort` and `tools` are what `apply_chat_template` takes (images too: they are
preprocessed with the model's image settings and go through the vision tower in the train step); the
conversation ends with an assistant turn. The targets are the assistant tokens: text, thinking, tool calls and each
turn's closing `</s>` (`ChatPrompt.assistant_mask`); system, user and tool turns and the settings and
tools blocks are context only. Why: the model only ever writes assistant turns, so those are what it
learns; `</s>` is a target so that it learns where a turn ends (and `[TOOL_CALLS]` so that it learns
when to call); the rest is written by people, tools or the template and is given, never predicted.
Every assistant turn is trained, not only the last, as mistral-common's fine-tuning messages default
to (weight 1).

Tokenising is one separate step, `tokenize_record(record, tokenizer)`: `tokenizer` is a
`mistral4_jax.text.tokenizer.Tokenizer` (for "text" any object with `encode(text, add_bos=...)`
will do), or None for token-id data.

Sequences longer than `max_len` are truncated to `max_len` (keeping the start) with one warning
that counts them (a record with images is refused instead: its image blocks cannot be cut); an
example left with no target token is dropped, with a warning.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import InputError
from ..jsonl import read_jsonl
from ..text.chat import training_prompt
from ..text.images import batch_images

PAD = 11  # the v15 <pad> id (docs/model.md 4); padded positions are masked out of the loss


class Encoder(Protocol):
    def encode(self, text: str, add_bos: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Example:
    ids: np.ndarray  # int32 [T]
    targets: np.ndarray  # bool [T]: True where token t is trained on (predicted from tokens < t)
    images: tuple[np.ndarray, ...] = ()  # float32 [3, H, W] each, in the order of their [IMG] blocks


def _ids(value, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise InputError(f"{where}: expected a list of integer token ids")
    return value


def tokenize_record(record: dict, tokenizer: Encoder | None, where: str = "record") -> Example:
    """One JSON record -> Example(ids, targets). See the module docstring for the formats."""
    if "messages" in record:
        return _chat(record, tokenizer, where)
    if "text" in record:
        if not isinstance(record["text"], str):
            raise InputError(f"{where}: 'text' must be a string")
        if tokenizer is None:
            raise InputError(f"{where}: 'text' needs a tokenizer (none found with the model); give 'ids' instead")
        ids = list(tokenizer.encode(record["text"], add_bos=True))
    elif "ids" in record:
        ids = _ids(record["ids"], f"{where}: 'ids'")
    else:
        raise InputError(f"{where}: no 'messages', 'text' or 'ids' field (keys: {sorted(record)})")
    targets = np.ones(len(ids), bool)
    targets[:1] = False
    return Example(np.asarray(ids, np.int32), targets)


def _chat(record: dict, tokenizer, where: str) -> Example:
    if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
        raise InputError(f"{where}: a 'messages' record needs the model's tokenizer (none found with the model: "
                         "put its tekken.json beside the model), or give 'ids' instead")
    try:
        prompt = training_prompt(tokenizer, record["messages"], reasoning_effort=record.get("reasoning_effort"),
                                 tools=record.get("tools"))
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    images = tuple(prompt.pixel_values[k, :, :h, :w] for k, (h, w) in enumerate(prompt.image_sizes)) \
        if prompt.num_images else ()
    return Example(np.asarray(prompt.input_ids, np.int32), np.asarray(prompt.assistant_mask, bool), images)


def load_examples(path: str | os.PathLike, tokenizer: Encoder | None, max_len: int,
                  vocab_size: int | None = None) -> list[Example]:
    """Read, tokenise, validate and truncate a JSONL file (see the module docstring)."""
    examples, truncated, dropped = [], 0, 0
    for n, rec in read_jsonl(path, "'messages', 'text' or 'ids'"):
        where = f"{path}:{n}"
        ex = tokenize_record(rec, tokenizer, where)
        if vocab_size is not None and len(ex.ids) and (ex.ids.min() < 0 or ex.ids.max() >= vocab_size):
            raise InputError(f"{where}: token id outside the vocabulary [0, {vocab_size})")
        if len(ex.ids) > max_len and ex.images:
            raise InputError(f"{where}: a record with images is {len(ex.ids)} tokens, longer than max_len={max_len}; "
                             "its image blocks cannot be cut: raise max_len or shorten the record")
        if len(ex.ids) > max_len:
            truncated += 1
            ex = Example(ex.ids[:max_len], ex.targets[:max_len])
        if not ex.targets.any():
            dropped += 1
            continue
        examples.append(ex)
    if truncated:
        warnings.warn(f"{path}: {truncated} sequence(s) longer than max_len={max_len} tokens were truncated "
                      "to their first max_len tokens", stacklevel=2)
    if dropped:
        warnings.warn(f"{path}: {dropped} example(s) with no target token were skipped", stacklevel=2)
    if not examples:
        raise InputError(f"{path}: no example has a token to train on")
    return examples


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so a resumed run repeats it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def make_batch(examples: list[Example], position: int, batch_size: int, seq_len: int, seed: int) -> dict:
    """The batch that starts at global example `position` (epochs follow each other, each shuffled).

    Returns numpy arrays: input_ids int32 [B, T] (padded with <pad>), attention_mask int32 [B, T],
    targets bool [B, T]; and when the rows hold images, pixel_values float32 [N, 3, H, W] and
    image_sizes int32 [N, 2] of all of them in row order (as the model takes them: `batch_images`).
    """
    n = len(examples)
    ids = np.full((batch_size, seq_len), PAD, np.int32)
    mask = np.zeros((batch_size, seq_len), np.int32)
    targets = np.zeros((batch_size, seq_len), bool)
    images = []
    for row in range(batch_size):
        g = position + row
        ex = examples[epoch_order(n, seed, g // n)[g % n]]
        t = len(ex.ids)
        ids[row, :t], mask[row, :t], targets[row, :t] = ex.ids, 1, ex.targets
        images += ex.images
    batch = {"input_ids": ids, "attention_mask": mask, "targets": targets}
    if images:
        batch["pixel_values"], batch["image_sizes"] = batch_images(images)
    return batch
