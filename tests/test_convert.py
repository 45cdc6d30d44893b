"""`mistral4-jax convert`: HF and native checkpoints to Orbax, checked against the transformers reference.

The native checkpoints are written here from a reference model the way Mistral's files are laid out
(docs/model.md 2.3, 2.5): native names, per-expert w1/w2/w3 each with its own FP8 `qscale_weight`, and vision q/k
rows in interleaved-RoPE order (the inverse of transformers' `_permute_for_rope`).
"""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load, save_file as np_save
from safetensors.torch import save_file

import reference as R
from convert import convert, main
from mistral4_jax import CheckpointError, ModelConfig, from_pretrained
from mistral4_jax.demo import synthetic

TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]
SIZES = [(28, 56)]


# ---------------------------------------------------------------------- a native writer (test side)
PREFIXES = [("model.language_model.embed_tokens.", "tok_embeddings."), ("model.language_model.norm.", "norm."),
            ("lm_head.", "output."), ("model.language_model.layers.", "layers."),
            ("model.vision_tower.", "vision_encoder."), ("model.multi_modal_projector.norm.", "pre_mm_projector_norm."),
            ("model.multi_modal_projector.patch_merger.", "patch_merger."),
            ("model.multi_modal_projector.linear_1.", "vision_language_adapter.w_in."),
            ("model.multi_modal_projector.linear_2.", "vision_language_adapter.w_out.")]
INFIXES = [(".input_layernorm.", ".attention_norm."), (".post_attention_layernorm.", ".ffn_norm."),
           (".self_attn.q_a_proj.", ".attention.wq_a."), (".self_attn.q_b_proj.", ".attention.wq_b."),
           (".self_attn.q_a_layernorm.", ".attention.q_a_norm."), (".self_attn.kv_a_layernorm.", ".attention.kv_a_norm."),
           (".self_attn.kv_a_proj_with_mqa.", ".attention.wkv_a_with_mqa."), (".self_attn.kv_b_proj.", ".attention.wkv_b."),
           (".self_attn.o_proj.", ".attention.wo."), (".mlp.gate.", ".gate."), (".mlp.shared_experts.", ".shared_experts."),
           ("attention.q_proj.", "attention.wq."), ("attention.k_proj.", "attention.wk."),
           ("attention.v_proj.", "attention.wv."), ("attention.o_proj.", "attention.wo."),
           ("gate_proj.", "w1."), ("down_proj.", "w2."), ("up_proj.", "w3.")]


def _native_name(name: str) -> str:
    """transformers 5 name -> Mistral-native name (docs/model.md 2.3), written out independently of mistral4_jax."""
    for a, b in PREFIXES:
        if name.startswith(a):
            name = b + name[len(a):]
            break
    for a, b in INFIXES:
        name = name.replace(a, b)
    return name


