"""On-disk layouts x tiny configs off the released shape, through the public API only.

Each source is written from a transformers reference model (tests/reference.py, and a native writer
below) in one of the layouts of docs/model.md 2.1-2.5, loaded with `from_pretrained` directly and after
`convert` (float32 / bfloat16 / float8), on one device and on a mesh, and with weights="fp8"; the
logits are compared with the reference's. The configs combine what the released model does not
have: a dense first layer, q_lora_rank null (a plain q_proj, native `attention.wq`), two shared
experts, group-limited routing, unequal qk nope / rope dims, tied embeddings, vision_feature_layer -2
and a text-only model.
"""

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import reference as R
from convert import convert, main
from mistral4_jax import CheckpointError, from_pretrained
from mistral4_jax.checkpoints.native import hf_config_dict
from mistral4_jax.sharding import make_mesh
from test_convert import _native_name

TOL = 1e-5  # relative error of float32 logits
QTOL = 1e-3  # weights="fp8" of a non-FP8 source against the reference quantised the same way

# A vision model: dense layer 0, plain q_proj, 2 shared experts, 4 groups of 2 experts (top 2 groups),
# qk nope 12 / rope 4, tied embeddings, the features of the second-to-last vision layer.
VISION = dict(text=dict(first_k_dense_replace=1, q_lora_rank=None, n_shared_experts=2, n_group=4, topk_group=2,
                        qk_nope_head_dim=12, qk_rope_head_dim=4),
              top=dict(tie_word_embeddings=True, vision_feature_layer=-2))
# A text-only model: dense layer 0, plain q_proj, 2 shared experts, 2 groups (top 1), qk nope 4 / rope 12, tied.
TEXT = dict(with_vision=False, text=dict(first_k_dense_replace=1, q_lora_rank=None, n_shared_experts=2, n_group=2,
                                         topk_group=1, qk_nope_head_dim=4, qk_rope_head_dim=12,
                                         tie_word_embeddings=True))


def _build(spec, seed):
    return R.build(R.hf_config(text=spec["text"], with_vision=spec.get("with_vision", True), **spec.get("top", {})),
                   seed=seed)


# ---------------------------------------------------------------------- a native writer (test side)
def _native(name: str) -> str:
    """transformers name of a text-only model -> native name (docs/model.md 2.3), with the plain-q and dense-layer names
    test_convert's writer does not need: `attention.wq`, `feed_forward.w1|w2|w3` (the vLLM native table)."""
    name = "model.language_model." + name[len("model."):] if name.startswith("model.") else name
    name = _native_name(name).replace(".self_attn.q_proj.", ".attention.wq.")
    return re.sub(r"^(layers\.\d+)\.mlp\.(w[123])\.", r"\1.feed_forward.\2.", name)


def _fp8(w):
    s = w.float().abs().max().clamp(min=1e-12) / 448.0
    return (w.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn), s


