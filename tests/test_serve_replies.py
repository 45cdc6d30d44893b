"""The server's reply fields that the random tiny model never produces, and clients that leave: ONE server on
127.0.0.1 over a scripted engine (its replies are fixed token sequences: reasoning, tool calls, a reply that
never ends), with the `openai` client and plain HTTP. The real model is tests/test_serve.py's."""

import json
import threading
import time
from collections import deque

import numpy as np
import openai
import pytest
import requests

from mistral4_jax.config import ModelConfig
from mistral4_jax.demo.synthetic_tokenizer import write_tekken
from mistral4_jax.inference import engine as engine_mod
from mistral4_jax.serve.server import Server
from mistral4_jax.text.tokenizer import Tokenizer

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
STALL = None  # in a script: the reply stops here without finishing, until it is cancelled


class ScriptedEngine:
    """Stands in for `Engine` behind the server's worker (the same submit / cancel / busy / step / results):
    each request's reply is `script(prompt)`, at most two tokens a step."""

    def __init__(self, config, script):
        self.config, self.model, self.script = config, None, script
        self.max_len = self.capacity = 256
        self.rows, self.cache_tokens = 4, 1024
        self._lock = threading.Lock()
        self._inbox, self.live, self.finished, self._next = [], [], deque(), 0

    def submit(self, prompt_ids, *, max_new_tokens=64, stop_tokens=None, on_tokens=None, **_):
        with self._lock:
            req = engine_mod.Request(self._next, list(prompt_ids), max_new_tokens, np.zeros(2, np.uint32),
                                     stop_tokens=tuple(stop_tokens or ()), on_tokens=on_tokens)
            req.todo = list(self.script(req.prompt))
            self._next += 1
            self._inbox.append(("submit", req))
        return req

    def cancel(self, req):
        with self._lock:
            self._inbox.append(("cancel", req))

    @property
    def busy(self):
        with self._lock:
            return bool(self._inbox or self.live)

    def _finish(self, req, reason):
        req.finish_reason = reason
        self.live.remove(req)
        self.finished.append(req)
        req.done.set()

    def step(self):
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for what, req in inbox:
            if what == "submit":
                self.live.append(req)
            elif req in self.live:
                self._finish(req, "cancelled")
        for req in list(self.live):
            new = []
            while req.todo and req.todo[0] is not STALL and len(new) < 2 and len(req.tokens) < req.max_new_tokens:
                new.append(req.todo.pop(0))
                req.tokens.append(new[-1])
                if new[-1] in req.stop_tokens:
                    break
            if req.on_tokens and new:
                req.on_tokens(req, new)
            if req.tokens and req.tokens[-1] in req.stop_tokens:
                self._finish(req, "stop")
            elif len(req.tokens) >= req.max_new_tokens or not req.todo:
                self._finish(req, "length")
        if self.live and not inbox and all(r.todo[:1] == [STALL] for r in self.live):
            time.sleep(0.01)  # only stalled replies: do not spin the engine thread

    def results(self):
        out = list(self.finished)
        self.finished.clear()
        return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("replies")
    write_tekken(d, vocab_size=ModelConfig.tiny().text.vocab_size)
    return Tokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def server(tok):
    def script(prompt):
        text = tok.decode(prompt)
        if "weather" in text:
            return [tok.tool_calls, *tok.encode("get_weather"), tok.args, *tok.encode('{"city": "Paris"}'),
                    tok.tool_calls, *tok.encode("get_time"), tok.args, *tok.encode("{}"), tok.eos]
        if "padded" in text:  # an id of the model's vocabulary that the tokenizer does not have
            return [*tok.encode("fine "), tok.vocab_size, *tok.encode("still"), tok.eos]
        if "forever" in text:
            return [*tok.encode("and on and on"), STALL]
        return [tok.think, *tok.encode("Let me think: 東京?"), tok.think_end, *tok.encode("Tokyo 🎉 it is."), tok.eos]

    s = Server(None, tok, served_name="scripted", port=0, engine=ScriptedEngine(ModelConfig.tiny(), script),
               api_key=KEY).start()
    yield s
    s.shutdown(0.0)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_reasoning_arrives_in_reasoning_content(client):
    r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Where?"}],
                                       reasoning_effort="high")
    m = r.choices[0].message
    assert (m.reasoning_content, m.content, r.choices[0].finish_reason) == ("Let me think: 東京?", "Tokyo 🎉 it is.",
                                                                          "stop")
    chunks = list(client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Where?"}],
                                                 reasoning_effort="high", stream=True))
    deltas = [ch.choices[0].delta for ch in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Let me think: 東京?"
    assert "".join(d.content or "" for d in deltas) == "Tokyo 🎉 it is."
    assert all("\ufffd" not in (d.content or "") + (getattr(d, "reasoning_content", None) or "") for d in deltas)


def test_tool_calls_arrive_in_tool_calls(client):
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
             for n in ("get_weather", "get_time")]
    messages = [{"role": "user", "content": "weather?"}]
    r = client.chat.completions.create(model="scripted", messages=messages, tools=tools)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert [(x.function.name, json.loads(x.function.arguments)) for x in calls] == [("get_weather", {"city": "Paris"}),
                                                                                     ("get_time", {})]
    assert len({x.id for x in calls}) == 2 and all(len(x.id) == 9 and x.id.isalnum() for x in calls)
    chunks = list(client.chat.completions.create(model="scripted", messages=messages, tools=tools, stream=True))
    streamed = [t for ch in chunks for t in (ch.choices[0].delta.tool_calls or [])]
    assert [(t.index, t.function.name, t.function.arguments) for t in streamed] == \
        [(k, x.function.name, x.function.arguments) for k, x in enumerate(calls)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the conversation goes on with the calls and their results
    follow = [*messages, {"role": "assistant", "content": None, "tool_calls": [x.model_dump() for x in calls]},
              *({"role": "tool", "tool_call_id": x.id, "content": "sunny"} for x in calls)]
    assert client.chat.completions.create(model="scripted", messages=follow, tools=tools).choices[0].message


def test_an_id_the_tokenizer_lacks_has_no_text(client, tok):
    assert ModelConfig.tiny().text.vocab_size > tok.vocab_size
    kw = dict(model="scripted", messages=[{"role": "user", "content": "padded"}], stop=["zzz"])
    assert client.chat.completions.create(**kw).choices[0].message.content == "fine still"
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                   if c.choices) == "fine still"


