"""Against mistral-common (the official implementation of Tekken, the v15 format and image
preprocessing), on its production vocabulary `tekken_240911.json` turned into a v15 file here:
version "v15", the 1,000 special tokens at the ids of docs/model.md 4, a settings block for reasoning effort
none / high, image settings patch 14 / longest side 1540 / merge 2 (the released model's).

A seeded generator writes hundreds of conversations (roles and runs of roles, part splits, unicode,
tools and parallel calls with results in any order, thinking parts, images of random and extreme
sizes, reasoning efforts, continued final turns) and broken variants of them. Each must encode to the
same ids and pixels as mistral-common, or be refused by both; fine-tuning conversations must also
mark as targets exactly the tokens mistral-common encodes for the assistant turns.
"""

import importlib.resources
import json
import random

import numpy as np
import pytest
from PIL import Image
from mistral_common.exceptions import MistralCommonException  # pinned in the test extra
from mistral_common.protocol.instruct.chunk import ImageChunk
from mistral_common.protocol.instruct.messages import (
    AssistantMessage, SystemMessage, ToolMessage, UserMessage)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.image import ImageConfig as MCImageConfig
from mistral_common.tokens.tokenizers.image import ImageEncoder, SpecialImageIDs
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral4_jax import InputError
from mistral4_jax.text.chat import training_prompt
from mistral4_jax.text.images import ImageConfig, preprocess
from mistral4_jax.text.tokenizer import SPECIAL_FILLER, SPECIAL_TOKENS, Tokenizer

N_CHATS = 300
# mistral-common and we both resize with OpenCV and normalise in float32: pixels agree exactly;
# 1e-4 is the acceptance bound of the issue, far below one grey level (1 / 255 / 0.27 = 0.015).
PIXEL_ATOL = 1e-4


@pytest.fixture(scope="module")
def v15_file(tmp_path_factory):
    src = importlib.resources.files("mistral_common") / "data" / "tekken_240911.json"
    raw = json.loads(src.read_text(encoding="utf-8"))
    n = raw["config"]["default_num_special_tokens"]
    assert n == 1000 and raw["config"]["default_vocab_size"] == 131072
    raw["config"]["version"] = "v15"
    raw["special_tokens"] = [{"rank": i, "token_str": SPECIAL_TOKENS.get(i, SPECIAL_FILLER.format(id=i)),
                              "is_control": True} for i in range(n)]
    raw["image"] = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}
    raw["model_settings_builder"] = {"reasoning_effort": {"values": ["none", "high"], "default": "none"}}
    path = tmp_path_factory.mktemp("v15") / "tekken.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ours(v15_file):
    return Tokenizer.from_pretrained(v15_file.parent)


@pytest.fixture(scope="module")
def theirs(v15_file):
    return {"prompt": MistralTokenizer.from_file(v15_file, mode=ValidationMode.test),
            "finetuning": MistralTokenizer.from_file(v15_file, mode=ValidationMode.finetuning)}


# ---------------------------------------------------------------------- plain text
TEXTS = ["", " ", "Hello, world!", "  leading and trailing  ", "line\nbreaks\r\n\n\ttabs", "[INST] not a control",
         "</s><s>[IMG]", "Größe, Straße, 日本語の文章, 你好，世界, привет 🎉🚀 ❤️", "1234567890 3.14159",
         "def f(x):\n    return x ** 2\n", "a" * 300, "\u200b\u00a0\ufeff", "é" * 7 + "e\u0301"]


def test_encode_decode_and_special_ids(ours, theirs):
    raw = theirs["prompt"].instruct_tokenizer.tokenizer
    assert ours.vocab_size == raw.n_words == 131072
    for text in TEXTS + [_text(random.Random(s)) for s in range(100)]:
        ids = ours.encode(text)
        assert ids == raw.encode(text, bos=False, eos=False), text
        assert ours.decode(ids) == raw.decode(ids), text
    for name, token in [("bos", "<s>"), ("eos", "</s>"), ("inst", "[INST]"), ("think", "[THINK]"),
                        ("img", "[IMG]"), ("model_settings", "[MODEL_SETTINGS]"), ("args", "[ARGS]")]:
        assert getattr(ours, name) == raw.get_special_token(token)
    mixed = [1, 3, *ours.encode("hi"), 4, 34, *ours.encode("ok"), 35, 2]
    assert ours.decode(mixed) == raw.decode(mixed, special_token_policy=SpecialTokenPolicy.KEEP)
    assert ours.decode(mixed, skip_special_tokens=True) == raw.decode(mixed)


# ---------------------------------------------------------------------- images
@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (28, 28), (29, 57), (200, 300), (768, 1024), (1048, 1600),
                                (900, 1700), (1540, 1540), (2000, 1200), (1, 3100), (3100, 1), (2, 2900)])