def save_native(model, path: Path, shards=2) -> Path:
    """`model` (text-only) in the native FP8 layout (every text projection, expert and dense MLP E4M3 with its own
    `qscale_weight`, w1 / w3 of an expert scaled separately), `consolidated-*` shards with an index, no
    `output.weight` when tied; `model` becomes the dequantised weights."""
    path.mkdir(parents=True)
    tc = model.config
    assert not hasattr(tc, "text_config"), "text-only models (test_convert writes the native vision tower)"
    out: dict[str, torch.Tensor] = {}

    def put(name, w):
        q, s = _fp8(w)
        out[name], out[name.replace(".weight", ".qscale_weight")] = q.contiguous(), s.reshape(())
        out[name.replace(".weight", ".qscale_act")] = torch.tensor(1.0)
        return q.float() * s

    with torch.no_grad():
        for name, w in model.state_dict().items():
            if "rotary_emb" in name or (tc.tie_word_embeddings and name == "lm_head.weight"):
                continue
            w = w.detach().clone()
            if re.search(r"mlp\.experts\.(gate_up|down)_proj$", name):
                base = _native(name.rsplit(".mlp.experts.", 1)[0]) + ".experts"
                half, deq = w.shape[1] // 2, w.clone()
                for e in range(w.shape[0]):
                    if name.endswith("gate_up_proj"):
                        deq[e, :half] = put(f"{base}.{e}.w1.weight", w[e, :half])
                        deq[e, half:] = put(f"{base}.{e}.w3.weight", w[e, half:])
                    else:
                        deq[e] = put(f"{base}.{e}.w2.weight", w[e])
                model.get_parameter(name).copy_(deq)
                continue
            nat = _native(name)
            if nat.startswith("layers.") and re.search(r"\.(attention\.w(q|q_a|q_b|kv_a_with_mqa|kv_b|o)|"
                                                        r"shared_experts\.w\d|feed_forward\.w\d)\.weight$", nat):
                model.get_parameter(name).copy_(put(nat, w))
            else:
                out[nat] = w.contiguous()
    names = sorted(out)
    per, weight_map = -(-len(names) // shards), {}
    for i in range(shards):
        fname = f"consolidated-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {k: out[k] for k in names[i * per:(i + 1) * per]}
        save_file(chunk, str(path / fname))
        weight_map.update(dict.fromkeys(chunk, fname))
    (path / "consolidated.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    rp = tc.rope_parameters
    params = {
        "dim": tc.hidden_size, "n_layers": tc.num_hidden_layers, "head_dim": tc.qk_nope_head_dim + tc.qk_rope_head_dim,
        "hidden_dim": tc.intermediate_size, "n_heads": tc.num_attention_heads, "n_kv_heads": tc.num_key_value_heads,
        "norm_eps": tc.rms_norm_eps, "vocab_size": tc.vocab_size, "tied_embeddings": tc.tie_word_embeddings,
        "max_position_embeddings": tc.max_position_embeddings, "rope_theta": rp["rope_theta"],
        "q_lora_rank": tc.q_lora_rank or 0, "kv_lora_rank": tc.kv_lora_rank,
        "qk_rope_head_dim": tc.qk_rope_head_dim, "qk_nope_head_dim": tc.qk_nope_head_dim, "v_head_dim": tc.v_head_dim,
        "yarn": {"original_max_position_embeddings": rp["original_max_position_embeddings"], "factor": rp["factor"],
                 "beta": rp["beta_fast"], "alpha": rp["beta_slow"], "apply_scale": False},
        "llama_4_scaling": {"beta": rp["llama_4_scaling_beta"],
                            "original_max_position_embeddings": rp["original_max_position_embeddings"]},
        "moe": {"num_experts": tc.n_routed_experts, "num_experts_per_tok": tc.num_experts_per_tok,
                "expert_hidden_dim": tc.moe_intermediate_size, "num_shared_experts": tc.n_shared_experts,
                "first_k_dense_replace": tc.first_k_dense_replace, "routed_scale": tc.routed_scaling_factor,
                "num_expert_groups": tc.n_group, "num_expert_groups_per_tok": tc.topk_group},
        "quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"},
    }
    (path / "params.json").write_text(json.dumps(params, indent=2))
    return path


def _rounded(ref, dtype=torch.bfloat16):
    """A copy of the reference with every parameter rounded to `dtype` (what a bf16 conversion stores)."""
    out = copy.deepcopy(ref)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.to(dtype).float())
    return out


# The parameters weights="fp8" keeps in E4M3 (those tagged fp8 in the model), by transformers name.
FP8_TARGETS = (r"layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)\.weight"
               r"|mlp\.(shared_experts\.)?(gate|up|down)_proj\.weight|mlp\.experts\.(gate_up|down)_proj)$")
DENSE_MLP = r"layers\.\d+\.mlp\.(gate|up|down)_proj\.weight$"


def _quantized(ref, which=FP8_TARGETS):
    """A copy of the reference with the text-decoder parameters matching `which` quantised to E4M3 with one
    scale per output row, max |w| / 448, as `quant.quantize` does for weights that are not FP8 on disk."""
    out = copy.deepcopy(ref)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if "vision" not in name and re.search(which, name):
                s = p.abs().amax(dim=-1, keepdim=True) / 448.0
                s = torch.where(s > 0, s, torch.ones_like(s))
                p.copy_((p / s).to(torch.float8_e4m3fn).float() * s)
    return out


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def vision_inputs():
    sizes = [(28, 56)]
    px, isz = R.pixel_batch(sizes, seed=3)
    return np.asarray([R.image_prompt(sizes)]), px, isz


