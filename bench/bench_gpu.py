"""GPU presets: decode ms/step and prefill tokens/s of random-weight models against their rooflines.

Models are built from random weights directly on the device (one jitted generator per parameter and
layer; nothing is copied from the host). Presets:

  reduced  real width (hidden 4096, 128 experts of width 2048, MLA dims, vocabulary 131072), 4 layers,
           bf16 (fits an H100), plus the transformers reference on the same config in the same run
           (in a child process that finishes before JAX takes the GPU)
  full     the whole depth (36 layers) with FP8 weights (`weights="fp8"`, about 119 GB; one H200)
  tiny     `ModelConfig.tiny()` on whatever JAX sees, in well under a minute on CPU (the test runs it)

Each decode figure (batch 1, 8, 64, 128, one token per row per step, `--context` tokens already cached)
is printed with its roofline: the bytes a step must read (attention, shared and router weights, the
expected number of distinct routed experts under uniform routing E*(1-(1-K/E)^B), lm_head, the latent
cache) over the device-to-device copy bandwidth measured in the same run. Prefill (batch 1, 2k / 8k /
32k tokens) is compared with the FLOPs it must do (2 x active parameters per token, plus causal
attention in the absorbed form) over a bf16 matmul peak measured in the same run. Each decode batch
runs with every `--expert-impls` entry, which is the measurement that chooses `moe.GATHER_MAX_PAIRS`.

    PYTHONPATH=$PWD python bench/bench_gpu.py --preset reduced
    PYTHONPATH=$PWD python bench/bench_gpu.py --preset full
    PYTHONPATH=$PWD python bench/bench_gpu.py --preset tiny --results /tmp/r.md --json /tmp/r.json

Writes a JSON per run (default bench/results/<preset>-<time>.json) and appends a section to
bench/RESULTS.md (device, driver, jax/jaxlib versions, date, command, figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mistral4_jax.model.cache import cache_bytes_per_token, init_cache  # noqa: E402
from mistral4_jax.model import fp8  # noqa: E402
from mistral4_jax.config import ModelConfig  # noqa: E402
from mistral4_jax.model.mistral3 import Mistral3ForConditionalGeneration  # noqa: E402

PRESETS = {
    "reduced": dict(layers=4, dtype="bfloat16", weights=None, batches=(1, 8, 64, 128), prefill=(2048, 8192, 32768),
                    chunk=2048, context=1024, steps=32, torch=True),
    "full": dict(layers=36, dtype="bfloat16", weights="fp8", batches=(1, 8, 64, 128), prefill=(2048, 8192, 32768),
                 chunk=2048, context=1024, steps=32, torch=False),
    "tiny": dict(layers=2, dtype="float32", weights="fp8", batches=(1, 8), prefill=(64,), chunk=32, context=32,
                 steps=4, torch=True, compile=False),
}
STATED_PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 TFLOP/s of the SXM parts (vendor figures)


def text_config(preset: str) -> ModelConfig:
    base = ModelConfig.tiny() if preset == "tiny" else ModelConfig.mistral_small_4()
    cfg = dataclasses.replace(base, vision=None)
    return cfg.replace_text(num_hidden_layers=PRESETS[preset]["layers"])


# ---------------------------------------------------------------------- random model on the device
@partial(jax.jit, static_argnames=("shape", "dtype", "kind"))
def _random(key, shape, dtype, kind):
    if kind == "ones":
        return jnp.ones(shape, dtype)
    w = jax.random.normal(key, shape, jnp.float32) * 0.02
    return fp8.quantize(w, dtype) if kind == "fp8" else w.astype(dtype)


@partial(jax.jit, donate_argnums=0)
def _set(stack, value, i):
    return jax.tree.map(lambda s, v: jax.lax.dynamic_update_index_in_dim(s, v, i, 0), stack, value)


def random_model(cfg: ModelConfig, dtype, weights=None, seed: int = 0) -> nnx.Module:
    """A model of `cfg` with random weights generated on the default device, one layer slice at a time
    (stacked parameters), so the peak is one layer's float32 temporary; FP8 targets are quantised."""
    dtype = jnp.dtype(dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Mistral3ForConditionalGeneration(cfg, dtype, rngs=nnx.Rngs(0))))
    root = jax.random.key(seed)
    out = []
    keep_fp8 = fp8.fp8_paths(state) if weights == "fp8" else set()
    for i, (p, var) in enumerate(nnx.to_flat_state(state)):
        path, shape = "/".join(map(str, p)), tuple(var.shape)
        kind = "ones" if path.endswith("norm/weight") else ("fp8" if path in keep_fp8 else "normal")
        key = jax.random.fold_in(root, i)
        if "/layers/" not in path or np.prod(shape) * 4 <= (1 << 30):  # small: one generator call
            value = _random(key, shape, dtype.name, kind)
        else:
            value = None
            for layer in range(shape[0]):
                v = _random(jax.random.fold_in(key, layer), shape[1:], dtype.name, kind)
                if value is None:
                    value = jax.tree.map(lambda x: jnp.zeros((shape[0], *x.shape), x.dtype), v)
                value = _set(value, v, layer)
        out.append((p, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(out))


def with_expert_impl(model, impl: str):
    cfg = model.config.replace_text(expert_impl=impl)
    dtype = model.lm_head.kernel[...].dtype
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Mistral3ForConditionalGeneration(cfg, dtype, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


# ---------------------------------------------------------------------- measurements
def best_time(fn, repeat=3) -> float:
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(nbytes: int) -> float:
    """Bytes/s of x + 1 over a float32 array (reads and writes it once: 2 * nbytes per call)."""
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1)
    return 2 * nbytes / best_time(lambda: f(x), repeat=5)


def matmul_peak(n: int) -> float:
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda a: a @ a)
    return 2 * n ** 3 / best_time(lambda: f(a), repeat=5)


