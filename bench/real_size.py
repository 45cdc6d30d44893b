"""The programs users run, compiled at the released model's size with abstract parameters (nothing allocated).

For Mistral Small 4 (36 layers, 128 experts top-4, hidden 4096, vocabulary 131072; `--layers N` for fewer
layers at the real width), bf16 and `weights="fp8"`, on one device or an N-device expert mesh, it compiles
the engine's own programs as `generate` runs them (`inference/engine.py`: decode steps over B slots of 32k
rows; one 512-token prefill chunk into a 16k row, the last chunk of an 8k prompt), `score`'s batch program
(`inference/score.py`) and a LoRA train step (`train/step.py`, rank 16, attention + experts, remat) and
prints, per program:

- params / cache: bytes per device of the arguments (the parameters as they are held; the cache as laid out);
- temp: XLA's `memory_analysis()` temporaries per device, with XLA:CPU's own copies removed (below);
- fits: params + cache + temp against one H200's pool at XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (133.4 GiB, what
  the `mistral4-jax` command sets) and an 80 GB card (79.6 GiB, pool 0.95);
- reads / must: the parameter bytes one step reads, counted on the program's jaxpr (`bench/jaxpr_cost.py`:
  slices and gathers by their size, the layer scan by its length), against what the model must read for
  that step: every non-expert weight once, and the routed experts the step's tokens pick (B = 1: 4 per layer;
  B tokens: the expected distinct experts under uniform routing, 128 (1 - (1 - 4/128)^B)), the cache
  not included (a step adds 23,040 B per filled slot);
- GFLOP / must: matmul FLOPs of one step (one token per slot; one chunk; one batch) against 2 x the active
  parameters per token x tokens.

While loops have no trip count in the program: the routed expert loop (B = 128, prefill, score, train) is
counted once, i.e. for one expert, and `reads` then adds its per-expert bytes x the expected experts (marked
"+loop"); attention's key-block loop reads the cache, which is not counted.

XLA:CPU's own copies, and how they are removed. (1) E4M3 has no data movement on XLA:CPU, which converts
whole E4M3 stacks to f16 before a loop slices them: FP8 weights are held as uint8 bits (`model/fp8.py`), so
this no longer happens on any backend (the script checks the optimised HLO for f16/f8 buffers of a layer's
expert stack and reports them). (2) XLA:CPU widens bf16 buffers that a loop slices or updates (stacked
weights, the cache) to f32: each bf16 program is also compiled in float32 (the "f32 twin": the same
program, no widening), and temp is the twin's temp / 2. (3) The train step's temp is taken from the twin the
same way. A GPU compile can still differ; these are XLA:CPU figures.

    PYTHONPATH=$PWD python bench/real_size.py [--layers 36] [--mesh 1 8] [--weights bf16 fp8] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jaxpr_cost import program_cost  # noqa: E402

from mistral4_jax import sharding as shard_lib  # noqa: E402
from mistral4_jax.checkpoints.read import abstract_model, filled, flat_params  # noqa: E402
from mistral4_jax.config import ModelConfig  # noqa: E402
from mistral4_jax.inference import engine  # noqa: E402
from mistral4_jax.inference.score import _score_batch  # noqa: E402
from mistral4_jax.model import fp8, moe  # noqa: E402
from mistral4_jax.model.cache import cache_bytes_per_token  # noqa: E402
from mistral4_jax.train.lora import LoRAConfig, init_adapters  # noqa: E402
from mistral4_jax.train.step import TrainConfig, compile_step, init_state, make_optimizer  # noqa: E402

GiB = 2**30
H200_POOL = 0.95 * 143771 * 2**20  # bytes: an H200 reports 143,771 MiB
CARD80_POOL = 0.95 * 79.6 * GiB
ROW = 32768  # slots per cache row for decode
S = jax.ShapeDtypeStruct


# ---------------------------------------------------------------------- abstract model
def abstract(cfg: ModelConfig, dtype, weights, mesh):
    """(graphdef, state) of the model with ShapeDtypeStruct leaves laid out as `from_pretrained` lays them out."""
    model = abstract_model(cfg, dtype)
    shardings = shard_lib.param_shardings(model, mesh) if mesh is not None else {}
    keep = fp8.fp8_paths(model) if weights == "fp8" else set()
    vals = {}
    for path, var in flat_params(model):
        shape, sh = tuple(var.shape), shardings.get(path)
        if path in keep:
            vals[path] = fp8.Fp8Weight(S(shape, jnp.uint8, sharding=sh),
                                       S(fp8.scale_shape(shape), jnp.float32,
                                         sharding=None if sh is None else fp8.scale_sharding(sh)), jnp.dtype(dtype).name)
        else:
            vals[path] = S(shape, var.dtype, sharding=sh)
    return nnx.split(filled(model, vals))


def per_device(tree) -> int:
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


# ---------------------------------------------------------------------- what the model must do
def expected_experts(cfg, tokens: int) -> float:
    t = cfg.text
    return t.n_routed_experts * (1 - (1 - t.num_experts_per_tok / t.n_routed_experts) ** tokens)


def must_read(cfg, state, tokens: int) -> tuple[float, float]:
    """(bytes of the weights a step over `tokens` tokens must read, bytes of one routed expert in all layers):
    every parameter but the routed experts, the embedding table and the vision tower (text steps) once, the
    embedding rows of the tokens, and the expected distinct experts."""
    experts, other = 0, 0
    for path, var in nnx.to_flat_state(state):
        p = "/".join(map(str, path))
        leaves = jax.tree.leaves(var.get_value())
        n = sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in leaves)
        if p.startswith(("vision_tower/", "multi_modal_projector/")):
            continue
        if p.startswith("language_model/embed_tokens/"):
            other += n * min(1.0, tokens / leaves[0].shape[0])
        elif "/mlp/experts/" in p:
            experts += n
        else:
            other += n
    per_expert = experts / cfg.text.n_routed_experts
    return other + per_expert * expected_experts(cfg, tokens), per_expert


def matmul_params(cfg) -> tuple[float, float]:
    """(parameters a token's matmuls use in the decoder layers, those of lm_head)."""
    t = cfg.text
    attn = (t.hidden_size * t.q_lora_rank + t.q_lora_rank * t.num_attention_heads * t.qk_head_dim
            + t.hidden_size * (t.kv_lora_rank + t.qk_rope_head_dim)
            + t.kv_lora_rank * t.num_attention_heads * (t.qk_nope_head_dim + t.v_head_dim)
            + t.num_attention_heads * t.v_head_dim * t.hidden_size)
    ffn = 3 * t.hidden_size * t.moe_intermediate_size * (t.num_experts_per_tok + t.n_shared_experts)
    return t.num_hidden_layers * (attn + ffn + t.hidden_size * t.n_routed_experts), t.hidden_size * t.vocab_size


def cpu_artefacts(compiled, cfg) -> int:
    """Buffers of the optimised HLO at least a layer's expert stack in size whose type is f16 or f8: XLA:CPU's
    E4M3 widening (0 with FP8 weights held as bits)."""
    t = cfg.text
    layer = t.n_routed_experts * t.hidden_size * t.moe_intermediate_size
    n = 0
    for line in compiled.as_text().splitlines():
        m = re.search(r"= (f16|f8e4m3fn)\[([\d,]+)\]", line)
        if m and np.prod([int(x) for x in m.group(2).split(",")], dtype=np.int64) >= layer:
            n += 1
    return n


# ---------------------------------------------------------------------- the programs
@dataclasses.dataclass
class Row:
    program: str
    weights: str
    devices: int
    params: float  # GiB per device
    cache: float  # GiB per device (the train step: adapters and optimizer moments)
    temp: float  # GiB per device, XLA:CPU's copies removed
    reads: float  # GB of parameters one step reads (one device)
    must: float  # GB the model must read for it
    gflop: float
    must_gflop: float
    note: str = ""

    def fits(self, pool_bytes: float) -> str:
        total = (self.params + self.cache + self.temp) * GiB
        return "yes" if total <= pool_bytes else f"NO ({total / GiB:.1f})"


def compile_both(build, dtype):
    """(the program compiled in `dtype`, its temp with XLA:CPU's bf16 widening removed, its context).

    build(dtype) -> (lowered program, context: {"args", "params", "call"} for the read count)."""
    lowered, ctx = build(dtype)
    compiled = lowered.compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16):
        temp = build(jnp.float32)[0].compile().memory_analysis().temp_size_in_bytes / 2
    return compiled, temp, ctx


