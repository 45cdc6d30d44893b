"""NVFP4 weights (`mistral4_jax.model.nvfp4`, docs/model.md 2.6): the NVFP4 release's native layout loaded with
its experts packed, the hybrid with the FP8 release, conversion and convert-time quantisation.

The checkpoints are written here from a transformers reference model the way the release is laid out:
native names, routed experts `experts.E.w1|w2|w3` and the shared expert as compressed-tensors NVFP4
quadruples (`weight_packed` U8 [out, in/2], `weight_scale` F8_E4M3 [out, in/16], `weight_global_scale` F32 [1],
`input_global_scale` F32 for routed and BF16 for shared experts), everything else BF16, and a `params.json`
whose `quantization` is llm-compressor's compressed-tensors config. The NVFP4 tensors are made by
compressed-tensors itself (its observer arithmetic and `NVFP4PackedCompressor.compress`), and the reference
model is loaded with compressed-tensors' own float32 dequantisation of them, so every expected number comes
from compressed-tensors or transformers, not from mistral4_jax.
"""

import copy
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.quantization.lifecycle.forward import dequantize
from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
from flax import nnx
from safetensors.torch import load_file, save_file

import reference as R
from convert import convert
from mistral4_jax import CheckpointError, ConfigError, from_pretrained, generate
from mistral4_jax.model import fp8, layer_at, moe, nvfp4, weights
from test_convert import _native_name, save_native

TOL = 1e-5
SCHEME = preset_name_to_scheme("NVFP4", ["Linear"])  # llm-compressor's NVFP4 preset (W4A4, per-16 E4M3 scales)
SIZES = [(28, 56)]
EXPERTS = "language_model/layers/mlp/experts/"
SHARED = "language_model/layers/mlp/shared_experts/"


# ---------------------------------------------------------------------- compressed-tensors, the reference
def ct_compress(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """One [out, in] matrix quantised and packed by compressed-tensors as llm-compressor calibrates it: a global
    scale from the matrix's min/max (`generate_gparam`), E4M3 block scales per 16 inputs (`calculate_qparams`)."""
    w = w.detach().float()
    out, d_in = w.shape
    g = generate_gparam(w.min(), w.max())
    blocks = w.reshape(out, d_in // 16, 16)
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), SCHEME.weights, global_scale=g)
    return NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": g}, SCHEME)


