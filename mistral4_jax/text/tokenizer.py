"""The Tekken v15 tokenizer on the `tokenizers` library (docs/model.md 4).

Two on-disk layouts are read:

- `tekken.json` (native, authoritative): a tiktoken-style byte BPE given as a ranked list of base64
  byte strings plus the split regex `config.pattern`. Ids 0..num_special-1 are special tokens (unused
  slots become `<SPECIAL_i>`); BPE rank r has id r + num_special. It is converted at load to a
  byte-level `tokenizers` BPE whose merges are derived from the ranks (the standard tiktoken
  conversion, as transformers' `convert_tekken_tokenizer` does).
- `tokenizer.json` (HF layout), as `convert_tekken_tokenizer` writes it.

Plain text is always encoded as text: a user typing "[INST]" gets the characters, never the control
token (as mistral-common's Tekkenizer does). Control tokens enter a prompt only through the chat
template (`mistral4_jax.text.chat`).
"""

from __future__ import annotations

import base64
import functools
import json
import os
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from . import chat
from ..config import ModelConfig
from ..errors import CheckpointError, InputError
from .images import ImageConfig

# Special tokens by id (docs/model.md 4). Ids 20..31 are not needed by this package and are not listed.
SPECIAL_TOKENS = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]", 6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]", 10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]",
    13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]", 16: "[SUFFIX]", 17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]", 32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]", 36: "[MODEL_SETTINGS]",
    37: "[/MODEL_SETTINGS]",
}
# Attribute name -> token string, for the ids a chat prompt needs.
SPECIAL_ATTRS = {
    "unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>", "inst": "[INST]", "inst_end": "[/INST]",
    "available_tools": "[AVAILABLE_TOOLS]", "available_tools_end": "[/AVAILABLE_TOOLS]",
    "tool_results": "[TOOL_RESULTS]", "tool_results_end": "[/TOOL_RESULTS]", "tool_calls": "[TOOL_CALLS]",
    "args": "[ARGS]", "call_id": "[CALL_ID]", "img": "[IMG]", "img_break": "[IMG_BREAK]", "img_end": "[IMG_END]",
    "system_prompt": "[SYSTEM_PROMPT]", "system_prompt_end": "[/SYSTEM_PROMPT]", "think": "[THINK]",
    "think_end": "[/THINK]", "model_settings": "[MODEL_SETTINGS]", "model_settings_end": "[/MODEL_SETTINGS]",
}
SPECIAL_FILLER = "<SPECIAL_{id}>"
# The tokenizer files a model directory may hold, the authoritative one first.
TOKENIZER_FILES = ("tekken.json", "tokenizer.json")
# Tokenizer, processor and generation files that travel with a model's weights (copied by the converter
# and by fine-tuning's export, so that the written directory is a complete model).
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "tekken.json",
               "chat_template.jinja", "chat_template.json", "processor_config.json", "preprocessor_config.json",
               "generation_config.json", "SYSTEM_PROMPT.txt")
# The split regex of the released tekken.json (`config.pattern`).
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: each byte as one printable character (what `ByteLevel` uses)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bytes_to_str(b: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[x] for x in b)


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to a tiktoken rank table.

    A token t of rank r is made by every split t = l + r' whose halves are both tokens; those merges
    get t's rank as priority (ties by the halves' ranks). Sorting all merges by priority gives the
    merge list for which lowest-rank-pair-first BPE reproduces tiktoken's encoding.
    """
    merges = []
    for token, rank in ranks.items():
        local = [(token[:i], token[i:]) for i in range(1, len(token))
                 if token[:i] in ranks and token[i:] in ranks]
        local.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges.extend((rank, lr) for lr in local)
    merges.sort(key=lambda m: m[0])
    return [lr for _, lr in merges]


def bpe_from_ranks(ranks: dict[bytes, int], pattern: str, specials: list[str]) -> tokenizers.Tokenizer:
    """A byte-level `tokenizers` BPE with ids 0..len(specials)-1 for `specials` and rank + len(specials)
    for the byte tokens; pre-tokenized by `pattern` (isolated matches), then mapped to bytes."""
    n = len(specials)
    vocab = {_bytes_to_str(tok): rank + n for tok, rank in ranks.items()}
    for i, s in enumerate(specials):
        vocab[s] = i
    merges = [(_bytes_to_str(a), _bytes_to_str(b)) for a, b in merges_from_ranks(ranks)]
    # ignore_merges: a piece that is itself a token maps to it directly, as tiktoken does.
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def read_tekken(path: str | os.PathLike) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """Parse a `tekken.json` into a `tokenizers.Tokenizer`; also returns the file's parsed JSON."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        cfg = raw["config"]
        pattern = cfg["pattern"]
        entries = raw["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable tekken.json (needs 'config.pattern' and 'vocab'): "
                              f"{e!r}") from None
    declared = sorted(raw.get("special_tokens") or [], key=lambda s: s["rank"])
    if [s["rank"] for s in declared] != list(range(len(declared))):
        raise CheckpointError(f"{path}: special_tokens ranks must be 0, 1, 2, ... without gaps")
    num_special = cfg.get("default_num_special_tokens", len(declared))
    if num_special < len(declared):
        raise CheckpointError(f"{path}: default_num_special_tokens {num_special} < {len(declared)} special_tokens")
    specials = [s["token_str"] for s in declared]
    specials += [SPECIAL_FILLER.format(id=i) for i in range(len(declared), num_special)]
    vocab_size = cfg.get("default_vocab_size")
    if vocab_size is not None:
        entries = entries[: vocab_size - num_special]  # the file may carry more ranks than the model uses
    ranks = {}
    for i, e in enumerate(entries):
        try:
            rank, token = e.get("rank", i), base64.b64decode(e["token_bytes"], validate=True)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: vocab entry {i} needs base64 'token_bytes': {err!r}") from None
        if rank != i:
            raise CheckpointError(f"{path}: vocab entry {i} has rank {rank}, expected {i}")
        ranks[token] = i
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointError(f"{path}: the byte vocabulary lacks {len(missing)} single bytes (e.g. {missing[:3]})")
    return bpe_from_ranks(ranks, pattern, specials), raw


