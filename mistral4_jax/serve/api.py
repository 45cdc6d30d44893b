"""The OpenAI-compatible HTTP API: a FastAPI app over a `worker.Worker`.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health

A handler reads and checks the body (size, JSON, schema, model name, values), renders the prompt (the v15
chat template; images from `data:` URLs), submits one engine request per choice to the worker and
answers when they end, or streams server-sent events as their tokens come. `protocol.py` lists the
fields and the error statuses. A client that disconnects cancels its requests. `logprobs` (and `echo`
with logprobs) come from one teacher-forced pass over prompt + generated tokens after generation
(`score.token_logprobs`): the log-probabilities of the model's own distribution, as `score` computes them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import io
import json
import math
import os
import secrets
import string
import sys
import time
import traceback
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError
from ..inference.engine import MAX_STOP_TOKENS
from ..text.streaming import REPLACEMENT, ChatStream
from .protocol import APIError, ChatRequest, CompletionRequest, TokenStrings, parse
from .worker import ShuttingDown

REASONING_EFFORTS = ("none", "high")
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_IMAGE_PIXELS = 64_000_000  # a decoded image's width x height (decompression bombs)
DRAIN_BODY_LIMIT = 1 << 28  # an oversized body up to this is read (and dropped) so the client sees the 413
POLL_SECONDS = 0.5  # how often a waiting handler checks that its client is still there
CALL_ID_CHARS = string.ascii_letters + string.digits


@dataclasses.dataclass
class Limits:
    max_body_bytes: int = 32 << 20
    max_images: int = 8
    max_choices: int = 64  # prompts x n of one request


class Service:
    """What the handlers share: the worker, the tokenizer, the engine's limits, the settings."""

    def __init__(self, worker, tokenizer, served_name: str, api_key: str | None = None, limits: Limits | None = None,
                 root: str | None = None, aliases: tuple[str, ...] = ()):
        self.worker, self.tok = worker, tokenizer
        self.engine = worker.engine
        self.config = self.engine.config
        self.served_name, self.api_key, self.root = served_name, api_key, root
        self.names = {served_name, *aliases}  # what a request's `model` may say
        self.limits = limits or Limits()
        self.strings = TokenStrings(tokenizer)
        self.eos = list(self.config.text.eos_token_id)
        self.draining = False
        self.created = int(time.time())

    # ------------------------------------------------------------------ checks every request passes
    def check(self, request: Request) -> None:
        if self.worker.failed:
            raise APIError(500, f"the server cannot serve: {self.worker.failed}", "internal_error")
        if self.draining:
            raise APIError(503, "the server is shutting down", "shutting_down")
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if not auth:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'", "missing_api_key")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid API key", "invalid_api_key")

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {self.served_name!r}",
                           "model_not_found", "model")