def _q(w: torch.Tensor):
    s = w.float().abs().max().clamp(min=1e-12) / 448.0
    q = (w.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, s


def save_native(model, path) -> Path:
    """Write `model` (a Mistral3 reference) in the native FP8 layout; `model` becomes the dequantised weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tc, vc = model.config.text_config, model.config.vision_config
    out: dict[str, torch.Tensor] = {}

    def put_fp8(name, w):
        q, s = _q(w)
        out[name] = q.contiguous()
        out[name.replace(".weight", ".qscale_weight")] = s.reshape(())
        out[name.replace(".weight", ".qscale_act")] = torch.tensor(1.0)
        return q.float() * s

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
                    if name.endswith("gate_up_proj"):  # w1 (gate rows) and w3 (up rows), each its own scale
                        deq[e, :half] = put_fp8(f"{base}.{e}.w1.weight", w[e, :half])
                        deq[e, half:] = put_fp8(f"{base}.{e}.w3.weight", w[e, half:])
                    else:
                        deq[e] = put_fp8(f"{base}.{e}.w2.weight", w[e])
                model.get_parameter(name).copy_(deq)
                continue
            nat = _native_name(name)
            if any(f".{k}" in name for k in R.FP8_LINEAR) and name.endswith(".weight"):
                model.get_parameter(name).copy_(put_fp8(nat, w))
            elif nat.startswith("vision_encoder.") and (".attention.wq." in nat or ".attention.wk." in nat):
                heads, d = vc.num_attention_heads, vc.hidden_size // vc.num_attention_heads
                out[nat] = w.view(heads, 2, d // 2, w.shape[1]).transpose(1, 2).reshape(w.shape).contiguous()
            else:
                out[nat] = w.contiguous()
    names = sorted(out)
    save_file({k: out[k] for k in names[: len(names) // 2]}, str(path / "consolidated-00001-of-00002.safetensors"))
    save_file({k: out[k] for k in names[len(names) // 2:]}, str(path / "consolidated-00002-of-00002.safetensors"))
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
                "first_k_dense_replace": 0, "routed_scale": tc.routed_scaling_factor},
        "quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"},
        "vision_encoder": {
            "hidden_size": vc.hidden_size, "intermediate_size": vc.intermediate_size,
            "num_hidden_layers": vc.num_hidden_layers, "num_attention_heads": vc.num_attention_heads,
            "num_channels": 3, "image_size": vc.image_size, "max_image_size": vc.image_size,
            "patch_size": vc.patch_size, "rope_theta": 10000.0, "spatial_merge_size": 2, "image_token_id": 10,
            "image_break_token_id": 12, "image_end_token_id": 13, "adapter_bias": False,
            "mm_projector_id": "patch_merge", "add_pre_mm_projector_layer_norm": True},
    }
    (path / "params.json").write_text(json.dumps(params, indent=2))
    (path / "tekken.json").write_text("{}")
    return path


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def inputs():
    px, isz = R.pixel_batch(SIZES, seed=3)
    return np.asarray([R.image_prompt(SIZES)]), px, isz


def _logits(jm, inputs):
    ids, px, isz = inputs
    return np.asarray(jm(ids, px, isz))


def _assert_same_params(a, b):
    from flax import nnx

    fa, fb = dict(nnx.to_flat_state(nnx.state(a, nnx.Param))), dict(nnx.to_flat_state(nnx.state(b, nnx.Param)))
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = fa[k][...], fb[k][...]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(k))


def _to_bf16(src: Path, dst: Path) -> Path:
    """The same checkpoint with every tensor rounded to bfloat16."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    t = np_load(str(src / "model.safetensors"))
    np_save({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """{case: (reference model, source dir)} for HF fp32 / bf16 / FP8 and native FP8."""
    tmp = tmp_path_factory.mktemp("src")
    base = R.build(R.hf_config(), seed=5)
    out = {"hf_fp32": (base, R.save(base, tmp / "hf_fp32"))}
    (out["hf_fp32"][1] / "tokenizer.json").write_text("{}")
    bf = copy.deepcopy(base)
    with torch.no_grad():
        for p in bf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    out["hf_bf16"] = (bf, _to_bf16(out["hf_fp32"][1], tmp / "hf_bf16"))
    fp8 = copy.deepcopy(base)
    out["hf_fp8"] = (fp8, R.save(fp8, tmp / "hf_fp8", fp8=True))
    nat = copy.deepcopy(base)
    out["native_fp8"] = (nat, save_native(nat, tmp / "native_fp8"))
    return out


# ---------------------------------------------------------------------- conversion matches
@pytest.mark.parametrize("case,dtype", [("hf_fp32", "float32"), ("hf_bf16", "bfloat16"), ("hf_fp8", "float8"),
                                        ("native_fp8", "float8"), ("native_fp8", "float32")])
def test_converted_logits_equal_direct_load_and_reference(cases, inputs, tmp_path, case, dtype):
    ref, src = cases[case]
    dst = convert(src, tmp_path / "out", dtype=dtype, quiet=True)
    restored = from_pretrained(dst, dtype="float32")
    _assert_same_params(restored, from_pretrained(src, dtype="float32"))  # so the logits are equal too
    assert R.rel_err(_logits(restored, inputs), R.logits(ref, *inputs)) < TOL
    meta = json.loads((dst / "mistral4_jax.json").read_text())
    kernel = meta["arrays"]["language_model/layers/mlp/experts/gate_up_proj"]
    if dtype == "float8":
        assert kernel["dtype"] == "float8_e4m3fn" and kernel["scaled"]
        assert meta["arrays"]["lm_head/kernel"]["dtype"] == "float32"  # not FP8 on disk: kept as written
        assert "quantization_config" in json.loads((dst / "config.json").read_text())
    else:
        assert kernel["dtype"] == dtype and not kernel["scaled"]
        assert "quantization_config" not in json.loads((dst / "config.json").read_text())
    if case == "hf_fp32":
        assert (dst / "tokenizer.json").exists()
    if case == "native_fp8":
        assert (dst / "tekken.json").exists()


def test_native_directory_loads_directly_and_keeps_each_expert_scale(cases, inputs):
    """w1 and w3 of an expert have different scales; fusing under one scale would change the weights."""
    ref, src = cases["native_fp8"]
    from mistral4_jax.checkpoints.safetensors_io import SafetensorsFile

    files = [SafetensorsFile(f) for f in sorted(src.glob("consolidated-*.safetensors"))]
    scale = {k: f.get(k) for f in files for k in f.keys() if k.startswith("layers.0.experts.0.w")}
    assert scale["layers.0.experts.0.w1.qscale_weight"] != scale["layers.0.experts.0.w3.qscale_weight"]
    jm = from_pretrained(src, dtype="float32")
    assert R.rel_err(_logits(jm, inputs), R.logits(ref, *inputs)) < TOL
    want = ref.model.language_model.layers[0].mlp.experts.gate_up_proj.detach().numpy()  # [E, 2I, H]
    got = np.asarray(jm.language_model.layers.mlp.experts.gate_up_proj[...])[0]  # [E, H, 2I]
    np.testing.assert_array_equal(got, np.swapaxes(want, 1, 2))


def test_restores_onto_a_mesh(cases, inputs, tmp_path):
    import jax

    from mistral4_jax.sharding import make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (virtual) devices")
    ref, src = cases["hf_fp8"]
    dst = convert(src, tmp_path / "out", dtype="float8", quiet=True)
    jm = from_pretrained(dst, dtype="float32", mesh=make_mesh(expert=8))
    experts = jm.language_model.layers.mlp.experts.gate_up_proj[...]
    assert {s.data.shape[1] for s in experts.addressable_shards} == {1}  # 8 experts over 8 devices
    assert R.rel_err(_logits(jm, inputs), R.logits(ref, *inputs)) < TOL


# ---------------------------------------------------------------------- safe output
@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A tiny model with many layers, so a conversion takes long enough to be killed mid-way."""
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("deep") / "m",
                                      ModelConfig.tiny(num_hidden_layers=24), fp8=True)


def test_killed_conversion_leaves_no_destination_and_rerun_succeeds(deep, tmp_path):
    dst = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "convert", str(deep), str(dst), "--quiet"], env=env, cwd=ROOT,
                            stderr=subprocess.PIPE)
    partial = tmp_path / f".out.partial-{proc.pid}"
    deadline = time.time() + 120
    while not (partial / "params" / "language_model.layers" / "00002").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the conversion never started writing layers"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dst.exists() and partial.exists()
    with pytest.raises(CheckpointError):
        from_pretrained(dst)
    assert main([str(deep), str(dst), "--quiet"]) == 0
    assert not partial.exists()  # the dead run's leftovers are cleaned up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert from_pretrained(dst, dtype="float32") is not None


def test_existing_destination_needs_overwrite(cases, tmp_path, capsys):
    _, src = cases["hf_fp32"]
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep").write_text("x")
    assert main([str(src), str(dst), "--quiet"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (dst / "keep").exists()
    assert main([str(src), str(dst), "--quiet", "--overwrite"]) == 0
    assert not (dst / "keep").exists() and (dst / "mistral4_jax.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert main([str(src), str(src / "sub"), "--quiet"]) == 2
    assert "must not be, contain or lie inside the source" in capsys.readouterr().err


def test_verification_catches_a_wrong_array(cases, tmp_path):
    """`verify` reads the Orbax metadata back: a group whose array has the wrong shape is reported."""
    from mistral4_jax.checkpoints import orbax as ck

    _, src = cases["hf_fp32"]
    dst = convert(src, tmp_path / "out", dtype="float32", quiet=True)
    specs = json.loads((dst / "mistral4_jax.json").read_text())["arrays"]
    assert ck.verify(dst, specs) == []
    specs["language_model/norm/weight"]["shape"] = [65]
    (msg,) = ck.verify(dst, specs)
    assert "params/other" in msg and "language_model/norm/weight" in msg and "[65]" in msg


# ---------------------------------------------------------------------- untrusted input
def _bad(tmp_path, cases, edit):
    _, src = cases["hf_fp32"]
    d = tmp_path / "src"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    edit(d, np_load(str(src / "model.safetensors")))
    return d


def _save(d, tensors, name="model.safetensors"):
    np_save(tensors, str(d / name))


def _truncate(d, t):
    _save(d, t)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage_header(d, t):
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")


def _missing(d, t):
    del t["language_model.model.layers.1.self_attn.o_proj.weight"]
    _save(d, t)


def _duplicate(d, t):
    _save(d, t, "a.safetensors")
    _save(d, {"language_model.model.norm.weight": t["language_model.model.norm.weight"]}, "b.safetensors")


def _wrong_shape(d, t):
    t["language_model.model.layers.0.mlp.gate.weight"] = np.zeros((8, 65), np.float32)
    _save(d, t)


def _pickle(d, t):
    (d / "pytorch_model.bin").write_bytes(b"never unpickled")


def _neither(d, t):
    (d / "config.json").unlink()
    (d / "weights.npz").write_bytes(b"")


@pytest.mark.parametrize("edit,message", [
    (_truncate, r"model\.safetensors: truncated file: tensor '"),
    (_garbage_header, r"model\.safetensors: (corrupt safetensors header|not a readable safetensors file)"),
    (_missing, r"missing tensor for language_model/layers/self_attn/o_proj/kernel \(layer 1\)"),
    (_duplicate, r"tensor 'language_model\.model\.norm\.weight' appears in both .*a\.safetensors and .*b\.safetensors"),
    (_wrong_shape, r"tensor 'language_model\.model\.layers\.0\.mlp\.gate\.weight' in .*model\.safetensors has shape "
                   r"\[8, 65\], expected \[8, 64\]"),
    (_pickle, r"only pickle weight files \(pytorch_model\.bin\).*\.safetensors"),
    (_neither, r"neither an HF checkpoint .* nor a Mistral-native one"),
], ids=["truncated", "corrupt_header", "missing", "duplicate", "wrong_shape", "pickle", "neither"])
def test_bad_input_one_message_and_nothing_written(cases, tmp_path, capsys, edit, message):
    src = _bad(tmp_path, cases, edit)
    dst = tmp_path / "out"
    assert main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mistral4-jax convert: error: ")
    assert __import__("re").search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli_subcommand_exit_code(cases, tmp_path):
    """`mistral4-jax convert` is the same command; a bad source exits non-zero with the message."""
    d = tmp_path / "src"
    d.mkdir()
    (d / "model.pt").write_bytes(b"x")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "mistral4_jax", "convert", str(d), str(tmp_path / "out")],
                       env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "only pickle weight files (model.pt)" in r.stderr
    assert not (tmp_path / "out").exists()


def test_convert_commands_keep_jax_on_the_host(tmp_path):
    """Both spellings of the command set JAX_PLATFORMS=cpu before jax is imported (jax reads it then), so
    conversion never claims an accelerator; building the parser imports no jax at all."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    src, dst = str(tmp_path / "none"), str(tmp_path / "out")
    # each: set up without jax, then run the command on a missing source (exit 2 after its imports)
    for setup, command in (("import mistral4_jax.cli as cli; cli.build_parser()",
                            f"cli.main(['convert', {src!r}, {dst!r}])"),
                           ("import convert", f"convert.main([{src!r}, {dst!r}])")):
        script = (f"import sys; {setup}\nearly = 'jax' in sys.modules\nrc = {command}\n"
                  "import jax; print(early, rc, jax.config.jax_platforms)")
        r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True)
        assert r.stdout.split() == ["False", "2", "cpu"], (setup, r.stdout, r.stderr[-2000:])
        assert r.stderr.startswith("mistral4-jax convert: error: "), r.stderr
    from mistral4_jax import cli
    from mistral4_jax.checkpoints.convert import DTYPES

    assert cli.CONVERT_DTYPES == DTYPES
