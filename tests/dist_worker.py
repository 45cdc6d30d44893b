"""One process of the two-process `jax.distributed` test (tests/test_sharding.py).

usage: python dist_worker.py CHECKPOINT PORT PROCESS_ID OUT_JSON
Each process owns 2 CPU devices; the mesh spans all 4 (expert=2 x tensor=2). Process 0 writes the
generations, scores and logits it saw to OUT_JSON.
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
# the device count comes from jax_num_cpu_devices below; LLVM unoptimised as in tests/conftest.py
os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
ckpt, port, pid, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)

from mistral4_jax import from_pretrained, generate, score  # noqa: E402
from mistral4_jax.sharding import make_mesh  # noqa: E402

assert jax.device_count() == 4 and jax.local_device_count() == 2, (jax.device_count(), jax.local_device_count())
spec = json.loads(os.environ["DIST_SPEC"])
mesh = make_mesh(expert=2, tensor=2)
model = from_pretrained(ckpt, dtype="float32", mesh=mesh)
gate_up = model.language_model.layers.mlp.experts.gate_up_proj[...]
local_experts = sorted({s.data.shape[1] for s in gate_up.addressable_shards})
gens = generate(model, spec["prompts"], max_new_tokens=spec["max_new"], stop_tokens=[])
scores = score(model, [tuple(r) for r in spec["requests"]])
if pid == 0:
    with open(out, "w") as f:
        json.dump({"generations": gens, "scores": scores, "local_experts": local_experts}, f)
jax.distributed.shutdown()
