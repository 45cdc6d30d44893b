"""Checkpoint conversion, kept as `python -m convert SRC DST ...`: the `mistral4-jax convert` command.

The converter lives in `mistral4_jax.checkpoints.convert`; this package re-exports it, loaded on first use
so that `python -m convert` starts as the CLI does (signal handlers and JAX_PLATFORMS=cpu before jax).
"""

import importlib
import sys

__all__ = ["ConvertError", "convert", "main"]


def main(argv=None) -> int:
    """`python -m convert ARGS` = `mistral4-jax convert ARGS` (flags, messages, exit statuses, signals)."""
    from mistral4_jax.cli import main as cli_main

    return cli_main(["convert", *(sys.argv[1:] if argv is None else argv)], program=argv is None)


def __getattr__(name):
    if name not in ("ConvertError", "convert"):
        raise AttributeError(f"module 'convert' has no attribute {name!r}")
    return getattr(importlib.import_module("mistral4_jax.checkpoints.convert"), name)