@pytest.fixture(scope="module")
def text_inputs():
    return (np.random.default_rng(1).integers(0, R.TEXT_DEFAULTS["vocab_size"], (2, 12)),)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{name: (reference, source directory)}."""
    tmp = tmp_path_factory.mktemp("layouts")
    vision, text = _build(VISION, seed=7), _build(TEXT, seed=8)
    out = {}
    ref = copy.deepcopy(vision)
    out["vision_released_sharded"] = (ref, R.save(ref, tmp / "vrs", shards=3))
    ref = copy.deepcopy(vision)
    out["vision_tf_per_expert_fp8"] = (ref, R.save(ref, tmp / "vtp", prefix="transformers", experts="per_expert",
                                                   fp8=True))
    ref = copy.deepcopy(text)
    out["text_native_fp8"] = (ref, save_native(ref, tmp / "tn"))
    out["text_fp32"] = (text, R.save(text, tmp / "tf"))
    return out


def _err(jm, ref, inputs):
    return R.rel_err(np.asarray(jm(*inputs)), R.logits(ref, *inputs))


# ---------------------------------------------------------------------- layouts x conversion
def test_vision_released_sharded_direct_and_converted_on_a_mesh(sources, vision_inputs, tmp_path):
    ref, src = sources["vision_released_sharded"]
    assert _err(from_pretrained(src, dtype="float32"), ref, vision_inputs) < TOL
    dst = convert(src, tmp_path / "f32", dtype="float32", quiet=True)
    assert _err(from_pretrained(dst, dtype="float32", mesh=make_mesh(expert=4, tensor=2)), ref, vision_inputs) < TOL


def test_vision_transformers_per_expert_fp8(sources, vision_inputs, tmp_path):
    ref, src = sources["vision_tf_per_expert_fp8"]
    assert _err(from_pretrained(src, dtype="float32"), ref, vision_inputs) < TOL
    dst = convert(src, tmp_path / "f8", dtype="float8", quiet=True)
    mesh = make_mesh(expert=4, tensor=2)
    assert _err(from_pretrained(dst, dtype="float32", mesh=mesh), ref, vision_inputs) < TOL
    # E4M3 weights stay exact; the dense layer (not FP8 in these files) is quantised per output column
    want = _quantized(ref, DENSE_MLP)
    assert _err(from_pretrained(dst, dtype="float32", mesh=mesh, weights="fp8"), want, vision_inputs) < QTOL


def test_text_native_fp8_plain_q_dense_layer_tied(sources, text_inputs, tmp_path):
    """Native `attention.wq` (q_lora_rank 0 in params.json) and `feed_forward.w*` of a dense layer, no `output`."""
    ref, src = sources["text_native_fp8"]
    assert _err(from_pretrained(src, dtype="float32"), ref, text_inputs) < TOL
    assert _err(from_pretrained(src, dtype="float32", weights="fp8"), ref, text_inputs) < TOL  # E4M3 kept exactly
    f8 = convert(src, tmp_path / "f8", dtype="float8", quiet=True)
    assert _err(from_pretrained(f8, dtype="float32", weights="fp8", mesh=make_mesh(expert=8)), ref, text_inputs) < TOL
    bf = convert(src, tmp_path / "bf16", dtype="bfloat16", quiet=True)
    assert _err(from_pretrained(bf, dtype="float32"), _rounded(ref), text_inputs) < TOL


def test_weights_fp8_of_a_float32_source_is_per_row_e4m3(sources, text_inputs, tmp_path):
    ref, src = sources["text_fp32"]
    want = _quantized(ref)
    assert _err(from_pretrained(src, dtype="float32", weights="fp8"), want, text_inputs) < QTOL
    dst = convert(src, tmp_path / "f32", dtype="float32", quiet=True)
    assert _err(from_pretrained(dst, dtype="float32", weights="fp8"), want, text_inputs) < QTOL
    assert _err(from_pretrained(dst, dtype="float32"), ref, text_inputs) < TOL


def test_a_full_snapshot_with_both_copies_reads_the_hf_side(sources, text_inputs, tmp_path):
    """The released repository ships the HF and the native copy side by side (docs/model.md 2.1). Here the native
    copy holds FP8-rounded weights, so reading it would miss the unrounded reference by far more than TOL."""
    ref, hf = sources["text_fp32"]
    _, native = sources["text_native_fp8"]
    snap = tmp_path / "snapshot"
    shutil.copytree(hf, snap)
    for f in native.iterdir():
        if f.name == "params.json" or f.name.startswith("consolidated"):
            shutil.copy(f, snap / f.name)
    assert _err(from_pretrained(snap, dtype="float32"), ref, text_inputs) < TOL
    dst = convert(snap, tmp_path / "f32", dtype="float32", quiet=True)
    assert _err(from_pretrained(dst, dtype="float32"), ref, text_inputs) < TOL


# ---------------------------------------------------------------------- error paths
@pytest.mark.parametrize("source", ["vision_released_sharded", "text_native_fp8"])
def test_unindexed_missing_shard_is_named(sources, tmp_path, capsys, source):
    """Without an index, a gap in a `-0000i-of-0000n` series names the missing file (not a list of tensors)."""
    _, src = sources[source]
    d = tmp_path / "src"
    d.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".index.json"):
            (d / f.name).symlink_to(f)
    shard = sorted(d.glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard file\\(s\\) missing .*: {shard.name}$"):
        from_pretrained(d)
    assert main([str(d), str(tmp_path / "out"), "--quiet"]) == 2
    assert shard.name in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_overwrite_of_a_file_leaves_nothing_behind(sources, tmp_path):
    _, src = sources["text_fp32"]
    (tmp_path / "out").write_text("not a checkpoint")
    assert main([str(src), str(tmp_path / "out"), "--quiet", "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "mistral4_jax.json").exists()


def test_native_q_lora_rank_zero_is_a_plain_q_proj():
    params = {"dim": 64, "n_layers": 1, "n_heads": 4, "norm_eps": 1e-6, "vocab_size": 256, "q_lora_rank": 0,
              "yarn": {"factor": 8.0, "original_max_position_embeddings": 32}, "moe": {},
              "rope_theta": 10000.0, "llama_4_scaling": {"beta": 0.1}}  # both required (docs/model.md 2.6)
    hf, _ = hf_config_dict(params)
    assert hf["q_lora_rank"] is None
