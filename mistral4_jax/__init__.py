"""mistral4_jax: Mistral Small 4 (mistralai/Mistral-Small-4-119B-2603) in JAX / Flax NNX.

The public names load on first use (PEP 562), so `import mistral4_jax` and the `mistral4-jax` command
start without importing jax: the command installs its signal handlers before the slow imports.
"""

import importlib

_EXPORTS = {
    "apply_chat_template": ".text.chat", "parse_output": ".text.chat",
    "ModelConfig": ".config", "QuantConfig": ".config", "RopeConfig": ".config", "TextConfig": ".config",
    "VisionConfig": ".config",
    "CheckpointError": ".errors", "ConfigError": ".errors", "InputError": ".errors", "Mistral4Error": ".errors",
    "generate": ".inference.generate",
    "ImageConfig": ".text.images",
    "from_pretrained": ".checkpoints.load",
    "Mistral3ForConditionalGeneration": ".model.mistral3",
    "Capture": ".model.hooks", "ForwardOutput": ".model.hooks", "Intervention": ".model.hooks",
    "ResidualPatch": ".model.hooks",
    "perplexity": ".inference.score", "score": ".inference.score",
    "Tokenizer": ".text.tokenizer",
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
