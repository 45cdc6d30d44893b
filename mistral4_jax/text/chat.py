"""The v15 chat format as mistral-common 1.13 writes it (`InstructTokenizerV15`, docs/model.md 4).

    <s>[SYSTEM_PROMPT]sys[/SYSTEM_PROMPT][AVAILABLE_TOOLS][...][/AVAILABLE_TOOLS]
    [MODEL_SETTINGS]{"reasoning_effort": "none"}[/MODEL_SETTINGS][INST]user 1[/INST]assistant 1</s>
    [INST]user 2[/INST]

A conversation goes through mistral-common's three stages, one function each here:

1. `_check` (its `MistralRequestValidatorV15`): role order (a tool result follows an assistant turn
   or another result), every tool call has an id and every result the id of a call of the assistant
   turn before it, names are `[a-zA-Z0-9_-]{1,64}`, and the final turn suits the use (a prompt ends
   with a user or tool turn, or an assistant turn to continue; a training conversation ends with a
   finished assistant turn). What it refuses is an InputError here.
2. `_merge` (its `InstructRequestNormalizerV15`): each run of consecutive user turns, and each run
   of assistant turns, becomes one turn; texts are joined with "\n\n" between turns and "" between
   the parts of a turn, so the joined text is encoded once; empty texts are dropped. The results of
   a run of tool turns are put in the order of the calls they answer. Empty tool-call arguments
   become {}. System turns stay as they are, where they are.
3. `_encode`: a system turn is `[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]`; the tools block (when tools are
   given) and the settings block (JSON, sorted keys) sit before the first user turn; a user turn is
   `[INST]...[/INST]`, its image first when its parts are texts then one image; an assistant turn is
   its content (string content right-stripped of spaces; thinking parts as `[THINK]...[/THINK]`),
   then each tool call as `[TOOL_CALLS]name[ARGS]{json}`, then `</s>` unless it is continued; a tool
   result is `[TOOL_RESULTS]...[/TOOL_RESULTS]` (no call ids since v13). Images are `[IMG]` blocks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from .images import ImageConfig, batch_images, image_token_ids, preprocess

REASONING_EFFORTS = ("none", "high")
ROLES = ("system", "user", "assistant", "tool")
# Part types each role may hold (mistral-common v15 minus audio).
PART_TYPES = {"system": ("text",), "user": ("text", "image"), "assistant": ("text", "thinking"),
              "tool": ("text", "image")}
NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # function and tool names (mistral-common validator)
NULL_ID = "null"  # mistral-common's placeholder for a missing tool-call id


@dataclass
class ChatPrompt:
    """An encoded chat: `input_ids` for one sequence and, when the messages carry images,
    `pixel_values` float32 [N, 3, H, W] (zero-padded bottom/right) and `image_sizes` int32 [N, 2]
    (height, width), in the order the images appear. Pass them to the model as they are.

    `assistant_mask[t]` is True where token t belongs to an assistant turn (its text, thinking, tool
    calls and closing `</s>`): the training targets of a finished conversation."""

    input_ids: list[int]
    pixel_values: np.ndarray | None = None
    image_sizes: np.ndarray | None = None
    assistant_mask: list[bool] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return 0 if self.image_sizes is None else len(self.image_sizes)


@dataclass
class ParsedOutput:
    """A generated answer split into reasoning (`[THINK]...[/THINK]`), answer text and tool calls.

    `tool_calls` holds {"name": str, "arguments": parsed JSON (or the raw string if it does not
    parse)}. `finished` says whether the ids ended with `</s>`."""

    content: str
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


@dataclass
class _Part:
    kind: str  # text | thinking | image
    value: Any  # the text, the thinking, or the image
    closed: bool = True  # a thinking part ends with [/THINK]
    where: str = ""  # for image errors: the message and part it came from


@dataclass
class _Call:
    id: str
    name: str
    arguments: str  # JSON text (normalised), or a raw string that is not JSON


@dataclass
class _Turn:
    role: str
    content: str | list[_Part] | None
    calls: list[_Call] = field(default_factory=list)
    call_id: str | None = None  # a tool result: the call it answers
    prefix: bool = False  # an assistant turn the model continues (no </s>)


def settings_json(reasoning_effort: str | None) -> str:
    """The `[MODEL_SETTINGS]` payload: JSON with sorted keys, ", " and ": " separators."""
    effort = "none" if reasoning_effort is None else reasoning_effort
    if effort not in REASONING_EFFORTS:
        raise InputError(f"reasoning_effort must be one of {REASONING_EFFORTS} (or None for 'none'), "
                         f"got {reasoning_effort!r}")
    return json.dumps({"reasoning_effort": effort}, sort_keys=True, separators=(", ", ": "))


def tools_json(tools: list[dict[str, Any]]) -> str:
    """The `[AVAILABLE_TOOLS]` payload: the tools as mistral-common dumps them,
    [{"type": "function", "function": {"name", "description", "parameters"}}, ...]."""
    if not isinstance(tools, (list, tuple)):
        raise InputError(f"tools must be a list of tool definitions, got {type(tools).__name__}")
    out = []
    for i, t in enumerate(tools):
        f = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("parameters"), dict):
            raise InputError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ..., "
                             f"'description': ..., 'parameters': {{...}}}}}}, got {t!r}")
        if t.get("type", "function") != "function":
            raise InputError(f"tools[{i}]: type must be 'function', got {t.get('type')!r}")
        _check_name(f["name"], f"tools[{i}].function.name")
        description = f.get("description", "")
        if not isinstance(description, str):
            raise InputError(f"tools[{i}].function.description must be a string")
        out.append({"type": "function", "function": {
            "name": f["name"], "description": description, "parameters": f["parameters"]}})
    return json.dumps(out, ensure_ascii=False)


def _check_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InputError(f"{where} must be 1 to 64 of a-z, A-Z, 0-9, '_' and '-', got {name!r}")


def _check_id(call_id: Any, where: str) -> None:
    if not isinstance(call_id, str) or not call_id or call_id == NULL_ID:
        raise InputError(f"{where} must be a non-empty string (the id that links a tool call to its result), "
                         f"got {call_id!r}")


def _json_text(text: str | None) -> str:
    """mistral-common's argument normalisation: empty -> "{}", JSON re-dumped, anything else kept."""
    if not text:
        return "{}"
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except json.JSONDecodeError:
        return text