# ---------------------------------------------------------------------- the body
async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object: 413 above `limit` bytes, 400 when it is not JSON or not an object."""
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                       "request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        if int(declared) <= DRAIN_BODY_LIMIT:
            async for _ in request.stream():
                pass
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}", "invalid_json")
    return data


# ---------------------------------------------------------------------- settings shared by both endpoints
@dataclasses.dataclass
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    seed: int
    n: int
    stop_strings: list[str]
    stop_tokens: list[int]
    stream: bool
    include_usage: bool


def _bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code, param)


def sampling(service: Service, req) -> Sampling:
    t = 1.0 if req.temperature is None else req.temperature
    if not (math.isfinite(t) and t >= 0):
        raise _bad(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}", "temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise _bad(f"top_p must be in (0, 1], got {top_p!r}", "top_p")
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    if top_k < 0:
        raise _bad(f"top_k must be >= 0 (0 or -1: no cut), got {req.top_k!r}", "top_k")
    if not 1 <= req.n <= service.limits.max_choices:
        raise _bad(f"n must be in [1, {service.limits.max_choices}], got {req.n}", "n")
    for name, neutral in (("frequency_penalty", 0), ("presence_penalty", 0), ("repetition_penalty", 1)):
        v = getattr(req, name)
        if v is not None and v != neutral:
            raise _bad(f"{name} is not supported by this server (only {neutral})", name, "unsupported_parameter")
    if req.logit_bias:
        raise _bad("logit_bias is not supported by this server", "logit_bias", "unsupported_parameter")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    stops = [s for s in stops if s]
    vocab = service.config.text.vocab_size
    extra = list(req.stop_token_ids or [])
    if any(not 0 <= i < vocab for i in extra):
        raise _bad(f"stop_token_ids must be ids in [0, {vocab})", "stop_token_ids")
    stop_tokens = service.eos + [i for i in extra if i not in service.eos]
    if len(stop_tokens) > MAX_STOP_TOKENS:
        raise _bad(f"stop_token_ids: at most {MAX_STOP_TOKENS - len(service.eos)} ids besides eos", "stop_token_ids")
    seed = secrets.randbelow(2**31) if req.seed is None else req.seed
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Sampling(t, top_p, top_k, seed, req.n, stops, stop_tokens, req.stream, include_usage)


def request_key(seed: int, i: int) -> list[int]:
    """Choice i's sampling key: fold_in(PRNGKey(seed), i), as `generate` keys its i-th prompt (so a choice
    equals `generate(..., seed=seed)` of its prompt at index i); a seed outside [0, 2**31) is taken as its
    64 bits, high word first (what PRNGKey does with 64-bit ints)."""
    import jax

    if 0 <= seed < 2**31:
        base = jax.random.PRNGKey(seed)
    else:
        s = seed % 2**64
        base = np.asarray([s >> 32, s & 0xFFFFFFFF], np.uint32)
    return [int(x) for x in np.asarray(jax.random.key_data(jax.random.fold_in(base, i)))]


def check_length(service: Service, n_prompt: int, max_tokens: int, param: str, cache: bool = True) -> None:
    """A 400 when prompt + max_tokens exceed the context, or (`cache`: it runs on the engine) the cache."""
    e = service.engine
    if n_prompt + max_tokens > e.max_len:
        raise APIError(400, f"this server's context is {e.max_len} tokens, but the request needs "
                            f"{n_prompt + max_tokens} ({n_prompt} in the prompt, {max_tokens} to generate): shorten "
                            f"the prompt or {param}",
                       "context_length_exceeded", param)
    if cache and n_prompt + max_tokens > e.capacity:
        raise APIError(400, f"the request needs {n_prompt + max_tokens} cache tokens ({n_prompt} prompt + {max_tokens} "
                            f"to generate), more than one request may hold in this server's cache ({e.capacity}; "
                            "--cache-tokens)", "context_length_exceeded", param)


def cut_at_stops(text: str, stops: list[str], final: bool = True) -> tuple[str, bool]:
    """(text up to the earliest stop string, whether one was found); not `final`: also hold back a tail that
    may still grow into a stop string."""
    at = [i for i in (text.find(s) for s in stops) if i >= 0]
    if at:
        return text[:min(at)], True
    if final or not stops:
        return text, False
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold], False


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # OpenAI's "very unlikely"


# ---------------------------------------------------------------------- chat: the prompt
def _data_url(url: Any, where: str) -> str:
    """The base64 payload of a data: URL (the server fetches nothing)."""
    if not isinstance(url, str):
        raise _bad(f"{where}: image_url.url must be a string", "messages")
    if not url.startswith("data:"):
        raise _bad(f"{where}: only data: URLs (data:image/png;base64,...) are accepted; this server fetches "
                   "nothing", "messages")
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise _bad(f"{where}: a data: URL must be base64 (data:image/...;base64,...)", "messages")
    return payload


def _open_image(payload: str, where: str):
    from PIL import Image

    try:
        raw = base64.b64decode(payload, validate=True)
        img = Image.open(io.BytesIO(raw))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise _bad(f"{where}: a {img.width}x{img.height} image has more than {MAX_IMAGE_PIXELS} pixels",
                       "messages")
        img.load()
    except APIError:
        raise
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as e:
        raise _bad(f"{where}: cannot decode the image ({type(e).__name__}: {e})", "messages") from None
    return img


def convert_messages(messages: list[dict], max_images: int) -> tuple[list[dict], list[str]]:
    """OpenAI messages as `apply_chat_template` takes them, and the images' base64 files in order. Only
    text and image_url parts (data: URLs) are read: a message can name no file on the server."""
    n_images = sum(1 for m in messages if isinstance(m.get("content"), list)
                   for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url")
    if n_images > max_images:
        raise APIError(413, f"the request has {n_images} images, more than this server's limit of {max_images}",
                       "too_many_images", "messages")
    out, files = [], []
    for i, m in enumerate(messages):
        role = "system" if m.get("role") == "developer" else m.get("role")
        msg: dict[str, Any] = {"role": role, "content": m.get("content")}
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": p.get("text")})
                elif kind == "image_url":
                    url = p.get("image_url")
                    payload = _data_url(url.get("url") if isinstance(url, dict) else url, where)
                    parts.append({"type": "image", "image": _open_image(payload, where)})
                    files.append(payload)
                else:
                    raise _bad(f"{where}: part type {kind!r} is not supported (text, image_url)", "messages")
            msg["content"] = parts
        elif content is not None and not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or a list of parts", "messages")
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        if role == "tool":
            msg["tool_call_id"] = m.get("tool_call_id")
            if m.get("name") is not None:
                msg["name"] = m["name"]
        out.append(msg)
    return out, files


@dataclasses.dataclass
class ChatPlan:
    ids: list[int]  # the prompt, with a forced tool call's opening
    forced: list[int]  # that opening (its tokens are part of the reply's text)
    images: tuple | None
    files: list[str]
    max_tokens: int
    sampling: Sampling
    logprobs: bool
    top_logprobs: int


def prepare_chat(service: Service, req: ChatRequest) -> ChatPlan:
    """Everything a chat request needs before it runs (called in a thread: images are decoded here)."""
    tok = service.tok
    s = sampling(service, req)
    effort = req.reasoning_effort
    if effort is not None and effort not in REASONING_EFFORTS:
        raise _bad(f"reasoning_effort must be one of {REASONING_EFFORTS} (Mistral Small 4 reasons or not), "
                   f"got {effort!r}", "reasoning_effort")
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise _bad("response_format: only {'type': 'text'} is supported", "response_format", "unsupported_parameter")
    tools = [dict(t, function={"parameters": {}, **t["function"]}) if isinstance(t, dict)
             and isinstance(t.get("function"), dict) else t for t in (req.tools or [])]
    names = [t["function"].get("name") for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    forced: list[int] = []
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise _bad(f"tool_choice names a function {name!r} that is not in tools ({names})", "tool_choice")
        forced = [tok.tool_calls, *tok.encode(name), tok.args]
    elif choice == "required":
        if not tools:
            raise _bad("tool_choice 'required' needs tools", "tool_choice")
        forced = [tok.tool_calls]
    elif choice not in ("auto", "none"):
        raise _bad(f"tool_choice must be 'auto', 'none', 'required' or a named function, got {choice!r}",
                   "tool_choice")
    messages, files = convert_messages(req.messages, service.limits.max_images)
    if req.logprobs and files and req.n > 1:
        raise _bad("logprobs with images: one choice per request (n = 1)", "n")
    try:
        prompt = tok.apply_chat_template(messages, reasoning_effort=effort or "none",
                                         tools=tools if tools and choice != "none" else None)
    except InputError as e:
        raise _bad(str(e), "messages") from None
    ids = prompt.input_ids + forced
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = min(service.engine.max_len, service.engine.capacity) - len(ids)
        if max_tokens < 1:
            check_length(service, len(ids), 1, "messages")
    elif max_tokens < 1:
        raise _bad(f"{param} must be >= 1, got {max_tokens}", param)
    check_length(service, len(ids), max_tokens, param)
    top = req.top_logprobs or 0
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise _bad(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs")
    if top and not req.logprobs:
        raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
    images = (prompt.pixel_values, prompt.image_sizes) if prompt.num_images else None
    return ChatPlan(ids, forced, images, files, max_tokens, s, req.logprobs, top)


def engine_spec(prompt: list[int], max_tokens: int, s: Sampling, index: int, files: list[str]) -> dict:
    return {"prompt": prompt, "max_new_tokens": max_tokens, "temperature": s.temperature, "top_k": s.top_k,
            "top_p": s.top_p, "key": request_key(s.seed, index), "stop_tokens": s.stop_tokens,
            "stop_strings": s.stop_strings, "images": files or None}


# ---------------------------------------------------------------------- running requests
class Run:
    """The engine requests of one HTTP request, seen from the event loop: their events arrive on `queue` as
    (choice, kind, value)."""

    def __init__(self, service: Service, tokens: bool):
        self.service, self.tokens = service, tokens  # tokens: the handler wants the tokens as they come
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests: list = []
        self.reasons: dict[int, str] = {}
        self.checked = time.monotonic()  # when the client was last seen connected

    def _sink(self, index: int):
        def sink(kind, value):
            if kind == "tokens" and not self.tokens:
                return
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, kind, value))
            except RuntimeError:  # the event loop is gone (shutdown)
                pass
        return sink

    async def start(self, specs: list[dict], local: dict | None) -> None:
        futures = [self.service.worker.submit(spec, self._sink(i), local) for i, spec in enumerate(specs)]
        error = None
        for f in futures:
            try:
                self.requests.append(await asyncio.wrap_future(f))
            except InputError as e:
                error = error or e
                self.requests.append(None)
            except RuntimeError as e:
                error = error or e
                self.requests.append(None)
        if error is not None:
            self.cancel()
            if isinstance(error, ShuttingDown):
                raise APIError(503, "the server is shutting down", "shutting_down")
            if isinstance(error, InputError):
                text = str(error)
                long = "context limit" in text or "cache tokens" in text
                raise APIError(400, text, "context_length_exceeded" if long else "invalid_value",
                               "max_tokens" if long else None)
            raise APIError(500, str(error), "internal_error")

    def cancel(self) -> None:
        for i, r in enumerate(self.requests):
            if r is not None and i not in self.reasons:
                self.service.worker.cancel(r)

    @property
    def finished(self) -> bool:
        return len(self.reasons) == len(self.requests)

    def end(self, index: int, kind: str, value) -> None:
        if kind == "done":
            self.reasons[index] = value
        elif kind == "error":
            self.reasons[index] = "error"
            raise APIError(500, str(value), "internal_error")

    async def next_event(self, request: Request | None):
        """The next event; cancels the requests and raises ClientGone when the client has left (checked every
        POLL_SECONDS; a streamed response passes None: Starlette cancels its generator instead)."""
        if request is None:
            return await self.queue.get()
        while True:
            if time.monotonic() - self.checked > POLL_SECONDS:
                self.checked = time.monotonic()
                if await request.is_disconnected():
                    self.cancel()
                    raise ClientGone()
            try:
                return await asyncio.wait_for(self.queue.get(), POLL_SECONDS)
            except TimeoutError:
                pass

    async def wait(self, request: Request) -> None:
        while not self.finished:
            self.end(*await self.next_event(request))
        if "cancelled" in self.reasons.values():
            raise APIError(503, "the request was cancelled: the server is shutting down", "shutting_down")


class ClientGone(Exception):
    """The client disconnected: nothing is answered."""


async def run_logprobs(service: Service, sequences: list[list[int]], top: int, images, files) -> list:
    """token_logprobs of each sequence on the worker (images: one sequence per call)."""
    if images is None:
        spec = {"sequences": sequences, "top": max(1, top), "images": None}
        return await asyncio.wrap_future(service.worker.logprobs(spec))
    out = []
    for seq in sequences:
        spec = {"sequences": [seq], "top": max(1, top), "images": files}
        out += await asyncio.wrap_future(service.worker.logprobs(spec, {"images": images}))
    return out


# ---------------------------------------------------------------------- chat: the reply
def call_id() -> str:
    """A tool call id: 9 letters and digits, the form mistral-common's validators ask for."""
    return "".join(secrets.choice(CALL_ID_CHARS) for _ in range(9))


