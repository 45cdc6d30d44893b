"""Checkpoint conversion, kept as `python -m convert SRC DST ...` (the same as `mistral4-jax convert`).

The converter lives in `mistral4_jax.checkpoints.convert`; this package only re-exports it.
"""

from mistral4_jax.checkpoints.convert import ConvertError, add_arguments, convert, main

__all__ = ["ConvertError", "add_arguments", "convert", "main"]
