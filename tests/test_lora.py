"""LoRA over a quantised (FP8, NVFP4) base: exact gradients, training from the command line, sharding, the merged
export, and the settings that refuse it (full fine-tuning, a resume with another base)."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
from flax import nnx

from mistral4_jax import InputError, from_pretrained
from mistral4_jax.config import ModelConfig
from mistral4_jax.demo import synthetic
from mistral4_jax.demo.synthetic_tokenizer import write_tekken
from mistral4_jax.model import weights
from mistral4_jax.model.fp8 import Fp8Weight
from mistral4_jax.model.nvfp4 import Nvfp4Weight
from mistral4_jax.sharding import make_mesh
from mistral4_jax.text.images import ImageConfig
from mistral4_jax.train import LoRAConfig, TrainConfig, Trainer, loss_fn, merge_adapters, tokenize_record
from mistral4_jax.train.lora import apply_adapters, init_adapters

CFG = ModelConfig.tiny(vocab_size=256).replace(vision=None)
ALL = ("attention", "shared_experts", "experts")
F32_U = 2.0**-24  # float32 unit roundoff


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    """A tiny checkpoint stored as the released one is: E4M3 projections and experts, per-tensor scales."""
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("lora_fp8") / "m", CFG, fp8=True)


def _examples(n=8, t=16, seed=0):
    g = np.random.default_rng(seed)
    return [tokenize_record({"ids": [1] + g.integers(20, 256, t - 1).tolist()}, None) for _ in range(n)]


@functools.partial(jax.jit, static_argnums=(3, 4))
def _loss_and_grads(adapters, base, batch, graphdef, cfg):
    """Loss and adapter gradients over `base`, one jitted function for the module: the two dense-base programs
    below (the plain float32 load, the dequantised hybrid state) are one program, compiled once."""
    return jax.value_and_grad(lambda a: loss_fn(a, base, batch, graphdef, cfg)[0])(adapters)


def _random_b(adapters, seed=0, std=0.1):
    """The adapters with B random (at init B = 0, where dL/dA = 0 and W_eff = W: a check would see too little)."""
    g = np.random.default_rng(seed)
    return {k: {"a": v["a"], "b": (std * g.standard_normal(v["b"].shape)).astype(np.float32)}
            for k, v in adapters.items()}


def test_lora_gradients_over_an_fp8_base_equal_those_over_the_dequantised_base(fp8_dir):
    """weights="fp8" keeps E4M3 bits and per-column scales and multiplies them where a kernel is read; the plain
    float32 load multiplies the same two numbers once when it reads the file. An E4M3 value is exact in float32,
    so both kernels are the one rounded float32 product (checked bit for bit) and the two programs differ only in
    where XLA places that product. Then the gradients may differ by float32 reassociation alone: a reordered sum
    of n terms moves by at most n * u of their magnitudes, with n the longest contraction here (vocab 256)."""
    quantised = from_pretrained(fp8_dir, dtype="float32", weights="fp8")
    plain = from_pretrained(fp8_dir, dtype="float32")
    gq, pq = nnx.split(quantised, nnx.Param)
    gp, pp = nnx.split(plain, nnx.Param)
    kinds = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(pq)
             if isinstance(v.get_value(), Fp8Weight)}
    assert len(kinds) == 10  # 5 attention projections, 3 shared-expert ones, 2 expert stacks (layers stacked)
    dense = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(pp)}
    for k, w in kinds.items():
        np.testing.assert_array_equal(np.asarray(w.dense()), np.asarray(dense[k]))
    lora = LoRAConfig(rank=3, alpha=6.0, targets=ALL)
    cfg = TrainConfig(steps=1, lora=lora)
    adapters = _random_b(init_adapters(pq, lora, jax.random.key(0)))
    g = np.random.default_rng(1)
    ids = g.integers(20, 256, (2, 12))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "targets": g.random((2, 12)) < 0.7}
    lq, grads_q = _loss_and_grads(adapters, pq, batch, gq, cfg)
    lp, grads_p = _loss_and_grads(adapters, pp, batch, gp, cfg)
    tol = CFG.text.vocab_size * F32_U
    assert abs(float(lq) - float(lp)) <= tol * float(lp)
    assert set(grads_q) == set(adapters) == set(kinds)
    for k in adapters:
        for ab in "ab":
            a, b = np.asarray(grads_q[k][ab]), np.asarray(grads_p[k][ab])
            assert np.abs(b).max() > 0, (k, ab)
            assert np.abs(a - b).max() <= tol * np.abs(b).max(), (k, ab)


def test_lora_gradients_over_nvfp4_experts_equal_those_over_the_dequantised_base(fp8_dir):
    """weights="hybrid": the routed experts quantised to NVFP4 at load, the other projections FP8. Against the same
    state with every kind replaced by its float32 `dense()` (the dequantised base), the two programs differ only
    in where XLA forms the kernels: float32 reassociation, as above."""
    quantised = from_pretrained(fp8_dir, dtype="float32", weights="hybrid")
    gq, pq = nnx.split(quantised, nnx.Param)
    kinds = {"/".join(map(str, k)): type(v.get_value()) for k, v in nnx.to_flat_state(pq)
             if weights.is_kind(v.get_value())}
    assert sorted(p for p, k in kinds.items() if k is Nvfp4Weight) == [
        "language_model/layers/mlp/experts/down_proj", "language_model/layers/mlp/experts/gate_up_proj"]
    assert sum(k is Fp8Weight for k in kinds.values()) == 8
    pp = nnx.from_flat_state([(k, v.replace(weights.dense(v.get_value()))) for k, v in nnx.to_flat_state(pq)])
    lora = LoRAConfig(rank=3, alpha=6.0, targets=ALL)
    cfg = TrainConfig(steps=1, lora=lora, weights="hybrid")
    adapters = _random_b(init_adapters(pq, lora, jax.random.key(0)))
    g = np.random.default_rng(1)
    ids = g.integers(20, 256, (2, 12))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "targets": g.random((2, 12)) < 0.7}
    lq, grads_q = _loss_and_grads(adapters, pq, batch, gq, cfg)
    # the dense base as in the test above (TrainConfig.weights tells `finetune` how to load; the loss ignores it)
    lp, grads_p = _loss_and_grads(adapters, pp, batch, gq, dataclasses.replace(cfg, weights=None))
    tol = CFG.text.vocab_size * F32_U
    assert abs(float(lq) - float(lp)) <= tol * float(lp)
    assert set(grads_q) == set(kinds)
    for k in adapters:
        for ab in "ab":
            a, b = np.asarray(grads_q[k][ab]), np.asarray(grads_p[k][ab])
            assert np.abs(b).max() > 0, (k, ab)
            assert np.abs(a - b).max() <= tol * np.abs(b).max(), (k, ab)


def test_the_weights_setting_is_from_pretrained_s_vocabulary():
    """TrainConfig.weights and `finetune --weights` take `from_pretrained(weights=...)`'s presets; "dense" holds
    plain parameters, so full fine-tuning over it is allowed."""
    from mistral4_jax import cli
    from mistral4_jax.checkpoints import scheme

    assert set(cli.WEIGHTS) == set(scheme.PRESETS)
    for w in ("fp8", "nvfp4", "hybrid"):
        TrainConfig(steps=1, weights=w, lora=LoRAConfig())
        with pytest.raises(InputError, match="only LoRA adapters"):
            TrainConfig(steps=1, weights=w)
    TrainConfig(steps=1, weights="dense")
    for bad in ("int4", {"experts": "nvfp4"}):
        with pytest.raises(InputError, match="weights must be None or one of"):
            TrainConfig(steps=1, weights=bad, lora=LoRAConfig())


RUN = TrainConfig(steps=2, lr=1e-2, warmup_steps=0, batch_size=4, max_len=16, weights="fp8",
                  lora=LoRAConfig(rank=2, alpha=4.0, targets=ALL))


@pytest.fixture(scope="module")
def fp8_run(fp8_dir, tmp_path_factory):
    """(trainer, per-step losses) of a short one-device LoRA run over the FP8 base (shared: one compile)."""
    tr = Trainer(from_pretrained(fp8_dir, dtype="float32", weights="fp8"), _examples(), RUN,
                 tmp_path_factory.mktemp("lora_run") / "run")
    return tr, [m["loss"] for m in tr.run(progress=False)]


def test_trainer_over_fp8_keeps_the_base_packed_and_its_merged_export_equals_the_adapted_model(fp8_run, tmp_path):
    tr, _ = fp8_run
    lora = RUN.lora
    assert sum(isinstance(v.get_value(), Fp8Weight) for _, v in nnx.to_flat_state(tr.frozen)) == 10
    adapted = apply_adapters(tr.frozen, tr.state["trainable"], lora.scale)
    ids = np.asarray([[1, 5, 30, 40, 50, 60, 70]])
    want = np.asarray(nnx.merge(tr.graphdef, adapted)(ids))
    # merge_adapters: adapted kernels become plain float32 arrays, the others stay FP8
    merged = merge_adapters(tr.frozen, tr.state["trainable"], lora.scale)
    kinds = [type(v.get_value()).__name__ for p, v in nnx.to_flat_state(merged) if "/".join(map(str, p)) in tr.state[
        "trainable"]]
    assert set(kinds) == {"ArrayImpl"}
    np.testing.assert_allclose(np.asarray(nnx.merge(tr.graphdef, merged)(ids)), want, rtol=0, atol=1e-6)
    # the merged export dequantises the base and writes W + s A @ B: the same model, with no FP8 left
    out = tr.export(tmp_path / "merged")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    got = from_pretrained(out, dtype="float32")
    assert not any(weights.is_kind(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(got, nnx.Param)))
    np.testing.assert_allclose(np.asarray(got(ids)), want, rtol=0, atol=1e-6)


def test_full_finetuning_over_a_quantised_base_is_refused(fp8_dir, tmp_path):
    with pytest.raises(InputError, match="only LoRA adapters"):
        TrainConfig(steps=1, weights="fp8")
    model = from_pretrained(fp8_dir, dtype="float32", weights="fp8")
    with pytest.raises(InputError, match="full fine-tuning .* is a quantised Fp8Weight"):
        Trainer(model, _examples(), TrainConfig(steps=1), tmp_path / "full")


def test_lora_step_over_fp8_on_a_mesh_equals_one_device(fp8_dir, fp8_run, tmp_path):
    """Expert and tensor axes both split the FP8 base (an FP8 scale's size-1 input axis cannot be split: each
    leaf gets its own sharding). The loss of a batch sums 4 x 15 per-token terms: the gamma_n bound."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (virtual) devices")
    mesh = make_mesh(4, tensor=2)
    model = from_pretrained(fp8_dir, dtype="float32", weights="fp8", mesh=mesh)
    tr = Trainer(model, _examples(), RUN, tmp_path / "mesh", mesh=mesh)
    losses = [fp8_run[1], [m["loss"] for m in tr.run(progress=False)]]
    n_summed = RUN.batch_size * 15
    for a, b in zip(*losses):
        assert abs(a - b) <= n_summed * F32_U * a, losses


