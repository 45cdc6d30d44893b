import os
import sys

# Conversion runs on the host: keep JAX (imported by Orbax) off any accelerator it would preallocate.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from mistral4_jax.checkpoints.convert import main  # noqa: E402

sys.exit(main())
