"""Blockwise attention (model/attention.py) against the materialised reference path (ops.py).

Both fp32 paths are compared with an exact float64 computation (torch autograd), and with each other.
Tolerances are the forward error bound of fp32 sums: a sum of n terms is off by at most
gamma_n * sum|terms|, gamma_n ~ n * u with u = 2^-24; the chain here is a D-term score dot product
(error amplified by exp into the probabilities), an S-term softmax sum and an S-term weighted sum.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import reference as R
from mistral4_jax.config import ModelConfig
from mistral4_jax.model import attention as A
from mistral4_jax.model import ops
from mistral4_jax.model.mistral3 import Mistral3ForConditionalGeneration

U32 = 2.0**-24
SCALE = 0.3


def _bound(d: int, s: int, scores_abs: float, magnitude: float) -> float:
    """gamma bound for softmax(q.k * scale) @ v computed twice in fp32 in different orders: each score
    is off by <= d u |scores| (so each probability by that relatively), each sum by <= s u; two
    computations can each be off by that much."""
    return 2 * (d * U32 * scores_abs + 2 * s * U32) * magnitude


def _exact(q, k, v, mask, scale, cot):
    """float64 values and gradients (of sum(out * cot)) with torch autograd."""
    q64, k64, v64 = (torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    s = torch.einsum("bthd,bshd->bhts", q64, k64) * scale
    m = torch.tensor(np.asarray(mask))[:, None]
    s = s.masked_fill(~m, -torch.inf)
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)  # rows with no allowed key: zeros
    out = torch.einsum("bhts,bshd->bthd", p, v64)
    (out * torch.tensor(np.asarray(cot), dtype=torch.float64)).sum().backward()
    return out.detach().numpy(), [x.grad.numpy() for x in (q64, k64, v64)], float(s.detach()[m.expand_as(s)].abs().max())


def _inputs(rng, b, t, s, h, d, dv):
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return f(b, t, h, d), f(b, s, h, d), f(b, s, h, dv), f(b, t, h, dv)


# Rows: plain causal; right padding; left padding with an offset; positions past 8192 (the
# original_max_position_embeddings of the release), one row shifted; queries a suffix of the keys.
CASES = {
    "causal": dict(t=48, s=48, q_off=(0, 0), k_off=(0, 0), valid=(48, 48), left=False),
    "right_padding": dict(t=48, s=48, q_off=(0, 0), k_off=(0, 0), valid=(48, 19), left=False),
    "left_padding": dict(t=40, s=40, q_off=(0, 3), k_off=(0, 3), valid=(40, 25), left=True),
    "past_original_max": dict(t=44, s=44, q_off=(8170, 8150), k_off=(8170, 8150), valid=(44, 44), left=False),
    "query_suffix": dict(t=16, s=56, q_off=(40, 40), k_off=(0, 0), valid=(56, 50), left=False),
}


def _case(name):
    c = CASES[name]
    q_pos = np.stack([np.arange(c["t"]) + o for o in c["q_off"]])
    k_pos = np.stack([np.arange(c["s"]) + o for o in c["k_off"]])
    ar = np.arange(c["s"])
    valid = np.stack([(ar >= c["s"] - n) if c["left"] else (ar < n) for n in c["valid"]])
    return jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32), jnp.asarray(valid)


@pytest.mark.parametrize("name", list(CASES))
def test_blockwise_equals_reference_values_and_gradients(name):
    q_pos, k_pos, valid = _case(name)
    b, t, s, h, d, dv = 2, q_pos.shape[1], k_pos.shape[1], 3, 16, 8
    q, k, v, cot = _inputs(np.random.default_rng(0), b, t, s, h, d, dv)
    mask = ops.causal_mask(q_pos, k_pos, valid)
    want, want_grads, s_abs = _exact(q, k, v, mask, SCALE, cot)

    def ref(q, k, v):
        return ops.attention(q, k, v, mask, SCALE)

    def new(q, k, v):  # small blocks: several key blocks, a partial last block, skipped blocks
        return A.blockwise_attention(q, k, v, q_pos, k_pos, valid, SCALE, block_q=16, block_k=8)

    def grads(f):
        return jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1, 2))(q, k, v)

    tol = _bound(d, s, s_abs, float(np.abs(np.asarray(v)).max()))
    for got in (ref(q, k, v), new(q, k, v)):
        assert np.abs(np.asarray(got) - want).max() <= tol
    assert np.abs(np.asarray(new(q, k, v)) - np.asarray(ref(q, k, v))).max() <= tol
    for g_ref, g_new, g_want in zip(grads(ref), grads(new), want_grads):
        # the gradient chain has one more sum over S (or T) terms of the same kind
        g_tol = _bound(d, s + t, s_abs, float(np.abs(g_want).max()) + tol) * 2
        assert np.abs(np.asarray(g_new) - g_want).max() <= g_tol
        assert np.abs(np.asarray(g_ref) - g_want).max() <= g_tol
        assert np.abs(np.asarray(g_new) - np.asarray(g_ref)).max() <= g_tol


def test_rows_with_no_allowed_key_are_zero_with_zero_gradient():
    q, k, v, cot = _inputs(np.random.default_rng(1), 1, 16, 16, 2, 8, 4)
    pos = jnp.arange(16, dtype=jnp.int32)[None]
    valid = jnp.zeros((1, 16), bool)
    out = A.blockwise_attention(q, k, v, pos, pos, valid, SCALE, block_q=8, block_k=8)
    assert np.all(np.asarray(out) == 0)
    g = jax.grad(lambda q, k, v: jnp.sum(A.blockwise_attention(q, k, v, pos, pos, valid, SCALE) * cot),
                 argnums=(0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(np.asarray(x))) and np.all(np.asarray(x) == 0) for x in g)


def test_key_block_counts_skip_blocks_above_the_diagonal():
    pos = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (2, 64))
    valid = jnp.ones((2, 64), bool)
    # query block i (16 positions) reaches key position 16 i + 15: key blocks of 8 up to 2 i + 1
    assert A.key_block_counts(pos, pos, valid, 16, 8).tolist() == [2, 4, 6, 8]
    # a row shifted by +20 reaches further; the batch's furthest row decides the count
    shifted = pos.at[1].add(20)
    assert A.key_block_counts(shifted, pos, valid, 16, 8).tolist() == [5, 7, 8, 8]


def test_blocks_above_the_diagonal_are_never_read():
    """NaN in the values of key block 1: query block 0 (positions 0..15) must not touch it."""
    q, k, v, _ = _inputs(np.random.default_rng(2), 1, 32, 32, 2, 8, 4)
    v = v.at[:, 16:].set(jnp.nan)
    pos = jnp.arange(32, dtype=jnp.int32)[None]
    out = np.asarray(A.blockwise_attention(q, k, v, pos, pos, None, SCALE, block_q=16, block_k=16))
    assert np.all(np.isfinite(out[:, :16])) and np.all(np.isnan(out[:, 16:]))


# ---------------------------------------------------------------------- latent (absorbed) form
def _latent_inputs(rng, b, t, h, n, r, c, v, s, layers):
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return f(b, t, h, n), f(b, t, h, r), f(c, h, n), f(c, h, v), f(layers, b, s, c), f(layers, b, s, r)


@pytest.mark.parametrize("t,offsets,block_k", [(8, (0, 13), 8), (8, (24, 3), 16), (1, (36, 5), 8), (1, (0, 0), None)])
def test_latent_attention_equals_absorbed_reference(t, offsets, block_k):
    """Prefill chunks (t = 8) and decode steps (t = 1) at per-row offsets, read from a stacked cache
    of 45 slots (not a multiple of the block: the last block overhangs and is masked)."""
    b, h, n, r, c, dv, s = 2, 3, 4, 6, 8, 5, 45
    qn, qp, w_uk, w_uv, ckv, kpe = _latent_inputs(np.random.default_rng(3), b, t, h, n, r, c, dv, s, 3)
    q_pos = jnp.asarray(np.stack([np.arange(t) + o for o in offsets]), jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    want = ops.mla_absorbed_attention(qn, qp, w_uk, w_uv, ckv[1], kpe[1], ops.causal_mask(q_pos, slots), SCALE)
    got = A.latent_attention(qn, qp, w_uk, w_uv, ckv, kpe, q_pos, SCALE, layer=1, block_k=block_k)
    unstacked = A.latent_attention(qn, qp, w_uk, w_uv, ckv[1], kpe[1], q_pos, SCALE, block_k=block_k)
    q_lat_abs = float(np.abs(np.einsum("bthn,chn->bthc", qn, w_uk)).max())
    s_abs = SCALE * (q_lat_abs * float(np.abs(ckv).max()) * c + float(np.abs(qp).max() * np.abs(kpe).max()) * r)
    # the output is W_UV (P c): one more c-term sum over magnitudes |W_UV| |c|
    tol = _bound(c + r, s + c, s_abs, float(np.abs(ckv).max() * np.abs(w_uv).max()) * c)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= tol
    assert np.array_equal(np.asarray(got), np.asarray(unstacked))


def test_latent_attention_reads_only_slots_up_to_the_last_query_position():
    """NaN in every cache slot past the block holding the largest query position: never read."""
    b, t, h, n, r, c, dv, s = 2, 4, 2, 4, 4, 8, 4, 64
    qn, qp, w_uk, w_uv, ckv, kpe = _latent_inputs(np.random.default_rng(4), b, t, h, n, r, c, dv, s, 1)
    q_pos = jnp.asarray(np.stack([np.arange(t) + 12, np.arange(t) + 4]), jnp.int32)  # largest position 15
    ckv, kpe = ckv.at[:, :, 16:].set(jnp.nan), kpe.at[:, :, 16:].set(jnp.nan)
    out = A.latent_attention(qn, qp, w_uk, w_uv, ckv, kpe, q_pos, SCALE, layer=0, block_k=8)
    assert np.all(np.isfinite(np.asarray(out)))


# ---------------------------------------------------------------------- backend choice, memory
def test_the_blockwise_fallback_is_chosen_on_cpu():
    q = jnp.zeros((1, 16, 4, 128), jnp.bfloat16)  # shapes cuDNN takes on a GPU
    assert jax.default_backend() == "cpu"
    assert A.choose_impl("auto", q, q, q) == "blockwise"
    assert A.choose_impl("reference", q, q, q) == "reference"
    with pytest.raises(ValueError, match="attention_impl"):
        A.choose_impl("flash", q, q, q)
    # and "auto" computes what the blockwise path computes
    q, k, v, _ = _inputs(np.random.default_rng(5), 1, 24, 24, 2, 8, 4)
    pos = jnp.arange(24, dtype=jnp.int32)[None]
    assert np.array_equal(np.asarray(A.expanded_attention(q, k, v, pos, pos, None, SCALE, "auto")),
                          np.asarray(A.blockwise_attention(q, k, v, pos, pos, None, SCALE)))


def test_cudnn_eligibility():
    qk, v = (1, 16, 4, 128), (1, 16, 4, 128)
    assert A.cudnn_eligible("gpu", qk, qk, v, jnp.bfloat16)
    assert not A.cudnn_eligible("cpu", qk, qk, v, jnp.bfloat16)
    assert not A.cudnn_eligible("gpu", qk, qk, v, jnp.float32)
    assert not A.cudnn_eligible("gpu", (1, 16, 4, 192), (1, 16, 4, 192), v, jnp.bfloat16)
    assert not A.cudnn_eligible("gpu", qk, (1, 32, 4, 128), (1, 32, 4, 128), jnp.bfloat16)


def test_cudnn_mask_form():
    """cuDNN's causal mask with key lengths is only the default positions with right padding."""
    pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
    right = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3], bool)
    left = jnp.asarray([[1] * 8, [0] * 3 + [1] * 5], bool)
    assert bool(A.cudnn_mask_form(pos, pos, None)) and bool(A.cudnn_mask_form(pos, pos, right))
    assert not bool(A.cudnn_mask_form(pos, pos, left))
    assert not bool(A.cudnn_mask_form(pos + 1, pos + 1, right))