def ct_dequantize(sd: dict[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    """compressed-tensors' dequantisation of one matrix, in float32 (its `decompress` is the same arithmetic
    with the codes and scales in bfloat16 and the result cast to bfloat16)."""
    m, half = sd["weight_packed"].shape
    codes = unpack_fp4_from_uint8(sd["weight_packed"], m, 2 * half, dtype=dtype)
    return dequantize(codes, sd["weight_scale"].to(dtype), args=SCHEME.weights,
                      global_scale=sd["weight_global_scale"], dtype=dtype)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy() if t.dtype == torch.float8_e4m3fn else t.numpy()


# ---------------------------------------------------------------------- the release's layout, written here
def params_json(model, quantization=None, **changes) -> dict:
    tc, vc = model.config.text_config, model.config.vision_config
    rp = tc.rope_parameters
    params = {
        "dim": tc.hidden_size, "n_layers": tc.num_hidden_layers, "head_dim": tc.qk_nope_head_dim + tc.qk_rope_head_dim,
        "hidden_dim": tc.intermediate_size, "n_heads": tc.num_attention_heads, "n_kv_heads": tc.num_key_value_heads,
        "norm_eps": tc.rms_norm_eps, "vocab_size": tc.vocab_size, "tied_embeddings": False,
        "max_position_embeddings": tc.max_position_embeddings, "rope_theta": rp["rope_theta"],
        "q_lora_rank": tc.q_lora_rank, "kv_lora_rank": tc.kv_lora_rank, "qk_rope_head_dim": tc.qk_rope_head_dim,
        "qk_nope_head_dim": tc.qk_nope_head_dim, "v_head_dim": tc.v_head_dim,
        "yarn": {"original_max_position_embeddings": rp["original_max_position_embeddings"], "factor": rp["factor"],
                 "beta": rp["beta_fast"], "alpha": rp["beta_slow"], "apply_scale": False},
        "llama_4_scaling": {"beta": rp["llama_4_scaling_beta"],
                            "original_max_position_embeddings": rp["original_max_position_embeddings"]},
        "moe": {"num_experts": tc.n_routed_experts, "num_experts_per_tok": tc.num_experts_per_tok,
                "expert_hidden_dim": tc.moe_intermediate_size, "num_shared_experts": tc.n_shared_experts,
                "routed_scale": tc.routed_scaling_factor},
        "vision_encoder": {
            "hidden_size": vc.hidden_size, "intermediate_size": vc.intermediate_size,
            "num_hidden_layers": vc.num_hidden_layers, "num_attention_heads": vc.num_attention_heads,
            "num_channels": 3, "image_size": vc.image_size, "max_image_size": vc.image_size,
            "patch_size": vc.patch_size, "rope_theta": 10000.0, "spatial_merge_size": 2, "image_token_id": 10,
            "image_break_token_id": 12, "image_end_token_id": 13, "adapter_bias": False,
            "mm_projector_id": "patch_merge", "add_pre_mm_projector_layer_norm": True},
    }
    if quantization is not None:
        params["quantization"] = quantization
    params.update(changes)
    return params


# llm-compressor's config as the release's params.json carries it (docs/model.md 2.6): W4A4 NVFP4 on every
# Linear but attention, router, head and the vision side.
CT_CONFIG = {
    "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"], "format": "nvfp4-pack-quantized",
        "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
                    "dynamic": False, "observer": "static_minmax", "scale_dtype": "torch.float8_e4m3fn"},
        "input_activations": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                              "symmetric": True, "dynamic": "local", "observer": "static_minmax",
                              "scale_dtype": "torch.float8_e4m3fn"}}},
    "ignore": ["re:.*self_attn.*", "re:.*gate$", "lm_head", "re:vision_encoder.*", "re:patch_merger.*",
               "re:vision_language_adapter.*"],
    "kv_cache_scheme": None, "transform_config": {},
}


def save_native_nvfp4(model, path, quantization=CT_CONFIG, **params_changes) -> Path:
    """Write `model` (a Mistral3 reference) in the NVFP4 release's native layout; `model` becomes exactly what
    was written: its routed and shared experts compressed-tensors' float32 dequantisation of the NVFP4
    tensors, every other weight rounded to bfloat16."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vc = model.config.vision_config
    out: dict[str, torch.Tensor] = {}

    def put_nvfp4(name: str, w: torch.Tensor, shared: bool) -> torch.Tensor:
        sd = ct_compress(w)
        for k, v in sd.items():
            out[f"{name}.{k}"] = v.contiguous()
        out[f"{name}.input_global_scale"] = torch.tensor([448.0 * 6 / 3.0],
                                                         dtype=torch.bfloat16 if shared else torch.float32)
        return ct_dequantize(sd)

    with torch.no_grad():
        for name, w in model.state_dict().items():
            if "rotary_emb" in name:
                continue
            w = w.detach().clone()
            if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
                base = _native_name(name.rsplit(".mlp.experts.", 1)[0]) + ".experts"
                half = w.shape[1] // 2
                deq = w.clone()
                for e in range(w.shape[0]):
                    if name.endswith("gate_up_proj"):  # w1 and w3, each its own global scale
                        deq[e, :half] = put_nvfp4(f"{base}.{e}.w1", w[e, :half], False)
                        deq[e, half:] = put_nvfp4(f"{base}.{e}.w3", w[e, half:], False)
                    else:
                        deq[e] = put_nvfp4(f"{base}.{e}.w2", w[e], False)
                model.get_parameter(name).copy_(deq)
                continue
            nat = _native_name(name)
            if ".mlp.shared_experts." in name:
                model.get_parameter(name).copy_(put_nvfp4(nat[: -len(".weight")], w, True))
                continue
            b = w.to(torch.bfloat16)
            model.get_parameter(name).copy_(b.float())
            if nat.startswith("vision_encoder.") and (".attention.wq." in nat or ".attention.wk." in nat):
                heads, d = vc.num_attention_heads, vc.hidden_size // vc.num_attention_heads
                b = b.view(heads, 2, d // 2, b.shape[1]).transpose(1, 2).reshape(b.shape)
            out[nat] = b.contiguous()
    names = sorted(out)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, chunk in enumerate(shards):
        fname = f"consolidated-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: out[k] for k in chunk}, str(path / fname))
        weight_map.update({k: fname for k in chunk})
    (path / "consolidated.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "params.json").write_text(json.dumps(params_json(model, quantization, **params_changes), indent=2))
    (path / "tekken.json").write_text("{}")
    return path


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(base reference, NVFP4 reference and dir, FP8 reference and dir), all from one set of weights."""
    tmp = tmp_path_factory.mktemp("nvfp4")
    base = R.build(R.hf_config(), seed=11)
    nv, f8 = copy.deepcopy(base), copy.deepcopy(base)
    return base, (nv, save_native_nvfp4(nv, tmp / "nvfp4")), (f8, save_native(f8, tmp / "fp8"))


