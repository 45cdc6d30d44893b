"""The OpenAI wire format: request schemas, the error body, and token strings.

Field names follow the `openai` package's types (`openai/types/chat/chat_completion*.py`,
`openai/types/completion*.py`); the extensions are vLLM's: `reasoning_content` beside `content`,
`top_k`, `stop_token_ids`. Unknown fields are ignored; known fields of the wrong JSON type are a 422.

Errors are `{"error": {"message", "type", "param", "code"}}` with these statuses:

| status | when | code |
|---|---|---|
| 400 | malformed JSON, a body that is not an object, a bad value (range, unknown role or part type, a tool name, ...), an option this server does not support, a prompt + max_tokens beyond the context or the cache | `invalid_json`, `invalid_value`, `unsupported_parameter`, `context_length_exceeded` |
| 401 | the server has an API key and the request's `Authorization: Bearer` is missing or wrong | `missing_api_key`, `invalid_api_key` |
| 404 | an unknown model name, an unknown path | `model_not_found`, `not_found` |
| 405 | a known path with the wrong method | `method_not_allowed` |
| 413 | a body over the size limit, more images than the limit | `request_too_large`, `too_many_images` |
| 422 | a field of the wrong JSON type (a string for `temperature`, ...) | `invalid_type` |
| 500 | a failure inside the server (the next request is still served) | `internal_error` |
| 503 | the server is shutting down (a request still running is cancelled at the end of the drain) | `shutting_down` |
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..text import chat
from ..text.tokenizer import byte_to_unicode

ERROR_TYPES = {401: "authentication_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error answered as OpenAI answers it: `status` and the `{"error": ...}` body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------- requests
class _Schema(BaseModel):
    # strict: "0.5" is not a number and true is not an integer (OpenAI answers such bodies with an error)
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Schema):
    include_usage: bool = False


class _Common(_Schema):
    model: str | None = None
    temperature: float | None = None  # default 1.0, as OpenAI's
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension; 0 or -1: no cut
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extension: ids that end a request, besides eos
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted at their neutral values only (400 otherwise)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class ChatRequest(_Common):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    reasoning_effort: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


UNION_FIELDS = {"prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
                "stop": "a string or a list of strings", "tool_choice": "a string or an object"}


def parse(schema: type[BaseModel], body: dict) -> Any:
    """The validated request, or a 422 naming the first field of the wrong type."""
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        if field in UNION_FIELDS:
            message = f"{field} must be {UNION_FIELDS[field]}"
        else:
            where = ".".join(str(x) for x in err["loc"])
            message = f"{where}: {err['msg']}" if where else err["msg"]
        raise APIError(422, message, "invalid_type", field) from None


# ---------------------------------------------------------------------- token strings
class KnownIds:
    """The tokenizer as the server uses it: `decode` (and so `parse_output`, streaming, stop strings) leaves
    out ids the tokenizer does not have instead of raising. A model's vocabulary may be larger than its
    tokenizer's (padded rows of the embedding): such an id has no text, and generating it must not fail the
    request, nor, through a stop string's check, the engine thread. Everything else is the tokenizer's."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        n = self.tokenizer.vocab_size
        return self.tokenizer.decode([i for i in map(int, ids) if 0 <= i < n], skip_special_tokens=skip_special_tokens)

    def parse_output(self, ids):
        return chat.parse_output(self, ids)


class TokenStrings:
    """Each token id as the string and bytes an OpenAI logprobs entry shows: its UTF-8 text, or
    "bytes:\\xNN..." for a piece of a multi-byte character (as OpenAI writes them); special tokens by name."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._byte_of = {c: b for b, c in byte_to_unicode().items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, i: int) -> tuple[str, list[int]]:
        i = int(i)
        if i not in self._cache:
            self._cache[i] = self._make(i)
        return self._cache[i]

    def text(self, i: int) -> str:
        return self.get(i)[0]

    def _make(self, i: int) -> tuple[str, list[int]]:
        piece = self.tok.id_to_token(i) or ""
        raw = None
        if not self.tok.is_special(i):
            try:  # a byte-level BPE piece: one character per byte
                raw = bytes(self._byte_of[c] for c in piece)
            except KeyError:
                raw = None
        if raw is None:
            raw = (piece if self.tok.is_special(i) else self.tok.decode([i])).encode("utf-8")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, list(raw)
