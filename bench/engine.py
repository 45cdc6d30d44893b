"""Continuous batching against static batches on a heavy-tailed workload, and `score` throughput.

The workload: most requests ask a few new tokens, one in `--long-every` asks a hundred or more.
Both sides decode with `--batch` cache rows and stop only at each request's own length:
- engine: one `generate(..., max_new_tokens=<per request>, batch_size=B)` call; a finished request's
  slot is refilled at once;
- static: the prompts in consecutive groups of B, each group run until its longest request ends
  (`generate(group, max_new_tokens=max(group), batch_size=B)`), as a static batch runs.
Useful tokens are the ones the requests asked for (sum of their lengths) on both sides; the ideal
ratio is static decode steps / engine decode steps = sum over groups of max(len) / (sum(len) / B).
Then `--short` prompts of 2 new tokens through the same B slots (wall time, compiles included: their
chunk and insert sizes are new), and `score` over `--score` requests.
Random weights (the tiny config with a longer context), float32; runs on whatever JAX sees.

    PYTHONPATH=$PWD python bench/engine.py [--prompts 96] [--batch 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def workload(n: int, long_every: int, seed: int = 0):
    g = np.random.default_rng(seed)
    prompts = [g.integers(20, 1000, int(g.integers(4, 33))).tolist() for _ in range(n)]
    lens = [int(g.integers(100, 161)) if i % long_every == long_every // 2 else int(g.integers(2, 9))
            for i in range(n)]
    return prompts, lens


def best_of(fn, repeat: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8, help="cache rows (batch_size) on both sides")
    ap.add_argument("--long-every", type=int, default=8, help="one request in this many is long")
    ap.add_argument("--short", type=int, default=2000, help="short prompts for the many-requests run")
    ap.add_argument("--score", type=int, default=256, help="score requests")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    from flax import nnx

    from mistral4_jax import generate, score
    from mistral4_jax.config import ModelConfig
    from mistral4_jax.model.mistral3 import Mistral3ForConditionalGeneration

    cfg = ModelConfig.tiny(max_position_embeddings=1024)
    model = Mistral3ForConditionalGeneration(cfg, jnp.float32, rngs=nnx.Rngs(0))
    b = args.batch
    prompts, lens = workload(args.prompts, args.long_every)
    groups = [range(i, min(i + b, len(prompts))) for i in range(0, len(prompts), b)]
    useful = sum(lens)
    ideal = sum(max(lens[i] for i in grp) for grp in groups) / (useful / b)

    engine_out = {}

    def engine():
        engine_out["out"] = generate(model, prompts, max_new_tokens=lens, stop_tokens=[], batch_size=b)

    def static():
        for grp in groups:
            generate(model, [prompts[i] for i in grp], max_new_tokens=max(lens[i] for i in grp), stop_tokens=[],
                     batch_size=b)

    t_engine, t_static = best_of(engine, args.repeat), best_of(static, args.repeat)
    assert [len(o) for o in engine_out["out"]] == lens
    res = {"backend": jax.devices()[0].platform, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
           "prompts": len(prompts), "batch_size": b, "useful_tokens": useful,
           "long_requests": sum(n >= 100 for n in lens),
           "engine_tokens_per_s": round(useful / t_engine, 1), "static_tokens_per_s": round(useful / t_static, 1),
           "speedup": round(t_static / t_engine, 2), "ideal_speedup": round(ideal, 2)}
    print(json.dumps(res), flush=True)

    g = np.random.default_rng(1)
    short = [g.integers(20, 1000, int(g.integers(2, 9))).tolist() for _ in range(args.short)]
    t0 = time.perf_counter()
    out = generate(model, short, max_new_tokens=2, stop_tokens=[], batch_size=b)
    assert all(len(o) == 2 for o in out)
    res.update(short_prompts=args.short, short_seconds=round(time.perf_counter() - t0, 2))

    reqs = [(g.integers(20, 1000, int(g.integers(8, 65))).tolist(),
             g.integers(20, 1000, int(g.integers(1, 9))).tolist()) for _ in range(args.score)]
    tokens = sum(len(c) + len(x) for c, x in reqs)
    t_score = best_of(lambda: score(model, reqs, batch_size=32), args.repeat)
    res.update(score_requests=len(reqs), score_tokens_per_s=round(tokens / t_score, 1),
               score_requests_per_s=round(len(reqs) / t_score, 1))
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