def test_the_cudnn_branch_computes_the_same_attention(monkeypatch):
    """The fused branch as a GPU would take it, with jax's XLA implementation standing in for cuDNN:
    causal with per-row key lengths equals the blockwise result where the mask has that form (right
    padding), and other masks (left padding, offsets) fall back to the blockwise path at run time."""
    fused = jax.nn.dot_product_attention
    monkeypatch.setattr(A, "choose_impl", lambda *a: "cudnn")
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, implementation, **kw: fused(*a, **kw))
    q, k, v, _ = _inputs(np.random.default_rng(7), 2, 24, 24, 2, 8, 8)
    pos = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))
    ar = np.arange(24)
    for valid, p in ((ar < np.array([[24], [15]]), pos), (ar >= np.array([[0], [9]]), pos), (ar < 24, pos + 3)):
        valid = jnp.asarray(np.broadcast_to(valid, (2, 24)))
        want = A.blockwise_attention(q, k, v, p, p, valid, SCALE)
        got = A.expanded_attention(q, k, v, p, p, valid, SCALE, "auto")
        rows = np.asarray(valid).any(1)
        s_abs = SCALE * 8 * float(np.abs(q).max() * np.abs(k).max())  # |q.k| * scale <= d max|q| max|k| scale
        assert np.abs(np.asarray(got) - np.asarray(want))[rows].max() <= _bound(8, 24, s_abs, float(np.abs(v).max()))


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_forward_and_gradient_memory_grow_linearly():
    """Compile-time temp memory of the value and gradient at T = 4k and 16k: x4 tokens, <= x4.5 memory.
    (The materialised form needs 16k^2 * 4 heads * 4 bytes = 4 GiB of scores at 16k.)"""

    def loss(q, k, v, pos):
        return jnp.sum(A.blockwise_attention(q, k, v, pos, pos, None, SCALE))

    temps = {}
    for t in (4096, 16384):
        x = jax.ShapeDtypeStruct((1, t, 4, 32), jnp.float32)
        pos = jax.ShapeDtypeStruct((1, t), jnp.int32)
        temps[t] = (_temp_bytes(loss, x, x, x, pos), _temp_bytes(jax.grad(loss, argnums=(0, 1, 2)), x, x, x, pos))
    assert temps[16384][0] <= 4.5 * temps[4096][0]
    assert temps[16384][1] <= 4.5 * temps[4096][1]
    assert temps[16384][1] < 16384**2 * 4 * 4 / 8  # far below one materialised score matrix


