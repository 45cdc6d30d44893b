"""Research access (model/hooks.py, research/expert_stats.py): captures against the transformers reference,
interventions against hand arithmetic, compile counts, and the default program left unchanged.

One tiny float32 reference model with a dense first layer (3 layers: dense, MoE, MoE).
"""

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import reference as R
from mistral4_jax import from_pretrained, score
from mistral4_jax.research.expert_stats import expert_load
from mistral4_jax.model.hooks import Capture, ForwardOutput, Intervention, ResidualPatch

TOL = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = R.build(R.hf_config(text=dict(num_hidden_layers=3, first_k_dense_replace=1)), seed=81)
    path = R.save(ref, tmp_path_factory.mktemp("research"))
    jm = from_pretrained(path, dtype="float32")
    jm.path = str(path)
    return ref, jm


def _ids(b, t, seed):
    return np.random.default_rng(seed).integers(0, 256, (b, t))


@torch.no_grad()
def _ref_outputs(ref, ids):
    """Hidden states and attentions of the whole model, router logits of the text model, and each
    MoE layer's router (logits, weights, ids) from a hook: all from the reference."""
    x = torch.as_tensor(np.asarray(ids))
    out = ref(input_ids=x, output_hidden_states=True, output_attentions=True)
    lm = ref.model.language_model
    routers = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o: routers.append(o))
             for layer in lm.layers if hasattr(layer.mlp, "gate")]
    try:
        router_logits = lm(input_ids=x, output_router_logits=True).router_logits
    finally:
        for h in hooks:
            h.remove()
    return out, router_logits, routers


def _np(t):
    return t.detach().double().numpy()


def test_captures_match_reference(pair):
    ref, jm = pair
    ids = _ids(2, 12, 1)
    want, want_router, routers = _ref_outputs(ref, ids)
    got = jm(ids, capture=Capture.everything())
    assert got.hidden_states.shape == (4, 2, 12, 64) and len(want.hidden_states) == 4
    for i, h in enumerate(want.hidden_states):
        assert R.rel_err(got.hidden_states[i], _np(h)) < TOL, f"hidden_states[{i}]"
    assert got.router_logits.shape == (2, 24, 8) and len(want_router) == 2
    for i, r in enumerate(want_router):
        assert R.rel_err(got.router_logits[i], _np(r)) < TOL, f"router_logits[{i}]"
    for i, (_, w_ref, idx_ref) in enumerate(routers):  # top-k sets and weights (order-free)
        o_ref, o_got = np.argsort(idx_ref.numpy(), -1), np.argsort(np.asarray(got.topk_ids[i]), -1)
        np.testing.assert_array_equal(np.take_along_axis(np.asarray(got.topk_ids[i]), o_got, -1),
                                      np.take_along_axis(idx_ref.numpy(), o_ref, -1))
        np.testing.assert_allclose(np.take_along_axis(np.asarray(got.topk_weights[i]), o_got, -1),
                                   np.take_along_axis(_np(w_ref), o_ref, -1), rtol=1e-5, atol=1e-7)
    assert got.attentions.shape == (3, 2, 4, 12, 12)
    for i, a in enumerate(want.attentions):
        assert R.rel_err(got.attentions[i], _np(a)) < TOL, f"attentions[{i}]"
    assert R.rel_err(got.logits, _np(want.logits)) < TOL
    assert not nnx.state(jm, nnx.Intermediate)  # nothing left sown on the model


def test_entry_points_return_one_type_each(pair):
    """`__call__` / `final_hidden` are the plain forward (an array each), `probe` / `probe_hidden` the
    hooked one (a ForwardOutput, with or without logits), all against the reference."""
    ref, jm = pair
    ids = _ids(2, 12, 7)
    with torch.no_grad():
        want = ref(input_ids=torch.as_tensor(ids), output_hidden_states=True)
    final = _np(want.hidden_states[-1])  # the final-norm output, as `final_hidden`
    logits = jm(ids)
    assert isinstance(logits, jax.Array) and R.rel_err(logits, _np(want.logits)) < TOL
    h = jm.final_hidden(ids)
    assert isinstance(h, jax.Array) and R.rel_err(h, final) < TOL
    out = jm.probe(ids)  # nothing requested: logits only
    assert isinstance(out, ForwardOutput) and out.hidden_states is None and out.router_logits is None
    assert R.rel_err(out.logits, _np(want.logits)) < TOL
    h, out = jm.probe_hidden(ids, capture=Capture(hidden_states=True))
    assert out.logits is None and R.rel_err(h, final) < TOL
    assert R.rel_err(out.hidden_states[1], _np(want.hidden_states[1])) < TOL
    assert not nnx.state(jm, nnx.Intermediate)


