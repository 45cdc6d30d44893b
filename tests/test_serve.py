"""`mistral4-jax serve` (mistral4_jax/serve/) with real clients: the `openai` package, plain HTTP and lm-eval's
`local-completions` against ONE server on 127.0.0.1 (a free port) over the tiny checkpoint, every answer
compared with `generate` / `score` / `Mistral4LM` in this process; then the command itself: SIGTERM drains
and exits, and two processes under jax.distributed (process 0 serves, the other follows).

The reply fields the random tiny model never produces (reasoning, tool calls) and a client that disconnects
are tested with a scripted engine in tests/test_serve_replies.py."""

import base64
import concurrent.futures
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import openai
import pytest
import requests

from conftest import FAST_COMPILE
from test_signals import ENV, _python  # children: SIGINT / SIGTERM at their defaults whatever we inherited
from mistral4_jax import from_pretrained, generate, score
from mistral4_jax.config import ModelConfig
from mistral4_jax.demo import synthetic
from mistral4_jax.demo.synthetic_tokenizer import write_tekken
from mistral4_jax.demo.tiny import demo_image
from mistral4_jax.serve.api import Limits, cut_at_stops, request_key
from mistral4_jax.serve.protocol import TokenStrings
from mistral4_jax.serve.server import Server
from mistral4_jax.text.images import ImageConfig
from mistral4_jax.text.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_NEW = 12
# 3 slots over a 192-token cache (3 pages of 64): the tiny model's context is 256, so a request can be refused
# for the cache (193..256 tokens) or for the context (more); 2 images and 64 KiB bodies at most.
BATCH, CACHE_TOKENS = 3, 192
LIMITS = Limits(max_body_bytes=64 << 10, max_images=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve") / "hf"
    cfg = ModelConfig.tiny()
    synthetic.write_checkpoint(d, cfg, fp8=True)
    write_tekken(d, vocab_size=cfg.text.vocab_size, image_config=ImageConfig.from_model_config(cfg))
    return d


@pytest.fixture(scope="module")
def model(ckpt):
    return from_pretrained(ckpt, dtype="float32")


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def server(model, tok):
    """The module's one server (started once, drained at the end)."""
    s = Server(model, tok, served_name="tiny", port=0, api_key=KEY, limits=LIMITS,
               engine={"batch_size": BATCH, "cache_tokens": CACHE_TOKENS}).start()
    yield s
    s.shutdown(0.0)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


ANCHOR = [1] + [500] * 129  # a plain-text prompt of 130 tokens


def expected(model, prompts, max_new_tokens, **kw):
    """`generate` of `prompts`, run at the shapes of the server's engine (3 rows of 256 slots, a 192-token page
    pool, tokens watched) so that it reuses the server's compiled decode program, and every call the same
    256-token prefill chunk (fewer insert programs to compile): ANCHOR prompts (one new token each; their
    outputs are dropped) make the rows and lengths come out so. Each prompt's output is that of generate
    alone (its key and its tokens do not depend on the batch)."""
    limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
    pad = max(1, BATCH - len(prompts))
    out = generate(model, [*prompts, *[ANCHOR] * pad], limits + [1] * pad, batch_size=BATCH,
                   cache_tokens=CACHE_TOKENS, callback=lambda step, tokens: None, **kw)
    return out[:len(prompts)]


def _chat_ids(tok, messages, **kw):
    return tok.apply_chat_template(messages, **kw).input_ids


def _finish(model, out, limit):
    return "stop" if len(out) < limit or out[-1] in model.config.text.eos_token_id else "length"


QUESTIONS = ["What is the capital of France?", "Name three colours.", "Schön, nicht wahr? 東京", "Hi"]


# ---------------------------------------------------------------------- chat
def test_greedy_chat_equals_generate_whole_and_streamed(client, model, tok):
    chats = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}] for q in QUESTIONS[:3]]
    want = expected(model, [_chat_ids(tok, m) for m in chats], MAX_NEW)
    for messages, w in zip(chats, want):
        got = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=MAX_NEW)
        parsed = tok.parse_output(w)
        c = got.choices[0]
        assert (c.message.content, c.message.reasoning_content) == (parsed.content, parsed.reasoning)
        assert c.finish_reason == _finish(model, w, MAX_NEW)
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(_chat_ids(tok, messages)), len(w))
        assert got.model == "tiny" and got.object == "chat.completion"
    # streamed: the deltas concatenate to the same text, one finish, a final usage chunk
    chunks = list(client.chat.completions.create(model="tiny", messages=chats[2], temperature=0, max_tokens=MAX_NEW,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == tok.parse_output(want[2]).content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [_finish(model, want[2], MAX_NEW)]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want[2])
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"


def test_sixteen_concurrent_requests_each_exact(client, model, tok):
    prompts = [[{"role": "user", "content": f"Question {i}: {QUESTIONS[i % 4]} " + "more " * (i % 5)}]
               for i in range(16)]
    limits = [4 + (i * 3) % 9 for i in range(16)]

    def ask(i):
        r = client.chat.completions.create(model="tiny", messages=prompts[i], temperature=0, max_tokens=limits[i])
        return r.choices[0].message.content, r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    want = expected(model, [_chat_ids(tok, p) for p in prompts], limits)
    assert got == [(tok.parse_output(w).content, len(w)) for w in want]


def test_chat_with_an_image_equals_generate(client, model, tok):
    img = demo_image()
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    got = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=6)
    prompt = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                                   {"type": "image", "image": img}]}])
    want = expected(model, [prompt.input_ids], 6, pixel_values=prompt.pixel_values,
                    image_sizes=prompt.image_sizes)[0]
    assert got.choices[0].message.content == tok.parse_output(want).content
    assert got.usage.prompt_tokens == len(prompt.input_ids) and prompt.num_images == 1


