"""mistral4_jax: Mistral Small 4 (mistralai/Mistral-Small-4-119B-2603) in JAX / Flax NNX."""

from .text.chat import apply_chat_template, parse_output
from .config import ModelConfig, QuantConfig, RopeConfig, TextConfig, VisionConfig
from .errors import CheckpointError, ConfigError, InputError, Mistral4Error
from .inference.generate import generate
from .text.images import ImageConfig
from .checkpoints.load import from_pretrained
from .model.mistral3 import Mistral3ForConditionalGeneration
from .model.hooks import Capture, ForwardOutput, Intervention, ResidualPatch
from .inference.score import perplexity, score
from .text.tokenizer import Tokenizer

__all__ = [
    "Capture", "CheckpointError", "ConfigError", "ForwardOutput", "Intervention", "ResidualPatch", "ImageConfig", "InputError", "Mistral3ForConditionalGeneration", "Mistral4Error",
    "ModelConfig", "QuantConfig", "RopeConfig", "TextConfig", "Tokenizer", "VisionConfig", "apply_chat_template",
    "from_pretrained", "generate", "parse_output", "perplexity", "score",
]
__version__ = "0.1.0"
