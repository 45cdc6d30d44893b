"""Exceptions raised by mistral4_jax.

Every error names the file, tensor or argument at fault and what was expected, so a caller can
fix the input without reading a traceback from inside jax.
"""


class Mistral4Error(Exception):
    """Base class of the errors this package raises on bad input."""


class ConfigError(Mistral4Error, ValueError):
    """A configuration is incomplete or inconsistent."""


class CheckpointError(Mistral4Error, ValueError):
    """A checkpoint directory, file or tensor is missing, malformed or does not match the config."""


class InputError(Mistral4Error, ValueError):
    """An argument passed to the model or to a public function is out of range or malformed."""
