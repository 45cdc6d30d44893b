"""mistral4_jax: Mistral Small 4 (mistralai/Mistral-Small-4-119B-2603) in JAX / Flax NNX."""

from .config import ModelConfig, QuantConfig, RopeConfig, TextConfig, VisionConfig
from .errors import CheckpointError, ConfigError, InputError, Mistral4Error
from .generate import generate
from .loading import from_pretrained
from .model import Mistral3ForConditionalGeneration
from .score import perplexity, score

__all__ = [
    "CheckpointError", "ConfigError", "InputError", "Mistral3ForConditionalGeneration", "Mistral4Error",
    "ModelConfig", "QuantConfig", "RopeConfig", "TextConfig", "VisionConfig", "from_pretrained",
    "generate", "perplexity", "score",
]
__version__ = "0.1.0"
