"""Does the work follow the routed experts? Two checkpoints that differ only in the number of routed experts.

Writes two random FP8 checkpoints in the released layout (2 layers, a quarter of the real width: hidden 1024,
8 heads, expert width 512, top-4) with 128 and with 16 routed experts, loads each through the public API
(`from_pretrained`, float32 and `weights="fp8"`), and times through `generate` and `score`:

- one batch-1 decode step: (generate of 1 + N new tokens - generate of 1) / N;
- a 512-token score (`score` of one request whose context and continuation feed 512 tokens);
- with `--long T`: `generate` of one token after a T-token prompt against one `score` pass over the same T.

Routed-only work makes the decode step cost about the same with 128 experts as with 16 (the step reads 4
experts either way); the score must read every expert's weights once, so it may cost more, but not the
~8x of multiplying every expert. Medians of `--repeat` timed calls after a compiling one; read the ratios
(the host is shared).

    PYTHONPATH=$PWD python bench/routed_cost.py --dir /tmp/m4_routed --repeat 5 [--long 16384]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from mistral4_jax import from_pretrained, generate, score
from mistral4_jax.config import ModelConfig, RopeConfig, TextConfig
from mistral4_jax.demo import synthetic


def config(experts: int) -> ModelConfig:
    text = TextConfig(vocab_size=32768, hidden_size=1024, intermediate_size=3072, moe_intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=256,
                      kv_lora_rank=256, n_routed_experts=experts, num_experts_per_tok=4,
                      rope=RopeConfig(factor=4.0, original_max_position_embeddings=8192),
                      max_position_embeddings=32768)
    return ModelConfig(text=text, vision=None)


def timed(fn, repeat: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(path: Path, weights, repeat: int, steps: int, long: int | None) -> dict:
    model = from_pretrained(path, dtype="float32", weights=weights)
    rng = np.random.default_rng(0)
    vocab = model.config.text.vocab_size
    prompt = rng.integers(3, vocab, 16).tolist()
    one = timed(lambda: generate(model, [prompt], max_new_tokens=1, stop_tokens=[]), repeat)
    more = timed(lambda: generate(model, [prompt], max_new_tokens=1 + steps, stop_tokens=[]), repeat)
    ids = rng.integers(3, vocab, 513).tolist()
    out = {"decode_step_s": (more - one) / steps,
           "score_512_s": timed(lambda: score(model, [(ids[:-1], ids[-1:])]), repeat)}
    if long:
        ids = rng.integers(3, vocab, long + 1).tolist()
        out["generate_after_long_s"] = timed(lambda: generate(model, [ids[:long]], max_new_tokens=1, stop_tokens=[]), 1)
        out["score_long_s"] = timed(lambda: score(model, [(ids[:1], ids[1:long])]), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/m4_routed")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per call")
    ap.add_argument("--long", type=int, default=None, help="also time generate after a prompt of this length")
    ap.add_argument("--experts", default="128,16")
    args = ap.parse_args()
    results = {}
    for e in (int(x) for x in args.experts.split(",")):
        path = Path(args.dir) / f"experts{e}"
        if not (path / "config.json").exists():
            synthetic.write_checkpoint(path, config(e), fp8=True)
        for weights in (None, "fp8"):
            key = f"{e} experts, weights={weights}"
            results[key] = measure(path, weights, args.repeat, args.steps, args.long)
            print(key, json.dumps({k: round(v, 4) for k, v in results[key].items()}), flush=True)
    es = [int(x) for x in args.experts.split(",")]
    if len(es) == 2:
        for weights in (None, "fp8"):
            a, b = (results[f"{e} experts, weights={weights}"] for e in es)
            print(f"weights={weights}: {es[0]} / {es[1]} experts: decode step {a['decode_step_s'] / b['decode_step_s']:.2f}x, "
                  f"512-token score {a['score_512_s'] / b['score_512_s']:.2f}x")
    for key, r in results.items():
        if "score_long_s" in r:
            print(f"{key}: generate after {args.long} tokens / score of them: "
                  f"{r['generate_after_long_s'] / r['score_long_s']:.2f}x")


if __name__ == "__main__":
    main()
