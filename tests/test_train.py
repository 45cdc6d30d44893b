"""Fine-tuning: data handling, the sharded step, overfitting (full and LoRA), exact resume, the CLI."""

import dataclasses
import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference as R
from mistral4_jax import InputError, from_pretrained
from mistral4_jax.config import ModelConfig
from mistral4_jax.model.mistral3 import Mistral3ForConditionalGeneration
from mistral4_jax.sharding import make_mesh
from mistral4_jax.train import LoRAConfig, TrainConfig, Trainer, load_examples, tokenize_record
from mistral4_jax.train.data import BOS, EOS, END_INST, INST, make_batch

CFG = ModelConfig.tiny(vocab_size=256).replace(vision=None)


def _model(seed=0):
    return Mistral3ForConditionalGeneration(CFG, jnp.float32, rngs=nnx.Rngs(seed))


def _examples(n=8, t=16, seed=0):
    g = np.random.default_rng(seed)
    return [tokenize_record({"ids": [BOS] + g.integers(20, 256, t - 1).tolist()}, None) for _ in range(n)]


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


# ---------------------------------------------------------------------- data
def test_chat_targets_are_the_assistant_turns():
    ex = tokenize_record({"messages": [{"role": "system", "content": [40]}, {"role": "user", "content": [50, 51]},
                                       {"role": "assistant", "content": [60, 61]}, {"role": "user", "content": [52]},
                                       {"role": "assistant", "content": [62]}]}, None)
    assert ex.ids.tolist() == [BOS, 17, 40, 18, INST, 50, 51, END_INST, 60, 61, EOS, INST, 52, END_INST, 62, EOS]
    assert ex.ids[ex.targets].tolist() == [60, 61, EOS, 62, EOS]


def test_text_goes_through_the_tokenizer():
    class Chars:  # any object with encode(text, add_bos) plugs in
        def encode(self, text, add_bos=False):
            return [BOS] * add_bos + [100 + ord(c) - ord("a") for c in text]

    ex = tokenize_record({"text": "abc"}, Chars())
    assert ex.ids.tolist() == [BOS, 100, 101, 102] and ex.targets.tolist() == [False, True, True, True]
    chat = tokenize_record({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                           Chars())
    assert chat.ids.tolist() == [BOS, INST, 100, END_INST, 101, EOS]


def test_bad_data_is_refused_with_the_line(tmp_path):
    with pytest.raises(InputError, match="empty"):
        load_examples(_write(tmp_path / "empty.jsonl", ["", "  "]), None, 32)
    with pytest.raises(InputError, match=r"bad.jsonl:2: no 'messages', 'text' or 'ids'"):
        load_examples(_write(tmp_path / "bad.jsonl", [{"ids": [1, 2]}, {"prompt": "x"}]), None, 32)
    with pytest.raises(InputError, match=r"json.jsonl:1: not valid JSON"):
        load_examples(_write(tmp_path / "json.jsonl", ["{nope"]), None, 32)
    with pytest.raises(InputError, match="needs a tokenizer"):
        load_examples(_write(tmp_path / "text.jsonl", [{"text": "hello"}]), None, 32)
    with pytest.raises(InputError, match=r"vocab.jsonl:1: token id outside the vocabulary \[0, 256\)"):
        load_examples(_write(tmp_path / "vocab.jsonl", [{"ids": [1, 300]}]), None, 32, vocab_size=256)
    with pytest.raises(InputError, match=r"role 'tool' is not supported"):
        tokenize_record({"messages": [{"role": "tool", "content": [1]}]}, None)


def test_long_sequences_are_truncated_with_a_warning(tmp_path):
    path = _write(tmp_path / "long.jsonl", [{"ids": list(range(1, 41))}, {"ids": [1, 5, 6]}])
    with pytest.warns(UserWarning, match="1 sequence.*longer than max_len=32.*truncated"):
        ex = load_examples(path, None, 32)
    assert [len(e.ids) for e in ex] == [32, 3] and ex[0].ids.tolist() == list(range(1, 33))


# ---------------------------------------------------------------------- the step
def test_step_on_8_devices_equals_1_device(tmp_path):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (virtual) devices")
    cfg = TrainConfig(steps=3, lr=1e-2, warmup_steps=0, batch_size=8, max_len=16)
    results = []
    for n in (1, 8):
        tr = Trainer(_model(), _examples(), cfg, tmp_path / f"d{n}", mesh=make_mesh(expert=n))
        m = tr.train_step()
        experts = tr.state["trainable"]["language_model"]["layers"]["mlp"]["experts"]["gate_up_proj"].get_value()
        assert {s.data.shape[1] for s in experts.addressable_shards} == {8 // n}  # split over the mesh
        results.append((m, jax.tree.map(np.asarray, tr.state["trainable"])))
    (m1, p1), (m8, p8) = results
    assert abs(m1["loss"] - m8["loss"]) / m1["loss"] < 1e-6
    assert abs(m1["grad_norm"] - m8["grad_norm"]) / m1["grad_norm"] < 1e-5
    init = jax.tree.map(np.asarray, nnx.state(_model(), nnx.Param))
    for (path, a), (_, b), (_, c) in zip(*(nnx.to_flat_state(t) for t in (p1, p8, init))):
        a, b, c = a.get_value(), b.get_value(), c.get_value()
        assert np.abs(a - c).max() > 0, path  # the step moved it
        assert R.rel_err(b - c, a - c) < 1e-4, path  # and moved it the same way on both meshes


# ---------------------------------------------------------------------- overfitting and resuming
def test_full_finetune_overfits_and_resumes_exactly(tmp_path):
    cfg = TrainConfig(steps=60, lr=3e-3, batch_size=8, max_len=16)
    tr = Trainer(_model(), _examples(), cfg, tmp_path / "a", save_every=20)
    hist = tr.run(progress=False)
    losses = [m["loss"] for m in hist]
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    # a run stopped at step 40 (keep that checkpoint, drop the final one) and resumed in a new Trainer
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "60")
    resumed = Trainer(_model(seed=7), _examples(), cfg, tmp_path / "b", save_every=20)  # other init: restored over
    assert resumed.restore() and resumed.step == 40 and resumed.position == 320
    again = [m["loss"] for m in resumed.run(progress=False)]
    assert again == losses[40:]
    logged = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 61))  # the log was cut back to the checkpoint, then continued
    # the loss chunk changes memory, not results: another value resumes; another learning rate does not
    chunked = Trainer(_model(seed=7), _examples(), dataclasses.replace(cfg, loss_chunk=3), tmp_path / "b")
    assert chunked.restore() and chunked.step == 60
    with pytest.raises(InputError, match="other settings"):
        Trainer(_model(seed=7), _examples(), dataclasses.replace(cfg, lr=1e-3), tmp_path / "b").restore()