def tool_calls_of(parsed) -> list[dict]:
    return [{"id": call_id(), "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"] if isinstance(c["arguments"], str)
                          else json.dumps(c["arguments"], ensure_ascii=False)}} for c in parsed.tool_calls]


def finish_reason(engine_reason: str, calls: list) -> str:
    if engine_reason == "stop" and calls:
        return "tool_calls"
    return engine_reason


def chat_logprobs(service: Service, tokens: list[int], lp, start: int, top: int) -> dict:
    """The `logprobs.content` entries of generated `tokens` (position start + j predicts token j)."""
    content = []
    for j, t in enumerate(tokens):
        text, raw = service.strings.get(t)
        at = start + j
        tops = [{"token": service.strings.text(i), "bytes": service.strings.get(i)[1], "logprob": _finite(float(v))}
                for i, v in zip(lp.top_ids[at][:top], lp.top_logprobs[at][:top])]
        content.append({"token": text, "bytes": raw, "logprob": _finite(lp.logprobs[at]), "top_logprobs": tops})
    return {"content": content, "refusal": None}


class ChoiceText:
    """One streamed choice of a chat: reasoning and answer deltas (ChatStream), held back at stop strings."""

    def __init__(self, tok, stops: list[str], forced: list[int]):
        self.stream = ChatStream(tok)
        for t in forced:
            self.stream.push(t)
        self.stops = stops
        self.text = {"answer": "", "reasoning": ""}
        self.sent = {"answer": "", "reasoning": ""}

    def push(self, tokens: list[int]) -> dict[str, str]:
        for t in tokens:
            self._take(self.stream.push(t))
        return self._release(False)

    def close(self) -> dict[str, str]:
        self._take(self.stream.close())
        return self._release(True)

    def _take(self, deltas) -> None:
        for kind, text in deltas:
            if kind in self.text:
                self.text[kind] += text

    def _release(self, final: bool) -> dict[str, str]:
        out = {}
        for kind, text in self.text.items():
            safe, _ = cut_at_stops(text, self.stops, final)
            if len(safe) > len(self.sent[kind]) and safe.startswith(self.sent[kind]):
                out[kind] = safe[len(self.sent[kind]):]
                self.sent[kind] = safe
        return out