def test_score_capture_matches_reference(pair):
    ref, jm = pair
    g = np.random.default_rng(2)
    requests = [(g.integers(0, 256, 5).tolist(), g.integers(0, 256, 4).tolist()),
                (g.integers(0, 256, 11).tolist(), g.integers(0, 256, 2).tolist())]
    got = score(jm, requests, capture=Capture(hidden_states=True, router=True))
    plain = score(jm, requests)
    for (c, x), (lp, greedy, cap), (lp0, greedy0) in zip(requests, got, plain):
        assert abs(lp - lp0) < 1e-5 and greedy == greedy0
        seq = np.asarray([(c + x)[:-1]])
        want, want_router, _ = _ref_outputs(ref, seq)
        assert cap["hidden_states"].shape == (4, seq.shape[1], 64)
        for i, h in enumerate(want.hidden_states):
            assert R.rel_err(cap["hidden_states"][i], _np(h)[0]) < TOL
        for i, r in enumerate(want_router):
            assert R.rel_err(cap["router_logits"][i], _np(r)) < TOL
        assert cap["topk_ids"].shape == (2, seq.shape[1], 2)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _silu(x):
    return x / (1 + np.exp(-x))


def test_top1_mask_matches_hand_computation(pair):
    """Only each token's top-1 expert enabled in the last layer: logits by numpy from the weights."""
    ref, jm = pair
    ids = _ids(2, 9, 3)
    last = ref.model.language_model.layers[2]
    seen = {}
    h = last.post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.setdefault("h", a[0]))
    try:
        R.logits(ref, ids)
    finally:
        h.remove()
    eps = ref.config.text_config.rms_norm_eps
    res = _np(seen["h"]).reshape(-1, 64)  # residual stream after the last layer's attention [BT, H]
    x = _rms(res, _np(last.post_attention_layernorm.weight), eps)
    top1 = (x @ _np(last.mlp.gate.weight).T).argmax(-1)  # [BT]
    gu, dn = _np(last.mlp.experts.gate_up_proj), _np(last.mlp.experts.down_proj)  # [E, 2I, H], [E, H, I]
    inter = gu.shape[1] // 2
    y = np.stack([dn[e] @ (_silu(gu[e, :inter] @ xt) * (gu[e, inter:] @ xt)) for e, xt in zip(top1, x)])
    se = last.mlp.shared_experts
    y = y + (_silu(x @ _np(se.gate_proj.weight).T) * (x @ _np(se.up_proj.weight).T)) @ _np(se.down_proj.weight).T
    # one enabled expert: its renormalised weight is 1, times routed_scaling_factor (1.0)
    out = _rms(res + y, _np(ref.model.language_model.norm.weight), eps) @ _np(ref.lm_head.weight).T
    mask = np.ones((2, 2, 9, 8), bool)
    mask[1] = np.eye(8, dtype=bool)[top1].reshape(2, 9, 8)
    got = jm(ids, capture=Capture(router=True), intervene=Intervention(expert_mask=mask))
    assert R.rel_err(got.logits.reshape(-1, 256), out) < TOL
    ids1, w1 = np.asarray(got.topk_ids[1]), np.asarray(got.topk_weights[1])
    np.testing.assert_array_equal(ids1[np.arange(18), w1.argmax(-1)], top1)  # the enabled expert carries
    np.testing.assert_allclose(np.sort(w1, -1), [[0.0, 1.0]] * 18, atol=1e-7)  # all the weight
    assert R.rel_err(jm(ids).reshape(-1, 256), out) > 1e-3  # the mask matters: the unmasked model differs


@partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, intervene):
    return nnx.merge(graphdef, state)(ids, intervene=intervene).logits


def test_interventions_compile_once_and_do_what_they_say(pair):
    ref, jm = pair
    ids = _ids(2, 10, 4)
    graphdef, state = nnx.split(jm)
    run = lambda iv: np.array(_forward(graphdef, state, ids, iv))  # noqa: E731
    ones = np.ones((2, 8), bool)
    # zero patch, all experts: the model's logits (another program, so equal to float32 rounding), and
    # the base that the interventions below compare with bit for bit (the same program)
    base = run(Intervention(ones, ResidualPatch.at(2, 3, np.zeros(64), row=1)))
    assert R.rel_err(base, np.asarray(jm(ids))) < TOL
    # an additive patch at point 1 (after layer 0), row 0, position 4: earlier positions and the other
    # row are untouched (causal attention), position 4 onwards of row 0 change
    v = np.random.default_rng(5).standard_normal(64).astype(np.float32)
    got = run(Intervention(ones, ResidualPatch.at(1, 4, v, row=0)))
    np.testing.assert_array_equal(got[1], base[1])
    np.testing.assert_array_equal(got[0, :4], base[0, :4])
    assert np.abs(got[0, 4:] - base[0, 4:]).max(-1).min() > 1e-4
    # replacing the residual at point L (the last layer's output) gives lm_head(norm(v)) there
    got = run(Intervention(ones, ResidualPatch.at(3, 7, v, row=1, replace=True)))
    want = _rms(v.astype(np.float64), _np(ref.model.language_model.norm.weight),
                ref.config.text_config.rms_norm_eps) @ _np(ref.lm_head.weight).T
    assert R.rel_err(got[1, 7], want) < TOL
    got[1, 7] = base[1, 7]
    np.testing.assert_array_equal(got, base)
    # disabling experts changes the output
    off = ones.copy()
    off[:, :4] = False
    assert np.abs(run(Intervention(off, ResidualPatch.at(0, 0, np.zeros(64))))- base).max() > 1e-4
    assert _forward._cache_size() == 1  # four different masks and patches, one program


