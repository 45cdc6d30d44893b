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
from mistral4_jax.demo.synthetic_tokenizer import write_tekken
from mistral4_jax.text.images import ImageConfig
from mistral4_jax.text.tokenizer import Tokenizer
from mistral4_jax.train.data import make_batch

CFG = ModelConfig.tiny(vocab_size=256).replace(vision=None)
# v15 special ids (docs/model.md 4)
BOS, EOS, INST, END_INST, CALLS, SYS, END_SYS, ARGS, THINK, END_THINK, SET, END_SET = (
    1, 2, 3, 4, 9, 17, 18, 32, 34, 35, 36, 37)


def _model(seed=0):
    return Mistral3ForConditionalGeneration(CFG, jnp.float32, rngs=nnx.Rngs(seed))


def _examples(n=8, t=16, seed=0):
    g = np.random.default_rng(seed)
    return [tokenize_record({"ids": [BOS] + g.integers(20, 256, t - 1).tolist()}, None) for _ in range(n)]


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


# ---------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_tok")
    write_tekken(d)
    return Tokenizer.from_pretrained(d)


def test_chat_targets_are_the_assistant_turns(tok):
    e = tok.encode
    calls = [{"id": "call00001", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "Check it."},
                                              {"type": "text", "text": "Checking."}], "tool_calls": calls}]
    ex = tokenize_record({"messages": msgs, "reasoning_effort": "high"}, tok)
    context = [BOS, SYS, *e("Be brief."), END_SYS, SET, *e('{"reasoning_effort": "high"}'), END_SET,
               INST, *e("Hello"), END_INST]
    reply1 = [*e("Hi!"), EOS]
    context2 = [INST, *e("Weather?"), END_INST]
    reply2 = [THINK, *e("Check it."), END_THINK, *e("Checking."), CALLS, *e("get_weather"), ARGS,
              *e('{"city": "Paris"}'), EOS]
    assert ex.ids.tolist() == context + reply1 + context2 + reply2
    assert ex.targets.tolist() == [False] * len(context) + [True] * len(reply1) + [False] * len(context2) + \
        [True] * len(reply2)


def test_chat_records_train_on_the_prompt_inference_writes(tok):
    # Fine-tuning chats carry the [MODEL_SETTINGS] block, as every inference prompt does: the context
    # a record trains on is exactly the prompt `chat` / `generate` would encode for the same turns.
    msgs = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."}]
    for effort in ("none", "high"):
        ex = tokenize_record({"messages": msgs, "reasoning_effort": effort}, tok)
        prompt = tok.apply_chat_template(msgs[:1], reasoning_effort=effort).input_ids
        assert SET in prompt and ex.ids[:len(prompt)].tolist() == prompt
        assert ex.ids[len(prompt):].tolist() == [*tok.encode("Paris."), EOS]
        assert not ex.targets[:len(prompt)].any() and ex.targets[len(prompt):].all()
    # no reasoning_effort means "none", as for inference
    assert tokenize_record({"messages": msgs}, tok).ids.tolist() == \
        tokenize_record({"messages": msgs, "reasoning_effort": "none"}, tok).ids.tolist()


