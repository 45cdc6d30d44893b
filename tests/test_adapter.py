"""PEFT LoRA adapters against peft itself (pinned in the test extra) on the transformers reference: ours load in
peft and give our logits; peft's load in ours and give peft's logits; unsupported ones are refused by name.

The reference has a dense first layer, so every LoRA target group (attention, shared experts, routed experts
through peft's `target_parameters`, the dense layer's MLP) and both layer stacks are covered."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model

import reference as R
from mistral4_jax import CheckpointError, from_pretrained
from mistral4_jax.checkpoints.adapter import CONFIG_FILE, WEIGHTS_FILE, save_adapter
from mistral4_jax.checkpoints.save import hf_tensors
from mistral4_jax.model.lora import LoRAWeight
from mistral4_jax.sharding import make_mesh
from mistral4_jax.train import LoRAConfig
from mistral4_jax.train.lora import init_adapters

TEXT = dict(first_k_dense_replace=1, num_hidden_layers=3)
TOL = 1e-5  # float32 throughout
IDS = np.asarray([[1, 3, 30, 40, 4, 50, 60, 70, 80, 90], [1, 7, 21, 22, 23, 24, 25, 26, 27, 28]])
ALL = ("attention", "shared_experts", "experts", "dense_mlp")


@nnx.jit
def _logits(model, ids):
    """model(ids) as one compiled program: the eager forward compiles its layer scans again on every call, the
    jitted one once per model structure (models with the same parameter types and shardings share it)."""
    return model(ids)


def _fwd(model) -> np.ndarray:
    return np.asarray(_logits(model, jnp.asarray(IDS)))


def _random_adapters(params, lora, g) -> dict:
    """Adapters of init_adapters' structure and shapes (traced only, nothing compiled), both factors random:
    A with init_adapters' std 1/sqrt(in), B with std 0.2 (not zero, so that the adapter changes the logits)."""
    shapes = jax.eval_shape(lambda: init_adapters(params, lora, jax.random.key(0)))
    return {k: {"a": jnp.asarray(g.standard_normal(v["a"].shape) / np.sqrt(v["a"].shape[-2]), jnp.float32),
                "b": jnp.asarray(0.2 * g.standard_normal(v["b"].shape), jnp.float32)} for k, v in shapes.items()}


def _ref(seed: int):
    return R.build(R.hf_config(text=TEXT), seed=seed)


@pytest.fixture(scope="module", params=["bf16", "fp8"])
def base(request, tmp_path_factory):
    """(checkpoint dir, our from_pretrained weights= argument, seed): reference weights stored plain, or in the
    released FP8 layout (per-tensor scales) and loaded with weights="fp8"."""
    seed = 11
    d = R.save(_ref(seed), tmp_path_factory.mktemp(f"adapter_{request.param}"), fp8=request.param == "fp8")
    return d, ("fp8" if request.param == "fp8" else None), seed


def _reference_holding(model, seed: int):
    """The reference model with exactly `model`'s base weights (written through our export names): with
    weights="fp8" those are the E4M3 values times their scales, and the dense layer's MLP, which the file stores
    unquantised, quantised per column as weights="fp8" loads it."""
    ref = _ref(seed)
    sd = {name: torch.from_numpy(np.asarray(x, np.float32)) for name, x in hf_tensors(nnx.state(model, nnx.Param),
                                                                                        model.config)}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    return ref


def _lora_modules(peft_model) -> set[str]:
    return {n.removeprefix("base_model.model.").replace(".base_layer", "") for n, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and len(m.lora_A)}


