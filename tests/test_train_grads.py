"""Loss and gradients of the training loss against torch autograd through the transformers reference.

The reference loss is written out here in torch (masked next-token cross-entropy, mean over target
tokens) and differentiated with `.backward()`; our gradients are mapped to HF names and layouts by the
export mapping (`saving.hf_tensors`), so that mapping is checked too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import reference as R
from mistral4_jax import from_pretrained
from mistral4_jax.checkpoints.save import hf_tensors
from mistral4_jax.train import LoRAConfig, TrainConfig, loss_fn
from mistral4_jax.train.lora import init_adapters

TOL = 1e-4


def _batch():
    """Two rows: one with an image, one right-padded; targets a random subset, as chat masks are."""
    sizes = [(56, 84)]
    px, isz = R.pixel_batch(sizes, seed=3)
    g = np.random.default_rng(4)
    row0 = R.image_prompt(sizes) + g.integers(20, 256, 8).tolist()
    row1 = g.integers(20, 256, 14).tolist()
    t = len(row0)
    ids = np.full((2, t), 11, np.int64)
    ids[0], ids[1, :len(row1)] = row0, row1
    mask = np.zeros((2, t), np.int64)
    mask[0], mask[1, :len(row1)] = 1, 1
    targets = (g.random((2, t)) < 0.6) & (mask == 1) & (ids != R.IMG)
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}, (px, isz)


def _torch_loss(ref, batch, images):
    out = ref(input_ids=torch.as_tensor(batch["input_ids"]), attention_mask=torch.as_tensor(batch["attention_mask"]),
              pixel_values=torch.as_tensor(images[0]), image_sizes=torch.as_tensor(images[1]))
    logits = out.logits[:, :-1].float()
    labels = torch.as_tensor(batch["input_ids"])[:, 1:]
    w = torch.as_tensor(batch["targets"])[:, 1:].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return (nll * w.reshape(-1)).sum() / w.sum()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref = R.build(R.hf_config(), seed=5)
    path = R.save(ref, tmp_path_factory.mktemp("grads"))
    batch, images = _batch()
    ref.zero_grad()
    loss = _torch_loss(ref, batch, images)
    loss.backward()
    want = {n: p.grad.numpy().copy() for n, p in ref.named_parameters() if p.grad is not None}
    model = from_pretrained(path, dtype="float32")
    return loss.item(), want, model, batch, images


def test_loss_and_gradients_match_torch_autograd(setup):
    want_loss, want, model, batch, images = setup
    cfg = TrainConfig(steps=1, loss_chunk=5)  # the loss's lm_head in chunks that do not divide T
    graphdef, params = nnx.split(model, nnx.Param)
    f = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, None, batch, graphdef, cfg, images)[0]))
    loss, grads = f(params)
    assert abs(float(loss) - want_loss) / want_loss < TOL
    got = dict(hf_tensors(grads, model.config))
    assert set(got) == set(want), set(got) ^ set(want)
    norm = lambda d: np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in d.values()))  # noqa: E731
    assert abs(norm(got) - norm(want)) / norm(want) < TOL
    named = ["model.language_model.layers.1.mlp.experts.gate_up_proj", "model.language_model.layers.0.mlp.experts.down_proj",
             "model.language_model.layers.0.mlp.gate.weight", "model.language_model.layers.1.self_attn.q_a_proj.weight",
             "model.language_model.layers.0.self_attn.kv_b_proj.weight",
             "model.language_model.layers.1.mlp.shared_experts.down_proj.weight", "model.language_model.embed_tokens.weight",
             "lm_head.weight", "model.vision_tower.patch_conv.weight",
             "model.vision_tower.transformer.layers.0.attention.q_proj.weight",
             "model.multi_modal_projector.linear_1.weight"]
    for name in named:
        assert np.abs(want[name]).max() > 0, f"reference gradient of {name} is zero: the check would be empty"
        assert R.rel_err(got[name], want[name]) < TOL, name


def test_lora_gradients_follow_from_the_reference_weight_gradient(setup):
    """At B = 0 the effective weight is W, so dL/dB = scale * A^T dL/dW and dL/dA = 0 (chain rule)."""
    _, want, model, batch, images = setup
    lora = LoRAConfig(rank=3, alpha=6.0, targets=("attention", "experts", "shared_experts"))
    cfg = TrainConfig(steps=1, lora=lora)
    graphdef, params = nnx.split(model, nnx.Param)
    adapters = init_adapters(params, lora, jax.random.key(0))
    grads = jax.jit(jax.grad(lambda a: loss_fn(a, params, batch, graphdef, cfg, images)[0]))(adapters)
    checks = {"language_model/layers/self_attn/q_b_proj/kernel": ("model.language_model.layers.{}.self_attn.q_b_proj.weight", True),
              "language_model/layers/mlp/experts/gate_up_proj": ("model.language_model.layers.{}.mlp.experts.gate_up_proj", False),
              "language_model/layers/mlp/shared_experts/up_proj/kernel":
                  ("model.language_model.layers.{}.mlp.shared_experts.up_proj.weight", True)}
    for path, (hf, linear) in checks.items():
        for layer in range(2):
            dw = want[hf.format(layer)]
            dw = dw.T if linear else np.swapaxes(dw, 1, 2)  # to our [.., in, out] layout
            a = np.asarray(adapters[path]["a"][layer])
            expect_db = lora.scale * np.swapaxes(a, -1, -2) @ dw
            assert R.rel_err(grads[path]["b"][layer], expect_db) < TOL, (path, layer)
            assert float(jnp.abs(grads[path]["a"][layer]).max()) == 0.0