def decode_program(cfg, weights, mesh, batch: int, dtype=jnp.bfloat16):
    def build(dt):
        graphdef, state = abstract(cfg, dt, weights, mesh)
        leaves, treedef = jax.tree.flatten(state)
        prog = engine.programs_for(graphdef, treedef)
        cache, slots, params, _, per_row = engine.abstract_args(cfg, dt, batch, ROW, 1, engine.STOP_WIDTH, mesh)
        flag = S((batch,), bool, sharding=per_row.sharding)
        args = (leaves, cache, slots, params, flag, jnp.int32(1), jnp.int32(0))
        call = lambda *a: prog.decode_steps(*a, k=engine.STEPS_PER_CALL, mesh=mesh)  # noqa: E731
        with shard_lib.mesh_context(mesh):
            return (prog.decode_steps.lower(*args, k=engine.STEPS_PER_CALL, mesh=mesh),
                    dict(args=args, params=state, call=call, cache=cache, tokens=batch, head=batch))

    return compile_both(build, dtype)


def insert_program(cfg, weights, mesh, dtype=jnp.bfloat16, chunk=512, row=16384):
    def build(dt):
        graphdef, state = abstract(cfg, dt, weights, mesh)
        leaves, treedef = jax.tree.flatten(state)
        prog = engine.programs_for(graphdef, treedef)
        rows = shard_lib.batch_divisor(mesh)
        cache, slots, params, ids, per_row = engine.abstract_args(cfg, dt, rows, row, chunk, engine.STOP_WIDTH, mesh)
        flag = S((rows,), bool, sharding=per_row.sharding)
        args = (leaves, cache, slots, params, ids, None, per_row, per_row, per_row, flag, per_row, per_row,
                slots.hist)
        call = lambda *a: prog.insert(*a, mesh=mesh)  # noqa: E731
        with shard_lib.mesh_context(mesh):
            return prog.insert.lower(*args, mesh=mesh), dict(args=args, params=state, call=call, cache=cache,
                                                              tokens=chunk, head=rows)

    return compile_both(build, dtype)


