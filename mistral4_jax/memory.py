"""Device memory: what the parameters and the compiled programs need, against what the device has.

JAX gives each accelerator a pool of XLA_PYTHON_CLIENT_MEM_FRACTION of its memory, 0.75 by default, read
once when the backend starts. On an H200 that is 105.3 GiB, less than the 112.8 GiB of the FP8 model, so
the released model on one card needs the variable raised before JAX starts: the `mistral4-jax` command
sets it (`CLI_MEM_FRACTION`, unless the environment already does); a library user sets it in the
environment, and `from_pretrained` checks the pool before reading anything (`check_params_fit`), with a
message that says what to set. On the CPU no pool is reported and nothing is checked.

The command line imports this module before it blocks SIGINT / SIGTERM for its imports, so it imports JAX
and numpy (whose BLAS starts threads that would not block them) only inside the functions that need them.
"""

from __future__ import annotations

import math
import os

from .errors import InputError

MEM_FRACTION_VAR = "XLA_PYTHON_CLIENT_MEM_FRACTION"
# What the command line sets: 0.95 of an H200 is 133.4 GiB, which holds the FP8 model (112.8 GiB), a cache of
# tens of thousands of tokens and the compiled temporaries, and leaves CUDA's own context and cuDNN's
# workspaces about 7 GiB outside the pool.
CLI_MEM_FRACTION = "0.95"
PLAN_MARGIN = 0.05  # of the free pool kept spare when sizing caches (fragmentation, small buffers)


def set_cli_allocator() -> None:
    """Where mistral4-jax owns the process: the pool the released model needs, unless the user chose one.
    Must run before JAX starts its backend (it reads the variable once)."""
    os.environ.setdefault(MEM_FRACTION_VAR, CLI_MEM_FRACTION)


def device_memory() -> tuple[int, int] | None:
    """(pool size, bytes in use) of this process's first device, or None where the backend reports no
    pool (the CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))


def shard_bytes(shape: tuple[int, ...], dtype, sharding) -> int:
    """Bytes one device holds of an array of `shape` laid out by `sharding`."""
    import numpy as np

    shard = sharding.shard_shape(tuple(shape)) if sharding is not None else shape
    return math.prod(int(n) for n in shard) * np.dtype(dtype).itemsize


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_params_fit(need_per_device: int, what: str) -> None:
    """Refuse, before anything is read, parameters that cannot fit the device's pool."""
    mem = device_memory()
    if mem is None:
        return
    limit, in_use = mem
    if need_per_device <= limit - in_use:
        return
    frac = os.environ.get(MEM_FRACTION_VAR)
    pool = f"{MEM_FRACTION_VAR}={frac}" if frac else f"{MEM_FRACTION_VAR} unset, so JAX took 0.75 of the card"
    raise InputError(f"{what} need {gib(need_per_device)} per device, but the device's JAX pool has "
                     f"{gib(limit - in_use)} free of {gib(limit)} ({pool}). Set {MEM_FRACTION_VAR}="
                     f"{CLI_MEM_FRACTION} in the environment before JAX starts (the mistral4-jax command does), "
                     "keep the weights in FP8 (weights='fp8') or with NVFP4 experts (weights='hybrid'), or shard them "
                     "over a mesh of several devices")