# ---------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny FP8 checkpoint with a tokenizer and two lines of text, as the released model is laid out."""
    d = tmp_path_factory.mktemp("lora_cli") / "hf"
    cfg = ModelConfig.tiny()
    synthetic.write_checkpoint(d, cfg, fp8=True)
    write_tekken(d, vocab_size=cfg.text.vocab_size, image_config=ImageConfig.from_model_config(cfg))
    (d.parent / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in (
        "The capital of France is Paris.", "Beautiful is better than ugly.")))
    return d


def test_cli_lora_over_fp8_lowers_the_loss_and_writes_a_peft_adapter(released, tmp_path, capsys):
    from mistral4_jax.cli import main

    out = tmp_path / "out"
    argv = ["finetune", "--model", str(released), "--data", str(released.parent / "train.jsonl"), "--steps", "8",
            "--lr", "1e-2", "--batch-size", "2", "--max-len", "32", "--out", str(out), "--weights", "fp8",
            "--lora-rank", "8", "--lora-targets", "attention"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "over the fp8 base" in said and "adapter=" in said
    losses = [json.loads(ln)["loss"] for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 16.0)
    assert config["base_model_name_or_path"] == str(released)
    assert not (out / "config.json").exists()  # over a quantised base the merged copy is asked for (--merged)
    # the adapter loads over the FP8 base and changes the model
    model = from_pretrained(released, dtype="bfloat16", weights="fp8", adapter=out / "adapter")
    base = from_pretrained(released, dtype="bfloat16", weights="fp8")
    ids = np.asarray([[1, 20, 30, 40, 50]])
    assert np.abs(np.asarray(model(ids), np.float32) - np.asarray(base(ids), np.float32)).max() > 0
    # a resumed run must load the base the same way
    assert main(argv[:-6] + ["--lora-rank", "8", "--lora-targets", "attention"]) == 2
    assert "other settings" in capsys.readouterr().err
    # full fine-tuning over a quantised base is refused before anything is loaded
    assert main(argv[:-4] + ["--out", str(tmp_path / "full")]) == 2
    assert "only LoRA adapters" in capsys.readouterr().err


def test_cli_merged_export_over_fp8_on_request(released, tmp_path):
    """--merged writes the dequantised base with the adapters merged (float32 here, so both forms hold the same
    W + s A @ B): the same logits as the FP8 base with the adapter, up to float32 rounding."""
    from mistral4_jax.cli import main

    out = tmp_path / "out"
    argv = ["finetune", "--model", str(released), "--data", str(released.parent / "train.jsonl"), "--steps", "2",
            "--lr", "1e-2", "--warmup-steps", "0", "--batch-size", "2", "--max-len", "32", "--out", str(out),
            "--weights", "fp8", "--lora-rank", "2", "--dtype", "float32", "--merged"]
    assert main(argv) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "tekken.json").is_file()
    ids = np.asarray([[1, 20, 30, 40, 50]])
    merged = np.asarray(from_pretrained(out, dtype="float32")(ids))
    adapted = np.asarray(from_pretrained(released, dtype="float32", weights="fp8", adapter=out / "adapter")(ids))
    base = np.asarray(from_pretrained(released, dtype="float32", weights="fp8")(ids))
    assert np.abs(adapted - base).max() > 1e-3  # the adapters changed the model
    np.testing.assert_allclose(merged, adapted, rtol=0, atol=1e-5 * np.abs(adapted).max())


def test_a_checkpoint_from_before_the_weights_setting_resumes(tmp_path):
    """Settings added since a checkpoint was written count as their defaults when it is resumed."""
    from mistral4_jax.train.trainer import _run_config, _with_defaults

    cfg = TrainConfig(steps=2, lora=LoRAConfig())
    old = {k: v for k, v in _run_config(cfg).items() if k != "weights"}
    assert _with_defaults(old) == _run_config(cfg)
    assert _with_defaults(old) != _run_config(dataclasses.replace(cfg, weights="fp8"))