def test_default_program_is_unchanged(pair):
    """Asking for nothing lowers to the plain program; asking for anything to a different one (so
    this comparison can fail). bench/default_program.py compares against a checkout from before the hooks."""
    _, jm = pair
    graphdef, state = nnx.split(jm)
    ids = jnp.asarray(_ids(2, 8, 6), jnp.int32)

    def text(**kw):
        lowered = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i, **kw)).lower(state, ids)
        return lowered.as_text(debug_info=False)

    plain = text()
    assert plain == text(capture=None, intervene=None)
    # one scan per layer stack (dense, MoE), each with the blockwise attention's two loops (query
    # blocks, key blocks)
    assert plain.count("stablehlo.while") == 2 * 3
    assert text(capture=Capture()) != plain
    assert text(capture=Capture(router=True)) != text(capture=Capture())


def test_expert_stats_against_reference_routing(pair, tmp_path):
    ref, jm = pair
    seqs = [_ids(1, n, 10 + n)[0].tolist() for n in (7, 13, 20)]
    load = expert_load(jm, seqs, batch_size=2, max_len=16)  # the 20-token sequence is cut into 16 + 4
    want = np.zeros((2, 8), int)
    for s in [seqs[0], seqs[1], seqs[2][:16], seqs[2][16:]]:
        _, _, routers = _ref_outputs(ref, np.asarray([s]))
        for i, (_, _, idx) in enumerate(routers):
            np.add.at(want[i], idx.numpy().reshape(-1), 1)
    np.testing.assert_array_equal(load.counts, want)
    assert load.tokens == 40 and load.layers == [1, 2]
    p = want / want.sum(-1, keepdims=True)
    np.testing.assert_allclose(load.entropy, -(p * np.log(np.where(p > 0, p, 1))).sum(-1), rtol=1e-12)
    np.testing.assert_allclose(load.fraction.sum(-1), [2.0, 2.0])  # top_k slots per token

    # the CLI writes the same numbers as JSON, and a heatmap
    from PIL import Image

    from mistral4_jax.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": s}) for s in seqs[:2]) + "\n"
                    + json.dumps({"context": seqs[2][:16], "continuation": seqs[2][16:]}) + "\n")
    out = tmp_path / "stats.json"
    assert main(["eval", "--model", jm.path, "--dtype", "float32", "--data", str(data), "--window", "16",
                 "--expert-stats", str(out)]) == 0
    got = json.loads(out.read_text())
    np.testing.assert_array_equal(got["counts"], want)
    assert got["tokens"] == 40 and got["experts"] == 8
    with Image.open(out.with_suffix(".png")) as img:
        assert img.format == "PNG" and img.size[0] > 8 and img.size[1] > 2


def test_route_mask_with_expert_groups():
    """Group-limited routing with a mask: disabled experts never carry weight; one enabled expert
    carries all of it (norm_topk_prob); unmasked rows route as without a mask."""
    from mistral4_jax.model import moe

    logits = np.random.default_rng(9).standard_normal((32, 8)).astype(np.float32)
    allowed = np.ones((32, 8), bool)
    allowed[:, [1, 6]] = False
    allowed[:4] = np.eye(8, dtype=bool)[5]
    allowed[4:8] = True
    kw = dict(top_k=2, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.0)
    w, idx = (np.asarray(a) for a in moe.route(jnp.asarray(logits), allowed_te=jnp.asarray(allowed), **kw))
    w0, idx0 = (np.asarray(a) for a in moe.route(jnp.asarray(logits), **kw))
    assert not (w[~np.take_along_axis(allowed, idx, -1)] > 0).any()
    np.testing.assert_array_equal(idx[:4, 0], 5)
    np.testing.assert_allclose(w[:4], [[1.0, 0.0]] * 4)
    np.testing.assert_array_equal(idx[4:8], idx0[4:8])
    np.testing.assert_allclose(w[4:8], w0[4:8])
