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
