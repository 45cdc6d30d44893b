"""FP8 weights in memory (`from_pretrained(..., weights="fp8")`) and the "gather" expert path.

The reference is the transformers model loaded with exactly the dequantised FP8 values that
`R.save(..., fp8=True)` wrote, so in float32 an FP8-in-memory model must match it as closely as the
dequantising loader does.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference as R
from convert import convert
from mistral4_jax import from_pretrained, generate
from mistral4_jax.model import fp8, layer_at, moe, weights

TOL = 1e-5


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    ref = R.build(R.hf_config(with_vision=False), seed=3)
    path = R.save(ref, tmp_path_factory.mktemp("fp8"), fp8=True)
    return ref, path


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(4).integers(3, 256, (2, 24))


def _fp8_paths(model):
    return {"/".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if isinstance(v.get_value(), fp8.Fp8Weight)}


def test_fp8_model_keeps_e4m3_weights_and_matches_reference(fp8_ckpt, ids):
    ref, path = fp8_ckpt
    jm = from_pretrained(path, dtype="float32", weights="fp8")
    paths = _fp8_paths(jm)
    want = {f"language_model/layers/self_attn/{m}/kernel" for m in
            ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}
    want |= {f"language_model/layers/mlp/shared_experts/{m}/kernel" for m in ("gate_proj", "up_proj", "down_proj")}
    want |= {"language_model/layers/mlp/experts/gate_up_proj", "language_model/layers/mlp/experts/down_proj"}
    assert paths == want  # embeddings, norms, router and lm_head stay in dtype
    w = jm.language_model.layers.mlp.experts.gate_up_proj.get_value()
    assert w.q.dtype == jnp.uint8 and fp8.e4m3(w.q).dtype == jnp.float8_e4m3fn and w.scale.dtype == jnp.float32
    assert w.scale.shape == (*w.q.shape[:-2], 1, w.q.shape[-1])
    assert jm.lm_head.kernel[...].dtype == jnp.float32
    assert jm.language_model.layers.mlp.gate.kernel[...].dtype == jnp.float32
    assert R.rel_err(np.asarray(jm(ids)), R.logits(ref, ids)) < TOL


def test_fp8_bfloat16_logits_and_greedy_generate(fp8_ckpt, ids):
    ref, path = fp8_ckpt
    want = R.logits(ref, ids)
    deq = from_pretrained(path, dtype="bfloat16")
    q8 = from_pretrained(path, dtype="bfloat16", weights="fp8")
    got_q8 = np.asarray(q8(ids), np.float32)
    # bf16 activations: the FP8 path stays as close to the float32 reference as the dequantised bf16 path
    assert R.rel_err(got_q8, want) < max(2 * R.rel_err(np.asarray(deq(ids), np.float32), want), 2e-2)
    prompts = ids[:, :8].tolist()  # the cached decode (absorbed attention reads kv_b_proj as FP8 too)
    a = generate(deq, prompts, max_new_tokens=6, stop_tokens=[])
    b = generate(q8, prompts, max_new_tokens=6, stop_tokens=[])
    assert a == b


def test_fp8_from_float8_orbax_conversion(fp8_ckpt, ids, tmp_path):
    ref, path = fp8_ckpt
    dst = convert(path, tmp_path / "out", dtype="float8", quiet=True)
    jm = from_pretrained(dst, dtype="float32", weights="fp8")
    assert "language_model/layers/self_attn/kv_b_proj/kernel" in _fp8_paths(jm)
    assert R.rel_err(np.asarray(jm(ids)), R.logits(ref, ids)) < TOL


def test_bf16_source_is_quantised_per_column(tmp_path):
    ref = R.build(R.hf_config(with_vision=False), seed=7)
    path = R.save(ref, tmp_path / "bf16")
    jm = from_pretrained(path, dtype="float32", weights="fp8")
    w = layer_at(jm.language_model.layers, 0).self_attn.o_proj.kernel.get_value()
    src = ref.model.layers[0].self_attn.o_proj.weight.detach().numpy().T  # [in, out]
    amax = np.abs(src).max(axis=0)
    np.testing.assert_allclose(np.asarray(w.scale).reshape(-1), amax / 448.0, rtol=1e-6)
    # E4M3 has 3 mantissa bits: every weight within half an ulp (2^-4 relative) of its source
    err = np.abs(np.asarray(w[...]) - src)
    assert np.all(err <= np.abs(src) * 2.0 ** -4 + amax / 448 * 2.0 ** -9 + 1e-12)


def test_parameter_bytes_by_arithmetic(fp8_ckpt):
    _, path = fp8_ckpt
    t = R.TEXT_DEFAULTS
    h, v, L = t["hidden_size"], t["vocab_size"], t["num_hidden_layers"]
    e, i, nh = t["n_routed_experts"], t["moe_intermediate_size"], t["num_attention_heads"]
    qk = t["qk_nope_head_dim"] + t["qk_rope_head_dim"]
    kernels = [(h, t["q_lora_rank"]), (t["q_lora_rank"], nh * qk), (h, t["kv_lora_rank"] + t["qk_rope_head_dim"]),
               (t["kv_lora_rank"], nh * (t["qk_nope_head_dim"] + t["v_head_dim"])), (nh * t["v_head_dim"], h),
               (h, i), (h, i), (i, h)]  # attention, then the shared expert (width moe_intermediate_size)
    kernels += [(h, 2 * i)] * e + [(i, h)] * e  # routed experts
    quantised = sum(a * b for a, b in kernels)
    out_cols = sum(b for _, b in kernels)
    rest = 2 * v * h + L * (2 * h + t["q_lora_rank"] + t["kv_lora_rank"] + h * e) + h  # embed, head, norms, router
    bf16 = from_pretrained(path, dtype="bfloat16")
    q8 = from_pretrained(path, dtype="bfloat16", weights="fp8")
    assert fp8.param_bytes(nnx.state(bf16, nnx.Param)) == 2 * (L * quantised + rest)
    assert fp8.param_bytes(nnx.state(q8, nnx.Param)) == L * (quantised + 4 * out_cols) + 2 * rest


def test_weights_argument_is_checked(fp8_ckpt):
    with pytest.raises(ValueError, match="weights"):
        from_pretrained(fp8_ckpt[1], weights="int8")


@pytest.mark.parametrize("quantised", [False, True])
def test_gather_and_auto_equal_dense(quantised):
    rng = np.random.default_rng(0)
    t, h, f, e, k = 5, 16, 8, 6, 2
    x = jnp.asarray(rng.normal(size=(t, h)), jnp.float32)
    gu = jnp.asarray(rng.normal(size=(e, h, 2 * f)) * 0.3, jnp.float32)
    dn = jnp.asarray(rng.normal(size=(e, f, h)) * 0.3, jnp.float32)
    if quantised:
        gu, dn = fp8.quantize(gu), fp8.quantize(dn)
    idx = jnp.asarray(rng.permuted(np.tile(np.arange(e), (t, 1)), axis=1)[:, :k], jnp.int32)
    w = jnp.asarray(rng.random((t, k)), jnp.float32)
    want = np.asarray(moe.experts_forward(x, w, idx, gu, dn, "silu", "dense"))
    for impl in ("gather", "routed", "grouped", "auto"):
        np.testing.assert_allclose(np.asarray(moe.experts_forward(x, w, idx, gu, dn, "silu", impl)), want,
                                   rtol=1e-5, atol=1e-5)
    assert moe.resolve_impl("auto", 16, 4) == "gather" and moe.resolve_impl("auto", 17, 4) == "routed"
    # the gather path's result from arithmetic: token 0 through its experts, one at a time
    gud = np.asarray(weights.dense(gu))
    dnd = np.asarray(weights.dense(dn))
    y0 = sum(float(w[0, j]) * (jax.nn.silu(x[0] @ gud[idx[0, j], :, :f]) * (x[0] @ gud[idx[0, j], :, f:]))
             @ dnd[idx[0, j]] for j in range(k))
    np.testing.assert_allclose(np.asarray(moe.experts_forward(x, w, idx, gu, dn, "silu", "gather"))[0], y0,
                               rtol=1e-5, atol=1e-5)