def test_text_goes_through_the_tokenizer():
    class Chars:  # any object with encode(text, add_bos) plugs in for plain text
        def encode(self, text, add_bos=False):
            return [BOS] * add_bos + [100 + ord(c) - ord("a") for c in text]

    ex = tokenize_record({"text": "abc"}, Chars())
    assert ex.ids.tolist() == [BOS, 100, 101, 102] and ex.targets.tolist() == [False, True, True, True]
    with pytest.raises(InputError, match="needs the model's tokenizer"):  # a chat needs the real renderer
        tokenize_record({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                        Chars())


def test_bad_data_is_refused_with_the_line(tmp_path, tok):
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
    with pytest.raises(InputError, match=r"r:1: a training conversation must end with a finished assistant turn"):
        tokenize_record({"messages": [{"role": "user", "content": "x"}]}, tok, "r:1")
    with pytest.raises(InputError, match=r"needs the model's tokenizer"):
        tokenize_record({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
                        None)


def test_long_sequences_are_truncated_with_a_warning(tmp_path):
    path = _write(tmp_path / "long.jsonl", [{"ids": list(range(1, 41))}, {"ids": [1, 5, 6]}])
    with pytest.warns(UserWarning, match="1 sequence.*longer than max_len=32.*truncated"):
        ex = load_examples(path, None, 32)
    assert [len(e.ids) for e in ex] == [32, 3] and ex[0].ids.tolist() == list(range(1, 33))


# ---------------------------------------------------------------------- the step
F32_U = 2.0**-24  # float32 unit roundoff
ADAM_EPS = 1e-8  # optax.adamw's default eps


def step_mismatch(a, b, c, lr: float, grad_scale: float, n_summed: int) -> float:
    """Largest |r_b - r_a| / bound over the elements of one parameter, where r = (new - init) / lr is
    the first Adam step g / (|g| + eps) of runs a and b from the same init c; > 1 means the two steps
    differ by more than float32 rounding allows.

    Bound: each gradient element sums `n_summed` per-token terms of size <= grad_scale (the clipped
    gradient norm) in another order on another mesh, so |dg| <= n_summed * u * grad_scale (the
    classic gamma_n bound). Adam maps g to r with slope eps / (|g| + eps)^2; |g| + eps = eps / (1 - |r|)
    comes from run a's own update, less dg for the worst point between the two gradients. Where that
    leaves no margin (|g| within dg of 0) the element is free (|dr| <= 2). On top: about 8 float32
    roundings inside each optax update (16 u for the pair) and one rounding of each new parameter.
    """
    a, b, c = (np.asarray(x, np.float64) for x in (a, b, c))
    r_a, r_b = (a - c) / lr, (b - c) / lr
    dg = n_summed * F32_U * grad_scale
    rounding = 16 * F32_U + 2 * F32_U * np.maximum(np.abs(a), np.abs(b)) / lr
    margin = ADAM_EPS / np.minimum(1 - np.abs(r_a) + rounding, 1) - dg
    slope_bound = np.where(margin > 0, ADAM_EPS * dg / np.where(margin > 0, margin, 1.0) ** 2, 2.0)
    return float((np.abs(r_b - r_a) / (slope_bound + rounding)).max())


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
        results.append((m, jax.tree.map(np.asarray, tr.state["trainable"]), tr.seq_len))
    (m1, p1, seq_len), (m8, p8, _) = results
    # loss and norm are sums over the 8 x seq_len tokens: the gamma_n bound of a float32 sum, relative
    n_summed = cfg.batch_size * seq_len
    assert abs(m1["loss"] - m8["loss"]) / m1["loss"] < n_summed * F32_U
    assert abs(m1["grad_norm"] - m8["grad_norm"]) / m1["grad_norm"] < n_summed * F32_U
    lr, scale = m1["lr"], min(m1["grad_norm"], cfg.clip_norm)
    init = jax.tree.map(np.asarray, nnx.state(_model(), nnx.Param))
    for (path, a), (_, b), (_, c) in zip(*(nnx.to_flat_state(t) for t in (p1, p8, init))):
        a, b, c = a.get_value(), b.get_value(), c.get_value()
        assert np.abs(a - c).max() > 0, path  # the step moved it
        assert step_mismatch(a, b, c, lr, scale, n_summed) <= 1, path  # and the same way on both meshes
        # the bound is tight enough to catch a wrong step: 0.1% too large, or two experts swapped
        assert step_mismatch(a, c + (b - c) * 1.001, c, lr, scale, n_summed) > 1, path
    a, b, c = (t["language_model"]["layers"]["mlp"]["experts"]["gate_up_proj"].get_value() for t in (p1, p8, init))
    swap = [1, 0, *range(2, a.shape[1])]  # the updates of experts 0 and 1 exchanged
    assert step_mismatch(a, c + (b - c)[:, swap], c, lr, scale, n_summed) > 1


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
    # The new Trainer's step is the same program (same graph, settings and optimizer) as the first one's: it runs
    # that compiled step rather than compiling it a second time. What resumes (state, RNG key, data position,
    # log) comes from the checkpoint alone.
    resumed.step_fn = tr.step_fn
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


class _InterruptedOnce:
    """A metric whose first read raises KeyboardInterrupt: what a Ctrl-C during `float(v)`, which waits for
    the step to finish, looks like (the usual moment a signal lands in a run)."""

    def __init__(self, value):
        self.value, self.raised = value, False

    def __float__(self):
        if not self.raised:
            self.raised = True
            raise KeyboardInterrupt
        return float(self.value)


def test_interrupt_between_a_step_and_its_log_line_keeps_log_and_checkpoint_equal(tmp_path):
    # bfloat16 parameters: this run also checks what param_dtype="bfloat16" keeps (one compiled step serves both)
    cfg = TrainConfig(steps=4, lr=1e-3, batch_size=2, max_len=16, param_dtype="bfloat16")
    tr = Trainer(Mistral3ForConditionalGeneration(CFG, jnp.bfloat16, rngs=nnx.Rngs(0)), _examples(), cfg, tmp_path,
                 save_every=100)
    step_fn = tr.step_fn

    def interrupted_at_step_3(*args):
        state, metrics = step_fn(*args)
        return state, metrics | ({"loss": _InterruptedOnce(metrics["loss"])} if int(state["step"]) == 3 else {})

    tr.step_fn = interrupted_at_step_3
    with pytest.raises(KeyboardInterrupt):
        tr.run(progress=False)
    log = tmp_path / "train_log.jsonl"
    logged = [json.loads(ln)["step"] for ln in log.read_text().splitlines()]
    assert (tr.manager.latest_step(), logged) == (3, [1, 2, 3])  # the saved step has its line
    # a line cut short by a kill while it was written is dropped on resume; the run continues to the end
    with open(log, "a") as f:
        f.write('{"loss": 5.1, "st')
    tr.step_fn = step_fn
    assert tr.restore() and tr.step == 3
    tr.run(progress=False)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2, 3, 4]
    # bfloat16 parameters stay bfloat16 through the steps and the restore; the optimizer state is float32
    assert {x.dtype for x in jax.tree.leaves(tr.state["trainable"])} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(tr.state["opt_state"]) if x.ndim} == {jnp.dtype(jnp.float32)}


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
    lines = [{"ids": [BOS] + g.integers(20, 256, 7).tolist()} for _ in range(4)]
    data = _write(tmp_path / "ids.jsonl", lines)
    argv = ["finetune", "--model", str(tmp_path / "m"), "--data", str(data), "--steps", "4", "--lr", "1e-3",
            "--out", str(tmp_path / "out"), "--batch-size", "2", "--lora-rank", "2", "--save-every", "2"]
    assert main(argv) == 0
    log = [json.loads(ln) for ln in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [1, 2, 3, 4] and all(np.isfinite(m["loss"]) for m in log)
    assert all(m["tokens"] == 2 * 7 for m in log)  # two rows of 7 targets (all ids after <s>)
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


def test_remat_is_a_call_argument_that_checkpoints_each_layer_stack():
    """TrainConfig.remat reaches the forward as an argument: the gradient's jaxpr gains one
    `jax.checkpoint` (remat2) per scanned layer stack, with and without the router aux loss."""
    import re

    from mistral4_jax.train.step import loss_fn

    batch = {k: jnp.asarray(v) for k, v in make_batch(_examples(), 0, 4, 16, 0).items()}
    graphdef, params = nnx.split(_model(), nnx.Param)
    stacks = (CFG.text.first_k_dense_replace > 0) + (CFG.text.num_moe_layers > 0)

    def checkpoints(cfg):
        jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss_fn(p, None, batch, graphdef, cfg)[0]))(params)
        return len(re.findall(r"\bremat2\[", str(jaxpr)))

    for aux in (0.0, 0.1):
        plain = checkpoints(TrainConfig(steps=1, router_aux_weight=aux))
        assert checkpoints(TrainConfig(steps=1, remat=True, router_aux_weight=aux)) == plain + stacks


