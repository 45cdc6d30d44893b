"""Convert an HF-layout checkpoint to sharded Orbax, load both, and check they give the same logits.

    python examples/convert_checkpoint.py                                   # the tiny FP8 model it writes
    python examples/convert_checkpoint.py --src /data/Mistral-Small-4-119B-2603 --dst /data/m4-orbax
(the same as `mistral4-jax convert SRC DST`; for the real model the comparison needs the memory for two copies,
so pass --no-compare there.)
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mistral4_jax.checkpoints.convert import convert
from mistral4_jax import ModelConfig, from_pretrained
from mistral4_jax.demo.synthetic import write_checkpoint
from mistral4_jax.sharding import make_mesh


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", help="HF or Mistral-native checkpoint directory (default: write the tiny FP8 one)")
    p.add_argument("--dst", help="output directory (default: a temporary one)")
    p.add_argument("--dtype", default="float32", help="bfloat16, float32 or float8 (default float32)")
    p.add_argument("--no-compare", action="store_true", help="skip loading both and comparing logits")
    p.add_argument("--quick", action="store_true", help="(the tiny default is already quick; for tests)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(args.src) if args.src else write_checkpoint(Path(tmp) / "hf", ModelConfig.tiny(), fp8=True)
        dst = Path(args.dst) if args.dst else Path(tmp) / "orbax"
        t0 = time.perf_counter()
        convert(src, dst, dtype=args.dtype, overwrite=not args.dst, quiet=True)
        print(f"converted {src} -> {dst} in {time.perf_counter() - t0:.1f}s:",
              sorted(x.name for x in dst.iterdir()))
        if not args.no_compare:
            ids = np.arange(1, 17)[None] * 7 % 1000
            direct = np.asarray(from_pretrained(src, dtype="float32")(ids))
            restored = np.asarray(from_pretrained(dst, dtype="float32", mesh=make_mesh())(ids))
            diff = float(np.abs(direct - restored).max())
            print(f"logits of the source and of the converted checkpoint: max |diff| = {diff:.3g}")
            if diff > 1e-5:
                print("MISMATCH", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
