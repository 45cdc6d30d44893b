"""The v15 chat format (spec section 4, mistral-common `InstructTokenizerV15`) and output parsing.

    <s>[SYSTEM_PROMPT]sys[/SYSTEM_PROMPT][AVAILABLE_TOOLS][...][/AVAILABLE_TOOLS]
    [MODEL_SETTINGS]{"reasoning_effort": "none"}[/MODEL_SETTINGS][INST]user 1[/INST]assistant 1</s>
    [INST]user 2[/INST]

- System messages are written where they appear, between `[SYSTEM_PROMPT]` and `[/SYSTEM_PROMPT]`.
- The tools block (only when tools are given) and the settings block (always) sit right before the
  first user turn. The settings are JSON with sorted keys and ", " / ": " separators.
- An assistant turn is its text (think parts as `[THINK]...[/THINK]`), then each tool call as
  `[TOOL_CALLS]name[ARGS]{json}`, then `</s>`.
- A tool result is `[TOOL_RESULTS]content[/TOOL_RESULTS]` (no call ids since v13).
- An image is its `[IMG]` block where the image part appears; as mistral-common does, a user turn of
  exactly one text part followed by one image part puts the image first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from .images import ImageConfig, batch_images, image_token_ids, preprocess

REASONING_EFFORTS = ("none", "high")
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class ChatPrompt:
    """An encoded chat: `input_ids` for one sequence and, when the messages carry images,
    `pixel_values` float32 [N, 3, H, W] (zero-padded bottom/right) and `image_sizes` int32 [N, 2]
    (height, width), in the order the images appear. Pass them to the model as they are."""

    input_ids: list[int]
    pixel_values: np.ndarray | None = None
    image_sizes: np.ndarray | None = None
    # True where the token belongs to an assistant turn (text, thinking, tool calls, closing </s>):
    # the training targets of a finished conversation.
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
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise InputError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ..., "
                             f"'description': ..., 'parameters': {{...}}}}}}, got {t!r}")
        out.append({"type": t.get("type", "function"), "function": {
            "name": f["name"], "description": f.get("description", ""), "parameters": f.get("parameters", {})}})
    return json.dumps(out, ensure_ascii=False)


def _arguments_json(args: Any) -> str:
    # mistral-common: a string is parsed as JSON when it can be, then everything is dumped again.
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return json.dumps(args, ensure_ascii=False)


class _Encoder:
    """Walks the messages once, collecting ids and images."""

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

    def parts(self, content: Any, where: str, allowed: tuple[str, ...]) -> list[dict[str, Any]]:
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        if not isinstance(content, (list, tuple)):
            raise InputError(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")
        if not content:
            raise InputError(f"{where}.content is an empty list: give a string or at least one part")
        for j, p in enumerate(content):
            kind = p.get("type") if isinstance(p, dict) else None
            if kind not in allowed:
                raise InputError(f"{where}.content[{j}]: part type {kind!r} is not allowed here "
                                 f"(expected one of {allowed})")
            key = {"text": "text", "image": "image", "thinking": "thinking"}[kind]
            if key not in p or (kind != "image" and not isinstance(p[key], str)):
                raise InputError(f"{where}.content[{j}]: a {kind!r} part needs a {key!r} field"
                                 + ("" if kind == "image" else " holding a string"))
        return list(content)

    def emit_parts(self, parts: list[dict[str, Any]], where: str) -> None:
        tok = self.tok
        for j, p in enumerate(parts):
            if p["type"] == "text":
                self.add(tok.encode(p["text"]))
            elif p["type"] == "thinking":
                self.add([tok.think, *tok.encode(p["thinking"])])
                if p.get("closed", True):
                    self.add([tok.think_end])
            else:
                self.emit_image(p["image"], f"{where}.content[{j}]")

    def emit_image(self, image: Any, where: str) -> None:
        cfg = self.image_config or self.tok.image_config
        if cfg is None:
            raise InputError(f"{where}: an image was given but the tokenizer knows no image settings; pass "
                             f"image_config=ImageConfig.from_model_config(model_config)")
        pixels = preprocess(image, cfg, what=where)
        t = cfg.token_size
        cols, rows = pixels.shape[2] // t, pixels.shape[1] // t
        self.add(image_token_ids(cols, rows, self.tok.img, self.tok.img_break, self.tok.img_end))
        self.images.append(pixels)


def apply_chat_template(tokenizer, messages: list[dict[str, Any]], reasoning_effort: str | None = "none",
                        tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True,
                        continue_final_message: bool = False,
                        image_config: ImageConfig | None = None) -> ChatPrompt:
    """Encode a chat in the v15 format (module docstring) and preprocess its images.

    messages: dicts with `role` (system, user, assistant, tool) and `content`: a string or a list of
      parts {"type": "text", "text": ...} / {"type": "image", "image": path | PIL image | uint8 array}
      (user and tool turns) / {"type": "thinking", "thinking": ...} (assistant turns). Assistant turns
      may carry `tool_calls`: [{"function": {"name": ..., "arguments": dict | JSON string}}, ...] (the
      OpenAI shape; {"name", "arguments"} works too).
    reasoning_effort: "none" (default; None means the same) or "high" (the model thinks first).
    tools: function definitions in the OpenAI shape; the tools block is left out when None or empty.
    add_generation_prompt: True (default) encodes a prompt the model answers next; the v15 format has
      no assistant header, so the ids end with `[/INST]` or `[/TOOL_RESULTS]`, and a final assistant
      turn is refused. False encodes a finished conversation (final assistant turn closed by `</s>`).
    continue_final_message: leave the final assistant turn open (no `</s>`) for the model to continue.
    image_config: image settings (default: the tokenizer's, read from the model's config.json).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    settings = settings_json(reasoning_effort)
    tools_block = tools_json(tools) if tools else None
    roles = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise InputError(f"messages[{i}]: unknown role {role!r} (expected one of {ROLES})")
        roles.append(role)
    if "user" not in roles:
        raise InputError("messages need at least one 'user' turn (the settings block sits before the first one)")
    last = roles[-1]
    if continue_final_message and last != "assistant":
        raise InputError("continue_final_message=True needs an assistant turn last")
    if add_generation_prompt and last == "assistant" and not continue_final_message:
        raise InputError("the last message is an assistant turn: pass add_generation_prompt=False to encode a "
                         "finished conversation, or continue_final_message=True to continue that turn")

    enc = _Encoder(tokenizer, image_config)
    tok = tokenizer
    first_user = roles.index("user")
    for i, (m, role) in enumerate(zip(messages, roles)):
        where = f"messages[{i}] ({role})"
        enc.assistant = role == "assistant"
        if role == "system":
            enc.add([tok.system_prompt])
            enc.emit_parts(enc.parts(m.get("content"), where, ("text",)), where)
            enc.add([tok.system_prompt_end])
        elif role == "user":
            if i == first_user:
                if tools_block is not None:
                    enc.add([tok.available_tools, *tok.encode(tools_block), tok.available_tools_end])
                enc.add([tok.model_settings, *tok.encode(settings), tok.model_settings_end])
            parts = enc.parts(m.get("content"), where, ("text", "image"))
            if len(parts) == 2 and parts[0]["type"] == "text" and parts[1]["type"] == "image":
                parts = [parts[1], parts[0]]  # mistral-common's force_img_first
            enc.add([tok.inst])
            enc.emit_parts(parts, where)
            enc.add([tok.inst_end])
        elif role == "tool":
            enc.add([tok.tool_results])
            enc.emit_parts(enc.parts(m.get("content"), where, ("text", "image")), where)
            enc.add([tok.tool_results_end])
        else:
            _emit_assistant(enc, m, where, close=not (continue_final_message and i == len(messages) - 1))
    if enc.images:
        pixel_values, image_sizes = batch_images(enc.images)
        return ChatPrompt(enc.ids, pixel_values, image_sizes, enc.mask)
    return ChatPrompt(enc.ids, assistant_mask=enc.mask)