def test_remat_bf16_and_aux_loss_options():
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
    # param_dtype="bfloat16" (bf16 parameters, float32 optimizer state): checked on the run of
    # test_interrupt_between_a_step_and_its_log_line_keeps_log_and_checkpoint_equal


# ---------------------------------------------------------------------- chats with images, tools, reasoning
def _multimodal_records(n=4):
    """Fine-tuning records as `apply_chat_template` takes them: a system prompt, a user turn with an
    image (all 56 x 84 pixels: one batch shape, one compile), reasoning, a tool call and its result."""
    g = np.random.default_rng(2)
    tools = [{"type": "function", "function": {"name": "count", "description": "Count shapes.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    out = []
    for i in range(n):
        img = g.integers(0, 256, (56, 84, 3), dtype=np.uint8)
        out.append({"reasoning_effort": "high", "tools": tools, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": f"Picture {i}?"}, {"type": "image", "image": img}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "Count them."}],
             "tool_calls": [{"id": f"call{i}", "function": {"name": "count", "arguments": {"n": i}}}]},
            {"role": "tool", "tool_call_id": f"call{i}", "content": str(i + 2)},
            {"role": "assistant", "content": f"There are {i + 2} shapes."}]})
    return out


def test_chat_records_with_images_train_through_the_vision_tower(tmp_path):
    import torch

    ref = R.build(R.hf_config(text={"vocab_size": 1024}), seed=3)
    model = from_pretrained(R.save(ref, tmp_path / "ref"), dtype="float32")
    write_tekken(tmp_path / "tok", vocab_size=1024)
    tok = Tokenizer.from_pretrained(tmp_path / "tok", image_config=ImageConfig.from_model_config(model.config))
    examples = [tokenize_record(r, tok) for r in _multimodal_records()]
    assert all(len(e.images) == 1 and e.images[0].shape == (3, 56, 84) for e in examples)
    cfg = TrainConfig(steps=20, lr=3e-3, batch_size=4, max_len=256)
    tr = Trainer(model, examples, cfg, tmp_path / "run")
    batch = tr.next_batch()
    assert batch["pixel_values"].shape == (4, 3, 56, 84) and batch["image_sizes"].tolist() == [[56, 84]] * 4
    # the first step's loss is the reference's on the same batch (the images through its vision tower)
    # the first step's loss and gradient norm are the reference's on the same batch (torch autograd
    # through its vision tower); the step's grad_norm is taken before clipping
    out = ref(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
              attention_mask=torch.as_tensor(batch["attention_mask"]),
              pixel_values=torch.as_tensor(batch["pixel_values"]), image_sizes=torch.as_tensor(batch["image_sizes"]))
    nll = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 1024).float(),
                                            torch.as_tensor(batch["input_ids"][:, 1:], dtype=torch.long).reshape(-1),
                                            reduction="none")
    w = torch.as_tensor(batch["targets"][:, 1:]).reshape(-1).float()
    loss = (nll * w).sum() / w.sum()
    loss.backward()
    want_norm = float(np.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in ref.parameters() if p.grad is not None)))
    assert ref.model.vision_tower.patch_conv.weight.grad.abs().max() > 0  # the images take part in the loss
    hist = tr.run(progress=False)
    losses = [m["loss"] for m in hist]
    assert abs(losses[0] - loss.item()) / loss.item() < 1e-4, (losses[0], loss.item())
    assert abs(hist[0]["grad_norm"] - want_norm) / want_norm < 1e-4, (hist[0]["grad_norm"], want_norm)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
