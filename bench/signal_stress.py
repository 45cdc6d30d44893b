"""Signals at random moments of real `mistral4-jax generate` processes on the tiny model: exit statuses, and
every run that ended otherwise than with one clean line (130 / 143) or a normal exit 0.

    PYTHONPATH=$PWD python bench/signal_stress.py --runs 40 --min 0.15 --max 2.5 --signal SIGINT

Each run sends the signal after a delay drawn uniformly from [--min, --max] seconds after the process
starts (imports take about 1.5 s here, a whole tiny generate about 8 s). A signal in the first ~50 ms
lands in Python's own start-up, before the CLI loads, and cannot be handled by the program.
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each child first runs this launcher, then execs the command (same process): SIGINT / SIGTERM at their
# defaults and unblocked, as tests/test_signals.py starts them. A script's `cmd &` starts this one with SIGINT
# ignored, and the CLI keeps what its starter ignored.
LAUNCHER = ("import os, signal, sys\n"
            "for s in (signal.SIGINT, signal.SIGTERM): signal.signal(s, signal.SIG_DFL)\n"
            "signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))\n"
            "os.execv(sys.executable, sys.argv[1:])")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--min", type=float, default=0.15)
    ap.add_argument("--max", type=float, default=2.5)
    ap.add_argument("--signal", choices=("SIGINT", "SIGTERM"), default="SIGINT")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from mistral4_jax.config import ModelConfig
    from mistral4_jax.demo import synthetic
    from mistral4_jax.demo.synthetic_tokenizer import write_tekken
    from mistral4_jax.text.images import ImageConfig

    sig, rng, counts, bad = getattr(signal, args.signal), random.Random(args.seed), {}, 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "hf"
        cfg = ModelConfig.tiny()
        synthetic.write_checkpoint(model, cfg, fp8=True)
        write_tekken(model, vocab_size=cfg.text.vocab_size, image_config=ImageConfig.from_model_config(cfg))
        for _ in range(args.runs):
            delay = rng.uniform(args.min, args.max)
            with tempfile.TemporaryFile("w+") as err:
                p = subprocess.Popen([sys.executable, "-c", LAUNCHER, sys.executable, "-m", "mistral4_jax",
                                      "generate", "--model", str(model),
                                      "--prompt", "hi", "--max-new-tokens", "4"], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=err)
                time.sleep(delay)
                p.send_signal(sig)
                rc = p.wait()
                err.seek(0)
                text = err.read()
            last = text.rstrip().splitlines()[-1] if text.strip() else ""
            clean = "Traceback" not in text and "Error" not in text
            ok = clean and (rc == 0 or (rc in (130, 143) and last.endswith(("interrupted", "terminated"))))
            counts[rc] = counts.get(rc, 0) + 1
            if not ok:
                bad += 1
                print(f"bad: delay {delay:.2f} s, exit {rc}, {len(text.splitlines())} stderr lines, last {last[:160]!r}")
    print(f"{args.signal} x {args.runs} at {args.min}-{args.max} s: exit statuses {dict(sorted(counts.items()))}, "
          f"bad {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