def test_our_adapter_loads_in_peft_with_our_logits(base, tmp_path):
    d, weights, seed = base
    model = from_pretrained(d, dtype="float32", weights=weights)
    lora = LoRAConfig(rank=3, alpha=5.0, targets=ALL)
    params = nnx.state(model, nnx.Param)
    adapters = _random_adapters(params, lora, np.random.default_rng(3))
    out = save_adapter(adapters, lora.rank, lora.alpha, model.config, tmp_path / "adapter", base_model=str(d))
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert not list(tmp_path.glob(".adapter*"))  # written under a temporary name, renamed into place

    ref = _reference_holding(model, seed)
    base_logits = R.logits(ref, IDS)
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(ref, str(out))
    # peft wrapped exactly the modules we adapted: 5 attention projections x 3 layers, 3 shared-expert ones x 2,
    # the dense layer's 3, and the experts of the 2 MoE layers (two nested parameter wrappers on one module)
    mods = _lora_modules(peft_model)
    assert len(mods) == 15 + 6 + 3 + 2 and not any("vision" in m for m in mods), sorted(mods)
    want = R.logits(peft_model, IDS)
    assert R.rel_err(want, base_logits) > 1e-2  # the adapter matters

    ours = from_pretrained(d, dtype="float32", weights=weights, adapter=out)
    kinds = {type(v.get_value()).__name__ for _, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    assert ("LoRAWeight" in kinds) == (weights == "fp8")  # an FP8 base stays FP8; a plain one is merged
    if weights == "fp8":
        lw = ours.language_model.layers.mlp.experts.gate_up_proj.get_value()
        assert isinstance(lw, LoRAWeight) and type(lw.w).__name__ == "Fp8Weight"
    got = _fwd(ours)
    assert R.rel_err(got, want) < TOL
    # the in-memory adapters (as training applies them) give the same logits
    from mistral4_jax.train.lora import apply_adapters

    graphdef, p = nnx.split(model, nnx.Param)
    trained = nnx.merge(graphdef, apply_adapters(p, adapters, lora.scale))
    assert R.rel_err(_fwd(trained), got) < TOL


@pytest.mark.parametrize("case", ["all", "down_only_rslora"])
def test_a_peft_adapter_loads_in_ours_with_peft_logits(base, tmp_path, case):
    d, weights, seed = base
    ref = _reference_holding(from_pretrained(d, dtype="float32", weights=weights), seed)
    if case == "all":
        cfg = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                         target_modules=["self_attn.q_a_proj", "self_attn.kv_b_proj", "self_attn.o_proj",
                                         "shared_experts.down_proj", "mlp.up_proj"],
                         target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"])
    else:  # one expert parameter: its wrapper is the only one (no `.base_layer`); rsLoRA's alpha / sqrt(r)
        cfg = LoraConfig(r=4, lora_alpha=3, init_lora_weights=False, use_rslora=True, target_modules=[],
                         target_parameters=["experts.down_proj"])
    torch.manual_seed(5)
    peft_model = get_peft_model(ref, cfg)
    with torch.no_grad():  # peft's random B is small: make the update visible in the logits
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.mul_(3.0)
    want = R.logits(peft_model, IDS)
    peft_model.save_pretrained(tmp_path / "peft")
    got = _fwd(from_pretrained(d, dtype="float32", weights=weights, adapter=tmp_path / "peft"))
    base_logits = _fwd(from_pretrained(d, dtype="float32", weights=weights))
    assert R.rel_err(want, base_logits) > 1e-3
    assert R.rel_err(got, want) < TOL


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(a plain checkpoint, an adapter of ours for it)."""
    d = R.save(_ref(12), tmp_path_factory.mktemp("refused"))
    model = from_pretrained(d, dtype="float32")
    lora = LoRAConfig(rank=2, alpha=4.0, targets=("attention", "experts"))
    adapters = _random_adapters(nnx.state(model, nnx.Param), lora, np.random.default_rng(4))
    return d, save_adapter(adapters, 2, 4.0, model.config, tmp_path_factory.mktemp("good") / "adapter")


@pytest.mark.parametrize("weights", [None, "fp8"])
def test_an_adapter_loads_onto_a_mesh(good, weights):
    """Factors split like their weight over (expert 4, tensor 2); merged into a plain base, kept beside FP8."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (virtual) devices")
    d, src = good
    want = _fwd(from_pretrained(d, dtype="float32", weights=weights, adapter=src))
    assert R.rel_err(want, _fwd(from_pretrained(d, dtype="float32", weights=weights))) > 1e-2
    model = from_pretrained(d, dtype="float32", weights=weights, adapter=src, mesh=make_mesh(4, tensor=2))
    experts = model.language_model.layers.mlp.experts.gate_up_proj.get_value()
    a = experts.a if weights else experts
    assert a.sharding.spec[1] == "expert"
    assert R.rel_err(_fwd(model), want) < TOL


@pytest.mark.parametrize("field,value", [("use_dora", True), ("bias", "all"), ("rank_pattern", {"o_proj": 4}),
                                         ("alpha_pattern", {"o_proj": 4}), ("modules_to_save", ["lm_head"]),
                                         ("peft_type", "IA3"), ("init_lora_weights", "pissa"), ("r", 0)])
def test_unsupported_adapter_settings_are_refused_naming_the_field(good, tmp_path, field, value):
    d, src = good
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / CONFIG_FILE).read_text())
    cfg[field] = value
    (bad / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=field):
        from_pretrained(d, dtype="float32", adapter=bad)


def test_adapters_for_modules_we_do_not_adapt_are_refused_naming_the_tensor(good, tmp_path):
    from safetensors.numpy import load_file, save_file

    d, src = good
    tensors = load_file(str(src / WEIGHTS_FILE))
    for module, shapes in [("model.vision_tower.transformer.layers.0.attention.q_proj", ((2, 32), (32, 2))),
                           ("lm_head", ((2, 64), (256, 2))), ("model.language_model.layers.1.mlp.gate", ((2, 64), (8, 2))),
                           ("model.language_model.layers.0.self_attn.nope", ((2, 64), (64, 2)))]:
        bad = tmp_path / module.replace(".", "_")
        shutil.copytree(src, bad)
        extra = {f"base_model.model.{module}.lora_A.weight": np.zeros(shapes[0], np.float32),
                 f"base_model.model.{module}.lora_B.weight": np.zeros(shapes[1], np.float32)}
        save_file({**tensors, **extra}, str(bad / WEIGHTS_FILE))
        with pytest.raises(CheckpointError, match=f"adapts {module}, which"):
            from_pretrained(d, dtype="float32", adapter=bad)
    # a factor without its partner, and a rank other than the config's
    key = next(k for k in tensors if k.endswith("o_proj.lora_B.weight"))
    for name, changed in [("half", {k: v for k, v in tensors.items() if k != key}),
                          ("rank", {**tensors, key: np.zeros((tensors[key].shape[0], 3), np.float32)})]:
        bad = tmp_path / name
        shutil.copytree(src, bad)
        save_file(changed, str(bad / WEIGHTS_FILE))
        with pytest.raises(CheckpointError, match="lora_A but not lora_B" if name == "half" else "expected"):
            from_pretrained(d, dtype="float32", adapter=bad)
