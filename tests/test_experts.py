"""The routed experts (`model/moe.py`): every dispatch path equals the dense reference, forward and backward,
on routings that leave experts empty, full and unbalanced, for every weight kind (plain, FP8, LoRA over FP8
and over NVFP4, the layer view the scan hands the experts); expert parallelism on 8 devices equals one device; and a
compiled decode step holds no buffer the size of a layer's experts (what reading every expert leaves
behind), where the ragged_dot path does.

Tolerances: float32 on both sides, the same products summed in another order (sorted by expert, tiles,
per-expert partial sums): a few ulps times sqrt(hidden) ~ 1e-6 relative; 1e-5 is used.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mistral4_jax.config import ModelConfig
from mistral4_jax.inference import engine
from mistral4_jax.model import fp8, moe, nvfp4, weights
from mistral4_jax.model.mistral3 import Mistral3ForConditionalGeneration
from mistral4_jax.model.lora import LoRAWeight

T, H, I, E, K = 37, 16, 16, 8, 3  # H and I: NVFP4 blocks are 16 inputs
TOL = 1e-5


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def routing(case: str, rng):
    """Router logits for each case; 'empty': experts 5..7 never chosen; 'one_full': expert 0 takes every token;
    'unbalanced': a few tokens spread, most on two experts; 'single': one token."""
    t = 1 if case == "single" else T
    logits = rng.standard_normal((t, E)).astype(np.float32)
    if case == "empty":
        logits[:, 5:] -= 100
    elif case == "one_full":
        logits[:, 0] += 100
    elif case == "unbalanced":
        logits[: t - 4, :2] += 100
    w, idx = moe.route(jnp.asarray(logits), top_k=K, n_group=1, topk_group=1, norm_topk_prob=True,
                       routed_scaling_factor=1.0)
    return jnp.asarray(rng.standard_normal((t, H)), jnp.float32), w, idx


def expert_weights(kind: str, rng):
    """(gate_up, down) of one kind and their dense values [E, H, 2I], [E, I, H]."""
    gu = jnp.asarray(rng.standard_normal((E, H, 2 * I)) * 0.3, jnp.float32)
    dn = jnp.asarray(rng.standard_normal((E, I, H)) * 0.3, jnp.float32)
    if kind == "plain":
        return gu, dn
    if kind == "lora_nvfp4":
        q1, q2 = nvfp4.quantize(gu, column_groups=2), nvfp4.quantize(dn)
    else:
        q1, q2 = fp8.quantize(gu), fp8.quantize(dn)
    if kind == "fp8":
        return q1, q2
    if kind in ("lora_fp8", "lora_nvfp4"):
        def lora(q, d_in, d_out, seed):
            g = np.random.default_rng(seed)
            return LoRAWeight(q, jnp.asarray(g.standard_normal((E, d_in, 2)) * 0.2, jnp.float32),
                              jnp.asarray(g.standard_normal((E, 2, d_out)) * 0.2, jnp.float32), 1.5)
        return lora(q1, H, 2 * I, 1), lora(q2, I, H, 2)
    # "stacked": layer 1 of a 3-layer stack, as the layer scan hands the experts to a decode step
    def stack(q):
        return weights.Stacked(jax.tree.map(lambda a: jnp.stack([a * 0, a, a * 0]), q), jnp.int32(1))
    return stack(q1), stack(q2)


@pytest.mark.parametrize("kind", ["plain", "fp8", "lora_fp8", "lora_nvfp4", "stacked"])
@pytest.mark.parametrize("case", ["balanced", "empty", "one_full", "unbalanced", "single"])
def test_every_path_equals_the_dense_reference(case, kind):
    rng = np.random.default_rng(0)
    x, w, idx = routing(case, rng)
    gu, dn = expert_weights(kind, rng)
    want = moe.experts_dense(x, w, idx, gu, dn, "silu")
    assert np.abs(np.asarray(want)).max() > 0
    for impl in ("routed", "gather", "grouped", "auto"):
        got = jax.jit(lambda *a, impl=impl: moe.experts_forward(*a, "silu", impl))(x, w, idx, gu, dn)
        assert rel(got, want) < TOL, (impl, rel(got, want))


def test_pairs_sent_to_no_expert_contribute_nothing():
    """Expert id E (padding, idle slots) reads no expert and adds zero, on every path."""
    rng = np.random.default_rng(1)
    x, w, idx = routing("balanced", rng)
    gu, dn = expert_weights("fp8", rng)
    dropped = idx.at[::3].set(E)
    want = moe.experts_dense(x, jnp.where(dropped == E, 0.0, w), idx, gu, dn, "silu")
    for impl in ("routed", "gather", "grouped", "dense"):
        got = moe.experts_forward(x, jnp.where(dropped == E, 0.0, w), dropped, gu, dn, "silu", impl)
        assert rel(got, want) < TOL, impl


@pytest.mark.parametrize("case", ["balanced", "empty", "one_full"])
def test_routed_gradients_equal_dense(case):
    rng = np.random.default_rng(2)
    x, w, idx = routing(case, rng)
    gu, dn = expert_weights("plain", rng)
    cot = jnp.asarray(rng.standard_normal((x.shape[0], H)), jnp.float32)

    def loss(impl):
        return lambda x_, w_, gu_, dn_: jnp.sum(moe.experts_forward(x_, w_, idx, gu_, dn_, "silu", impl) * cot)

    want = jax.grad(loss("dense"), argnums=(0, 1, 2, 3))(x, w, gu, dn)
    got = jax.jit(jax.grad(loss("routed"), argnums=(0, 1, 2, 3)))(x, w, gu, dn)
    for name, a, b in zip(("x", "weights", "gate_up", "down"), got, want):
        assert rel(a, b) < TOL, name


@pytest.mark.parametrize("kind", ["lora_fp8", "lora_nvfp4"])
def test_lora_adapter_gradients_through_a_quantised_base(kind):
    """The routed loop's VJP reaches LoRA factors over a frozen FP8 or NVFP4 base (through `weights.dense`'s VJP;
    the packed codes and E4M3 bits get no cotangent)."""
    rng = np.random.default_rng(3)
    x, w, idx = routing("balanced", rng)
    gu, dn = expert_weights(kind, rng)

    def loss(impl):
        def f(a1, b1, a2, b2):
            g = LoRAWeight(gu.w, a1, b1, gu.scale)
            d = LoRAWeight(dn.w, a2, b2, dn.scale)
            return jnp.sum(jnp.sin(moe.experts_forward(x, w, idx, g, d, "silu", impl)))
        return f

    args = (gu.a, gu.b, dn.a, dn.b)
    want = jax.grad(loss("dense"), argnums=(0, 1, 2, 3))(*args)
    got = jax.jit(jax.grad(loss("routed"), argnums=(0, 1, 2, 3)))(*args)
    for a, b in zip(got, want):
        assert rel(a, b) < TOL


def test_expert_parallel_equals_one_device():
    """Under a (data 2, expert 4) mesh each device loops over its 2 experts and the parts are summed: values and
    gradients equal the one-device computation, and the expert weights stay split."""
    rng = np.random.default_rng(4)
    x, w, idx = routing("unbalanced", rng)
    gu, dn = expert_weights("plain", rng)
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4, 1), ("data", "expert", "tensor"))
    split = NamedSharding(mesh, P("expert"))
    gus, dns = jax.device_put(gu, split), jax.device_put(dn, split)

    def loss(x_, gu_, dn_):
        return jnp.sum(jnp.sin(moe.experts_forward(x_, w, idx, gu_, dn_, "silu", "routed")))

    want_y = moe.experts_forward(x, w, idx, gu, dn, "silu", "routed")
    want_g = jax.grad(loss, argnums=(0, 1, 2))(x, gu, dn)
    with jax.set_mesh(mesh):
        assert moe.expert_axis_size() == 4
        got_y = jax.jit(lambda *a: moe.experts_forward(*a, "silu", "routed"))(x, w, idx, gus, dns)
        got_g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, gus, dns)
    assert rel(got_y, want_y) < TOL
    for a, b in zip(got_g, want_g):
        assert rel(a, b) < TOL
    assert got_g[1].sharding.spec[0] == "expert"  # each device's expert gradients stay on it


def _expert_stacks(compiled, cfg) -> list[str]:
    """Instructions of the optimised HLO (parameters and their plumbing aside) whose result is a layer's whole
    expert stack, [..., E, H, 2I] or [..., E, I, H]: what dequantising or copying every expert leaves behind."""
    t = cfg.text
    stacks = {(t.n_routed_experts, t.hidden_size, 2 * t.moe_intermediate_size),
              (t.n_routed_experts, t.moe_intermediate_size, t.hidden_size)}
    out = []
    for line in compiled.as_text().splitlines():
        m = re.search(r"= \w+\[([\d,]+)\]", line)
        if m and not re.search(r"parameter\(|get-tuple-element\(|= \(|tuple\(", line):
            dims = tuple(int(d) for d in m.group(1).split(","))
            if dims[-3:] in stacks:
                out.append(line.strip()[:160])
    return out


@pytest.mark.parametrize("batch", [1, 64])
def test_compiled_decode_step_holds_no_layer_of_experts(batch):
    """The engine's decode program, FP8 weights, 64 experts: neither the gathered path (batch 1) nor the routed loop
    (batch 64: 128 pairs) produces a buffer as large as a layer's experts, and the temporaries do not grow with the
    expert count. The ragged_dot path ('grouped') dequantises whole stacks: the same check finds them."""
    def compiled(n_experts, impl):
        cfg = ModelConfig.tiny(n_routed_experts=n_experts, expert_impl=impl, hidden_size=64,
                               moe_intermediate_size=48).replace(vision=None)
        model = nnx.eval_shape(lambda: Mistral3ForConditionalGeneration(cfg, jnp.float32, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        keep = fp8.fp8_paths(model)
        flat = [(p, v.replace(fp8.Fp8Weight(jax.ShapeDtypeStruct(v.shape, jnp.uint8),
                                            jax.ShapeDtypeStruct(fp8.scale_shape(tuple(v.shape)), jnp.float32),
                                            "float32")) if "/".join(map(str, p)) in keep else v)
                for p, v in nnx.to_flat_state(state)]
        leaves, treedef = jax.tree.flatten(nnx.from_flat_state(flat))
        prog = engine.programs_for(graphdef, treedef)
        cache, slots, params, _, _ = engine.abstract_args(cfg, jnp.float32, batch, 256, 1, 16, None)
        flag = jax.ShapeDtypeStruct((batch,), bool)
        return cfg, prog.decode_steps.lower(leaves, cache, slots, params, flag, jnp.int32(1), jnp.int32(0),
                                            k=engine.STEPS_PER_CALL, mesh=None).compile()

    cfg, routed = compiled(64, "auto")
    assert _expert_stacks(routed, cfg) == []
    _, few = compiled(8, "auto")
    temp = routed.memory_analysis().temp_size_in_bytes
    assert temp < 1.3 * few.memory_analysis().temp_size_in_bytes
    cfg, grouped = compiled(64, "grouped")
    assert _expert_stacks(grouped, cfg)  # the check sees whole-stack work where it happens