def training_prompt(tokenizer, messages: list[dict[str, Any]], reasoning_effort: str | None = "none",
                    tools: list[dict[str, Any]] | None = None,
                    image_config: ImageConfig | None = None) -> ChatPrompt:
    """A finished conversation for fine-tuning: the ids `apply_chat_template(...,
    add_generation_prompt=False)` writes, whose `assistant_mask` marks the targets (every assistant
    token: text, thinking, tool calls, and each turn's closing `</s>`). The last message must be an
    assistant turn, as mistral-common's fine-tuning mode requires."""
    if isinstance(messages, (list, tuple)) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") != "assistant":
        raise InputError(f"a training conversation must end with an assistant turn, got "
                         f"{messages[-1].get('role')!r} last")
    return apply_chat_template(tokenizer, messages, reasoning_effort=reasoning_effort, tools=tools,
                               add_generation_prompt=False, image_config=image_config)


def _emit_assistant(enc: _Encoder, m: dict[str, Any], where: str, close: bool) -> None:
    tok = enc.tok
    content, calls = m.get("content"), m.get("tool_calls") or []
    if not content and not calls:
        raise InputError(f"{where}: an assistant turn needs content or tool_calls")
    if isinstance(content, str):
        enc.add(tok.encode(content.rstrip(" ")))  # mistral-common strips trailing spaces of string content
    elif content:
        enc.emit_parts(enc.parts(content, where, ("text", "thinking")), where)
    for j, call in enumerate(calls):
        f = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise InputError(f"{where}.tool_calls[{j}]: expected {{'function': {{'name': ..., 'arguments': ...}}}}, "
                             f"got {call!r}")
        enc.add([tok.tool_calls, *tok.encode(f["name"]), tok.args,
                 *tok.encode(_arguments_json(f.get("arguments", {})))])
    if close:
        enc.add([tok.eos])


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
