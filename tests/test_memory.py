"""The memory plan (`mistral4_jax/memory.py`, `engine.default_batch_size`, the latent cache on a mesh, the in-place
prefill): what loading and generation ask of a device, checked on the CPU with a device pool simulated where the
backend reports none."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mistral4_jax import from_pretrained, memory
from mistral4_jax.checkpoints.load import stored_float_dtype
from mistral4_jax.checkpoints.save import save_pretrained
from mistral4_jax.config import ModelConfig
from mistral4_jax.demo import synthetic
from mistral4_jax.errors import InputError
from mistral4_jax.inference import engine
from mistral4_jax.model import fp8
from mistral4_jax.model.cache import cache_bytes_per_token
from mistral4_jax.model.mistral3 import Mistral3ForConditionalGeneration
from mistral4_jax.sharding import CACHE_LBSC, logical_sharding, make_mesh

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("mem")
    cfg = ModelConfig.tiny()
    synthetic.write_checkpoint(d / "fp8", cfg, fp8=True)
    synthetic.write_checkpoint(d / "bf16", cfg, fp8=False)
    save_pretrained(nnx.state(from_pretrained(d / "fp8", dtype="float32"), nnx.Param), cfg, d / "f32")
    return d


def pool(monkeypatch, limit: int, in_use: int = 0):
    monkeypatch.setattr(memory, "device_memory", lambda: (limit, in_use))


def test_loading_checks_the_pool_before_reading(tiny, monkeypatch):
    model = from_pretrained(tiny / "fp8", dtype="float32", weights="fp8")
    need = fp8.param_bytes(nnx.state(model, nnx.Param))  # what the loaded parameters hold on the one device
    pool(monkeypatch, limit=need + 1000, in_use=999)
    from_pretrained(tiny / "fp8", dtype="float32", weights="fp8")  # 1 byte to spare
    pool(monkeypatch, limit=need + 1000, in_use=1001)
    with pytest.raises(InputError, match=f"{memory.MEM_FRACTION_VAR}={memory.CLI_MEM_FRACTION}") as e:
        from_pretrained(tiny / "fp8", dtype="float32", weights="fp8")
    assert str(tiny / "fp8") in str(e.value)


def test_default_batch_size_fits_cache_and_compiled_temporaries(tiny, monkeypatch):
    """With a pool that holds 4 rows and their programs' temporaries but not 8, 8 requests get 4 slots; the
    temporaries are XLA's memory analysis of the compiled programs at that size."""
    model = from_pretrained(tiny / "fp8", dtype="float32")
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    prog = engine.programs_for(graphdef, treedef)
    cache_len, chunk, temps = 64, 16, {}

    def temp(rows):
        if rows not in temps:
            temps[rows] = engine.program_temp_bytes(prog, leaves, model.config, model.dtype, rows, cache_len, chunk,
                                                    16, None)
        return temps[rows]

    row = cache_bytes_per_token(model.config.text, model.dtype) * cache_len
    need = {b: row * b + temp(b) for b in (4, 8)}
    assert temp(8) > 0
    free = (need[4] + need[8]) / 2 / (1 - memory.PLAN_MARGIN)
    pool(monkeypatch, limit=int(free) + 10**6, in_use=10**6)
    assert engine.default_batch_size(model, 8, cache_len, 1, temp) == 4
    pool(monkeypatch, limit=int(need[8] / (1 - memory.PLAN_MARGIN)) + 1)
    assert engine.default_batch_size(model, 8, cache_len, 1, temp) == 8
    pool(monkeypatch, limit=row // 2)
    with pytest.raises(InputError, match="cache rows of 64 tokens"):
        engine.default_batch_size(model, 1, cache_len, 1, lambda rows: 0)


def test_prefill_chunk_does_not_copy_cache_rows():
    """The insert program's temporaries do not grow with the cache rows' length: a chunk writes its slots and
    reads the filled blocks in place (gathering and scattering whole rows grew them with the row)."""
    cfg = ModelConfig.tiny().replace(vision=None)
    model = nnx.eval_shape(lambda: Mistral3ForConditionalGeneration(cfg, jnp.float32, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    prog = engine.programs_for(graphdef, treedef)
    temps = {s: engine.program_temp_bytes(prog, leaves, cfg, jnp.float32, 4, s, 64, 16, None, 4096)
             for s in (1024, 32768)}
    row_bytes = cache_bytes_per_token(cfg.text, jnp.float32) * 32768 * 4
    assert temps[32768] - temps[1024] < 0.05 * row_bytes, temps


def test_cache_rows_split_over_every_device_of_an_expert_mesh():
    """On a (data 1, expert 8) mesh each device holds 1/8 of the cache rows (it used to hold them all)."""
    mesh = make_mesh(8, devices=jax.devices()[:8])
    cfg = ModelConfig.tiny().text
    shape = (cfg.num_hidden_layers, 16, 256, cfg.kv_lora_rank)
    sharding = logical_sharding(mesh, CACHE_LBSC, shape)
    assert sharding.shard_shape(shape)[1] == 2


def test_finetune_parameter_dtype_follows_the_checkpoint(tiny):
    assert stored_float_dtype(tiny / "fp8") == "bfloat16"
    assert stored_float_dtype(tiny / "bf16") == "bfloat16"
    assert stored_float_dtype(tiny / "f32") == "float32"


@pytest.mark.parametrize("command, env, want", [("generate", {}, "0.95"), ("generate", {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}, "0.5"),
                                                ("convert", {}, "unset")])
def test_the_command_line_sets_the_allocator_before_jax_starts(command, env, want):
    script = ("import os, sys; from mistral4_jax import cli; assert 'jax' not in sys.modules; "
              f"cli._preimport({command!r}); print(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', 'unset'))")
    base = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**base, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **env})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == want
