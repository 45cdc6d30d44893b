"""Memory (and, where it runs, time) of the long-context programs against the context length T.

One decoder layer with the released attention dims (hidden 4096, 32 heads, q_lora 1024, kv_lora 256,
qk_nope 64, qk_rope 64, v 128) and a reduced MoE (8 experts of width 256, top 2, one shared), bf16,
batch 1, a 1024-token vocabulary. For each T it compiles, without running:

- final_hidden: `model.final_hidden(ids, attention_mask=...)` (what score, perplexity, captures run);
- loss+grad: the gradient of the fine-tuning loss (`train.step.loss_fn`) over all parameters;
- prefill: the chunked prefill of a T-token prompt into a T-slot latent cache;
- decode: one cached step at position T - 1 against a T-slot cache,

and prints XLA's compile-time temporary memory (`memory_analysis().temp_size_in_bytes`: buffers the
program needs beyond its arguments and outputs) with the growth ratio against the previous T. The
cache itself is an argument of prefill/decode, so it is not in their temporaries. --run T... also runs
the programs at those lengths (median of --repeat timings after a warm-up).

    PYTHONPATH=. python bench/long_context.py [--lengths 2048 8192 32768 262144] [--run 2048] \
        [--impl blockwise|reference|auto] [--chunk 512] [--dtype bfloat16|float32]
    PYTHONPATH=. python bench/long_context.py --decode-slope 262144 --lengths 8192 65536 131072 262144 \
        --dtype float32

On CPU, XLA widens bf16 buffers that a loop slices to fp32 (a whole-buffer copy): bf16 figures there
include such copies of the cache and the prompt; float32 (and GPU) figures do not.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mistral4_jax.config import ModelConfig, RopeConfig
from mistral4_jax.model.cache import Cache
from mistral4_jax.model.mistral3 import Mistral3ForConditionalGeneration
from mistral4_jax.train.step import TrainConfig, loss_fn

GiB = 2 ** 30


def one_layer_config(max_len: int, impl: str) -> ModelConfig:
    """The released attention at full width, one MoE layer with few, narrow experts."""
    text = dict(vocab_size=1024, hidden_size=4096, num_hidden_layers=1, num_attention_heads=32,
                num_key_value_heads=32, q_lora_rank=1024, kv_lora_rank=256, qk_nope_head_dim=64,
                qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=256, n_shared_experts=1, max_position_embeddings=max(max_len, 8192),
                rope=RopeConfig(factor=32.0, original_max_position_embeddings=8192))
    if impl:
        text["attention_impl"] = impl
    return ModelConfig.tiny(**text).replace(vision=None)


def programs(model, chunk: int):
    """name -> (jitted function, argument builder for T)."""
    graphdef, state = nnx.split(model)
    tc = TrainConfig(steps=1, max_len=2, loss_chunk=512)
    tgd, params = nnx.split(model, nnx.Param)
    cfg = model.config.text

    def ids_mask(t):
        ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
        return ids, jax.ShapeDtypeStruct((1, t), jnp.int32)

    def cache_spec(t):
        return Cache(jax.ShapeDtypeStruct((cfg.num_hidden_layers, 1, t, cfg.kv_lora_rank), model.dtype),
                               jax.ShapeDtypeStruct((cfg.num_hidden_layers, 1, t, cfg.qk_rope_head_dim), model.dtype))

    def final_hidden(state, ids, mask):
        return nnx.merge(graphdef, state).final_hidden(ids, attention_mask=mask)

    def loss_grad(params, ids, mask):
        batch = {"input_ids": ids, "attention_mask": mask, "targets": mask.astype(bool)}
        return jax.grad(lambda p: loss_fn(p, None, batch, tgd, tc)[0])(params)

    def prefill(state, embeds, cache):
        return nnx.merge(graphdef, state).prefill(embeds, cache, min(chunk, embeds.shape[1]))

    def decode(state, x, pos, cache):
        return nnx.merge(graphdef, state).forward_cached(x, pos, cache)

    emb = lambda t: jax.ShapeDtypeStruct((1, t, cfg.hidden_size), model.dtype)  # noqa: E731
    return {
        "final_hidden": (jax.jit(final_hidden), lambda t: (state, *ids_mask(t))),
        "loss+grad": (jax.jit(loss_grad), lambda t: (params, *ids_mask(t))),
        "prefill": (jax.jit(prefill, donate_argnums=2), lambda t: (state, emb(t), cache_spec(t))),
        "decode": (jax.jit(decode, donate_argnums=3),
                   lambda t: (state, emb(1), jax.ShapeDtypeStruct((1, 1), jnp.int32), cache_spec(t))),
    }


def concrete(arg, t):
    """Real arrays for the abstract leaves of an argument (positions T - 1 for decode)."""
    def leaf(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if x.shape == (1, 1) and x.dtype == jnp.int32:
            return jnp.full(x.shape, t - 1, jnp.int32)
        if x.dtype == jnp.int32:
            return jnp.ones(x.shape, jnp.int32)
        return jnp.zeros(x.shape, x.dtype)

    return jax.tree.map(leaf, arg, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def decode_slope(progs, model, bucket: int, filled: list[int], repeat: int):
    """Time one decode step against a `bucket`-slot cache filled to each length: the attention reads
    the filled slots only, so time grows with the cache bytes read (the fitted slope, as bandwidth)."""
    fn, make = progs["decode"]
    spec = make(bucket)
    exe = fn.lower(*spec).compile()
    cfg = model.config.text
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * model.dtype.itemsize * cfg.num_hidden_layers
    print(f"decode step against a {bucket}-slot cache: filled length, cache MB read, ms (best of {repeat})")
    rows = []
    for n in sorted(filled):
        runs = []
        for _ in range(repeat + 1):
            a = [concrete(x, n) for x in spec]  # position n - 1: slots 0..n-1 are read
            t0 = time.perf_counter()
            jax.block_until_ready(exe(*a))
            runs.append(time.perf_counter() - t0)
        rows.append((n * per_token / 1e6, min(runs[1:]) * 1e3))  # min: the least disturbed run
        print(f"{n:>8} {rows[-1][0]:10.1f} {rows[-1][1]:9.2f}", flush=True)
    if len(rows) > 1:
        mb, ms = zip(*rows)
        slope = statistics.linear_regression(mb, ms).slope  # ms per MB
        print(f"slope {slope * 1e3:.3f} us/MB = {1 / slope:.1f} GB/s of cache read; "
              f"intercept (weights, the rest of the step) {statistics.linear_regression(mb, ms).intercept:.2f} ms")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768, 262144])
    p.add_argument("--run", type=int, nargs="*", default=[], help="lengths at which to also run and time")
    p.add_argument("--impl", default="", help="attention_impl (default: the config's)")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", help="parameters, activations and cache")
    p.add_argument("--decode-slope", type=int, default=0, metavar="BUCKET",
                   help="instead: time a decode step against a BUCKET-slot cache filled to each of --lengths")
    p.add_argument("--only", nargs="*", default=None, help="a subset of the programs")
    args = p.parse_args()
    cfg = one_layer_config(max(args.lengths + args.run), args.impl)
    model = Mistral3ForConditionalGeneration(cfg, jnp.dtype(args.dtype), rngs=nnx.Rngs(0))
    progs = programs(model, args.chunk)
    if args.decode_slope:
        return decode_slope(progs, model, args.decode_slope, args.lengths, args.repeat)
    names = [n for n in progs if args.only is None or n in args.only]
    print(f"{jax.devices()[0].platform}, attention_impl {cfg.text.attention_impl}, "
          f"1 layer, batch 1, {args.dtype}, prefill chunk {args.chunk}; compile-time temp GiB (x growth vs previous T)")
    print(f"{'T':>8} " + " ".join(f"{n:>20}" for n in names))
    prev = {}
    for t in sorted(set(args.lengths + args.run)):
        cells, compiled = [], {}
        for n in names:
            fn, make = progs[n]
            spec = make(t)
            compiled[n] = (fn.lower(*spec).compile(), spec)
            temp = compiled[n][0].memory_analysis().temp_size_in_bytes / GiB
            ratio = f"(x{temp / prev[n]:.1f})" if prev.get(n) else ""
            cells.append(f"{temp:11.3f} {ratio:>8}")
            prev[n] = temp
        print(f"{t:>8} " + " ".join(f"{c:>20}" for c in cells), flush=True)
        if t in args.run:
            times = []
            for n in names:
                exe, spec = compiled[n]
                runs = []
                for _ in range(args.repeat + 1):
                    a = [concrete(x, t) for x in spec]
                    t0 = time.perf_counter()
                    jax.block_until_ready(exe(*a))
                    runs.append(time.perf_counter() - t0)
                times.append(f"{statistics.median(runs[1:]) * 1e3:9.1f} ms")
            print(f"{'  time':>8} " + " ".join(f"{c:>20}" for c in times), flush=True)


if __name__ == "__main__":
    main()