def chat_message(service: Service, plan: ChatPlan, tokens: list[int]) -> tuple[dict, list]:
    parsed = service.tok.parse_output(plan.forced + tokens)
    content, _ = cut_at_stops(parsed.content, plan.sampling.stop_strings)
    reasoning = None if parsed.reasoning is None else cut_at_stops(parsed.reasoning, plan.sampling.stop_strings)[0]
    calls = tool_calls_of(parsed)
    message = {"role": "assistant", "content": None if calls and not content else content,
               "reasoning_content": reasoning}
    if calls:
        message["tool_calls"] = calls
    return message, calls


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------- the app
def build_app(service: Service) -> FastAPI:
    app = FastAPI(title="mistral4-jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def answer(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return answer(APIError(404, f"no such endpoint: {request.method} {request.url.path}", "not_found"))
        if exc.status_code == 405:
            return answer(APIError(405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"))
        return answer(APIError(exc.status_code, str(exc.detail), None))

    async def guarded(request: Request, handler):
        try:
            service.check(request)
            return await handler(request)
        except APIError as e:
            return answer(e)
        except ClientGone:
            return JSONResponse({}, status_code=499)
        except ShuttingDown:
            return answer(APIError(503, "the server is shutting down", "shutting_down"))
        except InputError as e:
            return answer(_bad(str(e), None))
        except Exception as e:  # noqa: BLE001 - a bug answers 500 and the server goes on
            return answer(internal_error(e))

    @app.get("/health")
    async def health():
        if service.worker.failed:
            return JSONResponse({"status": "failed", "error": service.worker.failed}, status_code=500)
        if service.draining:
            return JSONResponse({"status": "shutting down", "requests": service.worker.running}, status_code=503)
        return {"status": "ok", "requests": service.worker.running}

    @app.get("/v1/models")
    async def models(request: Request):
        async def handler(_):
            return {"object": "list", "data": [model_card(service)]}
        return await guarded(request, handler)

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str):
        async def handler(_):
            service.check_model(name)
            return model_card(service)
        return await guarded(request, handler)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await guarded(request, lambda r: chat_completion(service, r))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await guarded(request, lambda r: completion(service, r))

    return app


def internal_error(e: Exception) -> APIError:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
    print(f"mistral4-jax serve: request failed: {type(e).__name__}: {detail}", file=sys.stderr, flush=True)
    if os.environ.get("MISTRAL4_JAX_TRACEBACK"):
        traceback.print_exception(e, file=sys.stderr)
    return APIError(500, f"internal error: {type(e).__name__}: {detail}", "internal_error")


def model_card(service: Service) -> dict:
    return {"id": service.served_name, "object": "model", "created": service.created, "owned_by": "mistral4-jax",
            "root": service.root, "max_model_len": service.engine.max_len}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------------- POST /v1/chat/completions
async def chat_completion(service: Service, request: Request):
    body = await read_json(request, service.limits.max_body_bytes)
    req = parse(ChatRequest, body)
    service.check_model(req.model)
    plan = await asyncio.to_thread(prepare_chat, service, req)
    s = plan.sampling
    specs = await asyncio.to_thread(lambda: [engine_spec(plan.ids, plan.max_tokens, s, i, plan.files)
                                             for i in range(s.n)])
    run = Run(service, s.stream)
    await run.start(specs, {"images": plan.images} if plan.images is not None else None)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.served_name,
            "system_fingerprint": None}
    if s.stream:
        return StreamingResponse(stream_chat(service, request, run, plan, head), media_type="text/event-stream")
    try:
        await run.wait(request)
    except BaseException:
        run.cancel()
        raise
    choices = []
    lps = await run_logprobs(service, [plan.ids + r.tokens for r in run.requests], plan.top_logprobs,
                             plan.images, plan.files) if plan.logprobs else None
    for i, r in enumerate(run.requests):
        message, calls = chat_message(service, plan, r.tokens)
        logprobs = chat_logprobs(service, r.tokens, lps[i], len(plan.ids) - 1, plan.top_logprobs) if lps else None
        choices.append({"index": i, "message": message, "logprobs": logprobs,
                        "finish_reason": finish_reason(run.reasons[i], calls)})
    return {**head, "object": "chat.completion", "choices": choices,
            "usage": usage(len(plan.ids), sum(len(r.tokens) for r in run.requests))}


async def stream_chat(service: Service, request: Request, run: Run, plan: ChatPlan, head: dict):
    s = plan.sampling
    chunk = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if s.include_usage else {}

    def event(index, delta, finish=None, logprobs=None):
        return sse({**chunk, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                          "finish_reason": finish}], **extra})

    texts = [ChoiceText(service.tok, s.stop_strings, plan.forced) for _ in run.requests]
    try:
        for i in range(len(run.requests)):
            yield event(i, {"role": "assistant", "content": ""})
        while not run.finished:
            i, kind, value = await run.next_event(None)
            if kind == "tokens":
                for name, text in texts[i].push(value).items():
                    yield event(i, {"content" if name == "answer" else "reasoning_content": text})
                continue
            run.end(i, kind, value)
            if value == "cancelled":
                raise APIError(503, "the request was cancelled: the server is shutting down", "shutting_down")
            for name, text in texts[i].close().items():
                yield event(i, {"content" if name == "answer" else "reasoning_content": text})
            tokens = run.requests[i].tokens
            _, calls = chat_message(service, plan, tokens)
            if calls:
                yield event(i, {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]})
            if plan.logprobs:
                lp = (await run_logprobs(service, [plan.ids + tokens], plan.top_logprobs, plan.images, plan.files))[0]
                yield event(i, {}, logprobs=chat_logprobs(service, tokens, lp, len(plan.ids) - 1, plan.top_logprobs))
            yield event(i, {}, finish_reason(value, calls))
        if s.include_usage:
            yield sse({**chunk, "choices": [], "usage": usage(len(plan.ids), sum(len(r.tokens) for r in run.requests))})
        yield "data: [DONE]\n\n"
    except APIError as e:
        run.cancel()
        yield sse(e.body())
        yield "data: [DONE]\n\n"
    except ClientGone:
        return
    except Exception as e:  # noqa: BLE001
        run.cancel()
        yield sse(internal_error(e).body())
        yield "data: [DONE]\n\n"
    finally:  # the client left (the generator is closed or cancelled): free the slots
        run.cancel()


