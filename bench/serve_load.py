"""Load on `mistral4-jax serve`: requests/s and generated tokens/s with 1, 8 and 32 concurrent clients.

The server is the command itself (a child process, 127.0.0.1, a free port) over a random tiny checkpoint (the
tiny config, float32) with `--batch-size 32`; the clients are threads of this process, each with its own HTTP
connection, each sending its requests one after the other: POST /v1/completions with a prompt of 17 to 32 token
ids (one prefill-chunk size) and `max_tokens` new tokens, greedy (a request may stop early at an eos token: the
tokens counted are the `usage.completion_tokens` the server reports). The engine compiles its insert program
per number of prompts admitted together, so every level first runs twice untimed (those sizes compile then);
then each level runs `--repeat` times and the figures are the median run's. Runs on whatever JAX sees.

    PYTHONPATH=$PWD python bench/serve_load.py [--clients 1 8 32] [--requests-per-client 4] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent


def write_checkpoint(d: Path) -> Path:
    from mistral4_jax.config import ModelConfig
    from mistral4_jax.demo import synthetic
    from mistral4_jax.demo.synthetic_tokenizer import write_tekken

    cfg = ModelConfig.tiny()
    synthetic.write_checkpoint(d, cfg, fp8=True)
    write_tekken(d, vocab_size=cfg.text.vocab_size)
    return d


def start_server(model: Path, batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "mistral4_jax", "serve", "--model", str(model), "--dtype",
                              "float32", "--batch-size", str(batch), "--port", "0", "--served-model-name", "tiny"],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                             stderr=err)
    while " on http://" not in log.read_text():
        if p.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return p, log.read_text().split(" on ", 1)[1].split()[0]


def load(url: str, clients: int, per_client: int, max_tokens: int, seed: int) -> dict:
    """`clients` threads, `per_client` requests each; wall time from the first request to the last answer."""
    g = np.random.default_rng(seed)
    prompts = [[1, *g.integers(100, 1000, int(g.integers(16, 32))).tolist()] for _ in range(clients * per_client)]
    tokens = [0] * len(prompts)
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def client(c: int):
        with requests.Session() as s:
            start.wait()
            for k in range(per_client):
                i = c * per_client + k
                r = s.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompts[i], "temperature": 0,
                                                          "max_tokens": max_tokens}, timeout=600)
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                tokens[i] = r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(errors[0])
    return {"clients": clients, "requests": len(prompts), "tokens": sum(tokens), "seconds": seconds,
            "requests_per_s": len(prompts) / seconds, "tokens_per_s": sum(tokens) / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = write_checkpoint(Path(tmp) / "tiny")
        p, url = start_server(model, args.batch_size, Path(tmp) / "server.log")
        rows = []
        try:
            for seed in (0, 1):  # untimed: the insert sizes of every level compile
                for c in args.clients:
                    load(url, c, args.requests_per_client, args.max_tokens, seed=seed)
            for c in args.clients:
                runs = sorted((load(url, c, args.requests_per_client, args.max_tokens, seed=2 + r)
                               for r in range(args.repeat)), key=lambda x: x["seconds"])
                rows.append(runs[len(runs) // 2])
                row = rows[-1]
                print(f"{c:3d} clients: {row['requests']:4d} requests, {row['tokens']:6d} tokens in "
                      f"{row['seconds']:.2f} s: {row['requests_per_s']:.1f} requests/s, "
                      f"{row['tokens_per_s']:.0f} tokens/s", flush=True)
        finally:
            p.terminate()
            p.wait(60)
    print("\n| clients | requests/s | tokens/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests_per_s']:.1f} | {r['tokens_per_s']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
