"""The model: pure math (`ops`, `moe`, `fp8`), NNX modules mirroring transformers' files (`mistral4`,
`pixtral`, `mistral3`), the latent decode cache and the research hooks."""

from .cache import Cache, init_cache
from .hooks import Capture, ForwardOutput, Intervention, ResidualPatch
from .mistral3 import Mistral3ForConditionalGeneration
from .layers import layer_at

__all__ = ["Cache", "Capture", "ForwardOutput", "Intervention", "Mistral3ForConditionalGeneration", "ResidualPatch",
           "init_cache", "layer_at"]