@partial(jax.jit, static_argnames=("n",), donate_argnums=(2,))
def _decode_steps(graphdef, state, cache, tok_b, pos_b, n):
    model = nnx.merge(graphdef, state)

    def body(i, c):
        cache, tok = c
        h, cache = model.forward_cached(model.embed(tok[:, None]), (pos_b + i)[:, None], cache)
        return cache, jnp.argmax(model.lm_head(h[:, 0]), -1).astype(jnp.int32)

    return jax.lax.fori_loop(0, n, body, (cache, tok_b))


def decode_ms_per_step(model, batch: int, context: int, steps: int) -> float:
    t = model.config.text
    graphdef, state = nnx.split(model)
    dtype = model.lm_head.kernel[...].dtype
    tok = jnp.full((batch,), 5, jnp.int32)
    pos = jnp.full((batch,), context, jnp.int32)

    def run():
        cache = init_cache(t, batch, context + steps, dtype)
        return _decode_steps(graphdef, state, cache, tok, pos, steps)

    return 1e3 * best_time(run) / steps


@partial(jax.jit, static_argnames=("chunk",))
def _prefill(graphdef, state, ids_bt, cache, chunk):
    model = nnx.merge(graphdef, state)
    return model.prefill(model.embed(ids_bt), cache, chunk)[0][:, -1]


def prefill_tokens_per_s(model, length: int, chunk: int) -> float:
    graphdef, state = nnx.split(model)
    dtype = model.lm_head.kernel[...].dtype
    ids = jnp.full((1, length), 5, jnp.int32)
    chunk = min(chunk, length)
    return length / best_time(lambda: _prefill(graphdef, state, ids, init_cache(model.config.text, 1, length,
                                                                                       dtype), chunk), repeat=2)