def test_sampled_choices_are_generate_with_the_same_seed(client, model, tok):
    """n choices with a seed: choice i draws with fold_in(PRNGKey(seed), i), generate's key of prompt i."""
    messages = [{"role": "user", "content": "Tell me a story."}]
    got = client.chat.completions.create(model="tiny", messages=messages, temperature=0.9, top_p=0.95, seed=7, n=3,
                                         max_tokens=8)
    want = expected(model, [_chat_ids(tok, messages)] * 3, 8, temperature=0.9, top_p=0.95, seed=7)
    assert [c.message.content for c in got.choices] == [tok.parse_output(w).content for w in want]
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert request_key(7, 1) == [int(x) for x in np.asarray(jax.random.fold_in(jax.random.PRNGKey(7), 1))]


def test_chat_logprobs_are_the_models(client, model, tok):
    messages = [{"role": "user", "content": "Hello"}]
    got = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=5, logprobs=True,
                                         top_logprobs=3)
    ids = _chat_ids(tok, messages)
    gen = expected(model, [ids], 5)[0]
    entries = got.choices[0].logprobs.content
    assert [bytes(e.bytes) for e in entries] == [bytes(TokenStrings(tok).get(t)[1]) for t in gen]
    full = ids + gen
    want = score(model, [(full[:len(ids) + k], [full[len(ids) + k]]) for k in range(len(gen))])
    for e, (lp, greedy) in zip(entries, want, strict=True):  # score's log p of each token; greedy: the top one
        assert abs(e.logprob - lp) < 1e-4 and greedy
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob


def test_tools_and_reasoning_reach_the_prompt(client, model, tok):
    """The wiring with the real model: tools and reasoning_effort are rendered into the prompt, and what the
    random model says is parsed as parse_output parses it; a named tool_choice forces that call."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    ids = _chat_ids(tok, messages, tools=tools, reasoning_effort="high")
    opening = [tok.tool_calls, *tok.encode("get_weather"), tok.args]
    free, args = expected(model, [ids, _chat_ids(tok, messages, tools=tools) + opening], 6)
    got = client.chat.completions.create(model="tiny", messages=messages, tools=tools, reasoning_effort="high",
                                         temperature=0, max_tokens=6)
    want = tok.parse_output(free)
    assert got.usage.prompt_tokens == len(ids)
    assert got.choices[0].message.content == (want.content or None if want.tool_calls else want.content)
    assert got.choices[0].message.reasoning_content == want.reasoning
    forced = client.chat.completions.create(model="tiny", messages=messages, tools=tools, temperature=0, max_tokens=6,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = forced.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and call.type == "function" and len(call.id) == 9
    parsed = tok.parse_output(opening + args).tool_calls[0]["arguments"]
    assert call.function.arguments == (parsed if isinstance(parsed, str) else json.dumps(parsed, ensure_ascii=False))


# ---------------------------------------------------------------------- completions
def test_completions_equal_generate(client, model, tok):
    texts = ["The capital of France is", "Hello"]
    ids = [1, 5, 300, 301, 302]
    want = expected(model, [tok.encode(t, add_bos=True) for t in texts] + [ids], MAX_NEW)
    want = [tok.decode(w, skip_special_tokens=True) for w in want]
    got = client.completions.create(model="tiny", prompt=texts, temperature=0, max_tokens=MAX_NEW)
    assert [c.text for c in got.choices] == want[:2] and got.object == "text_completion"
    got = client.completions.create(model="tiny", prompt=ids, temperature=0, max_tokens=MAX_NEW)
    assert got.choices[0].text == want[2]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=ids, temperature=0, max_tokens=MAX_NEW, stream=True) if c.choices)
    assert streamed == want[2]


def test_stop_strings_cut_as_openai_does(client, model, tok):
    prompt = "Once upon a time"
    whole = tok.decode(expected(model, [tok.encode(prompt, add_bos=True)], 24)[0],
                       skip_special_tokens=True)
    stop = next(whole[k:k + 2] for k in range(2, len(whole) - 2)
                if whole[k:k + 2].strip() and "\ufffd" not in whole[:k + 2])
    want = whole[:whole.index(stop)]
    got = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=24, stop=[stop])
    assert (got.choices[0].text, got.choices[0].finish_reason) == (want, "stop")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, temperature=0, max_tokens=24, stop=stop, stream=True) if c.choices)
    assert streamed == want
    assert cut_at_stops("abcXYdef", ["XY", "d"]) == ("abc", True)
    assert cut_at_stops("abcX", ["XY"], final=False) == ("abc", False)


def test_echo_logprobs_equal_score(client, model, tok):
    """lm-eval's log-likelihood request (echo, logprobs 1, max_tokens 1) and max_tokens 0: the continuation's
    token_logprobs sum to score's log-likelihood, and lm-eval's greedy test agrees with score's."""
    ctx, cont = tok.encode("The capital of France is", add_bos=True), tok.encode(" Paris, of course.")
    want = score(model, [(ctx, cont), (ctx, cont[:2])])
    for max_tokens in (1, 0):
        got = client.completions.create(model="tiny", prompt=[ctx + cont, ctx + cont[:2]], echo=True, logprobs=1,
                                        max_tokens=max_tokens, temperature=0)
        for c, (lp, greedy), n in zip(got.choices, want, (len(cont), 2)):
            lps = c.logprobs.token_logprobs
            assert lps[0] is None and len(lps) == len(ctx) + n + max_tokens
            part = lps[len(ctx):len(ctx) + n]
            assert abs(sum(part) - lp) < 1e-4 * max(1, abs(lp))
            tops = c.logprobs.top_logprobs[len(ctx):len(ctx) + n]
            assert all(t == max(top.values()) for t, top in zip(part, tops)) == greedy
    # the generated token is the greedy one, after the echoed prompt
    got = client.completions.create(model="tiny", prompt=ctx, echo=True, logprobs=2, max_tokens=1, temperature=0)
    nxt = expected(model, [ctx], 1, stop_tokens=[])[0]
    assert got.choices[0].logprobs.tokens[-1] == TokenStrings(tok).text(nxt[0])
    assert got.choices[0].text == tok.decode(ctx + nxt, skip_special_tokens=True)


def test_models_and_health(server):
    r = requests.get(server.url + "/v1/models", headers=AUTH, timeout=60).json()
    assert [m["id"] for m in r["data"]] == ["tiny"] and r["data"][0]["max_model_len"] == 256
    assert requests.get(server.url + "/v1/models/tiny", headers=AUTH, timeout=60).json()["id"] == "tiny"
    assert requests.get(server.url + "/health", timeout=60).json()["status"] == "ok"  # health needs no key