# ---------------------------------------------------------------------- in the model
@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 queries and 8 keys, so short sequences span many blocks (and skip some)."""
    monkeypatch.setattr(A, "BLOCK_Q", 16)
    monkeypatch.setattr(A, "BLOCK_K", 8)


def _twins(**text):
    """The tiny model (vision, 2 MoE layers, YaRN over 64 original positions) with one set of weights,
    once per attention_impl."""
    cfg = ModelConfig.tiny(**text)
    return {impl: Mistral3ForConditionalGeneration(cfg.replace_text(attention_impl=impl), jnp.float32,
                                                   rngs=nnx.Rngs(0))
            for impl in ("reference", "blockwise")}


# The tiny model's attention: 4 heads of 16 (q/k) and 16 (v); one layer's blockwise output differs from
# the reference by at most _bound(16, T, ...) relative to the values (~ (16 + 2 T) * 2 u * |s| ~ 1e-6
# at T = 48 and |s| ~ 3); two layers, and the rest of the model computes identically.
MODEL_TOL = 1e-5


def test_model_blockwise_equals_reference_with_images_padding_and_offsets(small_blocks):
    """final_hidden and its gradient over every parameter: one row with an image and positions past
    original_max_position_embeddings (64), one right-padded row at an offset."""
    models = _twins()
    sizes = [(56, 56)]
    row = R.image_prompt(sizes, text_before=(1, 3, 5), text_after=tuple(range(20, 53)))
    t = len(row)
    ids = np.stack([row, np.arange(100, 100 + t) % 1000])
    pixels, image_sizes = R.pixel_batch(sizes)
    mask = np.ones((2, t), np.int32)
    mask[1, t - 9:] = 0
    positions = np.stack([np.arange(t) + 40, np.arange(t) + 7])  # row 0 runs to 40 + t - 1 > 64
    cot = jnp.asarray(np.random.default_rng(6).normal(size=(2, t, 64)), jnp.float32)

    def loss(model):
        h = model.final_hidden(jnp.asarray(ids), pixels, image_sizes, attention_mask=jnp.asarray(mask),
                               positions=jnp.asarray(positions))
        return jnp.sum(h * cot), h

    out = {impl: nnx.value_and_grad(loss, has_aux=True)(m) for impl, m in models.items()}
    (_, h_ref), g_ref = out["reference"]
    (_, h_new), g_new = out["blockwise"]
    assert R.rel_err(h_new, h_ref) < MODEL_TOL
    leaves = jax.tree_util.tree_leaves_with_path(g_ref)
    assert len(leaves) > 20
    for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(g_new)):
        if np.linalg.norm(np.asarray(a)) > 0:
            assert R.rel_err(b, a) < MODEL_TOL, jax.tree_util.keystr(path)


def test_generate_blockwise_equals_reference(small_blocks):
    """Greedy generation (chunked prefill, then decode against the latent cache) with prompts of
    different lengths: the same tokens by either attention path."""
    from mistral4_jax import generate

    models = _twins()
    prompts = [list(range(1, 45)), list(range(7, 20))]
    got = {impl: generate(m, prompts, max_new_tokens=6, prefill_chunk=16) for impl, m in models.items()}
    assert got["blockwise"] == got["reference"]


def test_attention_capture_at_a_length_it_cannot_hold():
    from mistral4_jax.errors import InputError
    from mistral4_jax.model.hooks import Capture
    from mistral4_jax.model.mistral4 import check_probs_size

    check_probs_size(1, 32, 8192, 8192)  # 8 GiB: allowed
    with pytest.raises(InputError, match="attentions"):
        check_probs_size(1, 32, 32768, 32768)
    model = _twins()["blockwise"]
    with pytest.raises(InputError, match="GiB"):
        jax.eval_shape(lambda ids: model(ids, capture=Capture(attentions=True)).logits,
                       jax.ShapeDtypeStruct((8, 65536), jnp.int32))