def test_lora_overfits_and_the_merged_export_loads(tmp_path):
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("attention", "shared_experts", "experts"))
    cfg = TrainConfig(steps=60, lr=1e-2, batch_size=8, max_len=16, lora=lora)
    base = _model()
    # a head as confident as a trained model's (at init, |logits| < 2: no adapter could overfit through it)
    base.lm_head.kernel[...] = base.lm_head.kernel[...] * 10
    base_params = jax.tree.map(np.asarray, nnx.state(base, nnx.Param))
    tr = Trainer(base, _examples(), cfg, tmp_path / "lora")
    losses = [m["loss"] for m in tr.run(progress=False)]
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    for (_, a), (_, b) in zip(nnx.to_flat_state(tr.frozen), nnx.to_flat_state(base_params)):
        np.testing.assert_array_equal(a.get_value(), b.get_value())  # the base stayed frozen
    out = tr.export()
    merged = from_pretrained(out, dtype="float32")
    batch = tr.next_batch()
    from mistral4_jax.train.step import masked_cross_entropy
    got, _ = masked_cross_entropy(merged(batch["input_ids"], attention_mask=batch["attention_mask"]),
                                  batch["input_ids"], batch["targets"])
    assert abs(float(got) - losses[-1]) < 0.5 * losses[0]  # the merged model kept what the adapters learnt
    from mistral4_jax.train.step import loss_fn
    with_adapters = loss_fn(tr.state["trainable"], tr.frozen, batch, tr.graphdef, cfg)[1][0]
    assert abs(float(got) - float(with_adapters)) < 1e-4 * float(with_adapters)