def _arguments_json(arguments: str) -> str:
    """The `[ARGS]` payload: the arguments parsed when they are JSON (else the string), dumped."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        value = arguments
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------- reading the messages
def _read_parts(content: Any, role: str, where: str) -> str | list[_Part]:
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise InputError(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")
    allowed, parts = PART_TYPES[role], []
    for j, p in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = p.get("type") if isinstance(p, dict) else None
        if kind not in allowed:
            raise InputError(f"{at}: part type {kind!r} is not allowed in a {role} turn (expected one of {allowed})")
        if kind == "image":
            if "image" not in p:
                raise InputError(f"{at}: an 'image' part needs an 'image' field")
            parts.append(_Part("image", p["image"], where=at))
            continue
        if not isinstance(p.get(kind), str):
            raise InputError(f"{at}: a {kind!r} part needs a {kind!r} field holding a string")
        closed = p.get("closed", True)
        if not isinstance(closed, bool):
            raise InputError(f"{at}: 'closed' must be true or false")
        parts.append(_Part(kind, p[kind], closed))
    return parts


def _read_call(call: Any, where: str) -> _Call:
    f = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(f, dict) or "name" not in f or "arguments" not in f:
        raise InputError(f"{where}: expected {{'id': ..., 'function': {{'name': ..., 'arguments': ...}}}}, "
                         f"got {call!r}")
    _check_id(call.get("id", NULL_ID), f"{where}.id")
    _check_name(f["name"], f"{where}.function.name")
    args = f["arguments"]
    if isinstance(args, dict):
        args = json.dumps(args, ensure_ascii=False)
    elif args is not None and not isinstance(args, str):
        raise InputError(f"{where}.function.arguments must be a dict or a JSON string, got {type(args).__name__}")
    return _Call(call["id"], f["name"], _json_text(args))


def _read(messages: Any) -> list[_Turn]:
    """The messages as turns, each checked on its own."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    turns = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise InputError(f"messages[{i}]: unknown role {role!r} (expected one of {ROLES})")
        where = f"messages[{i}] ({role})"
        content = m.get("content")
        if content is None and role != "assistant":
            raise InputError(f"{where} needs a 'content' (a string or a list of parts)")
        turn = _Turn(role, None if content is None else _read_parts(content, role, where))
        if role == "assistant":
            calls = m.get("tool_calls") or []
            if not isinstance(calls, (list, tuple)):
                raise InputError(f"{where}.tool_calls must be a list")
            turn.calls = [_read_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        elif role == "tool":
            _check_id(m.get("tool_call_id"), f"{where}.tool_call_id")
            turn.call_id = m["tool_call_id"]
            if m.get("name") is not None:
                _check_name(m["name"], f"{where}.name")
        turns.append(turn)
    return turns


# ---------------------------------------------------------------------- 1. checks
def _check(turns: list[_Turn], training: bool) -> None:
    """mistral-common's conversation checks (`MistralRequestValidatorV15`; `training` is its
    fine-tuning mode, else its default mode)."""
    roles = [t.role for t in turns]
    if len(turns) == 1 and roles[0] not in ("user", "system"):
        raise InputError(f"a conversation of one message must be a user or system turn, got {roles[0]!r}")
    last = turns[-1]
    if training and (last.role != "assistant" or last.prefix):
        raise InputError(f"a training conversation must end with a finished assistant turn, got {last.role!r} last")
    if not training and last.role == "assistant" and not last.prefix:
        raise InputError("the last message is an assistant turn: pass add_generation_prompt=False to encode a "
                         "finished conversation, or continue_final_message=True to continue that turn")
    for i in range(1, len(turns)):
        if roles[i] == "tool" and roles[i - 1] not in ("assistant", "tool"):
            raise InputError(f"messages[{i}] (tool): a tool result must follow an assistant turn or another "
                             f"tool result, not a {roles[i - 1]} turn")
    # Each result answers a call of the assistant turn before it; every call is answered before the
    # next assistant turn. (mistral-common starts this bookkeeping at the second message.)
    expected, seen = set(), set()
    for i, t in enumerate(turns[1:], start=1):
        if t.role == "tool":
            if t.call_id in seen:
                raise InputError(f"messages[{i}] (tool): a second result for tool call id {t.call_id!r}")
            if t.call_id not in expected:
                raise InputError(f"messages[{i}] (tool): tool_call_id {t.call_id!r} answers no tool call of the "
                                 f"assistant turn before it (its ids: {sorted(expected)})")
            seen.add(t.call_id)
        elif t.role == "assistant":
            if len(expected) != len(seen):
                raise InputError(f"messages[{i}] (assistant): the tool calls of the assistant turn before it have "
                                 f"{len(expected)} ids but {len(seen)} results came back")
            expected, seen = set(), set()
            for c in t.calls:
                if c.id in expected:
                    raise InputError(f"messages[{i}] (assistant): tool call id {c.id!r} is used twice")
                expected.add(c.id)


# ---------------------------------------------------------------------- 2. merging runs of turns
def _join(contents: list[str | list[_Part] | None]) -> str | list[_Part]:
    """The content of one turn made of several: texts joined with "\n\n" between turns and "" between
    the parts of a turn, empty texts dropped; a string when only text is left."""
    out: list[_Part] = []
    texts: list[str] = []
    for content in contents:
        new_turn = bool(texts)  # the first text of this turn is separated from the text before it
        if not content:
            continue
        if isinstance(content, str):
            texts.append(("\n\n" if new_turn else "") + content)
            continue
        for p in content:
            if p.kind != "text":
                if texts:
                    out.append(_Part("text", "".join(texts)))
                    texts = []
                out.append(p)
            elif p.value:
                texts.append(("\n\n" if texts and new_turn else "") + p.value)
                new_turn = False
    if not out:
        return "".join(texts)
    if texts:
        out.append(_Part("text", "".join(texts)))
    return out


def _merge_run(run: list[_Turn], call_order: list[str]) -> list[_Turn]:
    role = run[0].role
    if role == "system":
        return [_Turn("system", _join([t.content])) for t in run]
    if role == "tool":
        results = [_Turn("tool", _join([t.content]), call_id=t.call_id) for t in run]
        rank = {cid: k for k, cid in enumerate(call_order)}
        first = {t.call_id: k for k, t in enumerate(results)}
        return sorted(results, key=lambda t: (rank.get(t.call_id, float("inf")), first[t.call_id]))
    merged = _Turn(role, _join([t.content for t in run]))
    if role == "assistant":
        merged.calls = [c for t in run for c in t.calls]
        merged.prefix = any(t.prefix for t in run)
    return [merged]


def _merge(turns: list[_Turn]) -> list[_Turn]:
    """mistral-common's normalisation (`InstructRequestNormalizerV15`, module docstring)."""
    out: list[_Turn] = []
    call_order: list[str] = []  # ids of the calls since the last run of tool results
    start = 0
    for i in range(1, len(turns) + 1):
        if i < len(turns) and turns[i].role == turns[start].role:
            continue
        merged = _merge_run(turns[start:i], call_order)
        out += merged
        if merged[0].role == "assistant":
            call_order += [c.id for c in merged[0].calls]
        elif merged[0].role == "tool":
            call_order = []
        start = i
    return out


# ---------------------------------------------------------------------- 3. encoding
class _Encoder:
    """Collects ids, the assistant mask and images."""

    def __init__(self, tok, image_config: ImageConfig | None):
        self.tok = tok
        self.image_config = image_config
        self.ids: list[int] = [tok.bos]
        self.mask: list[bool] = [False]
        self.images: list[np.ndarray] = []
        self.assistant = False  # the turn being written is the assistant's

    def add(self, ids: list[int]) -> None:
        self.ids += ids
        self.mask += [self.assistant] * len(ids)

    def content(self, content: str | list[_Part] | None) -> None:
        if isinstance(content, str):
            self.add(self.tok.encode(content))
            return
        for p in content or []:
            if p.kind == "text":
                self.add(self.tok.encode(p.value))
            elif p.kind == "thinking":
                self.add([self.tok.think, *self.tok.encode(p.value)] + [self.tok.think_end] * p.closed)
            else:
                self.image(p.value, p.where)

    def image(self, image: Any, where: str) -> None:
        cfg = self.image_config or self.tok.image_config
        if cfg is None:
            raise InputError(f"{where}: an image was given but the tokenizer knows no image settings; pass "
                             f"image_config=ImageConfig.from_model_config(model_config)")
        pixels = preprocess(image, cfg, what=where)
        t = cfg.token_size
        cols, rows = pixels.shape[2] // t, pixels.shape[1] // t
        self.add(image_token_ids(cols, rows, self.tok.img, self.tok.img_break, self.tok.img_end))
        self.images.append(pixels)


def _image_first(content: str | list[_Part]) -> str | list[_Part]:
    # mistral-common's force_img_first: texts followed by one image put the image in front.
    if isinstance(content, list) and len(content) >= 2 and content[-1].kind == "image" \
            and all(p.kind == "text" for p in content[:-1]):
        return [content[-1], *content[:-1]]
    return content


def _encode(enc: _Encoder, turns: list[_Turn], settings: str, tools_block: str | None) -> None:
    tok = enc.tok
    first_user = next((k for k, t in enumerate(turns) if t.role == "user"), None)
    for k, t in enumerate(turns):
        enc.assistant = t.role == "assistant"
        if t.role == "system":
            enc.add([tok.system_prompt])
            enc.content(t.content)
            enc.add([tok.system_prompt_end])
        elif t.role == "user":
            if k == first_user:
                if tools_block is not None:
                    enc.add([tok.available_tools, *tok.encode(tools_block), tok.available_tools_end])
                enc.add([tok.model_settings, *tok.encode(settings), tok.model_settings_end])
            enc.add([tok.inst])
            enc.content(_image_first(t.content))
            enc.add([tok.inst_end])
        elif t.role == "tool":
            enc.add([tok.tool_results])
            enc.content(t.content)
            enc.add([tok.tool_results_end])
        else:
            if not t.content and not t.calls:
                raise InputError("an assistant turn needs content or tool_calls (after merging the assistant "
                                 "turns that follow each other, this one has neither)")
            # mistral-common strips trailing spaces of string content (merged texts are strings too)
            enc.content(t.content.rstrip(" ") if isinstance(t.content, str) else t.content)
            for c in t.calls:
                enc.add([tok.tool_calls, *tok.encode(c.name), tok.args, *tok.encode(_arguments_json(c.arguments))])
            if not t.prefix:
                enc.add([tok.eos])


def _render(tokenizer, messages, reasoning_effort, tools, continue_final_message: bool, training: bool,
            image_config: ImageConfig | None) -> ChatPrompt:
    settings = settings_json(reasoning_effort)
    tools_block = tools_json(tools) if tools else None
    turns = _read(messages)
    if continue_final_message:
        if turns[-1].role != "assistant":
            raise InputError("continue_final_message=True needs an assistant turn last")
        turns[-1].prefix = True
    _check(turns, training)
    enc = _Encoder(tokenizer, image_config)
    _encode(enc, _merge(turns), settings, tools_block)
    if enc.images:
        pixel_values, image_sizes = batch_images(enc.images)
        return ChatPrompt(enc.ids, pixel_values, image_sizes, enc.mask)
    return ChatPrompt(enc.ids, assistant_mask=enc.mask)


def apply_chat_template(tokenizer, messages: list[dict[str, Any]], reasoning_effort: str | None = "none",
                        tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True,
                        continue_final_message: bool = False,
                        image_config: ImageConfig | None = None) -> ChatPrompt:
    """Encode a chat in the v15 format exactly as mistral-common does (module docstring), and
    preprocess its images.

    messages: dicts with `role` (system, user, assistant, tool) and `content`: a string or a list of
      parts {"type": "text", "text": ...} / {"type": "image", "image": path | PIL image | uint8 array}
      (user and tool turns) / {"type": "thinking", "thinking": ..., "closed": True} (assistant turns).
      Assistant turns may carry `tool_calls`: [{"id": ..., "function": {"name": ..., "arguments":
      dict | JSON string}}, ...] (the OpenAI shape); a tool turn names the call it answers with
      `tool_call_id`. Consecutive user (or assistant) turns are merged into one.
    reasoning_effort: "none" (default; None means the same) or "high" (the model thinks first).
    tools: function definitions in the OpenAI shape; the tools block is left out when None or empty.
    add_generation_prompt: True (default) encodes a prompt the model answers next; the v15 format has
      no assistant header, so the ids end with `[/INST]` or `[/TOOL_RESULTS]`, and a final assistant
      turn is refused. False encodes a finished conversation (final assistant turn closed by `</s>`,
      checked as mistral-common checks fine-tuning data).
    continue_final_message: leave the final assistant turn open (no `</s>`) for the model to continue.
    image_config: image settings (default: the tokenizer's, read from the model's config.json).
    """
    finished = not add_generation_prompt and not continue_final_message and isinstance(messages, (list, tuple)) \
        and bool(messages) and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"
    return _render(tokenizer, messages, reasoning_effort, tools, continue_final_message, finished, image_config)


def training_prompt(tokenizer, messages: list[dict[str, Any]], reasoning_effort: str | None = "none",
                    tools: list[dict[str, Any]] | None = None,
                    image_config: ImageConfig | None = None) -> ChatPrompt:
    """A finished conversation for fine-tuning: the ids of mistral-common's fine-tuning encoding
    (what `apply_chat_template(..., add_generation_prompt=False)` writes), whose `assistant_mask`
    marks the targets: every assistant token (text, thinking, tool calls, each turn's closing `</s>`).
    The last message must be an assistant turn, as mistral-common's fine-tuning mode requires."""
    return _render(tokenizer, messages, reasoning_effort, tools, False, True, image_config)


def parse_output(tokenizer, ids) -> ParsedOutput:
    """Split generated ids into reasoning, answer and tool calls.

    Everything after the first `</s>` is dropped. Text inside `[THINK]...[/THINK]` (an unclosed
    `[THINK]` runs to the end) is the reasoning; each `[TOOL_CALLS]name[ARGS]{json}` is a tool call;
    the rest is the answer, decoded without special tokens.
    """
    tok = tokenizer
    ids = [int(i) for i in ids]
    finished = tok.eos in ids
    if finished:
        ids = ids[: ids.index(tok.eos)]
    reasoning, answer, calls = [], [], []
    cur, mode = [], "answer"  # mode: answer | think | name | args

    def flush():
        nonlocal cur
        text = tok.decode(cur, skip_special_tokens=True)
        if mode == "answer":
            answer.append(text)
        elif mode == "think":
            reasoning.append(text)
        elif mode == "name":
            calls.append({"name": text.strip(), "arguments": None})
        else:
            calls[-1]["arguments"] = _parse_args(text)
        cur = []

    for i in ids:
        if i == tok.think and mode == "answer":
            flush(); mode = "think"
        elif i == tok.think_end and mode == "think":
            flush(); mode = "answer"
        elif i == tok.tool_calls and mode != "think":
            flush(); mode = "name"
        elif i == tok.args and mode == "name":
            flush(); mode = "args"
        else:
            cur.append(i)
    flush()
    return ParsedOutput(content="".join(answer), reasoning="".join(reasoning) if reasoning else None,
                        tool_calls=calls, finished=finished)


def _parse_args(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
