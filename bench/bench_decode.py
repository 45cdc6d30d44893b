"""Decode / prefill throughput, compile time against depth, and transformers' generate side by side.

Runs on whatever JAX sees (CPU or GPU); the transformers side runs on CPU (torch). Same tiny config
and the same weights for both: a transformers reference model is built, saved, and loaded here.

    PYTHONPATH=$PWD python bench/bench_decode.py [--new 64] [--prompt 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def timed(fn, repeat=3):
    """(seconds of the first call, best of `repeat` later calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return first, best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--prompt", type=int, default=16, help="prompt length for the decode runs")
    ap.add_argument("--prefill", type=int, default=512, help="prompt length for the prefill run")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--depths", default="4,36")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    import torch
    from flax import nnx

    import reference as R
    from mistral4_jax import from_pretrained, generate
    from mistral4_jax.config import ModelConfig
    from mistral4_jax.model.mistral3 import Mistral3ForConditionalGeneration

    res = {"jax": jax.__version__, "backend": jax.devices()[0].platform, "device": str(jax.devices()[0].device_kind),
           "new_tokens": args.new, "prompt": args.prompt}
    g = np.random.default_rng(0)
    ref = R.build(R.hf_config(text=dict(max_position_embeddings=4096), with_vision=False), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        jm = from_pretrained(R.save(ref, tmp), dtype="float32")
    res["config"] = {k: R.TEXT_DEFAULTS[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                      "num_attention_heads", "n_routed_experts", "kv_lora_rank")}

    # ---- ours: decode
    for b in map(int, args.batches.split(",")):
        prompts = g.integers(3, 256, (b, args.prompt)).tolist()
        first, best = timed(lambda: generate(jm, prompts, max_new_tokens=args.new, stop_tokens=[]))
        res[f"jax_decode_b{b}_tok_s"] = round(b * args.new / best, 1)
        res[f"jax_decode_b{b}_first_call_s"] = round(first, 2)
    # ---- ours: prefill (one new token after a long prompt)
    prompts = g.integers(3, 256, (8, args.prefill)).tolist()
    _, best = timed(lambda: generate(jm, prompts, max_new_tokens=1, stop_tokens=[]))
    res["jax_prefill_b8_tok_s"] = round(8 * args.prefill / best, 1)

    # ---- transformers generate on the same weights (CPU, greedy, fixed length)
    torch.set_num_threads(os.cpu_count() or 1)
    for b in (1, 8):
        ids = torch.as_tensor(g.integers(3, 256, (b, args.prompt)))

        def hf():
            with torch.no_grad():
                out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                   min_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert out.shape[1] == args.prompt + args.new

        _, best = timed(hf, repeat=2)
        res[f"hf_generate_b{b}_tok_s"] = round(b * args.new / best, 1)
    res["speedup_b1"] = round(res["jax_decode_b1_tok_s"] / res["hf_generate_b1_tok_s"], 1)
    res["speedup_b8"] = round(res["jax_decode_b8_tok_s"] / res["hf_generate_b8_tok_s"], 1)

    # ---- compile time against depth (random tiny models; first call minus a later call)
    for depth in map(int, args.depths.split(",")):
        cfg = ModelConfig.tiny(num_hidden_layers=depth)
        model = Mistral3ForConditionalGeneration(cfg, rngs=nnx.Rngs(depth))
        prompts = g.integers(3, 256, (2, args.prompt)).tolist()
        first, best = timed(lambda m=model: generate(m, prompts, max_new_tokens=args.new, stop_tokens=[]), repeat=2)
        res[f"compile_s_{depth}_layers"] = round(first - best, 2)
    depths = list(map(int, args.depths.split(",")))
    res["compile_ratio"] = round(res[f"compile_s_{depths[-1]}_layers"] / res[f"compile_s_{depths[0]}_layers"], 2)
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
