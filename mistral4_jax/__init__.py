"""mistral4_jax: Mistral Small 4 (mistralai/Mistral-Small-4-119B-2603) in JAX / Flax NNX.

The public names load on first use (PEP 562), so `import mistral4_jax` and the `mistral4-jax` command
start without importing jax: the command installs its signal handlers before the slow imports.
"""

import importlib

# name -> the module that defines it, grouped as a reader looks for them.
_EXPORTS = {
    # ------------------------------------------------------------------ load, run, evaluate
    "from_pretrained": ".checkpoints.load",
    "generate": ".inference.generate",
    "score": ".inference.score", "perplexity": ".inference.score",
    "Engine": ".inference.engine",
    # ------------------------------------------------------------------ the model
    "Mistral3ForConditionalGeneration": ".model.mistral3",
    # ------------------------------------------------------------------ text and images in, text out
    "Tokenizer": ".text.tokenizer",
    "apply_chat_template": ".text.chat", "parse_output": ".text.chat",
    "ImageConfig": ".text.images",
    # ------------------------------------------------------------------ configuration
    "ModelConfig": ".config", "TextConfig": ".config", "VisionConfig": ".config", "RopeConfig": ".config",
    "QuantConfig": ".config",
    # ------------------------------------------------------------------ errors
    "Mistral4Error": ".errors", "CheckpointError": ".errors", "ConfigError": ".errors", "InputError": ".errors",
    # ------------------------------------------------------------------ research: captures and interventions
    "Capture": ".model.hooks", "Intervention": ".model.hooks", "ResidualPatch": ".model.hooks",
    "ForwardOutput": ".model.hooks",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mistral4_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
