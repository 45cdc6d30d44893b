import os
import sys

# Tests run on the CPU; several use 8 virtual devices to exercise sharding.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=".*RoPE scaling factor.*")

# Many tests compile the same tiny programs; a persistent compilation cache lets later compiles (in
# this run and in later runs on the same machine) reuse them. Set MISTRAL4_TEST_CACHE= to disable.
_cache = os.environ.get("MISTRAL4_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mistral4_jax", "jax"))
if _cache:
    import jax  # noqa: E402

    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
