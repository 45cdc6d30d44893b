"""The Tekken tokenizer: both on-disk layouts, against tiktoken's algorithm and transformers' converter."""

import base64
import json
import math

import pytest
import regex

from mistral4_jax import CheckpointError, InputError
from mistral4_jax.demo.synthetic_tokenizer import write_tekken
from mistral4_jax.text.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "función común días 日本語 🎉",
    "Grüße aus München — Всё хорошо. 你好，世界。",
    "emoji 👍🏽 ❤️ 🚀🚀 and a rare one 🦜",
    "def add(a, b):\n    return a + b\n\n\n\tx = 12345",
    "  leading spaces, trailing spaces   ",
    "[INST] not a control token </s> <s> [IMG]",
    "",
]
# docs/model.md 4: the v15 special ids.
SPEC_IDS = {"unk": 0, "bos": 1, "eos": 2, "inst": 3, "inst_end": 4, "available_tools": 5, "available_tools_end": 6,
            "tool_results": 7, "tool_results_end": 8, "tool_calls": 9, "img": 10, "pad": 11, "img_break": 12,
            "img_end": 13, "system_prompt": 17, "system_prompt_end": 18, "args": 32, "call_id": 33, "think": 34,
            "think_end": 35, "model_settings": 36, "model_settings_end": 37}


def tiktoken_encode(text, ranks, pattern, num_special):
    """tiktoken's algorithm written out: split by the regex; a piece that is a token is that token;
    otherwise merge the adjacent pair whose concatenation has the lowest rank (leftmost first)."""
    out = []
    for m in regex.finditer(pattern, text):
        piece = m.group().encode("utf-8")
        if piece in ranks:
            out.append(ranks[piece] + num_special)
            continue
        parts = [bytes([b]) for b in piece]
        while len(parts) > 1:
            cand = [ranks.get(parts[i] + parts[i + 1], math.inf) for i in range(len(parts) - 1)]
            i = min(range(len(cand)), key=cand.__getitem__)
            if cand[i] == math.inf:
                break
            parts[i: i + 2] = [parts[i] + parts[i + 1]]
        out += [ranks[p] + num_special for p in parts]
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """tekken.json (100 specials), the tokenizer.json transformers' converter makes from it, and a
    tekken.json with the real 1000 specials."""
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    root = tmp_path_factory.mktemp("tok")
    tekken = write_tekken(root / "tekken", vocab_size=1024, num_special=100)
    hf_dir = root / "hf"
    hf_dir.mkdir()
    convert_tekken_tokenizer(str(tekken)).backend_tokenizer.save(str(hf_dir / "tokenizer.json"))
    big = write_tekken(root / "tekken1000", vocab_size=1000 + 924, num_special=1000)
    return {"tekken": tekken, "hf": hf_dir / "tokenizer.json", "tekken1000": big}


@pytest.fixture(scope="module")
def tok(files):
    return Tokenizer.from_pretrained(files["tekken"].parent)


def _ranks(path):
    raw = json.loads(path.read_text())
    return {base64.b64decode(e["token_bytes"]): e["rank"] for e in raw["vocab"]}, raw["config"]["pattern"]


def test_special_ids_follow_spec(tok, files):
    for attr, i in SPEC_IDS.items():
        assert getattr(tok, attr) == i, attr
    big = Tokenizer.from_pretrained(files["tekken1000"])
    for attr, i in SPEC_IDS.items():
        assert getattr(big, attr) == i, attr
    assert big.id_to_token(999) == "<SPECIAL_999>" and big.id_to_token(20) == "<SPECIAL_20>"
    assert tok.is_special(34) and not tok.is_special(100)


def test_tekken_matches_tiktoken_algorithm(tok, files):
    ranks, pattern = _ranks(files["tekken"])
    for text in TEXTS:
        assert tok.encode(text) == tiktoken_encode(text, ranks, pattern, 100), text


def test_tekken_1000_specials_shift_ids(tok, files):
    big = Tokenizer.from_pretrained(files["tekken1000"])
    ranks, pattern = _ranks(files["tekken1000"])
    for text in TEXTS:
        assert big.encode(text) == tiktoken_encode(text, ranks, pattern, 1000), text
    assert big.vocab_size == 1000 + len(ranks)


def test_both_layouts_give_identical_ids(tok, files):
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    hf_layout = Tokenizer.from_pretrained(files["hf"])
    reference = convert_tekken_tokenizer(str(files["tekken"]))
    assert hf_layout.vocab_size == tok.vocab_size
    for text in TEXTS[:-2]:  # the reference maps typed "[INST]" to the control token; we keep it text
        assert tok.encode(text) == hf_layout.encode(text) == reference.encode(text, add_special_tokens=False), text
    for text in TEXTS:
        assert tok.encode(text) == hf_layout.encode(text), text


def test_round_trip_and_bos(tok):
    for text in TEXTS:
        ids = tok.encode(text, add_bos=True)
        assert ids[0] == 1 and 1 not in ids[1:]
        assert tok.decode(ids[1:]) == text
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids) == "<s>" + text
    assert tok.encode("hi", add_eos=True)[-1] == 2


def test_control_strings_in_text_are_text(tok):
    ids = tok.encode("[INST]</s>")
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode([3, *ids, 4]) == "[INST][INST]</s>[/INST]"


def test_save_writes_hf_layout(tok, tmp_path):
    again = Tokenizer.from_pretrained(tok.save(tmp_path))
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)


def test_errors(tmp_path, tok):
    with pytest.raises(CheckpointError, match="no tekken.json or tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no such tokenizer"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "tekken.json").write_text('{"config": {}}')
    with pytest.raises(CheckpointError, match="tekken.json.*config.pattern"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tekken.json").write_text('{"config": {"pattern": "."}, "vocab": [{"rank": 0}]}')
    with pytest.raises(CheckpointError, match="vocab entry 0 needs base64 'token_bytes'"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tekken.json").unlink()
    (tmp_path / "tokenizer.json").write_text(tok.backend.to_str().replace("[THINK]", "[NOTHINK]"))
    with pytest.raises(CheckpointError, match=r"lacks the special tokens \['\[THINK\]'\]"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.decode([5000])
    with pytest.raises(InputError, match="must be a str"):
        tok.encode(b"bytes")


def test_find_is_the_one_lookup_beside_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: no tokenizer beside the model"):
        Tokenizer.find(tmp_path / "empty")
    assert Tokenizer.find(tmp_path / "empty", required=False) is None
    write_tekken(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text("not read: tekken.json comes first")
    found = Tokenizer.find(tmp_path / "m", required=False)
    assert found.source.endswith("tekken.json") and found.encode("Hello") == Tokenizer.from_pretrained(
        tmp_path / "m" / "tekken.json").encode("Hello")