class Tokenizer:
    """Tekken v15 tokenizer: text <-> ids, special ids as attributes, and the chat template.

    Attributes `bos`, `eos`, `pad`, `unk`, `inst`, `inst_end`, `img`, `img_break`, `img_end`, `think`,
    `think_end`, `model_settings`, ... (see `SPECIAL_ATTRS`) are the special ids. `image_config` holds
    the image preprocessing settings when the tokenizer directory says them (a `config.json` with a
    `vision_config`, or the `image` section of `tekken.json`); None otherwise.
    """

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "<memory>",
                 image_config: ImageConfig | None = None):
        self.backend = backend
        self.source = source
        self.image_config = image_config
        self.backend.encode_special_tokens = True  # text is text: "[INST]" typed by a user is not a control token
        missing = []
        for attr, token in SPECIAL_ATTRS.items():
            i = backend.token_to_id(token)
            if i is None:
                missing.append(token)
            setattr(self, attr, i)
        if missing:
            raise CheckpointError(f"{source}: the tokenizer lacks the special tokens {missing} (a Tekken v15 "
                                  f"tokenizer has them at the ids of docs/model.md 4)")
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, image_config: ImageConfig | None = None) -> Tokenizer:
        """Load from a directory holding `tekken.json` (preferred: it is the authoritative file) or
        `tokenizer.json`, or from either file directly.

        `image_config` overrides the image settings read from the directory's `config.json` (the
        model's `vision_config`) or from `tekken.json`'s `image` section.
        """
        p = Path(path)
        if p.is_dir():
            candidates = [p / f for f in TOKENIZER_FILES]
            file = next((c for c in candidates if c.is_file()), None)
            if file is None:
                raise CheckpointError(f"{p}: no tekken.json or tokenizer.json in this directory")
        elif p.is_file():
            file = p
        else:
            raise CheckpointError(f"{p}: no such tokenizer file or directory")
        raw = None
        if _is_tekken(file):
            backend, raw = read_tekken(file)
        else:
            try:
                backend = tokenizers.Tokenizer.from_file(str(file))
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                raise CheckpointError(f"{file}: not a readable tokenizer.json: {e}") from None
        if image_config is None:
            image_config = _image_config_near(file, raw)
        return cls(backend, str(file), image_config)

    @classmethod
    def find(cls, model_dir: str | os.PathLike, required: bool = True) -> Tokenizer | None:
        """The tokenizer beside a model: `model_dir`'s tekken.json or tokenizer.json (or the file itself).

        A directory without either file raises a CheckpointError that says what to do, or gives None
        when `required` is False (token-id data needs no tokenizer).
        """
        d = Path(model_dir)
        if d.is_dir() and not any((d / f).is_file() for f in TOKENIZER_FILES):
            if not required:
                return None
            raise CheckpointError(f"{d}: no tokenizer beside the model (expected tekken.json or tokenizer.json in "
                                  "this directory; copy the one from the HF repository, or give token ids)")
        return cls.from_pretrained(d)

    # ------------------------------------------------------------------ text
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text` (control-token strings inside it are encoded as plain text)."""
        if not isinstance(text, str):
            raise InputError(f"encode: text must be a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos] * add_bos + ids + [self.eos] * add_eos

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens appear as their strings unless `skip_special_tokens`."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"decode: ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def is_special(self, i: int) -> bool:
        return int(i) in self._special_ids

    def save(self, path: str | os.PathLike) -> Path:
        """Write the HF-layout `tokenizer.json` to the directory `path`; returns the file."""
        out = Path(path) / "tokenizer.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        self.backend.save(str(tmp))
        os.replace(tmp, out)
        return out

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages, reasoning_effort: str | None = "none", tools=None,
                            add_generation_prompt: bool = True, continue_final_message: bool = False,
                            image_config: ImageConfig | None = None):
        """The v15 chat prompt of `messages`: see `mistral4_jax.text.chat.apply_chat_template`."""
        return chat.apply_chat_template(self, messages, reasoning_effort=reasoning_effort, tools=tools,
                                        add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message, image_config=image_config)

    def parse_output(self, ids):
        """Reasoning, answer and tool calls of generated ids: see `mistral4_jax.text.chat.parse_output`."""
        return chat.parse_output(self, ids)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


def _is_tekken(file: Path) -> bool:
    if file.name.startswith("tekken"):
        return True
    if file.name == "tokenizer.json":
        return False
    try:
        with open(file, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e}") from None
    return b'"pattern"' in head or b'"default_num_special_tokens"' in head


def _image_config_near(file: Path, tekken: dict | None) -> ImageConfig | None:
    """Image settings from `config.json` beside the tokenizer (the model's), else from tekken.json."""
    cfg_file = file.parent / "config.json"
    if cfg_file.is_file():
        cfg = ModelConfig.from_json_file(cfg_file)
        if cfg.vision is not None:
            return ImageConfig.from_model_config(cfg)
    img = (tekken or {}).get("image")
    if img:
        try:
            return ImageConfig(int(img["max_image_size"]), int(img["image_patch_size"]),
                               int(img.get("spatial_merge_size", 1)))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: malformed 'image' section: {e!r}") from None
    return None