# ---------------------------------------------------------------------- rooflines
def leaf_bytes(model) -> dict[str, int]:
    return {"/".join(map(str, p)): fp8.param_bytes(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def expected_experts(e: int, k: int, tokens: int) -> float:
    """Distinct experts touched by `tokens` tokens of top-k under uniform routing: E * (1 - (1 - K/E)^T)."""
    return e * (1 - (1 - k / e) ** tokens)


def decode_bytes(model, batch: int, context: int) -> float:
    """Bytes one decode step must read: weights (routed experts by expected use, embeddings by row) + cache."""
    t = model.config.text
    total = 0.0
    for path, n in leaf_bytes(model).items():
        if "/mlp/experts/" in path:
            total += n * expected_experts(t.n_routed_experts, t.num_experts_per_tok, batch) / t.n_routed_experts
        elif path.endswith("embed_tokens/embedding"):
            total += n * min(batch, t.vocab_size) / t.vocab_size
        else:
            total += n
    return total + batch * (context + 1) * cache_bytes_per_token(t, model.lm_head.kernel[...].dtype)


def prefill_flops(cfg: ModelConfig, length: int) -> float:
    """2 x active weight parameters per token x T, plus causal absorbed attention: per head and
    (query, key) pair 2 * (kv_lora_rank + rope) for scores and 2 * kv_lora_rank for values, T^2/2 pairs.
    The absorption matmuls (q_nope @ W_UK, o @ W_UV) count with the attention weights (kv_b_proj)."""
    t = cfg.text
    h, nh = t.hidden_size, t.num_attention_heads
    q = h * t.q_lora_rank + t.q_lora_rank * nh * t.qk_head_dim if t.q_lora_rank else h * nh * t.qk_head_dim
    attn = q + h * (t.kv_lora_rank + t.qk_rope_head_dim) + t.kv_lora_rank * nh * (t.qk_nope_head_dim + t.v_head_dim) \
        + nh * t.v_head_dim * h
    mlp = 3 * h * t.moe_intermediate_size * (t.num_experts_per_tok + t.n_shared_experts) + h * t.n_routed_experts
    weights = 2 * t.num_hidden_layers * (attn + mlp) * length
    pairs = length * (length + 1) / 2
    return weights + t.num_hidden_layers * nh * pairs * (2 * (t.kv_lora_rank + t.qk_rope_head_dim) + 2 * t.kv_lora_rank)


# ---------------------------------------------------------------------- transformers side by side
def torch_reference(cfg: ModelConfig, batches, context: int, steps: int, compile: bool = True) -> dict:
    """ms/step of transformers' Mistral4ForCausalLM (random weights, same config) in eager mode and
    under torch.compile, one token per row per step after a `context`-token prefill."""
    import torch
    from transformers import Mistral4ForCausalLM

    import reference as R

    t = cfg.text
    fields = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim",
              "qk_nope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
              "first_k_dense_replace", "max_position_embeddings")
    rope = {k: getattr(t.rope, k) for k in ("rope_type", "rope_theta", "factor", "original_max_position_embeddings",
                                            "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "llama_4_scaling_beta")}
    hf = R.hf_config(text={k: getattr(t, k) for k in fields}, rope=rope, with_vision=False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    with torch.device(dev):
        model = Mistral4ForCausalLM(hf).eval()
    torch.set_default_dtype(torch.float32)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def ms_per_step(fwd, b):
        ids = torch.full((b, context), 5, device=dev)
        with torch.no_grad():
            out = fwd(input_ids=ids, use_cache=True)
            pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(2):  # warm-up (compilation)
                out = fwd(input_ids=tok, past_key_values=pkv, use_cache=True)
                pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                out = fwd(input_ids=tok, past_key_values=pkv, use_cache=True)
                pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
        return 1e3 * (time.perf_counter() - t0) / steps

    res = {"torch": torch.__version__, "torch_device": dev}
    for b in batches:
        res[f"eager_b{b}_ms_step"] = round(ms_per_step(model, b), 3)
    if not compile:
        return res
    try:
        compiled = torch.compile(model)
        for b in batches:
            res[f"compile_b{b}_ms_step"] = round(ms_per_step(compiled, b), 3)
    except Exception as e:  # noqa: BLE001 - the reference's compile support is what is measured
        res["compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return res


# ---------------------------------------------------------------------- the run
def environment() -> dict:
    import jaxlib

    d = jax.devices()[0]
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "backend": d.platform, "device": d.device_kind, "jax": jax.__version__, "jaxlib": jaxlib.__version__}
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["driver"] = None
    return env


def torch_in_child(preset: str, batches, context: int, steps: int, compile: bool) -> dict:
    """`torch_reference` in a child process, run before JAX claims the GPU (JAX takes most of its
    memory when its backend starts, and keeps it); a failure is recorded, not raised."""
    cmd = [sys.executable, __file__, "--preset", preset, "--torch-only",
           json.dumps(dict(batches=list(batches), context=context, steps=steps, compile=compile))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}
    return json.loads(lines[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="reduced")
    ap.add_argument("--tiny", action="store_const", const="tiny", dest="preset", help="same as --preset tiny")
    ap.add_argument("--batches", help="comma-separated decode batch sizes (default: the preset's)")
    ap.add_argument("--prefill", help="comma-separated prefill lengths (default: the preset's)")
    ap.add_argument("--expert-impls", default="auto,routed,gather,grouped",
                    help="expert paths to time at each decode batch (model/moe.py)")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers side by side")
    ap.add_argument("--json", help="where to write the figures (default bench/results/<preset>-<time>.json)")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file to append the run to")
    ap.add_argument("--torch-only", metavar="JSON", help=argparse.SUPPRESS)  # the child of torch_in_child
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset])
    batches = tuple(map(int, args.batches.split(","))) if args.batches else p["batches"]
    lengths = tuple(map(int, args.prefill.split(","))) if args.prefill else p["prefill"]
    tiny = args.preset == "tiny"
    cfg = text_config(args.preset)
    ref_cfg = cfg if tiny else text_config("reduced")
    if args.torch_only:
        print(json.dumps(torch_reference(ref_cfg, **json.loads(args.torch_only))))
        return {}

    reference = None
    if p["torch"] and not args.no_torch:
        reference = torch_in_child(args.preset, batches[:2], min(p["context"], 128), min(p["steps"], 8),
                                   p.get("compile", True))
        print("transformers:", reference, flush=True)
    # JAX preallocates 75% of the GPU by default; the FP8 model alone is about 121 GB of an H200's 141.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    res = {**environment(), "preset": args.preset, "command": "python bench/bench_gpu.py " + " ".join(argv or sys.argv[1:]),
           "dtype": p["dtype"], "weights": p["weights"], "layers": p["layers"], "context": p["context"]}
    out = Path(args.json or HERE / "results" / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(**figures):  # the JSON is rewritten after every figure, so a run cut short keeps what it measured
        res.update(figures)
        out.write_text(json.dumps(res, indent=1))

    if reference is not None:
        record(transformers=reference)
    bw = copy_bandwidth(64 << 20 if tiny else 4 << 30)
    peak = matmul_peak(512 if tiny else 8192)
    stated = next((v for k, v in STATED_PEAK_BF16.items() if k in res["device"]), None)
    record(copy_GBps=round(bw / 1e9, 1), matmul_TFLOPs=round(peak / 1e12, 2), stated_peak_TFLOPs=stated and stated / 1e12)
    print(f"{res['device']}: copy {bw / 1e9:.1f} GB/s, bf16 matmul {peak / 1e12:.1f} TFLOP/s", flush=True)

    t0 = time.perf_counter()
    model = random_model(cfg, p["dtype"], p["weights"])
    record(param_GB=round(sum(leaf_bytes(model).values()) / 1e9, 3), build_s=round(time.perf_counter() - t0, 1))
    print(f"model: {p['layers']} layers, {res['param_GB']} GB of parameters, built in {res['build_s']} s", flush=True)

    for impl in args.expert_impls.split(","):
        m = with_expert_impl(model, impl)
        for b in batches:
            ms = decode_ms_per_step(m, b, p["context"], p["steps"])
            roof = 1e3 * decode_bytes(m, b, p["context"]) / bw
            record(**{f"decode_{impl}_b{b}": {"ms_step": round(ms, 3), "tok_s": round(1e3 * b / ms, 1),
                                              "roofline_ms": round(roof, 3), "of_roofline": round(roof / ms, 3)}})
            print(f"decode {impl:8s} B={b:4d}: {ms:9.3f} ms/step {1e3 * b / ms:10.1f} tok/s  "
                  f"roofline {roof:.3f} ms ({roof / ms:.0%})", flush=True)
    for n in lengths:
        tps = prefill_tokens_per_s(model, n, p["chunk"])  # the default expert path
        frac = prefill_flops(cfg, n) / n * tps / peak
        record(**{f"prefill_{n}": {"tok_s": round(tps, 1), "of_measured_peak": round(frac, 3)}})
        print(f"prefill T={n:6d}: {tps:12.1f} tok/s  {frac:.0%} of the measured bf16 matmul peak", flush=True)
    with open(args.results, "a") as f:
        f.write(f"\n## {res['preset']} on {res['device']} ({res['date']})\n\n"
                f"driver {res['driver']}, jax {res['jax']}, jaxlib {res['jaxlib']}; `{res['command']}`\n\n"
                "```json\n" + json.dumps(res, indent=1) + "\n```\n")
    return res


if __name__ == "__main__":
    main()
