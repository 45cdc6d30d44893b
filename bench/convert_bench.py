"""Conversion benchmark: peak host memory and throughput of `python -m convert` on a multi-GB synthetic
checkpoint in the released on-disk layout (FP8 E4M3 + per-tensor / per-expert scales, real width).

    PYTHONPATH=$PWD python bench/convert_bench.py [--layers 2 6] [--experts 32] [--dtype bfloat16]

For each depth it writes a random-weight checkpoint (`mistral4_jax.demo.synthetic`), reads its files raw once
(64 MiB chunks; this also warms the page cache, so both figures are warm-cache), then converts it in a child
process and reports the child's peak RSS (`/usr/bin/time -v`), the wall time, GB/s of source bytes, and
the ratio to the raw read. Peak RSS should not grow with the number of layers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mistral4_jax import ModelConfig
from mistral4_jax.demo import synthetic  # noqa: E402
from mistral4_jax.config import VisionConfig  # noqa: E402


def bench_config(layers: int, experts: int) -> ModelConfig:
    """The released model's widths (hidden 4096, expert width 2048, vocab 131072) with fewer layers/experts."""
    cfg = ModelConfig.mistral_small_4()
    cfg = cfg.replace_text(num_hidden_layers=layers, n_routed_experts=experts)
    return cfg.replace(vision=VisionConfig(num_hidden_layers=2))


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file())


def raw_read(path: Path) -> float:
    t0 = time.perf_counter()
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float8"])
    ap.add_argument("--dir", default="/tmp/mistral4_convert_bench")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = ap.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in args.layers:
        src, dst = work / f"src-L{layers}", work / f"dst-L{layers}"
        shutil.rmtree(dst, ignore_errors=True)
        if not (src / "model.safetensors.index.json").exists():
            t0 = time.perf_counter()
            synthetic.write_checkpoint(src, bench_config(layers, args.experts), fp8=True)
            print(f"wrote {src} in {time.perf_counter() - t0:.0f}s", flush=True)
        size = dir_bytes(src, "*.safetensors")
        raw_read(src)  # warm the page cache
        t_raw = raw_read(src)
        t0 = time.perf_counter()
        env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
        r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "convert", str(src), str(dst),
                            "--dtype", args.dtype, "--quiet"], env=env, cwd=ROOT, capture_output=True, text=True)
        t_conv = time.perf_counter() - t0
        if r.returncode != 0:
            sys.exit(f"conversion failed:\n{r.stderr}")
        peak_kib = next(int(line.split(":")[1]) for line in r.stderr.splitlines() if "Maximum resident set size" in line)
        rows.append((layers, size, dir_bytes(dst), t_raw, t_conv, peak_kib * 1024))
        if not args.keep:
            shutil.rmtree(dst)
    print(f"\nexperts={args.experts}, hidden=4096, expert width=2048, vocab=131072, FP8 source -> {args.dtype}")
    print("| layers | source GB | output GB | raw read GB/s | convert s | convert GB/s | ratio to raw | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for layers, size, out, t_raw, t_conv, rss in rows:
        print(f"| {layers} | {size / 1e9:.2f} | {out / 1e9:.2f} | {size / 1e9 / t_raw:.2f} | {t_conv:.1f} | "
              f"{size / 1e9 / t_conv:.3f} | {t_raw / t_conv:.3f} | {rss / 1e9:.2f} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
