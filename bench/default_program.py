"""Fingerprint of the default forward's program, to show that research access costs nothing unused.

Prints the sha256 of the lowered StableHLO and of the optimised HLO (metadata stripped) of
`model(ids)` on the tiny config. Run it on two checkouts and compare:

    PYTHONPATH=/path/to/checkout python bench/default_program.py
"""

import hashlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mistral4_jax.config import ModelConfig
from mistral4_jax.model.mistral3 import Mistral3ForConditionalGeneration


def _strip(text: str) -> str:
    """The program without source locations (line numbers move when code is edited)."""
    text = re.sub(r"\nFileNames\n.*?\n(?=%|ENTRY)", "\n", text, flags=re.S)  # HLO source tables
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    return re.sub(r"loc\([^)]*\)", "", text)


def main():
    cfg = ModelConfig.tiny(first_k_dense_replace=1, num_hidden_layers=3)
    model = Mistral3ForConditionalGeneration(cfg, jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def fwd(state, ids):
        return nnx.merge(graphdef, state)(ids)

    ids = jnp.asarray(np.arange(16).reshape(2, 8) % cfg.text.vocab_size, jnp.int32)
    lowered = jax.jit(fwd).lower(state, ids)
    compiled = lowered.compile()
    for name, text in (("lowered", lowered.as_text()), ("compiled", compiled.as_text())):
        print(name, hashlib.sha256(_strip(text).encode()).hexdigest())


if __name__ == "__main__":
    main()
