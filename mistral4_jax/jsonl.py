"""JSON-lines input files (evaluation and training data), read with errors that name the line."""

from __future__ import annotations

import json
import os

from .errors import InputError


def read_jsonl(path: str | os.PathLike, expected: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `path`.

    `expected` describes the objects (e.g. "'messages', 'text' or 'ids'") for the error messages: an
    unreadable file, a line that is not JSON or not an object, and a file with no records each raise
    one InputError naming the file (and line).
    """
    records = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read the data file ({e.strerror})") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{n}: expected a JSON object with {expected}")
            records.append((n, obj))
    if not records:
        raise InputError(f"{path}: the dataset is empty (expected JSON lines with {expected})")
    return records
