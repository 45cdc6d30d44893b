import os
import sys

# Tests run on the CPU; several use 8 virtual devices to exercise sharding. Most of the suite's time is
# XLA:CPU compiling tiny programs, and about a third of each compile is LLVM optimising machine code that then
# runs for milliseconds: the tests skip that (XLA's own graph passes, fusion included, still run).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Processes the tests start set it too (test_signals.ENV; dist_worker.py writes it out).
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
sys.path.insert(0, os.path.dirname(__file__))

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=".*RoPE scaling factor.*")

# MISTRAL4_TEST_CACHE=DIR keeps a persistent JAX compilation cache there, so that many identical tiny
# programs compile once. Off by default: with jaxlib 0.10 on CPU, reading back some entries written
# earlier in the same full run crashed the process (SIGSEGV / SIGABRT inside
# compilation_cache.get_executable_and_time, reproducibly at the same test), which a test run must
# never do; the suite runs in a fresh process with no cache.
_cache = os.environ.get("MISTRAL4_TEST_CACHE", "")
if _cache:
    import jax  # noqa: E402

    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. A full run otherwise keeps hundreds of CPU
    executables loaded, each holding its own memory mappings, and a late compile crashed (SIGSEGV inside
    XLA's backend compile) once the process had accumulated them; module by module it never does."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()