# ---------------------------------------------------------------------- the command
def test_cli_finetune_writes_a_loadable_model_and_a_log(tmp_path, capsys):
    from mistral4_jax.demo import synthetic
    from mistral4_jax.cli import main

    synthetic.write_checkpoint(tmp_path / "m", CFG, fp8=True)
    g = np.random.default_rng(1)
    lines = [{"messages": [{"role": "user", "content": g.integers(20, 256, 5).tolist()},
                           {"role": "assistant", "content": g.integers(20, 256, 6).tolist()}]} for _ in range(4)]
    data = _write(tmp_path / "chat.jsonl", lines)
    argv = ["finetune", "--model", str(tmp_path / "m"), "--data", str(data), "--steps", "4", "--lr", "1e-3",
            "--out", str(tmp_path / "out"), "--batch-size", "2", "--lora-rank", "2", "--save-every", "2"]
    assert main(argv) == 0
    log = [json.loads(ln) for ln in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [1, 2, 3, 4] and all(np.isfinite(m["loss"]) for m in log)
    assert all(m["tokens"] == 2 * 7 for m in log)  # two rows of 6 assistant tokens + </s>
    model = from_pretrained(tmp_path / "out", dtype="float32")
    assert model(np.asarray([[1, 3, 30, 4]])).shape == (1, 4, 256)
    assert main(argv[:-6] + ["--out", str(tmp_path / "bad"), "--lora-rank", "2", "--lora-targets", "mlp"]) == 2
    assert "LoRA targets must be" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["finetune", "--model", str(tmp_path / "m"), "--data", str(_write(tmp_path / "e.jsonl", [])),
                     "--steps", "1", "--out", str(tmp_path / "o2")]) == 2
    assert "dataset is empty" in capsys.readouterr().err


# ---------------------------------------------------------------------- options
def test_load_balancing_loss_by_arithmetic():
    from mistral4_jax.train.step import load_balancing_loss

    cfg = ModelConfig.tiny(n_routed_experts=4, num_experts_per_tok=1).text
    big = 30.0  # softmax of a one-hot * 30 is one-hot to float32 precision
    balanced = jnp.eye(4)[None] * big  # token t -> expert t: f = P = 1/4 each -> 4 * 4 * 1/16 = 1 = top_k
    skewed = jnp.tile(jnp.eye(4)[:1], (4, 1))[None] * big  # every token -> expert 0: f_0 = P_0 = 1 -> E = 4
    valid = jnp.ones(4)
    assert abs(float(load_balancing_loss(balanced, valid, cfg)) - 1.0) < 1e-5
    assert abs(float(load_balancing_loss(skewed, valid, cfg)) - 4.0) < 1e-5
    # padded tokens do not count: only token 0 (expert 0) is valid -> f_0 = P_0 = 1
    assert abs(float(load_balancing_loss(balanced, jnp.asarray([1.0, 0, 0, 0]), cfg)) - 4.0) < 1e-5


def test_remat_bf16_and_aux_loss_options(tmp_path):
    from mistral4_jax.train.step import loss_fn

    batch = {k: jnp.asarray(v) for k, v in make_batch(_examples(), 0, 4, 16, 0).items()}
    grads = []
    for remat in (False, True):
        cfg = TrainConfig(steps=1, remat=remat, router_aux_weight=0.1)
        graphdef, params = nnx.split(_model(), nnx.Param)
        (loss, (ce, aux, _)), g = jax.jit(jax.value_and_grad(
            lambda p: loss_fn(p, None, batch, graphdef, cfg), has_aux=True))(params)
        assert 2.0 <= float(aux) <= 8.0  # between top_k (balanced) and E (collapsed)
        assert abs(float(loss) - float(ce) - 0.1 * float(aux)) < 1e-5
        grads.append(g)
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads[0]), nnx.to_flat_state(grads[1])):
        assert R.rel_err(b.get_value(), a.get_value()) < 1e-5, path  # remat recomputes, same gradients
    cfg = TrainConfig(steps=2, param_dtype="bfloat16", batch_size=4, max_len=16)
    tr = Trainer(Mistral3ForConditionalGeneration(CFG, jnp.bfloat16, rngs=nnx.Rngs(0)), _examples(), cfg, tmp_path)
    tr.train_step()
    assert {x.dtype for x in jax.tree.leaves(tr.state["trainable"])} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(tr.state["opt_state"]) if x.ndim} == {jnp.dtype(jnp.float32)}
