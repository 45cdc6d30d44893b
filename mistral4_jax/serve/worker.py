"""The engine thread of a server: the one thread that drives an `Engine`, and what the others hand it.

HTTP handlers never touch the engine. They queue jobs (`submit`, `cancel`, `logprobs`) and get a
`concurrent.futures.Future` back; a submitted request reports its tokens and its end to a `sink`
callable, called from this thread. Each round the thread takes the queued jobs, applies them, and steps
the engine while it has work (`Engine.step`), sleeping when it has none.

Several processes (`jax.distributed`, engine.md §7): every process holds the same model and engine and
runs this loop; process 0 (the leader, which serves HTTP) publishes each round's jobs, as JSON, through a
`Channel` before it runs anything on the devices, and the others (`follow`) apply the same jobs in the same
order and step when their engine is busy, so every process makes the same scheduling decisions and runs
the same programs. A job the leader refuses (an `InputError` from `Engine.submit`) is never published.
Jobs are JSON: a request's images travel as their encoded files and are decoded again on each process.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import sys
import threading
import traceback
from concurrent.futures import Future
from typing import Callable

import numpy as np

from ..errors import InputError
from ..inference.score import token_logprobs
from ..text.images import batch_images, preprocess

ENGINE_FAILED = "the engine failed"


class ShuttingDown(RuntimeError):
    """A request submitted after the server stopped taking new ones."""


def images_from_files(files_b64: list[str], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values, image_sizes) of base64 image files, preprocessed as the chat template does."""
    from PIL import Image

    cfg = tokenizer.image_config
    if cfg is None:
        raise InputError("images were given but the tokenizer knows no image settings (no vision_config beside it)")
    return batch_images([preprocess(Image.open(io.BytesIO(base64.b64decode(f))), cfg) for f in files_b64])


@dataclasses.dataclass
class Job:
    kind: str  # submit | cancel | cancel_all | logprobs
    spec: dict  # what every process applies (JSON)
    future: Future | None = None
    sink: Callable[[str, object], None] | None = None
    local: dict | None = None  # the leader's decoded images, so it does not decode them twice


