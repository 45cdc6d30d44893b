"""Wall time of `generate` calls with images of different sizes (the tiny test config, CPU).

The first call compiles everything; later calls use other image sizes that fall in the same buckets
(image count, patch grid, patch count), so they should reuse the compiled vision program.

    PYTHONPATH=$PWD python bench/image_calls.py
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import reference as R  # noqa: E402

from mistral4_jax import from_pretrained, generate  # noqa: E402

CALLS = [[(56, 84), (28, 56)], [(42, 70), (56, 42)], [(56, 98), (28, 28)], [(50, 84), (42, 56)]]


def main() -> None:
    ref = R.build(R.hf_config(), seed=61)
    model = from_pretrained(R.save(ref, tempfile.mkdtemp()), dtype="float32")
    seconds = []
    for k, sizes in enumerate(CALLS):
        px, isz = R.pixel_batch(sizes, seed=k)
        t0 = time.perf_counter()
        generate(model, [R.image_prompt(sizes)], max_new_tokens=4, stop_tokens=[], pixel_values=px,
                 image_sizes=isz)
        seconds.append(time.perf_counter() - t0)
    print("seconds per call:", [round(s, 2) for s in seconds])
    print(f"first call {seconds[0]:.2f} s; median of the later calls {np.median(seconds[1:]):.2f} s")


if __name__ == "__main__":
    main()