# ---------------------------------------------------------------------- POST /v1/completions
@dataclasses.dataclass
class CompletionPlan:
    prompts: list[list[int]]
    texts: list[str]  # what echo returns of each prompt
    max_tokens: int
    sampling: Sampling
    echo: bool
    logprobs: int | None

    @property
    def scored_only(self) -> bool:
        """lm-eval's log-likelihood request (echo, logprobs, max_tokens 1, greedy): the next token is the argmax
        of the teacher-forced pass, so no generation runs."""
        return self.echo and self.logprobs is not None and self.max_tokens == 1 and self.sampling.temperature == 0


def prepare_completion(service: Service, req: CompletionRequest) -> CompletionPlan:
    tok = service.tok
    s = sampling(service, req)
    if req.suffix:
        raise _bad("suffix is not supported by this server", "suffix", "unsupported_parameter")
    if req.best_of not in (None, 1, req.n):
        raise _bad("best_of is not supported by this server (only best_of = n)", "best_of", "unsupported_parameter")
    p = req.prompt
    if isinstance(p, str):
        raw = [p]
    elif not p:
        raise _bad("prompt is empty", "prompt")
    elif isinstance(p[0], int):
        raw = [p]
    else:
        raw = list(p)
    vocab = service.config.text.vocab_size
    prompts, texts = [], []
    for i, x in enumerate(raw):
        if isinstance(x, str):
            prompts.append(tok.encode(x, add_bos=True))
            texts.append(x)
        else:
            if not x:
                raise _bad(f"prompt[{i}] is an empty token list", "prompt")
            if any(not 0 <= t < vocab for t in x):
                raise _bad(f"prompt[{i}] holds ids outside the vocabulary [0, {vocab})", "prompt")
            prompts.append(list(x))
            texts.append(tok.decode(x, skip_special_tokens=True))
    if len(prompts) * s.n > service.limits.max_choices:
        raise _bad(f"prompts x n = {len(prompts) * s.n} choices, more than this server's {service.limits.max_choices}",
                   "prompt")
    if req.max_tokens is None or req.max_tokens < 0:
        raise _bad(f"max_tokens must be >= 0, got {req.max_tokens}", "max_tokens")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
        raise _bad(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "logprobs")
    if req.max_tokens == 0 and not req.echo:
        raise _bad("max_tokens 0 needs echo (there is nothing else to return)", "max_tokens")
    plan = CompletionPlan(prompts, texts, req.max_tokens, s, req.echo, req.logprobs)
    generates = not (plan.scored_only or plan.max_tokens == 0)  # else one teacher-forced pass: no cache pages
    for x in prompts:
        check_length(service, len(x), max(req.max_tokens, 1 if req.logprobs is not None else 0), "max_tokens",
                     cache=generates)
    if req.stream and req.max_tokens == 0:
        raise _bad("stream needs max_tokens >= 1", "stream")
    return plan