def test_images_equal_mistral_common(hw):
    enc = ImageEncoder(MCImageConfig(14, 1540, 2), SpecialImageIDs(10, 12, 13))
    rng = np.random.default_rng(hw[0] * 7919 + hw[1])
    for channels, mode in [(3, "RGB"), (4, "RGBA"), (1, "L"), (4, "LA"), (3, "P")]:
        a = rng.integers(0, 256, (*hw, channels) if channels > 1 else hw, dtype=np.uint8)
        img = Image.fromarray(a).convert(mode) if mode in ("LA", "P") else Image.fromarray(a)
        ref = enc(ImageChunk(image=img))
        got = preprocess(img, ImageConfig())
        assert got.shape == ref.image.shape, (hw, mode)
        np.testing.assert_allclose(got, ref.image, rtol=0, atol=PIXEL_ATOL)


# ---------------------------------------------------------------------- generated conversations
WORDS = ["Hello", "world", " the", " quick", "Größe", "日本語", "你好", "привет", "🎉", "❤️", "42", "3.14", "\n",
         "\n\n", " ", "  ", "\t", "[INST]", "</s>", "é", "e\u0301", "{", "}", "\"quoted\"", "x" * 40]
NAMES = ["get_weather", "search", "calc", "now", "lookup_2", "send-mail"]


def _text(r: random.Random, empty_ok: bool = True) -> str:
    if empty_ok and r.random() < 0.05:
        return ""
    return "".join(r.choice(WORDS) for _ in range(r.randint(1, 8)))


def _image(r: random.Random) -> np.ndarray:
    h, w = r.choice([(r.randint(1, 90), r.randint(1, 90)), (r.randint(100, 700), r.randint(100, 700)),
                     (r.randint(1541, 2200), r.randint(50, 900)), (1, r.randint(3000, 3200)),
                     (r.randint(3000, 3200), 2)])
    g = np.random.default_rng(r.getrandbits(32))
    return g.integers(0, 256, (h, w, r.choice([3, 4])), dtype=np.uint8)


def _content(r: random.Random, kinds: tuple[str, ...], p_images: float = 0.0):
    if r.random() < 0.4:
        return _text(r)
    parts = []
    for _ in range(r.randint(1, 4)):
        kind = r.choice(kinds)
        if kind == "image" and r.random() > p_images:
            kind = "text"
        if kind == "text":
            parts.append({"type": "text", "text": _text(r)})
        elif kind == "thinking":
            parts.append({"type": "thinking", "thinking": _text(r), "closed": r.random() < 0.9})
        else:
            parts.append({"type": "image", "image": _image(r)})
    return parts


def _arguments(r: random.Random):
    return r.choice([{"city": _text(r), "n": r.randint(0, 9)}, {}, "", '{"a": [1, 2, {"b": null}]}',
                     "not json", json.dumps({"q": "Zürich"}), None])


def _tools(r: random.Random):
    return [{"type": "function", "function": {"name": n, "description": _text(r),
                                              "parameters": {"type": "object", "properties": {
                                                  "x": {"type": "string", "description": _text(r)}}}}}
            for n in r.sample(NAMES, r.randint(1, 3))]


def _conversation(r: random.Random, finished: bool) -> list[dict]:
    """A conversation mistral-common accepts: a prompt (ends with a user or tool turn, or an assistant
    turn to continue) or a finished one (ends with an assistant turn)."""
    msgs, n_calls = [], 0
    if r.random() < 0.5:
        msgs.append({"role": "system", "content": _content(r, ("text",))})
    for turn in range(r.randint(1, 3)):
        for _ in range(1 if r.random() < 0.8 else 2):  # sometimes two user turns in a row
            msgs.append({"role": "user", "content": _content(r, ("text", "image"), p_images=0.15)})
        if r.random() < 0.15:
            msgs.append({"role": "system", "content": _text(r)})  # system prompts anywhere
        last_turn = turn == 2 or r.random() < 0.3
        if last_turn and not finished and r.random() < 0.6:
            break
        for _ in range(1 if r.random() < 0.85 else 2):  # sometimes two assistant turns in a row
            m = {"role": "assistant", "content": _content(r, ("text", "thinking"))}
            if r.random() < 0.3:
                m["tool_calls"] = [{"id": f"call{n_calls + k:05d}", "type": "function",
                                    "function": {"name": r.choice(NAMES), "arguments": _arguments(r)}}
                                   for k in range(r.randint(1, 3))]
                n_calls += len(m["tool_calls"])
                if r.random() < 0.2:
                    m["content"] = None
            if not m.get("content") and not m.get("tool_calls"):
                m["content"] = _text(r, empty_ok=False)
            msgs.append(m)
            if m.get("tool_calls"):
                break  # the results come next
        calls = msgs[-1].get("tool_calls") or []
        if calls and not (finished and last_turn):
            order = list(range(len(calls)))
            r.shuffle(order)  # results in any order
            for k in order:
                msgs.append({"role": "tool", "tool_call_id": calls[k]["id"],
                             "content": _content(r, ("text", "image"), p_images=0.1)})
            if finished and last_turn:
                msgs.append({"role": "assistant", "content": _text(r, empty_ok=False)})
        if last_turn:
            break
    if finished and msgs[-1]["role"] != "assistant":
        msgs.append({"role": "assistant", "content": _content(r, ("text", "thinking"))})
        if not msgs[-1]["content"]:
            msgs[-1]["content"] = _text(r, empty_ok=False)
    return msgs


