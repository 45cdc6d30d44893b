"""A small Tekken v15 tokenizer in the released `tekken.json` layout (demo and tests; no download).

Its byte BPE is trained with the `tokenizers` trainer on a short text embedded here, with the released
split regex, and written as a tiktoken-style ranked vocabulary: the 256 single bytes (ranks 0..255),
then the merged tokens in the order the trainer made them. The special ids are the real v15 ones
(docs/model.md 4); only the number of special slots and of BPE ranks is smaller.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import tokenizers
from tokenizers import Regex, models, pre_tokenizers, trainers

from ..text.images import ImageConfig
from ..text.tokenizer import SPECIAL_FILLER, SPECIAL_TOKENS, TEKKEN_PATTERN, byte_to_unicode

CORPUS = """\
Mistral Small 4 is a hybrid model: it answers instantly or reasons step by step, reads images, and calls tools.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine, thank you.
The model has 36 layers, 128 experts and a vocabulary of 131072 tokens. It runs in JAX on CPUs, GPUs and TPUs.
A picture is worth a thousand words. What is the capital of France? The capital of France is Paris.
Please describe this image in one sentence. The image shows a red square on a white background.
def add(a, b):
    return a + b
for i in range(10):
    print(i, i * i)
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
The weather in Paris is sunny, 21 degrees. Tomorrow it will rain in London and snow in Oslo.
Les modèles de langue apprennent à prédire le mot suivant. Où est la gare ? À gauche, après le café.
Die Würfel sind gefallen. Größe, Straße, schön, Grüße aus München.
La función común de los días festivos en España. ¿Dónde está la biblioteca? Mañana será otro día.
日本語の文章も少し含めます。東京は日本の首都です。こんにちは、世界。
中文也可以。你好，世界。今天天气很好。
Русский текст: привет, мир. Как дела? Всё хорошо.
Emoji: 🎉 🚀 😀 👍 ❤️ — and symbols like € £ ¥ © ® ™ ± × ÷.
Think before you answer. First, list the facts. Second, check them. Finally, give a short answer.
"""


def train_ranks(text: str = CORPUS, num_merges: int = 668) -> list[bytes]:
    """A ranked byte vocabulary: the 256 bytes, then up to `num_merges` tokens merged by BPE training
    on `text` (split by the released tekken regex), in the order they were made."""
    model = tokenizers.Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TEKKEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=256 + num_merges, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(text.splitlines(keepends=True), trainer)
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    ranks = [bytes([b]) for b in range(256)]
    seen = set(ranks)
    for merge in json.loads(model.to_str())["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        tok = bytes(to_byte[c] for c in left + right)
        if tok not in seen:
            seen.add(tok)
            ranks.append(tok)
    return ranks[: 256 + num_merges]


def tekken_json(ranks: list[bytes], num_special: int = 100, image_config: ImageConfig | None = None) -> dict:
    """The `tekken.json` content for a ranked vocabulary, with the v15 special tokens."""
    if num_special <= max(SPECIAL_TOKENS):
        raise ValueError(f"num_special must exceed {max(SPECIAL_TOKENS)} (the v15 special ids), got {num_special}")
    specials = [{"rank": i, "token_str": SPECIAL_TOKENS.get(i, SPECIAL_FILLER.format(id=i)), "is_control": True}
                for i in range(num_special)]
    out = {
        "config": {
            "pattern": TEKKEN_PATTERN,
            "num_vocab_tokens": len(ranks),
            "default_vocab_size": num_special + len(ranks),
            "default_num_special_tokens": num_special,
            "version": "v15",
        },
        "vocab": [{"rank": r, "token_bytes": base64.b64encode(t).decode("ascii"),
                   "token_str": t.decode("utf-8", errors="replace")} for r, t in enumerate(ranks)],
        "special_tokens": specials,
        "model_settings_builder": {"reasoning_effort": {"values": ["none", "high"], "accepts_none": True,
                                                        "default": "none"}},
    }
    if image_config is not None:
        out["image"] = {"image_patch_size": image_config.patch_size, "max_image_size": image_config.image_size,
                        "spatial_merge_size": image_config.spatial_merge_size}
    return out


def write_tekken(directory: str | os.PathLike, vocab_size: int = 1024, num_special: int = 100,
                 image_config: ImageConfig | None = None) -> Path:
    """Write `directory/tekken.json` with at most `vocab_size` ids in all; returns the file."""
    ranks = train_ranks(num_merges=max(vocab_size - num_special - 256, 0))
    out = Path(directory) / "tekken.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(tekken_json(ranks, num_special, image_config), ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out)
    return out
