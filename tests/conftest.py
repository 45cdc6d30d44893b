import os
import sys

# Tests run on the CPU; several use 8 virtual devices to exercise sharding.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=".*RoPE scaling factor.*")