def _broken(r: random.Random, msgs: list[dict]) -> list[dict]:
    """A variant mistral-common may refuse: a call without id, an unknown result id, a missing or
    doubled result, a result after a user turn, a bad name, a thinking part in a system prompt."""
    msgs = [dict(m) for m in msgs]
    kind = r.randrange(6)
    calls = [i for i, m in enumerate(msgs) if m.get("tool_calls")]
    tools = [i for i, m in enumerate(msgs) if m["role"] == "tool"]
    if kind == 0 and calls:
        i = r.choice(calls)
        msgs[i]["tool_calls"] = [{k: v for k, v in c.items() if k != "id"} for c in msgs[i]["tool_calls"]]
    elif kind == 1 and tools:
        msgs[r.choice(tools)]["tool_call_id"] = "call99999"
    elif kind == 2 and tools:
        del msgs[r.choice(tools)]
    elif kind == 3 and tools:
        i = r.choice(tools)
        msgs.insert(i, dict(msgs[i]))
    elif kind == 4:
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        msgs.insert(r.choice(users) + 1, {"role": "tool", "tool_call_id": "call00000", "content": "r"})
    elif kind == 5 and calls:
        i = r.choice(calls)
        msgs[i]["tool_calls"] = [dict(c, function=dict(c["function"], name="bad name"))
                                 for c in msgs[i]["tool_calls"]]
    else:
        msgs.insert(0, {"role": "system", "content": [{"type": "thinking", "thinking": "t"}]})
    return msgs


def _to_mc(messages: list[dict], tools, effort, prefix: bool) -> ChatCompletionRequest:
    out = []
    for i, m in enumerate(messages):
        d = {k: v for k, v in m.items() if k in ("role", "tool_call_id")}
        content = m.get("content")
        if isinstance(content, list):
            content = [{"type": "image", "image": Image.fromarray(p["image"])} if p["type"] == "image" else p
                       for p in content]
        if content is not None:
            d["content"] = content
        if m.get("tool_calls") is not None:
            d["tool_calls"] = m["tool_calls"]
        if prefix and i == len(messages) - 1:
            d["prefix"] = True
        out.append(d)
    return ChatCompletionRequest(messages=out, tools=tools, reasoning_effort=effort)


def _mc_encode(tokenizer: MistralTokenizer, request: ChatCompletionRequest):
    """mistral-common's encoding, and its per-message split: the mask of the assistant messages'
    own tokens (each encoded by its `encode_assistant_message`, as a fine-tuning loader does)."""
    tokenized = tokenizer.encode_chat_completion(request)
    validated = tokenizer._chat_completion_request_validator.validate_request(request)
    normalized = tokenizer._instruct_request_normalizer.from_chat_completion_request(validated)
    it = tokenizer.instruct_tokenizer
    first, last = it.find_first_last_user(normalized)
    ids, mask = it.start(), [False]
    for i, msg in enumerate(normalized.messages):
        if isinstance(msg, UserMessage):
            part = it.encode_user_message(msg, normalized.available_tools, i == last, i == first,
                                          force_img_first=True, settings=normalized.settings)[0]
        elif isinstance(msg, ToolMessage):
            part = it.encode_tool_message(msg, i < last)[0]
        elif isinstance(msg, AssistantMessage):
            part = it.encode_assistant_message(msg, i < last)
        else:
            assert isinstance(msg, SystemMessage)
            part = it.encode_system_message(msg)[0]
        ids += part
        mask += [isinstance(msg, AssistantMessage)] * len(part)
    assert ids == tokenized.tokens  # the split is the whole encoding
    return tokenized, mask


