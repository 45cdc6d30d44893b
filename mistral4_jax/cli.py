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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mistral4-jax", description="Mistral Small 4 in JAX / Flax NNX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_demo(sub)
    add_finetune(sub)
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