# ---------------------------------------------------------------------- bad requests
def test_bad_requests_get_their_status_and_the_server_keeps_serving(server, tok):
    chat, comp = server.url + "/v1/chat/completions", server.url + "/v1/completions"
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    png = io.BytesIO()
    demo_image().save(png, format="PNG")
    image = {"type": "image_url",
             "image_url": {"url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}}
    words = [{"role": "user", "content": "word " * 40}]
    n_words = len(_chat_ids(tok, words))
    assert n_words < CACHE_TOKENS < 256
    cases = [
        (chat, b"{not json", 400, "invalid_json"),
        (chat, b"[1, 2]", 400, "invalid_json"),
        (chat, {**ok, "temperature": "hot"}, 422, "invalid_type"),
        (chat, {**ok, "messages": "hi"}, 422, "invalid_type"),
        (chat, {**ok, "n": True}, 422, "invalid_type"),
        (chat, {**ok, "model": "gpt-4"}, 404, "model_not_found"),
        (chat, {**ok, "max_tokens": 10_000}, 400, "context_length_exceeded"),
        (chat, {**ok, "messages": [{"role": "user", "content": "word " * 300}]}, 400, "context_length_exceeded"),
        # within the context (256), beyond what the cache holds for one request (192)
        (chat, {**ok, "messages": words, "max_tokens": CACHE_TOKENS + 1 - n_words}, 400, "context_length_exceeded"),
        (chat, {**ok, "temperature": -1}, 400, "invalid_value"),
        (chat, {**ok, "n": 0}, 400, "invalid_value"),
        (chat, {**ok, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
        (chat, {**ok, "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400, "invalid_value"),
        (chat, {**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]}, 400, "invalid_value"),
        (chat, {**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "https://example.com/cat.png"}}]}]}, 400, "invalid_value"),
        (chat, {**ok, "messages": [{"role": "user", "content": [image] * 3}]}, 413, "too_many_images"),
        (chat, {**ok, "messages": [{"role": "user", "content": "x" * (70 << 10)}]}, 413, "request_too_large"),
        (chat, {**ok, "reasoning_effort": "medium"}, 400, "invalid_value"),
        (chat, {**ok, "frequency_penalty": 0.5}, 400, "unsupported_parameter"),
        (chat, {**ok, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "invalid_value"),
        (comp, {"model": "tiny", "prompt": [1, 10**9]}, 400, "invalid_value"),
        (comp, {"model": "tiny", "prompt": 5}, 422, "invalid_type"),
        (comp, {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "invalid_value"),
        (server.url + "/v1/nothing", {}, 404, "not_found"),
    ]
    for where, body, status, code in cases:
        sent = {"data": body, "headers": {**AUTH, "Content-Type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body, "headers": AUTH}
        r = requests.post(where, **sent, timeout=120)
        assert r.status_code == status, (str(body)[:200], r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["message"] and err["type"], r.text
        good = requests.post(chat, json=ok, headers=AUTH, timeout=120)
        assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert requests.get(chat, headers=AUTH, timeout=60).status_code == 405
    # the API key: missing or wrong is a 401 (and the server goes on)
    assert requests.post(chat, json=ok, timeout=60).json()["error"]["code"] == "missing_api_key"
    r = requests.post(chat, json=ok, headers={"Authorization": "Bearer wrong"}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert requests.post(chat, json=ok, headers=AUTH, timeout=120).status_code == 200


# ---------------------------------------------------------------------- lm-eval local-completions
def test_lm_eval_local_completions_equals_mistral4lm(server, model, ckpt, tmp_path, monkeypatch):
    import lm_eval
    import tokenizers
    import transformers
    from lm_eval.tasks import TaskManager
    from tokenizers import processors

    from mistral4_jax.harness import Mistral4LM
    from test_harness import TASKS, TASKS_DIR, _tasks_cwd, assert_same_samples

    # lm-eval tokenizes with an HF tokenizer: the same BPE, <s> first (as the released tokenizer.json)
    backend = tokenizers.Tokenizer.from_str(Tokenizer.from_pretrained(ckpt).backend.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf_dir = tmp_path / "hf_tokenizer"
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                         unk_token="<unk>", clean_up_tokenization_spaces=False).save_pretrained(hf_dir)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # what local-completions sends as its bearer token
    # lm-eval's API model keeps max_length - 1 tokens and rolls windows of max_length - 2; Mistral4LM uses
    # max_length for both: 202 against 200 makes the same windows (and 201 tokens + 1 generated fit the context)
    args = (f"base_url={server.url}/v1/completions,model=tiny,tokenizer_backend=huggingface,tokenizer={hf_dir},"
            "add_bos_token=True,max_length=202,tokenized_requests=True")
    with _tasks_cwd():
        tm = TaskManager(include_path=str(TASKS_DIR))
        got = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=TASKS, log_samples=True,
                                      task_manager=tm, bootstrap_iters=0)
        want = lm_eval.simple_evaluate(model=Mistral4LM(pretrained=model, tokenizer=ckpt, batch_size=4, max_length=200),
                                       tasks=TASKS, log_samples=True, task_manager=tm, bootstrap_iters=0)
    assert_same_samples(got, want)


# ---------------------------------------------------------------------- the command: SIGTERM, several processes


def _start(tmp_path, argv, env=ENV, tag="0"):
    err = tmp_path / f"err-{tag}"
    with open(err, "w") as f:
        p = subprocess.Popen(_python("-m", "mistral4_jax", *argv), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=f)
    return p, err


def _poll(ready, what, p=None, deadline=600.0):
    """Wait for ready() (a guard deadline only: nothing is timed)."""
    t0 = time.monotonic()
    while not ready():
        assert p is None or p.poll() is None, f"{what}: the process exited"
        assert time.monotonic() - t0 < deadline, f"{what}: gave up after {deadline} s"
        time.sleep(0.05)


def _serving_url(p, err) -> str:
    _poll(lambda: " on http://" in err.read_text(), err.read_text, p)
    return err.read_text().split(" on ", 1)[1].split()[0]


def test_sigterm_drains_and_exits(ckpt, tmp_path):
    p, err = _start(tmp_path, ["serve", "--model", str(ckpt), "--dtype", "float32", "--port", "0", "--batch-size", "2",
                               "--drain-seconds", "2"])
    lines = []
    try:
        url = _serving_url(p, err)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}

        def stream():
            with requests.post(url + "/v1/chat/completions", json=body, timeout=120, stream=True) as r:
                lines.extend(x.decode() for x in r.iter_lines() if x)

        t = threading.Thread(target=stream)
        t.start()
        _poll(lambda: lines, "the first event", p)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=120)  # a guard: the drain is 2 s
        t.join(120)
    finally:
        if p.poll() is None:
            p.kill()
    text = err.read_text()
    assert rc == 143, (rc, text[-3000:])
    assert "Traceback" not in text and text.rstrip().splitlines()[-1] == "mistral4-jax serve: terminated", text
    assert lines[-1] == "data: [DONE]"  # the stream ended: finished, or cancelled with an error event
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url + "/health", timeout=10)


def test_serve_usage_errors_are_one_line(ckpt, capsys):
    from mistral4_jax import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for argv, want in ((["--port", "70000"], "--port must be in [0, 65535], got 70000"),
                           (["--coordinator", "127.0.0.1:1"], "--coordinator HOST:PORT needs --num-processes and "
                                                               "--process-id"),
                           (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}")):
            rc = cli.main(["serve", "--model", str(ckpt), "--dtype", "float32", *argv])
            err = capsys.readouterr().err.strip()
            assert rc == 2 and err.startswith(f"mistral4-jax serve: error: {want}") and len(err.splitlines()) == 1, \
                (argv, err)


@pytest.mark.slow
def test_two_processes_process_0_serves_and_the_other_follows(ckpt, model, tok, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}"}
    procs = [_start(tmp_path, ["serve", "--model", str(ckpt), "--dtype", "float32", "--port", "0", "--mesh", "1,2,2",
                               "--batch-size", "2", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i), "--served-model-name", "tiny"], env, tag=str(i))
             for i in range(2)]
    try:
        url = _serving_url(*procs[0])
        c = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=300)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        ids = [1, 5, 300, 301]
        chat_want = expected(model, [_chat_ids(tok, messages)], 6)[0]
        several_want = expected(model, [ids, ids[:2]], 6, temperature=0.7, seed=3)
        got = c.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=6)
        assert got.choices[0].message.content == tok.parse_output(chat_want).content
        r = c.completions.create(model="tiny", prompt=ids, echo=True, logprobs=1, max_tokens=0)
        (lp, _), = score(model, [(ids[:1], ids[1:])])
        assert abs(sum(r.choices[0].logprobs.token_logprobs[1:]) - lp) < 1e-4 * max(1, abs(lp))
        several = c.completions.create(model="tiny", prompt=[ids, ids[:2]], temperature=0.7, seed=3, max_tokens=6)
        assert [x.text for x in several.choices] == [tok.decode(g, skip_special_tokens=True) for g in several_want]
        procs[0][0].send_signal(signal.SIGTERM)
        rcs = [p.wait(timeout=120) for p, _ in procs]  # a guard
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
    logs = [e.read_text() for _, e in procs]
    assert rcs == [143, 0], logs
    assert all("Traceback" not in t for t in logs), logs


def test_the_library_imports_without_the_serve_extra():
    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
            "import mistral4_jax, mistral4_jax.cli\n"
            "try:\n    import mistral4_jax.serve\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and 'pip install -e ".[serve]"' in r.stdout, r.stderr
