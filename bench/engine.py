"""The engine's figures: continuous batching against static batches, the paged cache against contiguous rows of
the same memory, shared prefixes in generation and in scoring, and `score` throughput.

The workload: 96 prompts of 4 to 40 tokens; most requests ask 4 to 8 new tokens, one in `--long-every` (7) asks 96
to 128.
Both sides decode with `--batch` cache rows and stop only at each request's own length:
- engine: one `generate(..., max_new_tokens=<per request>, batch_size=B)` call; a finished request's
  slot is refilled at once;
- static: the prompts in consecutive groups of B, each group run until its longest request ends
  (`generate(group, max_new_tokens=max(group), batch_size=B)`), as a static batch runs.
Useful tokens are the ones the requests asked for (sum of their lengths) on both sides; the ideal
ratio is static decode steps / engine decode steps = sum over groups of max(len) / (sum(len) / B).
Then `--short` prompts of 2 new tokens through the same B slots (wall time, compiles included: their
chunk and insert sizes are new), and `score` over `--score` requests.
With `--paged`: 256 requests (240 ask 32 new tokens, 16 ask 1,000) through 32 slots sharing a pool of 20,480
tokens, against contiguous rows of the same memory (one page per row as long as the longest request: 10 rows);
useful tokens/s, decode steps and the cache bytes each holds. With `--prefix`: 32 generation prompts that share a
1,024-token few-shot prefix (4 new tokens each), with and without reusing its pages; and multiple-choice
scoring, 32 contexts of 384 tokens x 4 continuations, packed by shared context against one row per request.
Random weights (the tiny config with a longer context), float32; runs on whatever JAX sees. Times are medians
of `--repeat` runs after a compiling one.

    PYTHONPATH=$PWD python bench/engine.py [--prompts 96] [--batch 8] [--paged] [--prefix] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def workload(n: int, long_every: int, seed: int = 0):
    """Prompts of 4 to 40 tokens; one request in `long_every` asks 96 to 128 new tokens, the others 4 to 8 (the
    defaults give 14 long requests in 96)."""
    g = np.random.default_rng(seed)
    prompts = [g.integers(20, 1000, int(g.integers(4, 41))).tolist() for _ in range(n)]
    lens = [int(g.integers(96, 129)) if i % long_every == long_every // 2 else int(g.integers(4, 9))
            for i in range(n)]
    return prompts, lens


def best_of(fn, repeat: int) -> float:
    """The median wall time of `repeat` calls after a compiling one."""
    fn()  # compile
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paged_vs_contiguous(model, repeat: int) -> dict:
    """A mixed workload within 20,480 cache tokens: 240 requests ask 32 new tokens and 16 ask 1,000 (prompts of 4
    to 40). Pages: 32 slots, each request holding pages for its own tokens. Contiguous rows of the same memory:
    every slot a row as long as the longest request (2,048 slots: 10 rows), as a cache without pages must."""
    from mistral4_jax import Engine

    g = np.random.default_rng(2)
    prompts = [g.integers(20, 1000, int(g.integers(4, 41))).tolist() for _ in range(256)]
    lens = [1000 if i % 16 == 7 else 32 for i in range(256)]
    budget, row = 20480, 2048

    def run(**kw):
        eng = Engine(model, max_len=row, cache_tokens=budget, **kw)
        reqs = [eng.submit(p, max_new_tokens=n, stop_tokens=[]) for p, n in zip(prompts, lens)]
        eng.run()
        assert [len(r.tokens) for r in reqs] == lens
        return eng

    paged, contiguous = {}, {}
    t_paged = best_of(lambda: paged.update(e=run(batch_size=32)), repeat)
    t_cont = best_of(lambda: contiguous.update(e=run(batch_size=budget // row, page_tokens=row)), repeat)
    return {"paged_tokens_per_s": round(sum(lens) / t_paged, 1), "contiguous_tokens_per_s": round(sum(lens) / t_cont, 1),
            "paged_over_contiguous": round(t_cont / t_paged, 2), "paged_slots": 32,
            "contiguous_slots": budget // row, "cache_bytes_both": paged["e"].cache_bytes(),
            "paged_decode_steps": paged["e"].stats["decode_steps"],
            "contiguous_decode_steps": contiguous["e"].stats["decode_steps"], "preempted": paged["e"].stats["preempted"]}


def shared_prefixes(model, repeat: int) -> dict:
    from mistral4_jax import Engine, score

    g = np.random.default_rng(3)
    prefix = g.integers(20, 1000, 1024).tolist()
    prompts = [prefix + g.integers(20, 1000, int(g.integers(8, 41))).tolist() for _ in range(32)]

    def run(share):
        eng = Engine(model, batch_size=8, max_len=1280, share_prefixes=share)
        for p in prompts:
            eng.submit(p, max_new_tokens=4, stop_tokens=[])
        eng.run()

    t_share, t_none = best_of(lambda: run(True), repeat), best_of(lambda: run(False), repeat)
    contexts = [g.integers(20, 1000, 384).tolist() for _ in range(32)]
    reqs = [(c, g.integers(20, 1000, int(g.integers(2, 9))).tolist()) for c in contexts for _ in range(4)]
    shared = best_of(lambda: score(model, reqs, batch_size=8), repeat)
    alone = best_of(lambda: score(model, reqs, batch_size=8, share_contexts=False), repeat)
    return {"fewshot_prefix_reuse_speedup": round(t_none / t_share, 2),
            "mc_score_shared_s": round(shared, 3), "mc_score_distinct_s": round(alone, 3),
            "mc_score_speedup": round(alone / shared, 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8, help="cache rows (batch_size) on both sides")
    ap.add_argument("--long-every", type=int, default=7, help="one request in this many is long")
    ap.add_argument("--short", type=int, default=2000, help="short prompts for the many-requests run")
    ap.add_argument("--score", type=int, default=256, help="score requests")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--paged", action="store_true", help="paged cache against contiguous rows (see above)")
    ap.add_argument("--prefix", action="store_true", help="shared prefixes in generation and scoring (see above)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    from flax import nnx

    from mistral4_jax import generate, score
    from mistral4_jax.config import ModelConfig
    from mistral4_jax.model.mistral3 import Mistral3ForConditionalGeneration

    cfg = ModelConfig.tiny(max_position_embeddings=4096)
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
           "long_requests": sum(n >= 96 for n in lens),
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
    if args.paged:
        res.update(paged_vs_contiguous(model, args.repeat))
    if args.prefix:
        res.update(shared_prefixes(model, args.repeat))
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