class Worker:
    """Owns `engine` (and the model it runs) on one thread; see the module docstring.

    channel: a `multihost.Channel` when several processes serve together (None: one process)."""

    def __init__(self, engine, tokenizer, channel=None):
        self.engine, self.tok, self.channel = engine, tokenizer, channel
        self._jobs: list[Job] = []
        self._cond = threading.Condition()
        self._sinks: dict[int, Callable] = {}  # request id -> its sink (leader)
        self._requests: dict[int, object] = {}  # request id -> Request (followers, for cancel)
        self._stopping = False
        self.closed = False  # no new requests (the drain's end)
        self.failed: str | None = None
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------ any thread
    def submit(self, spec: dict, sink: Callable[[str, object], None], local: dict | None = None) -> Future:
        """Queue a request (`spec`: Engine.submit's arguments as JSON, `key` as two uint32 and images as
        base64 files); the future gives its `Request`, or the InputError that refused it. sink(kind, value):
        ("tokens", [ids]) as they come, then ("done", finish_reason), from the engine thread."""
        return self._queue(Job("submit", spec, Future(), sink, local))

    def cancel(self, request) -> None:
        """Stop a submitted request (it reports ("done", "cancelled") unless it finished already)."""
        self._queue(Job("cancel", {"id": request.id}))

    def cancel_all(self) -> None:
        """Stop taking requests and cancel every running one (the end of a drain)."""
        with self._cond:
            self.closed = True
        self._queue(Job("cancel_all", {}))

    def logprobs(self, spec: dict, local: dict | None = None) -> Future:
        """Queue a `token_logprobs` call ({"sequences", "top", "images"}); the future gives its result."""
        return self._queue(Job("logprobs", spec, Future(), local=local))

    def _queue(self, job: Job) -> Future | None:
        with self._cond:
            if self.failed or (self.closed and job.kind in ("submit", "logprobs")):
                if job.future is not None:
                    job.future.set_exception(RuntimeError(self.failed) if self.failed
                                             else ShuttingDown("the server is shutting down"))
                return job.future
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    @property
    def running(self) -> int:
        """Requests submitted and not finished (leader)."""
        return len(self._sinks)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._lead, name="mistral4-jax-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """End the loop once the queued jobs are applied and the engine is idle (cancel what runs first)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    # ------------------------------------------------------------------ the engine thread
    def _lead(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._jobs and not self.engine.busy and not self._stopping:
                        self._cond.wait()
                    jobs, self._jobs = self._jobs, []
                    if not jobs and not self.engine.busy and self._stopping:
                        break
                published = []
                for job in jobs:
                    if job.kind == "submit":
                        try:
                            req = self._submit(job.spec, job.local, job.sink)
                        except InputError as e:
                            job.future.set_exception(e)
                            continue
                        job.future.set_result(req)
                    elif job.kind == "cancel_all":
                        for rid in list(self._sinks):
                            self._cancel(rid)
                            published.append({"kind": "cancel", "id": rid})
                        continue
                    elif job.kind == "cancel":
                        self._cancel(job.spec["id"])
                    published.append({"kind": job.kind, **job.spec})
                if self.channel is not None and (published or self.engine.busy):
                    self.channel.publish(published)  # before anything runs on the devices
                for job in jobs:
                    if job.kind == "logprobs":
                        try:
                            job.future.set_result(self._logprobs(job.spec, job.local))
                        except Exception as e:  # noqa: BLE001 - the handler answers it; the others ran the same
                            job.future.set_exception(e)
                if self.engine.busy:
                    self._step()
            if self.channel is not None:
                self.channel.publish([{"kind": "shutdown"}])
        except BaseException as e:  # noqa: BLE001 - reported to every waiting handler, then to the server
            self._fail(e)

    def follow(self, stop: threading.Event | None = None) -> None:
        """A follower's loop (processes other than 0): apply the leader's jobs, step the same way; returns at
        the leader's shutdown (or when `stop` is set and the leader says nothing for a second)."""
        while True:
            jobs = self.channel.receive(stop)
            if jobs is None:
                return
            for job in jobs:
                kind = job.pop("kind")
                if kind == "shutdown":
                    return
                if kind == "submit":
                    req = self._submit(job, None, None)
                    self._requests[req.id] = req
                elif kind == "cancel":
                    self._cancel(job["id"])
                elif kind == "logprobs":
                    try:
                        self._logprobs(job, None)
                    except Exception:  # noqa: BLE001 - the leader answered the same error
                        pass
            if self.engine.busy:
                self._step()

    def warmup(self) -> None:
        """One 1-token request run through, before serving: the first client does not wait for the compile
        of the decode program (every process runs it, in the same order)."""
        req = self.engine.submit([self.tok.bos], max_new_tokens=1, stop_tokens=[])
        while not req.done.is_set():
            self.engine.step()
        self.engine.results()

    def _submit(self, spec: dict, local: dict | None, sink):
        images = None
        if spec.get("images"):
            images = local["images"] if local else images_from_files(spec["images"], self.tok)
        on_tokens = None if sink is None else (lambda req, toks: sink("tokens", toks))
        req = self.engine.submit(
            spec["prompt"], max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"],
            top_k=spec["top_k"], top_p=spec["top_p"], key=np.asarray(spec["key"], np.uint32),
            stop_tokens=spec.get("stop_tokens"), stop_strings=spec.get("stop_strings") or None,
            tokenizer=self.tok if spec.get("stop_strings") else None, images=images, on_tokens=on_tokens)
        if sink is not None:
            self._sinks[req.id] = sink
            self._requests[req.id] = req
        return req

    def _cancel(self, request_id: int) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            self.engine.cancel(req)

    def _logprobs(self, spec: dict, local: dict | None):
        px = sizes = None
        if spec.get("images"):
            px, sizes = local["images"] if local else images_from_files(spec["images"], self.tok)
        return token_logprobs(self.engine.model, spec["sequences"], top=spec["top"], pixel_values=px,
                              image_sizes=sizes)

    def _step(self) -> None:
        self.engine.step()
        for req in self.engine.results():
            self._requests.pop(req.id, None)
            sink = self._sinks.pop(req.id, None)
            if sink is not None:
                sink("done", req.finish_reason)

    def _fail(self, e: BaseException) -> None:
        """The loop cannot go on: every waiting handler hears it; the server sees `failed` and stops."""
        detail = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if os.environ.get("MISTRAL4_JAX_TRACEBACK"):
            traceback.print_exception(e, file=sys.stderr)
        with self._cond:
            self.failed = f"{ENGINE_FAILED} ({detail})"
            jobs, self._jobs = self._jobs, []
        for job in jobs:
            if job.future is not None and not job.future.done():
                job.future.set_exception(RuntimeError(self.failed))
        sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink("error", self.failed)