def _poll(ready, what, deadline=120.0):
    """A guard deadline only: the events polled for happen without any timing."""
    t0 = time.monotonic()
    while not ready():
        assert time.monotonic() - t0 < deadline, f"{what}: gave up after {deadline} s"
        time.sleep(0.02)


def test_a_client_that_disconnects_cancels_its_request(server):
    """The reply stalls until it is cancelled: only the client's leaving can end it."""
    body = {"model": "scripted", "messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 200,
            "stream": True}
    seen = []
    orig = server.worker.submit

    def spy(spec, sink, local=None):
        f = orig(spec, sink, local)
        seen.append(f)
        return f

    server.worker.submit = spy
    try:
        with requests.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, stream=True, timeout=120) as r:
            first = next(line for line in r.iter_lines() if line)
        assert first.startswith(b"data: ")
        _poll(lambda: seen and seen[-1].done() and seen[-1].result().done.is_set(), "the streamed request's end")
        assert seen[-1].result().finish_reason == "cancelled"
        # not streamed: the handler notices that the client left while it waits
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, headers=AUTH,
                          timeout=1.0)
        _poll(lambda: len(seen) == 2 and seen[-1].done() and seen[-1].result().done.is_set(), "the request's end")
        assert seen[-1].result().finish_reason == "cancelled"
        _poll(lambda: server.worker.running == 0 and not server.engine.busy, "the engine's idle")
    finally:
        server.worker.submit = orig
    assert requests.get(server.url + "/health", timeout=60).json() == {"status": "ok", "requests": 0}
