"""Process 0 tells the other processes what to run: numbered messages through the key-value store of JAX's
coordination service (engine.md §7; jax-llm-examples' `serving_loop.py` does the same).

Round r's message is `PREFIX/r/<r>`, a JSON list of jobs (`worker.Worker`). Process 0 writes it before it
runs anything on the devices that round; the others read the rounds in order (blocking reads with a
timeout, so a follower can notice that it should stop). Every ACK_EVERY rounds each follower writes the
round it has read to `PREFIX/ack/<process>`, and process 0 deletes the rounds all of them have read.
The store is `jax._src.distributed.global_state.client` (a private API, as in jax-llm-examples): it exists
once `jax.distributed.initialize` has run.
"""

from __future__ import annotations

import json
import threading

PREFIX = "mistral4_jax/serve"
ACK_EVERY = 64
POLL_MS = 1000


def _is_timeout(e: Exception) -> bool:
    text = str(e)
    return "DEADLINE_EXCEEDED" in text or "Deadline Exceeded" in text or "timed out" in text.lower()


class Channel:
    """publish(jobs) on process 0, receive() on the others; one call per round, in the same order."""

    def __init__(self, client=None, process_index: int | None = None, process_count: int | None = None,
                 prefix: str = PREFIX):
        import jax

        if client is None:
            from jax._src import distributed

            client = distributed.global_state.client
            if client is None:
                raise RuntimeError("several processes need jax.distributed.initialize() first")
        self.client, self.prefix = client, prefix
        self.index = jax.process_index() if process_index is None else process_index
        self.count = jax.process_count() if process_count is None else process_count
        self.round = 0
        self.deleted = 0  # rounds below this are gone from the store

    @property
    def leader(self) -> bool:
        return self.index == 0

    def publish(self, jobs: list[dict]) -> None:
        self.client.key_value_set(f"{self.prefix}/r/{self.round}", json.dumps(jobs))
        self.round += 1
        if self.round % ACK_EVERY == 0:
            self._collect()

    def receive(self, stop: threading.Event | None = None) -> list[dict] | None:
        """The next round's jobs; None once `stop` is set and a poll found nothing."""
        key = f"{self.prefix}/r/{self.round}"
        while True:
            try:
                value = self.client.blocking_key_value_get(key, POLL_MS)
                break
            except Exception as e:  # noqa: BLE001 - jaxlib raises its own runtime error type
                if not _is_timeout(e):
                    raise
                if stop is not None and stop.is_set():
                    return None
        self.round += 1
        if self.round % ACK_EVERY == 0:
            self.client.key_value_set(f"{self.prefix}/ack/{self.index}", str(self.round), allow_overwrite=True)
        return json.loads(value)

    def _collect(self) -> None:
        """Delete the rounds every follower has acknowledged."""
        read = []
        for p in range(1, self.count):
            try:
                read.append(int(self.client.key_value_try_get(f"{self.prefix}/ack/{p}")))
            except Exception:  # noqa: BLE001 - not acknowledged yet
                read.append(0)
        upto = min(read, default=self.round)
        for r in range(self.deleted, upto):
            self.client.key_value_delete(f"{self.prefix}/r/{r}")
        self.deleted = max(self.deleted, upto)
