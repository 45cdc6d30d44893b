"""The `mistral4-jax` command line. Each subcommand lives in `add_<name>` / `run_<name>` here."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="write a tiny random FP8 checkpoint in the released layout, load it, run it",
                       description="Runs the whole path on a model small enough for any machine: writes a tiny "
                                   "random-weight checkpoint in the released HF layout (FP8 with per-tensor "
                                   "scales), loads it with from_pretrained, and runs a batch with and without "
                                   "an image. The weights are random: the output tokens mean nothing.")
    p.add_argument("--dir", help="where to write the checkpoint (default: a temporary directory)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    import jax
    import numpy as np

    from . import synthetic
    from .config import ModelConfig
    from .loading import from_pretrained

    def say(msg):
        print(msg, flush=True)

    say("mistral4-jax demo: a tiny Mistral Small 4 with RANDOM weights (the tokens it predicts mean nothing)")
    say(f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s))")
    cfg = ModelConfig.tiny()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.dir or tmp) / "tiny-mistral4"
        t0 = time.perf_counter()
        synthetic.write_checkpoint(path, cfg, fp8=True)
        say(f"[1/3] wrote {path} (HF layout, FP8 E4M3 + scales) in {time.perf_counter() - t0:.2f}s")
        t0 = time.perf_counter()
        model = from_pretrained(path, dtype="float32")
        say(f"[2/3] loaded with from_pretrained in {time.perf_counter() - t0:.2f}s")
        rng = np.random.default_rng(0)
        p, m = cfg.vision.patch_size, cfg.spatial_merge_size
        h, w = 2 * p * m, 3 * p * m
        img_ids = []
        for r in range(h // (p * m)):
            img_ids += [cfg.image_token_id] * (w // (p * m)) + [12 if r < h // (p * m) - 1 else 13]
        prompt = [1, 3] + img_ids + list(rng.integers(100, cfg.text.vocab_size, 6)) + [4]
        ids = np.asarray([prompt])
        pixels = rng.standard_normal((1, 3, h, w)).astype(np.float32)
        t0 = time.perf_counter()
        logits = np.asarray(model(ids, pixels, [(h, w)]))
        say(f"[3/3] forward of {ids.shape[1]} tokens with one {h}x{w} image in {time.perf_counter() - t0:.2f}s "
            f"(includes compilation)")
        say(f"      logits {logits.shape}, next-token argmax {int(logits[0, -1].argmax())}")
    say("done")
    return 0


def _add_model_args(p) -> None:
    p.add_argument("--model", required=True, help="HF-format checkpoint directory")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float32 or float16")
    p.add_argument("--mesh", default=None, metavar="DATA,EXPERT,TENSOR",
                   help="shard over a device mesh of this shape, e.g. 1,8,1 (default: one device)")


def _load(args):
    from .loading import from_pretrained
    from .sharding import make_mesh

    mesh = None
    if args.mesh:
        try:
            data, expert, tensor = (int(x) for x in args.mesh.split(","))
        except ValueError:
            raise SystemExit(f"--mesh must be DATA,EXPERT,TENSOR integers, got {args.mesh!r}") from None
        mesh = make_mesh(expert, data=data, tensor=tensor)
    return from_pretrained(args.model, dtype=args.dtype, mesh=mesh)


def _parse_ids(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise SystemExit(f"{what} must be comma-separated token ids, got {text!r}") from None


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate tokens for one or more prompts; prints JSON",
                       description="Greedy or sampled generation from token-id prompts (all prompts run as "
                                   "one batch). Prints {\"outputs\": [[new ids], ...], ...} as JSON.")
    _add_model_args(p)
    p.add_argument("--ids", action="append", required=True, metavar="ID,ID,...",
                   help="a prompt as comma-separated token ids; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", default=None, metavar="ID,ID,...", help="stop token ids (default: the config's eos)")
    p.add_argument("--stream", action="store_true", help="print each step's tokens to stderr as they come")
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    import json

    from .generate import generate

    prompts = [_parse_ids(x, "--ids") for x in args.ids]
    stop = None if args.stop is None else _parse_ids(args.stop, "--stop")
    model = _load(args)
    cb = None
    if args.stream:
        def cb(step, tokens):
            print(json.dumps({"step": step, "tokens": tokens}), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stop, callback=cb)
    print(json.dumps({"outputs": out, "seconds": round(time.perf_counter() - t0, 3)}))
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a JSONL file (log-likelihoods, perplexity); prints JSON",
                       description="Each line of --data is {\"context\": [ids], \"continuation\": [ids]} "
                                   "(scored: summed log-probability and whether it is the greedy "
                                   "continuation) or {\"text\": [ids]} (sliding-window perplexity).")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="JSONL file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--window", type=int, default=2048, help="perplexity window (tokens)")
    p.add_argument("--stride", type=int, default=None, help="perplexity stride (default: window / 2)")
    p.add_argument("--expert-stats", default=None, metavar="OUT.json",
                   help="also count which experts every token of the data is routed to (per MoE layer; "
                        "context + continuation or text, in --window pieces) and write counts, fractions and "
                        "entropies to OUT.json and a layer x expert heatmap to OUT.png")
    p.set_defaults(func=run_eval)


def read_eval_data(path) -> tuple[list, list]:
    """(requests [(line number, context, continuation)], texts [(line number, ids)]) of a JSONL file."""
    import json

    from .errors import InputError

    requests, texts = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not JSON ({e.msg})") from None
            if isinstance(rec, dict) and "context" in rec and "continuation" in rec:
                requests.append((n, rec["context"], rec["continuation"]))
            elif isinstance(rec, dict) and "text" in rec:
                texts.append((n, rec["text"]))
            else:
                raise InputError(f"{path}:{n}: expected {{\"context\", \"continuation\"}} or {{\"text\"}} "
                                 "with token-id lists")
    return requests, texts


def run_eval(args) -> int:
    import json
    import math

    from .errors import InputError
    from .score import perplexity, score

    requests, texts = read_eval_data(args.data)
    if not requests and not texts:
        raise InputError(f"{args.data}: no records")
    model = _load(args)
    out: dict = {}
    if requests:
        try:
            res = score(model, [(c, x) for _, c, x in requests], batch_size=args.batch_size)
        except InputError as e:  # name the line, not the list index
            raise InputError(f"{args.data}: {e} (requests are the context/continuation lines in order: "
                             f"{[n for n, _, _ in requests][:20]})") from None
        out["loglikelihood"] = [{"line": n, "logprob": lp, "greedy": gr} for (n, _, _), (lp, gr) in zip(requests, res)]
        out["accuracy_greedy"] = sum(gr for _, gr in res) / len(res)
    if texts:
        per = [dict(line=n, **perplexity(model, ids, window=args.window, stride=args.stride,
                                         batch_size=args.batch_size)) for n, ids in texts]
        total_nll, total_tok = sum(p["nll"] for p in per), sum(p["tokens"] for p in per)
        out["perplexity"] = {"texts": per, "ppl": math.exp(total_nll / total_tok), "tokens": total_tok}
    if args.expert_stats:
        from .expert_stats import expert_load

        load = expert_load(model, [c + x for _, c, x in requests] + [ids for _, ids in texts],
                           batch_size=args.batch_size,
                           max_len=min(args.window, model.config.text.max_position_embeddings))
        path = Path(args.expert_stats)
        load.save_json(path)
        load.save_png(path.with_suffix(".png"))
        out["expert_stats"] = {"json": str(path), "png": str(path.with_suffix(".png")), "tokens": load.tokens,
                               "entropy_normalized": load.to_json()["entropy_normalized"]}
    print(json.dumps(out))
    return 0


def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a checkpoint (full or LoRA) on a JSONL dataset",
                       description="Trains with AdamW (warmup + cosine schedule, global-norm clipping) on "
                                   "JSONL lines {\"messages\": [...]} (assistant turns trained), {\"text\": ...} or "
                                   "{\"ids\": [...]}; writes Orbax checkpoints, a loss log and the fine-tuned model "
                                   "(LoRA merged) to --out, which loads with from_pretrained. Rerunning with the same "
                                   "--out resumes from the latest checkpoint.")
    p.add_argument("--model", required=True, help="HF-layout checkpoint directory")
    p.add_argument("--data", required=True, help="JSONL training data")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, train_log.jsonl, the model)")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    p.add_argument("--lora-targets", default="attention",
                   help="comma-separated: attention, shared_experts, experts, dense_mlp (default attention)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512, help="longer sequences are truncated, with a warning")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --steps, at most 100")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clipping (0: off)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter dtype (the optimizer state is float32 either way)")
    p.add_argument("--remat", action="store_true", help="rematerialise each decoder layer in the backward pass")
    p.add_argument("--router-aux-weight", type=float, default=0.0, help="load-balancing loss weight (default off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint interval in steps")
    p.add_argument("--mesh", action="store_true", help="shard over all devices (experts split, batch split)")
    p.set_defaults(func=run_finetune)


def run_finetune(args) -> int:
    from .train import LoRAConfig, TrainConfig, finetune

    lora = None
    if args.lora_rank:
        lora = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank,
                          targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                      clip_norm=args.clip_norm, batch_size=args.batch_size, max_len=args.max_len, remat=args.remat,
                      param_dtype=args.dtype, router_aux_weight=args.router_aux_weight, lora=lora, seed=args.seed)
    mesh = None
    if args.mesh:
        from .sharding import make_mesh
        mesh = make_mesh()
    try:
        finetune(args.model, args.data, args.out, cfg, mesh=mesh, save_every=args.save_every)
    except KeyboardInterrupt:
        print(f"interrupted: the train state is saved in {args.out}/checkpoints; rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


def add_convert(sub) -> None:
    from convert import add_arguments

    p = sub.add_parser("convert", help="convert an HF or Mistral-native safetensors checkpoint to sharded Orbax",
                       description="Streams the source one layer at a time (bounded memory), writes Orbax "
                                   "checkpoints plus config.json and the tokenizer files into a temporary sibling "
                                   "of DST, verifies every array, then renames it to DST.")
    add_arguments(p)
    p.set_defaults(func=run_convert)


def run_convert(args) -> int:
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work; do not claim an accelerator
    from convert.converter import run

    return run(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mistral4-jax", description="Mistral Small 4 in JAX / Flax NNX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_demo(sub)
    add_generate(sub)
    add_eval(sub)
    add_finetune(sub)
    add_convert(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .errors import Mistral4Error

    try:
        return args.func(args)
    except Mistral4Error as e:
        print(f"mistral4-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
