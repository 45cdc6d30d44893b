"""Training data: JSONL lines -> token ids with a loss mask -> fixed-shape batches.

Each line is one JSON object, one of:

  {"ids": [1, 3, 17, ...]}                     token ids; every token after the first is a target
  {"text": "..."}                              plain text (needs a tokenizer); every token is a target
  {"messages": [{"role": ..., "content": ...}]} a chat; only assistant turns are targets

A message `content` is a string (needs a tokenizer) or a list of token ids. Roles: system, user,
assistant. The chat is laid out in the v15 format (spec section 4):

  <s>[SYSTEM_PROMPT]system[/SYSTEM_PROMPT][INST]user 1[/INST]assistant 1</s>[INST]user 2[/INST]assistant 2</s>

and the targets are each assistant reply and its `</s>`. Not rendered (yet): the
`[MODEL_SETTINGS]` block, tools, images, `[THINK]` chunks.

Tokenising is one separate step, `tokenize_record(record, tokenizer)`: `tokenizer` is any object
with `encode(text, add_bos=...) -> list[int]`, e.g. `mistral4_jax.tokenizer.Tokenizer`, or None for
token-id data.

Sequences longer than `max_len` are truncated to `max_len` (keeping the start) with one warning
that counts them; an example left with no target token is dropped, with a warning.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import InputError
from ..jsonl import read_jsonl

BOS, EOS, PAD = 1, 2, 11
INST, END_INST, SYSTEM, END_SYSTEM = 3, 4, 17, 18


class Encoder(Protocol):
    def encode(self, text: str, add_bos: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Example:
    ids: np.ndarray  # int32 [T]
    targets: np.ndarray  # bool [T]: True where token t is trained on (predicted from tokens < t)


def _ids(value, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise InputError(f"{where}: expected a list of integer token ids")
    return value


def _content(content, tokenizer: Encoder | None, where: str) -> list[int]:
    if isinstance(content, str):
        if tokenizer is None:
            raise InputError(f"{where}: text content needs a tokenizer (none found with the model); "
                             "give token ids instead, or a model directory with tokenizer files")
        return list(tokenizer.encode(content, add_bos=False))
    return _ids(content, where)


def tokenize_record(record: dict, tokenizer: Encoder | None, where: str = "record") -> Example:
    """One JSON record -> Example(ids, targets). See the module docstring for the formats."""
    if "messages" in record:
        return _chat(record["messages"], tokenizer, where)
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


def _chat(messages, tokenizer: Encoder | None, where: str) -> Example:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    ids, targets = [BOS], [False]

    def add(tokens, train: bool):
        ids.extend(tokens)
        targets.extend([train] * len(tokens))

    for i, m in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"{at}: expected an object with 'role' and 'content'")
        role, content = m["role"], _content(m["content"], tokenizer, at)
        if role == "system":
            add([SYSTEM, *content, END_SYSTEM], False)
        elif role == "user":
            add([INST, *content, END_INST], False)
        elif role == "assistant":
            add([*content, EOS], True)
        else:
            raise InputError(f"{at}: role {role!r} is not supported (expected system, user or assistant)")
    return Example(np.asarray(ids, np.int32), np.asarray(targets, bool))


def load_examples(path: str | os.PathLike, tokenizer: Encoder | None, max_len: int,
                  vocab_size: int | None = None) -> list[Example]:
    """Read, tokenise, validate and truncate a JSONL file (see the module docstring)."""
    examples, truncated, dropped = [], 0, 0
    for n, rec in read_jsonl(path, "'messages', 'text' or 'ids'"):
        where = f"{path}:{n}"
        ex = tokenize_record(rec, tokenizer, where)
        if vocab_size is not None and len(ex.ids) and (ex.ids.min() < 0 or ex.ids.max() >= vocab_size):
            raise InputError(f"{where}: token id outside the vocabulary [0, {vocab_size})")
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
    targets bool [B, T].
    """
    n = len(examples)
    ids = np.full((batch_size, seq_len), PAD, np.int32)
    mask = np.zeros((batch_size, seq_len), np.int32)
    targets = np.zeros((batch_size, seq_len), bool)
    for row in range(batch_size):
        g = position + row
        ex = examples[epoch_order(n, seed, g // n)[g % n]]
        t = len(ex.ids)
        ids[row, :t], mask[row, :t], targets[row, :t] = ex.ids, 1, ex.targets
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}
