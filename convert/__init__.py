"""Checkpoint conversion: HF or Mistral-native safetensors -> the sharded Orbax layout of
`mistral4_jax.checkpoint`, in bounded memory.

    python -m convert SRC DST [--dtype bfloat16|float32|float8] [--overwrite] [--quiet]
    mistral4-jax convert SRC DST ...            (the same command)

Design card:
- Input is untrusted. Only `.safetensors` are read (headers validated, tensors memory-mapped); pickle
  files are refused. Every tensor is matched to a parameter slot and every shape checked against the
  config before the first byte of weights is read (`loading.plan_checkpoint`), so a bad source fails
  fast with one message naming file and tensor.
- Bounded memory: the output is written one group at a time (the unstacked parameters, then each
  decoder / vision layer), each group read slot by slot from the memory-mapped source, saved as its own
  Orbax checkpoint, and released. Peak host memory is about one decoder layer, whatever the depth.
- Safe output: everything goes to a hidden sibling `.DST.partial-PID`, is verified (every array's shape
  and dtype, read back from Orbax metadata), and only then renamed to DST. A crash or kill leaves no DST;
  stale partial directories of dead runs are removed by the next run. An existing DST is replaced only
  with --overwrite.
"""

from .converter import ConvertError, add_arguments, convert, main

__all__ = ["ConvertError", "add_arguments", "convert", "main"]