def completion_logprobs(service: Service, plan: CompletionPlan, prompt: list[int], tokens: list[int], lp,
                        text_start: int) -> dict:
    """The legacy `logprobs` object: tokens, token_logprobs, top_logprobs (the `logprobs` most likely and the
    token itself, as vLLM gives them) and text_offset, of the echoed prompt (its first token has none) and
    the generated tokens."""
    k = plan.logprobs or 0
    strings = service.strings
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = text_start

    def add(t: int, at: int | None):
        nonlocal offset
        text = strings.text(t)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(service.tok.decode([t], skip_special_tokens=True))  # where the next token's text starts
        if at is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            return
        value = _finite(lp.logprobs[at])
        top = {strings.text(i): _finite(float(v)) for i, v in zip(lp.top_ids[at][:k], lp.top_logprobs[at][:k])}
        top.setdefault(text, value)
        out["token_logprobs"].append(value)
        out["top_logprobs"].append(top)

    if plan.echo:
        for j, t in enumerate(prompt):
            add(t, None if j == 0 else j - 1)
    for j, t in enumerate(tokens):
        add(t, len(prompt) - 1 + j)
    return out


async def completion(service: Service, request: Request):
    body = await read_json(request, service.limits.max_body_bytes)
    req = parse(CompletionRequest, body)
    service.check_model(req.model)
    plan = await asyncio.to_thread(prepare_completion, service, req)
    s = plan.sampling
    n = s.n
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.served_name,
            "system_fingerprint": None}
    if plan.scored_only or plan.max_tokens == 0:
        return await scored_completion(service, plan, head)
    specs = await asyncio.to_thread(lambda: [engine_spec(p, plan.max_tokens, s, i * n + j, [])
                                             for i, p in enumerate(plan.prompts) for j in range(n)])
    run = Run(service, s.stream)
    await run.start(specs, None)
    if s.stream:
        return StreamingResponse(stream_completion(service, request, run, plan, head), media_type="text/event-stream")
    try:
        await run.wait(request)
    except BaseException:
        run.cancel()
        raise
    lps = None
    if plan.logprobs is not None:
        lps = await run_logprobs(service, [plan.prompts[k // n] + r.tokens for k, r in enumerate(run.requests)],
                                 plan.logprobs, None, None)
    choices = []
    for k, r in enumerate(run.requests):
        prompt = plan.prompts[k // n]
        text, _ = cut_at_stops(service.tok.decode(r.tokens, skip_special_tokens=True), s.stop_strings)
        start = plan.texts[k // n] if plan.echo else ""
        choices.append({"index": k, "text": start + text, "finish_reason": run.reasons[k],
                        "logprobs": None if lps is None else completion_logprobs(service, plan, prompt, r.tokens,
                                                                                lps[k], 0)})
    return {**head, "object": "text_completion", "choices": choices,
            "usage": usage(sum(map(len, plan.prompts)), sum(len(r.tokens) for r in run.requests))}


async def scored_completion(service: Service, plan: CompletionPlan, head: dict):
    """echo with max_tokens 0, or lm-eval's log-likelihood request: one teacher-forced pass, no generation."""
    s, n = plan.sampling, plan.sampling.n
    lps = None
    if plan.logprobs is not None:
        lps = await run_logprobs(service, plan.prompts, plan.logprobs, None, None)
    choices = []
    for k in range(len(plan.prompts) * n):
        prompt = plan.prompts[k // n]
        tokens, reason, text = [], "length", ""
        if plan.max_tokens:  # scored_only: the greedy next token
            tokens = [int(lps[k // n].top_ids[-1][0])]
            text, cut = cut_at_stops(service.tok.decode(tokens, skip_special_tokens=True), s.stop_strings)
            reason = "stop" if cut or tokens[0] in s.stop_tokens else "length"
        logprobs = None
        if lps is not None:
            lp = lps[k // n]
            if tokens:  # the next token's log p is its top value
                lp = dataclasses.replace(lp, logprobs=lp.logprobs + [float(lp.top_logprobs[-1][0])])
            logprobs = completion_logprobs(service, plan, prompt, tokens, lp, 0)
        choices.append({"index": k, "text": plan.texts[k // n] + text, "finish_reason": reason, "logprobs": logprobs})
    result = {**head, "object": "text_completion", "choices": choices,
              "usage": usage(sum(map(len, plan.prompts)), sum(1 for _ in choices) * plan.max_tokens)}
    if s.stream:
        async def one():
            for c in choices:
                yield sse({**head, "object": "text_completion", "choices": [c]})
            if s.include_usage:
                yield sse({**head, "object": "text_completion", "choices": [], "usage": result["usage"]})
            yield "data: [DONE]\n\n"
        return StreamingResponse(one(), media_type="text/event-stream")
    return result


class TextDeltas:
    """A completion's text as it grows: decoded whole each time (never half a UTF-8 character), held back at
    stop strings."""

    def __init__(self, tok, stops: list[str]):
        self.tok, self.stops = tok, stops
        self.ids: list[int] = []
        self.sent = ""

    def push(self, tokens: list[int], final: bool = False) -> str:
        self.ids += tokens
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not final:
            text = text.rstrip(REPLACEMENT)
        safe, _ = cut_at_stops(text, self.stops, final)
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta


async def stream_completion(service: Service, request: Request, run: Run, plan: CompletionPlan, head: dict):
    s, n = plan.sampling, plan.sampling.n
    chunk = {**head, "object": "text_completion"}
    extra = {"usage": None} if s.include_usage else {}

    def event(index, text, finish=None, logprobs=None):
        return sse({**chunk, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                          "finish_reason": finish}], **extra})

    texts = [TextDeltas(service.tok, s.stop_strings) for _ in run.requests]
    try:
        if plan.echo:
            for k in range(len(run.requests)):
                yield event(k, plan.texts[k // n])
        while not run.finished:
            k, kind, value = await run.next_event(None)
            if kind == "tokens":
                delta = texts[k].push(value)
                if delta:
                    yield event(k, delta)
                continue
            run.end(k, kind, value)
            if value == "cancelled":
                raise APIError(503, "the request was cancelled: the server is shutting down", "shutting_down")
            delta = texts[k].push([], final=True)
            if delta:
                yield event(k, delta)
            logprobs = None
            if plan.logprobs is not None:
                prompt, tokens = plan.prompts[k // n], run.requests[k].tokens
                lp = (await run_logprobs(service, [prompt + tokens], plan.logprobs, None, None))[0]
                logprobs = completion_logprobs(service, plan, prompt, tokens, lp, 0)
            yield event(k, "", value, logprobs)
        if s.include_usage:
            yield sse({**chunk, "choices": [], "usage": usage(sum(map(len, plan.prompts)),
                                                               sum(len(r.tokens) for r in run.requests))})
        yield "data: [DONE]\n\n"
    except APIError as e:
        run.cancel()
        yield sse(e.body())
        yield "data: [DONE]\n\n"
    except ClientGone:
        return
    except Exception as e:  # noqa: BLE001
        run.cancel()
        yield sse(internal_error(e).body())
        yield "data: [DONE]\n\n"
    finally:
        run.cancel()