def _compare(ours, theirs, msgs, tools, effort, finished, prefix, where):
    mode = "finetuning" if finished else "prompt"
    try:
        ref, ref_mask = _mc_encode(theirs[mode], _to_mc(msgs, tools, effort, prefix))
    except (MistralCommonException, ValueError, AssertionError) as e:  # refused (pydantic errors are ValueErrors)
        ref, refusal = None, e
    try:
        if finished:
            got = training_prompt(ours, msgs, reasoning_effort=effort, tools=tools)
        else:
            got = ours.apply_chat_template(msgs, reasoning_effort=effort, tools=tools,
                                           continue_final_message=prefix)
    except InputError as e:
        assert ref is None, f"{where}: we refuse what mistral-common accepts: {e}"
        return "refused"
    assert ref is not None, f"{where}: we accept what mistral-common refuses: {refusal!r}"
    assert got.input_ids == ref.tokens, where
    assert got.assistant_mask == ref_mask, where
    assert got.num_images == len(ref.images), where
    for k, image in enumerate(ref.images):
        h, w = got.image_sizes[k]
        assert image.shape == (3, h, w), where
        np.testing.assert_allclose(got.pixel_values[k, :, :h, :w], image, rtol=0, atol=PIXEL_ATOL, err_msg=where)
    return "equal"


def test_generated_conversations_equal_mistral_common(ours, theirs):
    r = random.Random(15)
    seen = {"equal": 0, "refused": 0}
    kinds = {"images": 0, "calls": 0, "thinking": 0, "runs": 0, "continued": 0, "finished": 0}
    for n in range(N_CHATS):
        finished = r.random() < 0.4
        msgs = _conversation(r, finished)
        prefix = not finished and msgs[-1]["role"] == "assistant"
        if not finished and not prefix and r.random() < 0.15:  # continue a final assistant turn
            msgs.append({"role": "assistant", "content": _text(r, empty_ok=False)})
            prefix = True
        tools = _tools(r) if r.random() < 0.4 else None
        effort = r.choice(["none", "high", None])
        seen[_compare(ours, theirs, msgs, tools, effort, finished, prefix, f"conversation {n}")] += 1
        flat = json.dumps(msgs, default=lambda a: "<image>")
        kinds["images"] += "<image>" in flat
        kinds["calls"] += "tool_calls" in flat
        kinds["thinking"] += '"thinking"' in flat
        kinds["runs"] += any(a["role"] == b["role"] != "tool" for a, b in zip(msgs, msgs[1:]))
        kinds["continued"] += prefix
        kinds["finished"] += finished
        if r.random() < 0.5:
            broken = _broken(r, msgs)
            seen[_compare(ours, theirs, broken, tools, effort, finished, prefix, f"broken conversation {n}")] += 1
    # the corpus covers every kind of case, and both outcomes
    assert seen["equal"] >= N_CHATS and seen["refused"] >= 30, seen
    assert min(kinds.values()) >= 20, kinds


# ---------------------------------------------------------------------- parsing generated ids
def _mc_parse(tokenizer: MistralTokenizer, ids: list[int]):
    """How mistral-common's reference server reads generated ids (`experimental/app/routers.py`):
    content and tool calls split at [TOOL_CALLS], the content into think and text chunks."""
    from mistral_common.experimental.think import _split_content_and_think_chunks
    from mistral_common.experimental.tools import _decode_tool_calls, _split_content_and_tool_calls

    it = tokenizer.instruct_tokenizer
    content, calls = _split_content_and_tool_calls(ids, it.tokenizer.get_special_token("[TOOL_CALLS]"))
    text, think = [], []
    for chunk, is_think in _split_content_and_think_chunks(content, it.BEGIN_THINK, it.END_THINK):
        (think if is_think else text).append(it.tokenizer.decode(chunk, special_token_policy=SpecialTokenPolicy.IGNORE))
    tool_calls = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)}
                  for c in _decode_tool_calls(calls, it.tokenizer)]
    return "".join(text), "".join(think) if think else None, tool_calls


def test_parse_output_equals_mistral_common(ours, theirs):
    r = random.Random(4)
    e = ours.encode
    for n in range(200):
        # a well-formed answer: reasoning (left open only when nothing follows), text, tool calls
        ids, open_think = [], r.random() < 0.1
        if open_think or r.random() < 0.5:
            ids += [ours.think, *e(_text(r, empty_ok=False))] + [ours.think_end] * (not open_think)
        if not open_think:
            ids += e(_text(r))
            for _ in range(r.choice([0, 0, 1, 2])):
                ids += [ours.tool_calls, *e(r.choice(NAMES)), ours.args,
                        *e(json.dumps({"q": _text(r), "n": r.randint(0, 99)}, ensure_ascii=False))]
        finished = r.random() < 0.7
        ids += [ours.eos] * finished
        got = ours.parse_output(ids)
        content, reasoning, calls = _mc_parse(theirs["prompt"], ids)
        assert (got.content, got.reasoning, got.tool_calls, got.finished) == (content, reasoning, calls, finished), n
