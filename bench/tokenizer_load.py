"""Time loading a full-size (131072-id, 1000 specials) tekken.json and encoding text with it.

The vocabulary is synthetic (the real file cannot be downloaded here) but has the real size and
structure: the 256 bytes, then 129816 tokens each made by merging two earlier tokens (at most 16 bytes).

    PYTHONPATH=$PWD python bench/tokenizer_load.py
"""

import json
import random
import tempfile
import time
from pathlib import Path

from mistral4_jax.demo.synthetic_tokenizer import CORPUS, tekken_json
from mistral4_jax.text.tokenizer import Tokenizer


def main():
    rng = random.Random(0)
    ranks = [bytes([b]) for b in range(256)]
    seen = set(ranks)
    while len(ranks) < 131072 - 1000:
        tok = rng.choice(ranks) + rng.choice(ranks)
        if len(tok) <= 16 and tok not in seen:
            seen.add(tok)
            ranks.append(tok)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tekken.json"
        path.write_text(json.dumps(tekken_json(ranks, num_special=1000)))
        t0 = time.perf_counter()
        tok = Tokenizer.from_pretrained(d)
        load = time.perf_counter() - t0
        text = CORPUS * 50
        t0 = time.perf_counter()
        ids = tok.encode(text)
        enc = time.perf_counter() - t0
        print(f"tekken.json with {tok.vocab_size} ids: load + convert {load:.2f}s; "
              f"encode {len(text.encode())} bytes -> {len(ids)} ids in {enc * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