def score_program(cfg, weights, mesh, dtype=jnp.bfloat16, length=8192):
    def build(dt):
        graphdef, state = abstract(cfg, dt, weights, mesh)
        b = shard_lib.batch_divisor(mesh)
        sh = None if mesh is None else shard_lib.logical_sharding(mesh, ("batch", None), (b, length))
        arr = S((b, length), jnp.int32, sharding=sh)
        args = (state, arr, arr, arr, arr)
        call = lambda *a: _score_batch(graphdef, *a)  # noqa: E731
        with shard_lib.mesh_context(mesh):
            return _score_batch.lower(graphdef, *args), dict(args=args, params=state, call=call, cache=(),
                                                              tokens=b * length, head=b * length)

    return compile_both(build, dtype)


def train_program(cfg, weights, mesh, dtype=jnp.bfloat16, length=4096, rank=16):
    tcfg = TrainConfig(steps=10, max_len=length, batch_size=1, remat=True, param_dtype=jnp.dtype(dtype).name,
                       lora=LoRAConfig(rank=rank, alpha=2.0 * rank, targets=("attention", "experts")))
    tx = make_optimizer(tcfg)

    def build(dt):
        model = nnx.merge(*abstract(cfg, dt, weights, mesh))
        graphdef, params = nnx.split(model, nnx.Param)
        adapters = jax.eval_shape(lambda p: init_adapters(p, tcfg.lora, jax.random.key(0)), params)
        state = jax.eval_shape(lambda a: init_state(a, tx), adapters)
        step = compile_step(graphdef, tcfg, tx, mesh, state, params)
        batch = {k: S((1, length), jnp.int32) for k in ("input_ids", "attention_mask", "targets")}
        with shard_lib.mesh_context(mesh):
            # the adapters and AdamW moments count as "cache": the state besides the frozen base
            return step.lower(state, params, batch, None, None), dict(params=params, cache=state, tokens=length,
                                                                      head=length)

    return compile_both(build, dtype)