@pytest.fixture(scope="module")
def inputs():
    px, isz = R.pixel_batch(SIZES, seed=3)
    return np.asarray([R.image_prompt(SIZES)]), px, isz


def _logits(jm, inputs):
    ids, px, isz = inputs
    return np.asarray(jm(ids, px, isz), np.float32)


def _kinds(model) -> dict[str, type]:
    return {"/".join(map(str, p)): type(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------- the format
def _matrices():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * 0.05
    w[3, 16:32] = 0.0  # an all-zero block: its scale is E4M3's smallest step
    w[5, :16] = -0.0
    w[7] *= 40.0  # a row far larger than the rest: other rows' block scales use little of E4M3's range
    return [w, torch.randn(32, 128, generator=g) * 3e-3]


@pytest.mark.parametrize("i", [0, 1])
def test_dequantisation_equals_compressed_tensors(i):
    w = _matrices()[i]
    sd = ct_compress(w)
    packed, scale, glob = (_np(sd[k]) for k in ("weight_packed", "weight_scale", "weight_global_scale"))
    want32 = ct_dequantize(sd).numpy()
    np.testing.assert_array_equal(nvfp4.dequantize_disk(packed, scale.view(ml_dtypes.float8_e4m3fn), glob), want32)
    # in our layout ([in, out], the global scale per output column), float32 and bfloat16 alike
    kernel = nvfp4.Nvfp4Weight(jnp.asarray(packed.T), jnp.asarray(scale.T), jnp.full((1, w.shape[0]), glob[0]),
                               "float32")
    np.testing.assert_array_equal(np.asarray(kernel[...]).T, want32)
    want16 = NVFP4PackedCompressor.decompress(sd, SCHEME)["weight"]  # compressed-tensors' own decompress (bf16)
    assert want16.dtype == torch.bfloat16
    got16 = nvfp4.dequantize(kernel.codes, kernel.scales, kernel.global_scale, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got16.astype(jnp.float32)).T, want16.float().numpy())


def test_quantisation_is_compressed_tensors_and_round_trips():
    for w in _matrices():
        sd = ct_compress(w)
        q = nvfp4.quantize(jnp.asarray(w.numpy().T))  # our layout [in, out]
        np.testing.assert_array_equal(np.asarray(q.codes).T, _np(sd["weight_packed"]))
        np.testing.assert_array_equal(np.asarray(q.scales).T, _np(sd["weight_scale"]))
        np.testing.assert_array_equal(np.asarray(q.global_scale)[0],
                                      np.full(w.shape[0], _np(sd["weight_global_scale"])[0]))
        # within the format's precision: at most one E2M1 step of the block (the largest gap is 4 -> 6)
        block = np.asarray(q.scales).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        step = np.repeat(block / np.asarray(q.global_scale), 16, axis=0)
        assert np.all(np.abs(np.asarray(q[...]) - w.numpy().T) <= step)
    # a fused gate_up: each half (matrix) keeps its own global scale, as the release's w1 and w3 do
    gate, up = _matrices()[0][:, :32], 7.0 * _matrices()[0][:, 32:]
    fused = nvfp4.quantize(jnp.concatenate([jnp.asarray(gate.numpy()), jnp.asarray(up.numpy())], axis=1),
                           column_groups=2)
    for half, w in ((slice(0, 32), gate), (slice(32, 64), up)):
        alone = nvfp4.quantize(jnp.asarray(w.numpy()))
        _leaves_equal(jax.tree.map(lambda a: a[..., half], fused), alone)
    # a tensor NVFP4 represents exactly comes back exactly: E2M1 codes x E4M3 block scales / a global scale,
    # where every block holds a +-6 (so its scale is found again) and the largest block scale is 448 (so the
    # global scale 448 * 6 / max|w| is found again; 1024 here)
    rng = np.random.default_rng(1)
    codes = rng.choice(nvfp4.E2M1, size=(64, 24))
    codes[::16] = 6.0 * rng.choice([-1.0, 1.0], size=(4, 24))
    s = rng.choice([448.0, 224.0, 96.0, 40.0, 13.0, 2.5, 0.5], size=(4, 24))
    s[0, 0] = 448.0
    values = (codes * np.repeat(s / 1024.0, 16, axis=0)).astype(np.float32)
    q = nvfp4.quantize(jnp.asarray(values))
    assert float(q.global_scale[0, 0]) == 1024.0
    np.testing.assert_array_equal(np.asarray(q[...]), values)


@pytest.mark.parametrize("impl", ["gather", "routed", "grouped", "dense"])
def test_expert_paths_take_nvfp4_weights(impl):
    rng = np.random.default_rng(0)
    t, h, f, e, k = 5, 32, 16, 6, 2
    x = jnp.asarray(rng.normal(size=(t, h)), jnp.float32)
    gu = nvfp4.quantize(jnp.asarray(rng.normal(size=(e, h, 2 * f)) * 0.3, jnp.float32), column_groups=2)
    dn = nvfp4.quantize(jnp.asarray(rng.normal(size=(e, f, h)) * 0.3, jnp.float32))
    idx = jnp.asarray(rng.permuted(np.tile(np.arange(e), (t, 1)), axis=1)[:, :k], jnp.int32)
    w = jnp.asarray(rng.random((t, k)), jnp.float32)
    want = moe.experts_forward(x, w, idx, gu[...], dn[...], "silu", "dense")
    np.testing.assert_allclose(np.asarray(moe.experts_forward(x, w, idx, gu, dn, "silu", impl)), np.asarray(want),
                               rtol=1e-5, atol=1e-5)
    one = weights.index(gu, 3)  # selection works on the packed leaves
    assert isinstance(one, nvfp4.Nvfp4Weight) and one.shape == (h, 2 * f)
    np.testing.assert_array_equal(np.asarray(one[...]), np.asarray(gu[...])[3])


# ---------------------------------------------------------------------- the release's layout
def test_nvfp4_checkpoint_loads_packed_and_matches_reference(ckpts, inputs):
    _, (ref, path), _ = ckpts
    jm = from_pretrained(path, dtype="float32")
    kinds = _kinds(jm)
    packed = {p for p, k in kinds.items() if k is nvfp4.Nvfp4Weight}
    assert packed == {EXPERTS + "gate_up_proj", EXPERTS + "down_proj",
                      *(SHARED + f"{m}/kernel" for m in ("gate_proj", "up_proj", "down_proj"))}
    assert all(k is not fp8.Fp8Weight for k in kinds.values())  # attention, router, head: plain (bf16 on disk)
    w = jm.language_model.layers.mlp.experts.gate_up_proj.get_value()
    assert w.codes.dtype == jnp.uint8 and w.scales.dtype == jnp.uint8 and w.global_scale.dtype == jnp.float32
    assert R.rel_err(_logits(jm, inputs), R.logits(ref, *inputs)) < TOL


def test_greedy_generate_follows_the_reference(ckpts):
    """The cached decode (gathered expert slices of the packed stacks, the absorbed attention) and prefill."""
    _, (ref, path), _ = ckpts
    jm = from_pretrained(path, dtype="float32")
    prompts = [[1, 21, 33, 70, 41, 99, 140], [1, 77, 5]]
    for prompt, new in zip(prompts, generate(jm, prompts, max_new_tokens=8, stop_tokens=[])):
        R.assert_teacher_forced(ref, prompt, new)


def test_parameter_bytes_of_the_routed_experts(ckpts):
    _, (_, path), _ = ckpts
    jm = from_pretrained(path, dtype="bfloat16")
    t = R.TEXT_DEFAULTS
    h, i, e, n = t["hidden_size"], t["moe_intermediate_size"], t["n_routed_experts"], t["num_hidden_layers"]
    routed = [jm.language_model.layers.mlp.experts.gate_up_proj.get_value(),
              jm.language_model.layers.mlp.experts.down_proj.get_value()]
    got = sum(fp8.param_bytes(w) for w in routed)
    # codes: half a byte per weight; block scales: one byte per 16; global scales: 4 bytes per output column
    want = n * e * ((h * 2 * i) * (0.5 + 1 / 16) + 4 * 2 * i + (i * h) * (0.5 + 1 / 16) + 4 * h)
    assert got == want
    per_weight = got / (n * e * 3 * h * i)
    assert 0.56 < per_weight < 0.5625 + 4 / min(h, i) + 1e-9
    assert sum(w.nbytes for w in routed) == got


def test_bfloat16_load_is_compressed_tensors_decompression(ckpts):
    _, (_, path), _ = ckpts
    jm = from_pretrained(path, dtype="bfloat16")
    layer = 1
    w = layer_at(jm.language_model.layers, layer).mlp.experts.gate_up_proj.get_value()
    got = np.asarray(w[...].astype(jnp.float32))  # [E, H, 2I]
    index = json.loads((path / "consolidated.safetensors.index.json").read_text())["weight_map"]
    stem = f"layers.{layer}.experts.5.w3"
    sd = {}
    for suffix in ("weight_packed", "weight_scale", "weight_global_scale"):
        sd[suffix] = load_file(str(path / index[f"{stem}.{suffix}"]))[f"{stem}.{suffix}"]
    want = NVFP4PackedCompressor.decompress(sd, SCHEME)["weight"].float().numpy()  # [I, H]
    np.testing.assert_array_equal(got[5, :, got.shape[-1] // 2:], want.T)


def test_dense_weights_dequantise_everything(ckpts, inputs):
    _, (ref, path), _ = ckpts
    jm = from_pretrained(path, dtype="float32", weights="dense")
    assert all(k not in (nvfp4.Nvfp4Weight, fp8.Fp8Weight) for k in _kinds(jm).values())
    assert R.rel_err(_logits(jm, inputs), R.logits(ref, *inputs)) < TOL


def test_expert_mesh(ckpts, inputs):
    from mistral4_jax.sharding import make_mesh

    _, (ref, path), _ = ckpts
    jm = from_pretrained(path, dtype="float32", mesh=make_mesh(expert=4, tensor=2))
    w = jm.language_model.layers.mlp.experts.down_proj.get_value()
    assert isinstance(w, nvfp4.Nvfp4Weight) and len(w.codes.sharding.device_set) == 8
    assert R.rel_err(_logits(jm, inputs), R.logits(ref, *inputs)) < TOL


def test_rope_theta_and_scaling_are_read_from_params_json(ckpts, tmp_path):
    base, _, _ = ckpts
    ref = R.build(R.hf_config(rope=dict(rope_theta=1e7, llama_4_scaling_beta=0.3)), seed=11)
    ref.load_state_dict({k: v for k, v in base.state_dict().items() if "rotary_emb" not in k}, strict=False)
    path = save_native_nvfp4(ref, tmp_path / "theta")
    ids = np.random.default_rng(2).integers(14, 256, (1, 80))  # past original_max_position_embeddings (32)
    jm = from_pretrained(path, dtype="float32")
    assert jm.config.text.rope.rope_theta == 1e7 and jm.config.text.rope.llama_4_scaling_beta == 0.3
    assert jm.config.quantization.is_nvfp4 and jm.config.quantization.group_size == 16
    assert R.rel_err(np.asarray(jm(ids)), R.logits(ref, ids)) < TOL
    # the same weights read with theta 1e4 give other logits: the value matters and is not defaulted
    params = json.loads((path / "params.json").read_text())
    params["rope_theta"] = 1e4
    (path / "params.json").write_text(json.dumps(params))
    assert R.rel_err(np.asarray(from_pretrained(path, dtype="float32")(ids)), R.logits(ref, ids)) > 1e-3
    for key in ("rope_theta", "llama_4_scaling"):
        bad = dict(params)
        del bad[key]
        (path / "params.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=key):
            from_pretrained(path, dtype="float32")


def test_quantization_config_is_checked(ckpts, tmp_path):
    _, (_, path), _ = ckpts
    params = json.loads((path / "params.json").read_text())
    bad = copy.deepcopy(params)
    bad["quantization"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    (tmp_path / "params.json").write_text(json.dumps(bad))
    for f in path.iterdir():
        if f.name != "params.json":
            (tmp_path / f.name).symlink_to(f)
    with pytest.raises(ConfigError, match="only NVFP4"):
        from_pretrained(tmp_path, dtype="float32")


def _broken(path: Path, tmp: Path, edit) -> Path:
    """A copy of the NVFP4 checkpoint with one shard's tensors changed by `edit(dict)`."""
    from safetensors.torch import load_file

    tmp.mkdir()
    for f in path.iterdir():
        if f.name.endswith(".safetensors"):
            t = load_file(str(f))
            edit(t)
            save_file(t, str(tmp / f.name))
        elif f.name == "consolidated.safetensors.index.json":
            continue  # without the index, the shards are found by name
        else:
            (tmp / f.name).write_bytes(f.read_bytes())
    return tmp


@pytest.mark.parametrize("case", ["scale_shape", "packed_dtype", "no_global", "global_dtype"])
def test_malformed_nvfp4_tensors_are_one_error_naming_them(ckpts, tmp_path, case):
    _, (_, path), _ = ckpts
    stem = "layers.0.experts.3.w2"

    def edit(t):
        if f"{stem}.weight_packed" not in t:
            return
        if case == "scale_shape":
            t[f"{stem}.weight_scale"] = t[f"{stem}.weight_scale"][:, :1].contiguous()
        elif case == "packed_dtype":
            t[f"{stem}.weight_packed"] = t[f"{stem}.weight_packed"].to(torch.int32)
        elif case == "no_global":
            del t[f"{stem}.weight_global_scale"]
        else:
            t[f"{stem}.weight_global_scale"] = t[f"{stem}.weight_global_scale"].to(torch.bfloat16)

    bad = _broken(path, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(bad, dtype="float32")
    msg = str(err.value)
    assert "1 problems" in msg and "consolidated-0000" in msg and stem in msg, msg


# ---------------------------------------------------------------------- the hybrid and conversion
def _hybrid_reference(ckpts):
    """FP8 attention and shared expert (the FP8 reference) with the NVFP4 routed experts."""
    _, (nv, _), (f8, _) = ckpts
    ref = copy.deepcopy(f8)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".mlp.experts." in name:
                p.copy_(nv.get_parameter(name))
    return ref


def test_hybrid_from_both_releases(ckpts, inputs):
    _, (_, nv_path), (_, f8_path) = ckpts
    jm = from_pretrained(f8_path, dtype="float32", weights="fp8", experts_from=nv_path)
    kinds = _kinds(jm)
    assert kinds[EXPERTS + "gate_up_proj"] is nvfp4.Nvfp4Weight and kinds[EXPERTS + "down_proj"] is nvfp4.Nvfp4Weight
    assert kinds[SHARED + "gate_proj/kernel"] is fp8.Fp8Weight
    assert kinds["language_model/layers/self_attn/kv_b_proj/kernel"] is fp8.Fp8Weight
    assert R.rel_err(_logits(jm, inputs), R.logits(_hybrid_reference(ckpts), *inputs)) < TOL
    same = from_pretrained(f8_path, dtype="float32", weights="hybrid", experts_from=nv_path)
    _leaves_equal(nnx.state(same, nnx.Param), nnx.state(jm, nnx.Param))


def test_weights_vocabulary(ckpts):
    _, (_, nv_path), (_, f8_path) = ckpts
    kinds = _kinds(from_pretrained(f8_path, dtype="float32", weights="nvfp4"))  # the NVFP4 release's scheme
    assert kinds[EXPERTS + "gate_up_proj"] is nvfp4.Nvfp4Weight
    assert kinds[SHARED + "down_proj/kernel"] is nvfp4.Nvfp4Weight
    assert kinds["language_model/layers/self_attn/o_proj/kernel"] is not fp8.Fp8Weight
    kinds = _kinds(from_pretrained(nv_path, dtype="float32", weights={"experts": "fp8", "attention": "fp8"}))
    assert kinds[EXPERTS + "down_proj"] is fp8.Fp8Weight and kinds["language_model/layers/self_attn/o_proj/kernel"] \
        is fp8.Fp8Weight
    assert kinds[SHARED + "down_proj/kernel"] not in (fp8.Fp8Weight, nvfp4.Nvfp4Weight)
    for bad in ("int4", {"experts": "int4"}, {"mlp": "fp8"}):
        with pytest.raises(ValueError, match="weights"):
            from_pretrained(nv_path, weights=bad)


def test_converted_hybrid_from_both_releases(ckpts, inputs, tmp_path):
    _, (_, nv_path), (_, f8_path) = ckpts
    dst = convert(f8_path, tmp_path / "hybrid", dtype="float8", experts_from=nv_path, quiet=True)
    marker = json.loads((dst / "mistral4_jax.json").read_text())
    assert marker["version"] == 2 and marker["arrays"][EXPERTS + "down_proj"]["kind"] == "nvfp4"
    jm = from_pretrained(dst, dtype="float32", weights="fp8")
    _leaves_equal(nnx.state(jm, nnx.Param),
                  nnx.state(from_pretrained(f8_path, dtype="float32", weights="fp8", experts_from=nv_path), nnx.Param))
    assert R.rel_err(_logits(jm, inputs), R.logits(_hybrid_reference(ckpts), *inputs)) < TOL


def test_converted_nvfp4_release_stays_packed(ckpts, inputs, tmp_path):
    _, (ref, nv_path), _ = ckpts
    dst = convert(nv_path, tmp_path / "nv", dtype="bfloat16", quiet=True)
    jm = from_pretrained(dst, dtype="float32")
    direct = from_pretrained(nv_path, dtype="float32")
    _leaves_equal(jm.language_model.layers.mlp.experts.gate_up_proj.get_value(),
                  direct.language_model.layers.mlp.experts.gate_up_proj.get_value())
    dense = from_pretrained(dst, dtype="float32", weights="dense")  # dequantised from the converted leaves
    np.testing.assert_array_equal(np.asarray(dense.language_model.layers.mlp.shared_experts.up_proj.kernel[...]),
                                  np.asarray(direct.language_model.layers.mlp.shared_experts.up_proj.kernel[...]))
    assert R.rel_err(_logits(jm, inputs), R.logits(ref, *inputs)) < TOL


def test_convert_time_quantisation_of_fp8_experts(ckpts, inputs, tmp_path):
    _, _, (f8, f8_path) = ckpts
    dst = convert(f8_path, tmp_path / "q", dtype="float8", experts="nvfp4", quiet=True)
    jm = from_pretrained(dst, dtype="float32", weights="fp8")
    w = jm.language_model.layers.mlp.experts.gate_up_proj.get_value()
    assert isinstance(w, nvfp4.Nvfp4Weight)
    assert isinstance(jm.language_model.layers.self_attn.o_proj.kernel.get_value(), fp8.Fp8Weight)
    # the experts are the FP8 release's values quantised as compressed-tensors quantises them, per matrix
    e, layer = 2, 1
    gate_up = f8.get_parameter("model.language_model.layers.1.mlp.experts.gate_up_proj").detach()[e]  # [2I, H]
    half = gate_up.shape[0] // 2
    got = layer_at(jm.language_model.layers, layer).mlp.experts.gate_up_proj.get_value()
    for cols, matrix in ((slice(0, half), gate_up[:half]), (slice(half, None), gate_up[half:])):
        want = ct_compress(matrix)
        np.testing.assert_array_equal(np.asarray(got.codes[e][:, cols]).T, _np(want["weight_packed"]))
        np.testing.assert_array_equal(np.asarray(got.scales[e][:, cols]).T, _np(want["weight_scale"]))
        np.testing.assert_array_equal(np.asarray(got[...][e][:, cols]).T, ct_dequantize(want).numpy())
    # the same layout made at load time from the FP8 release alone
    _leaves_equal(w, from_pretrained(f8_path, dtype="float32", weights="hybrid")
                  .language_model.layers.mlp.experts.gate_up_proj.get_value())
    # and close to the FP8 model: 4-bit experts change the logits, but not much
    err = R.rel_err(_logits(jm, inputs), R.logits(f8, *inputs))
    assert 1e-4 < err < 0.2, err
