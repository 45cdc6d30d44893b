"""A running server: the engine thread, uvicorn on its own thread, and the drain.

The main thread only waits (`Server.wait`), so a signal lands there and never inside a JAX call:
`mistral4-jax serve` turns SIGINT / SIGTERM into KeyboardInterrupt there (cli.py), and `Server.shutdown`
drains: new requests get 503 and uvicorn stops accepting connections; running requests have
`drain_seconds` to finish, then are cancelled (a waiting client gets a 503, a stream an error event);
then the engine thread stops. A second signal cancels at once.
"""

from __future__ import annotations

import socket
import sys
import threading
import time

from ..inference.engine import Engine
from .api import Limits, Service, build_app
from .protocol import KnownIds
from .worker import Worker

DRAIN_SECONDS = 5.0
START_TIMEOUT = 60.0
# After the drain: how long the engine thread may take to see the cancellations, and then uvicorn to send
# the cancelled streams their last events (each). Normally well under a second; a process exiting before that cuts a
# stream mid-chunk (seen with 5 s on a machine at load 12).
CLOSE_SECONDS = 10.0


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: a free port), before uvicorn starts: a taken port is a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class Server:
    """One model served over HTTP: `start()`, then `wait()` on the main thread, `shutdown()` to drain.

    model / tokenizer: loaded. engine: Engine's keyword arguments (batch_size, cache_tokens, max_len; the
    engine watches: tokens come back every few steps, for streaming), or an engine object to serve (the model
    is then unused). channel: a `multihost.Channel` on process 0 of several. Everything else is `api.Service`'s."""

    def __init__(self, model, tokenizer, *, served_name: str, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, limits: Limits | None = None, engine=None,
                 channel=None, root: str | None = None, aliases: tuple[str, ...] = (),
                 drain_seconds: float = DRAIN_SECONDS):
        self.drain_seconds = drain_seconds
        tokenizer = tokenizer if isinstance(tokenizer, KnownIds) else KnownIds(tokenizer)
        self.engine = engine if engine is not None and not isinstance(engine, dict) else \
            Engine(model, watch=True, **(engine or {}))
        self.worker = Worker(self.engine, tokenizer, channel)
        self.service = Service(self.worker, tokenizer, served_name, api_key, limits, root, aliases)
        self.app = build_app(self.service)
        self.host, self.port = host, port
        self.http = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, warmup: bool = True) -> Server:
        import uvicorn

        sock = bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        if warmup:
            self.worker.warmup()
        self.worker.start()
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=int(self.drain_seconds) + 10)
        self.http = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.http.run, kwargs={"sockets": [sock]}, name="mistral4-jax-http",
                                       daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.http.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > START_TIMEOUT:
                raise RuntimeError(f"the HTTP server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self

    def wait(self, poll: float = 0.25) -> None:
        """Block (interruptibly) while the server runs; raises if the engine or the HTTP thread failed."""
        while self.thread.is_alive() and not self.worker.failed:
            time.sleep(poll)
        if self.worker.failed:
            raise RuntimeError(self.worker.failed)
        raise RuntimeError("the HTTP server stopped")

    def shutdown(self, drain_seconds: float = DRAIN_SECONDS) -> None:
        """Stop accepting, give running requests `drain_seconds`, cancel the rest, stop both threads."""
        self.service.draining = True
        if self.http is not None:
            self.http.should_exit = True
        deadline = time.monotonic() + drain_seconds
        while self.worker.running and time.monotonic() < deadline and not self.worker.failed:
            time.sleep(0.02)
        self.worker.cancel_all()
        deadline = time.monotonic() + CLOSE_SECONDS
        while self.worker.running and time.monotonic() < deadline and not self.worker.failed:
            time.sleep(0.02)
        if self.thread is not None:
            self.thread.join(CLOSE_SECONDS)
        self.worker.stop(timeout=5.0)


def announce(server: Server, name: str) -> None:
    e = server.engine
    print(f"mistral4-jax serve: {name} on {server.url} (OpenAI API under /v1; {e.rows} slots, "
          f"{e.cache_tokens} cache tokens, context {e.max_len})", file=sys.stderr, flush=True)


def run_leader(server: Server, name: str) -> None:
    """Serve until a signal (KeyboardInterrupt here), drain, and re-raise it; returns never."""
    server.start()
    announce(server, name)
    try:
        server.wait()
    except KeyboardInterrupt:
        try:
            server.shutdown(server.drain_seconds)
        except KeyboardInterrupt:  # a second signal: cancel what runs at once
            server.shutdown(0.0)
        raise
    finally:
        if server.worker.channel is not None:
            end_distributed()


def run_follower(model, tokenizer, engine: dict, channel, drain_seconds: float) -> None:
    """A process other than 0: run the leader's jobs until it shuts down (or, after a signal of our own,
    until it has been silent for a second past the drain)."""
    worker = Worker(Engine(model, watch=True, **engine), KnownIds(tokenizer), channel)
    worker.warmup()
    stop = threading.Event()
    thread = threading.Thread(target=worker.follow, args=(stop,), name="mistral4-jax-follower", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.25)
    except KeyboardInterrupt:
        deadline = time.monotonic() + drain_seconds + 5.0
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.25)
        stop.set()
        raise
    finally:
        end_distributed()


def end_distributed(timeout: float = 5.0) -> None:
    """jax.distributed.shutdown(), which waits for the other processes, for at most `timeout` seconds."""
    import jax

    t = threading.Thread(target=jax.distributed.shutdown, daemon=True)
    t.start()
    t.join(timeout)