def measure(name, fn, cfg, weights, mesh) -> Row:
    t0 = time.time()
    compiled, temp, ctx = fn(cfg, weights, mesh)
    tokens, note = ctx["tokens"], ""
    reads = flops = must = np.nan
    if mesh is None and "call" in ctx:  # the read count is of the whole model: one device
        cost = program_cost(ctx["call"], ctx["args"], (0,))
        must, per_expert = must_read(cfg, ctx["params"], tokens)
        reads, flops = cost.reads, cost.flops
        t = cfg.text
        if moe.resolve_impl(t.expert_impl, tokens, t.num_experts_per_tok) == "routed":
            # the routed loop's body was counted once: one expert's weights, one tile of rows
            reads += per_expert * (expected_experts(cfg, tokens) - 1)
            tile = moe.tile_rows(tokens * t.num_experts_per_tok, t.n_routed_experts)
            flops += 6 * t.hidden_size * t.moe_intermediate_size * t.num_moe_layers * (
                tokens * t.num_experts_per_tok - tile)
            note = "+loop"
    art = cpu_artefacts(compiled, cfg)
    if art:
        note = (note + f" {art} f16/f8 stack buffers").strip()
    row = Row(name, weights or "bf16", 1 if mesh is None else mesh.size, per_device(ctx["params"]) / GiB,
              per_device(ctx["cache"]) / GiB, temp / GiB, reads / 1e9, must / 1e9, flops / 1e9,
              2 * (matmul_params(cfg)[0] * tokens + matmul_params(cfg)[1] * ctx["head"]) / 1e9, note)
    print(f"  {name} {row.weights} x{row.devices}: compiled in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return row


PROGRAMS = {
    "decode B=1": lambda c, w, m: decode_program(c, w, m, 1),
    "decode B=8": lambda c, w, m: decode_program(c, w, m, 8),
    "decode B=128": lambda c, w, m: decode_program(c, w, m, 128),
    "prefill 512 of 8k": insert_program,
    "score 8k": score_program,
    "LoRA r16 step 4k": train_program,
}


def table(rows: list[Row]) -> str:
    out = ["| program | weights | devices | params GiB | cache GiB | temp GiB | fits H200 @0.95 | fits 80 GB "
           "| reads GB | must GB | reads / must | GFLOP | must GFLOP | note |",
           "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        def f(x, fmt):
            return "-" if x != x else format(x, fmt)  # NaN: not counted (a mesh, the train step)

        out.append(f"| {r.program} | {r.weights} | {r.devices} | {r.params:.2f} | {r.cache:.2f} | {r.temp:.2f} | "
                   f"{r.fits(H200_POOL)} | {r.fits(CARD80_POOL)} | {f(r.reads, '.2f')} | {f(r.must, '.2f')} | "
                   f"{f(r.reads / r.must, '.2f')} | {f(r.gflop, '.0f')} | {f(r.must_gflop, '.0f')} | {r.note} |")
    return "\n".join(out)


def concurrency(rows: list[Row], cfg) -> str:
    """How many concurrent requests of 4k and 32k tokens the one-device FP8 plan holds in the cache room one H200
    leaves (pool at 0.95 - parameters - the largest decode / prefill temporaries): with pages a request holds
    its own tokens; with contiguous rows every request holds a row as long as the longest (32k)."""
    mine = [r for r in rows if r.weights == "fp8" and r.devices == 1 and not r.program.startswith("LoRA")]
    if not mine:
        return ""
    room = H200_POOL - (mine[0].params + max(r.temp for r in mine)) * GiB
    tokens = room / cache_bytes_per_token(cfg.text, jnp.bfloat16)
    return (f"\nOne H200 at 0.95, FP8 weights: {room / GiB:.1f} GiB of cache room = {tokens / 1e3:.0f}k tokens. "
            f"Concurrent requests with pages: {int(tokens // 4096)} of 4k or {int(tokens // 32768)} of 32k; "
            f"with contiguous rows of 32k: {int(tokens // 32768)} of either.")


def main(argv=None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--mesh", type=int, nargs="+", default=[1, 8], help="expert-axis sizes (1: one device)")
    ap.add_argument("--weights", nargs="+", default=["fp8", "bf16"], choices=["fp8", "bf16"])
    ap.add_argument("--programs", default=",".join(PROGRAMS), help="comma-separated names from: " + ", ".join(PROGRAMS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cfg = ModelConfig.mistral_small_4().replace_text(num_hidden_layers=args.layers)
    rows = []
    for n in args.mesh:
        mesh = None if n == 1 else shard_lib.make_mesh(n, devices=jax.devices()[:n])
        for w in args.weights:
            for name in args.programs.split(","):
                if name.startswith("LoRA") and n > 1 and w == "fp8":
                    continue
                rows.append(measure(name, PROGRAMS[name], cfg, None if w == "bf16" else w, mesh))
    print(f"Mistral Small 4 at {args.layers} layers, jax {jax.__version__} ({jax.default_backend()})")
    print(table(rows))
    print(concurrency(rows, cfg))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    return rows


if __name__ == "__main__":
    main()
