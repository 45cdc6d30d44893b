"""Expert load of two prompt sets, and what disabling one expert does to next-token log-probabilities.

Runs on the tiny random model (`ModelConfig.tiny()`, written in the released layout, no download);
point --model at a real checkpoint directory (with tekken.json) to run the same study on it.

    python examples/expert_load.py [--out DIR] [--model DIR] [--quick]

Writes DIR/{prose,code}.json and .png (layer x expert heatmaps, via mistral4_jax.expert_stats) and
prints, per prompt, how the next-token distribution moves when the most loaded expert of the first
MoE layer is disabled (an `Intervention` mask: the same compiled program serves any expert choice).
`--quick` (or MISTRAL4_EXAMPLE_QUICK=1) uses two prompts per set, for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "A picture is worth a thousand words, or so the saying goes.",
    "Please describe this image in one sentence.",
    "I am fine, thank you. How are you today?",
    "The model answers instantly or reasons step by step.",
]
CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "x = [1, 2, 3]; y = {k: v for k, v in zip(x, x)}",
    "import numpy as np\nnp.zeros((36, 128))",
    "if n % 2 == 0:\n    n //= 2\nelse:\n    n = 3 * n + 1",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y",
]


def tiny_model_dir(root: Path) -> Path:
    from mistral4_jax.demo import synthetic
    from mistral4_jax.config import ModelConfig
    from mistral4_jax.demo.synthetic_tokenizer import write_tekken

    path = root / "tiny-mistral4"
    synthetic.write_checkpoint(path, ModelConfig.tiny(), fp8=False, seed=0)
    write_tekken(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="expert_load_out", help="output directory (JSON and PNG files)")
    ap.add_argument("--model", default=None, help="checkpoint directory with tekken.json (default: tiny random)")
    ap.add_argument("--quick", action="store_true", default=os.environ.get("MISTRAL4_EXAMPLE_QUICK") == "1")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mistral4_jax import Tokenizer, from_pretrained
    from mistral4_jax.research.expert_stats import expert_load
    from mistral4_jax.model.hooks import Intervention

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = 2 if args.quick else len(PROSE)
    sets = {"prose": PROSE[:n], "code": CODE[:n]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else tiny_model_dir(Path(tmp))
        model = from_pretrained(path, dtype="float32" if args.model is None else "bfloat16")
        tok = Tokenizer.from_pretrained(path)
    cfg = model.config.text
    ids = {name: [tok.encode(p, add_bos=True) for p in prompts] for name, prompts in sets.items()}

    # 1. expert load per prompt set
    loads = {}
    for name, seqs in ids.items():
        loads[name] = load = expert_load(model, seqs)
        load.save_json(out / f"{name}.json")
        load.save_png(out / f"{name}.png", title=f"{name}: fraction of tokens per expert")
        ent = ", ".join(f"{e:.3f}" for e in load.to_json()["entropy_normalized"])
        print(f"{name}: {load.tokens} tokens, normalised load entropy per MoE layer [{ent}] -> {out / name}.png")
    diff = loads["code"].fraction - loads["prose"].fraction
    layer, expert = np.unravel_index(np.abs(diff).argmax(), diff.shape)
    print(f"largest difference: layer {loads['code'].layers[layer]}, expert {expert}: "
          f"code {loads['code'].fraction[layer, expert]:.3f} vs prose {loads['prose'].fraction[layer, expert]:.3f}")

    # 2. disable the most loaded expert of the first MoE layer; compare next-token log-probabilities.
    # Both runs use one compiled program: the mask is an input (all-True = the unchanged model).
    first = cfg.first_k_dense_replace
    target = int(loads["prose"].counts[0].argmax())
    keep_all = Intervention(expert_mask=np.ones((cfg.num_moe_layers, cfg.n_routed_experts), bool))
    disable = Intervention.disable_experts(cfg, {first: [target]})
    rows = [(name, prompt, s) for name, seqs in ids.items() for prompt, s in zip(sets[name], seqs)]
    t = max(len(s) for _, _, s in rows)
    x, mask = np.zeros((len(rows), t), np.int32), np.zeros((len(rows), t), np.int32)
    for r, (_, _, s) in enumerate(rows):
        x[r, :len(s)], mask[r, :len(s)] = s, 1
    last = mask.sum(1) - 1
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_token_logp(state, intervene):
        out = nnx.merge(graphdef, state)(x, attention_mask=mask, intervene=intervene)
        return jax.nn.log_softmax(out.logits[np.arange(len(rows)), last].astype(jnp.float32), -1)

    lp0, lp1 = (np.asarray(next_token_logp(state, iv)) for iv in (keep_all, disable))
    report = []
    for r, (name, prompt, _) in enumerate(rows):
        kl = float(np.sum(np.exp(lp0[r]) * (lp0[r] - lp1[r])))
        top = int(lp0[r].argmax())
        report.append({"set": name, "prompt": prompt, "kl": kl, "top_token": top,
                       "logp_top_before": float(lp0[r, top]), "logp_top_after": float(lp1[r, top]),
                       "max_abs_change": float(np.abs(lp1[r] - lp0[r]).max())})
        print(f"[{name}] {prompt[:40]!r:44} KL {kl:.2e}  log p(top {top}) {lp0[r, top]:.3f} -> {lp1[r, top]:.3f}")
    (out / "disable_expert.json").write_text(json.dumps({"layer": first, "expert": target, "prompts": report}, indent=1))
    print(f"disabled expert {target} of layer {first}: {out / 'disable_expert.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
