"""Chunked lm_head log-probabilities (logprobs.py) against float64 numpy arithmetic, and the memory of the
compiled score and loss programs against the size of the [B, T, vocab] float32 logits they avoid."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mistral4_jax import InputError
from mistral4_jax.config import ModelConfig
from mistral4_jax.inference.logprobs import chunk_layout, target_logprobs
from mistral4_jax.model.mistral3 import Mistral3ForConditionalGeneration
from mistral4_jax.train.step import TrainConfig, chunked_cross_entropy, loss_fn

score_mod = importlib.import_module("mistral4_jax.inference.score")  # the package exports the function `score`

B, T, D, V = 2, 37, 16, 300


@pytest.fixture(scope="module")
def data():
    g = np.random.default_rng(0)
    h, w = g.standard_normal((B, T, D)).astype(np.float32), g.standard_normal((D, V)).astype(np.float32)
    z = h.astype(np.float64) @ w.astype(np.float64)
    y = g.integers(0, V, (B, T))
    y[:, ::3] = z.argmax(-1)[:, ::3]  # some targets are the argmax, most are not
    return h, w, y, z


def _log_softmax(z):
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("chunk", [8, 100])  # 37 = 5 chunks of 8 (3 padded); one chunk larger than T
def test_target_logprobs_match_arithmetic(data, chunk):
    h, w, y, z = data
    lp, top = target_logprobs(jnp.asarray(h), jnp.asarray(w), jnp.asarray(y, jnp.int32), chunk=chunk)
    want = np.take_along_axis(_log_softmax(z), y[..., None], -1)[..., 0]
    assert lp.shape == top.shape == (B, T) and lp.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lp), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(top), z.argmax(-1) == y)
    assert 0 < np.asarray(top).sum() < B * T


def test_chunked_cross_entropy_value_and_gradients(data):
    """Loss and its gradients (hidden, kernel) with chunks of 8 over T = 37, against the closed form:
    dL/dz[b,t] = (softmax(z[b,t]) - onehot(ids[b,t+1])) * targets[b,t+1] / n, dW = h^T dz, dh = dz W^T."""
    h, w, ids, z = data
    targets = np.random.default_rng(1).random((B, T)) < 0.5
    wt = np.zeros((B, T))
    wt[:, :-1] = targets[:, 1:]
    n = wt.sum()
    lsm = _log_softmax(z)
    nxt = np.zeros((B, T), int)
    nxt[:, :-1] = ids[:, 1:]
    want_loss = -(np.take_along_axis(lsm, nxt[..., None], -1)[..., 0] * wt).sum() / n
    dz = (np.exp(lsm) - np.eye(V)[nxt]) * (wt / n)[..., None]
    f = jax.value_and_grad(lambda h_, w_: chunked_cross_entropy(h_, w_, ids, targets, chunk=8)[0], argnums=(0, 1))
    loss, (dh, dw) = jax.jit(f)(jnp.asarray(h), jnp.asarray(w))
    assert abs(float(loss) - want_loss) < 1e-5 * want_loss
    np.testing.assert_allclose(np.asarray(dw), np.einsum("btd,btv->dv", h, dz), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dh), dz @ w.T, rtol=1e-4, atol=1e-6)


def test_chunk_layout_and_bad_chunk():
    assert chunk_layout(37, 8) == (5, 8) and chunk_layout(520, 512) == (2, 260) and chunk_layout(8, 100) == (1, 8)
    with pytest.raises(InputError, match="chunk must be an integer >= 1"):
        chunk_layout(8, 0)
    with pytest.raises(InputError, match="loss_chunk"):
        TrainConfig(steps=1, loss_chunk=0)


def test_compiled_programs_hold_no_full_logits():
    """At the real vocabulary, no [B, T, V] float32 buffer (256 MiB here) in the score or loss program's
    temporaries; with one chunk as long as T it is there (the measurement sees it)."""
    b, t, v, chunk = 2, 256, 131072, 32
    full = b * t * v * 4
    cfg = ModelConfig.tiny(vocab_size=v, num_hidden_layers=1, first_k_dense_replace=1).replace(vision=None)
    model = Mistral3ForConditionalGeneration(cfg, jnp.float32, rngs=nnx.Rngs(0))
    ids, w = jnp.zeros((b, t), jnp.int32), jnp.ones((b, t), jnp.float32)

    def score_temp(c):
        graphdef, state = nnx.split(model)
        lowered = score_mod._score_batch.lower(graphdef, state, ids, ids, ids, w, chunk=c)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    assert score_temp(chunk) < full / 2
    assert score_temp(t) >= full
    tc = TrainConfig(steps=1, loss_chunk=chunk)
    graphdef, params = nnx.split(model, nnx.Param)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "targets": ids == 0}
    grad = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, None, batch, graphdef, tc)[0]))
    assert grad.lower(params).compile().memory_analysis().temp_size_in_bytes < full / 2
