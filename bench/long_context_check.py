"""Long-context acceptance check against the transformers reference, with peak host memory.

A small random model (32 heads, YaRN factor 4 over 8,192 original positions, two layers: one dense,
one MoE) is built with transformers in float32 (release softmax scale, as tests/reference.py patches
it) and saved in the released layout. Then, each in a fresh subprocess whose peak RSS is reported:

- score:      `score` of one request, a 16,384-token context and a 16-token continuation;
- perplexity: `perplexity` over 32,768 tokens with window 32,768 (one window: every token after
              the first scored with the whole stream before it as context);
- generate:   greedy `generate` of 8 tokens after a 32,760-token prompt (no stop tokens).

The reference runs the same token stream incrementally with its cache (chunks of --ref-chunk
tokens, use_cache=True), collecting the log-probability of every next token; greedy decoding
continues token by token from a copy of the cache after the 32,760-token prompt. The check passes
when each run's peak RSS is at most 3 GiB, the log-likelihoods agree within 1e-5 relative and the
greedy tokens are identical.

    PYTHONPATH=$PWD python bench/long_context_check.py [--dir DIR [--reuse]] [--ref-chunk 256] [--serial]

All processes run at once by default (a check's peak RSS is its own process's); --reuse keeps the
results already in DIR.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2 ** 30
_DIV = int(os.environ.get("LONGCHECK_DIV", "1"))  # >1: every length divided, for a quick trial of the script
SEQ = 32_768 // _DIV
SCORE_CTX, SCORE_CONT = 16_384 // _DIV, 16
PROMPT, NEW = SEQ - 8, 8
VOCAB = 512
LIMIT = 3 * GiB

TEXT = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=256, moe_intermediate_size=64,
            num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=32, num_key_value_heads=32,
            q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
            n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, max_position_embeddings=SEQ + 1024,
            initializer_range=0.1)
ROPE = dict(factor=4.0, original_max_position_embeddings=8192)


def tokens(seed=0) -> list[int]:
    import numpy as np
    return np.random.default_rng(seed).integers(0, VOCAB, SEQ).tolist()


def peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------- ours
def ours(which: str, path: str) -> dict:
    """One check with mistral4_jax, in this (fresh) process."""
    import mistral4_jax as m4
    model = m4.from_pretrained(path, dtype="float32")
    ids = tokens()
    t0 = time.time()
    if which == "score":
        (lp, greedy), = m4.score(model, [(ids[:SCORE_CTX], ids[SCORE_CTX:SCORE_CTX + SCORE_CONT])])
        out = {"logprob": lp}
    elif which == "perplexity":
        out = m4.perplexity(model, ids, window=SEQ)
    elif which == "generate":
        out = {"tokens": m4.generate(model, [ids[:PROMPT]], max_new_tokens=NEW, stop_tokens=[])[0]}
    else:
        raise ValueError(which)
    out.update(seconds=time.time() - t0, peak_rss=peak_rss())
    return out


# ------------------------------------------------------------------------------------ reference
def build_reference(path: Path, save: bool = True):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import reference as R
    model = R.build(R.hf_config(text=TEXT, rope=ROPE, with_vision=False), seed=0)  # release scale patched
    if save:
        R.save(model, path)
    return model


def reference(model, chunk: int) -> dict:
    """Next-token log-probs of the stream (incremental, with the cache) and greedy tokens after PROMPT."""
    import numpy as np
    import torch
    from transformers import DynamicCache

    ids = torch.as_tensor([tokens()])
    lp = np.zeros(SEQ, np.float64)  # lp[i] = log p(ids[i] | ids[:i]); lp[0] unused
    cache = DynamicCache(config=model.config)
    after_prompt, prompt_last = None, None
    t0 = time.time()
    with torch.no_grad():
        pos = 0
        while pos < SEQ - 1:
            end = min(pos + chunk, SEQ - 1, PROMPT if pos < PROMPT else SEQ - 1)
            out = model(input_ids=ids[:, pos:end], past_key_values=cache, use_cache=True)
            logp = torch.log_softmax(out.logits[0].float(), -1)
            lp[pos + 1:end + 1] = logp.gather(-1, ids[0, pos + 1:end + 1, None])[:, 0].double().numpy()
            cache = out.past_key_values
            pos = end
            if end == PROMPT:
                after_prompt, prompt_last = copy.deepcopy(cache), out.logits[0, -1]
        gen, cache, nxt = [], after_prompt, int(prompt_last.argmax())
        for step in range(NEW):
            gen.append(nxt)
            if step == NEW - 1:
                break
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
    return {"score": float(lp[SCORE_CTX:SCORE_CTX + SCORE_CONT].sum()), "nll": float(-lp[1:].sum()),
            "tokens": gen, "seconds": time.time() - t0, "peak_rss": peak_rss()}


def reference_child(path: str, chunk: int) -> dict:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    return reference(build_reference(Path(path), save=False), chunk)


# ---------------------------------------------------------------------------------------- main
def start(args: list[str], out: Path) -> subprocess.Popen:
    """This script with `args` in a fresh process, its JSON result written to `out`."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen([sys.executable, __file__, *args, "--out", str(out)], env=env)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None, help="checkpoint and result directory (default: a temporary one)")
    ap.add_argument("--ref-chunk", type=int, default=256)
    ap.add_argument("--only", nargs="*", default=["score", "perplexity", "generate"])
    ap.add_argument("--reuse", action="store_true", help="keep results already in --dir")
    ap.add_argument("--serial", action="store_true", help="one process at a time (default: all at once; "
                    "each process's peak RSS is its own either way)")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_ref", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child or a._ref:
        res = ours(*a._child) if a._child else reference_child(a.dir, a.ref_chunk)
        Path(a.out).write_text(json.dumps(res))
        return
    d = Path(a.dir or tempfile.mkdtemp(prefix="m4_longcheck_"))
    if not (d / "config.json").exists():
        build_reference(d)  # the reference process rebuilds the same weights (seed 0)
    jobs = {"ref": ["--dir", str(d), "--ref-chunk", str(a.ref_chunk), "--_ref"]}
    jobs.update({w: ["--_child", w, str(d)] for w in a.only})
    procs = {}
    for name, args in jobs.items():
        out = d / f"result_{name}.json"
        if a.reuse and out.exists():
            continue
        procs[name] = start(args, out)
        if a.serial:
            procs[name].wait()
    for name, p in procs.items():
        if p.wait():
            raise SystemExit(f"{name}: exit {p.returncode}")
    res = {name: json.loads((d / f"result_{name}.json").read_text()) for name in jobs}
    ref = res["ref"]
    print(f"reference (transformers float32, eager, incremental with its cache, chunks of {a.ref_chunk}): "
          f"{ref['seconds']:.0f} s, peak RSS {ref['peak_rss'] / GiB:.2f} GiB", flush=True)
    ok = True
    for which in a.only:
        got = res[which]
        mem_ok = got["peak_rss"] <= LIMIT
        if which == "score":
            err = rel(got["logprob"], ref["score"])
            detail, good = f"logprob {got['logprob']:.6f} vs {ref['score']:.6f}, rel err {err:.2e}", err <= 1e-5
        elif which == "perplexity":
            err = rel(got["nll"], ref["nll"])
            detail, good = f"nll {got['nll']:.4f} vs {ref['nll']:.4f}, rel err {err:.2e}", err <= 1e-5
        else:
            good = got["tokens"] == ref["tokens"]
            detail = f"tokens {got['tokens']} vs {ref['tokens']}: {'identical' if good else 'DIFFER'}"
        ok &= mem_ok and good
        print(f"{which:10s} peak RSS {got['peak_rss'] / GiB:.2f} GiB ({'ok' if mem_ok else 'OVER 3 GiB'}), "
              f"{got['seconds']:.0f} s; {detail} -> {'PASS' if mem_ok and good else 'FAIL'}", flush=True)
    print("ALL PASS" if ok else "SOME CHECK FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
