"""generate() against the transformers reference: greedy tokens are the teacher-forced argmax.

The teacher-forced logits come from the reference model run on prompt + generated tokens, one row
at a time without padding; our batch mixes lengths, crosses original_max_position_embeddings (32
in the tiny config) and carries images.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as R
from mistral4_jax import InputError, from_pretrained, generate
from mistral4_jax.inference.engine import compiled_programs
from mistral4_jax.inference.sampling import sample_logits


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = R.build(R.hf_config(), seed=61)
    path = R.save(ref, tmp_path_factory.mktemp("gen"))
    jm = from_pretrained(path, dtype="float32")
    jm.path = str(path)
    return ref, jm


def test_greedy_equals_teacher_forced_argmax_past_original_max(pair):
    ref, jm = pair
    g = np.random.default_rng(62)
    prompts = [g.integers(20, 256, n).tolist() for n in (3, 20, 30)]
    out = generate(jm, prompts, max_new_tokens=14, stop_tokens=[], prefill_chunk=8)  # 4 prefill chunks
    assert [len(o) for o in out] == [14, 14, 14]
    for p, o in zip(prompts, out):
        R.assert_teacher_forced(ref, p, o)
    assert max(map(len, prompts)) + 14 > 32  # positions cross original_max_position_embeddings


def test_greedy_with_images_in_a_mixed_batch(pair):
    ref, jm = pair
    sizes = [(56, 84), (28, 56)]
    px, isz = R.pixel_batch(sizes, seed=63)
    prompts = [R.image_prompt(sizes[:1]), [1, 40, 41], R.image_prompt(sizes[1:], text_after=(20, 4, 7, 9))]
    out = generate(jm, prompts, max_new_tokens=30, stop_tokens=[], pixel_values=px, image_sizes=isz)
    R.assert_teacher_forced(ref, prompts[0], out[0], px[:1], isz[:1])
    R.assert_teacher_forced(ref, prompts[1], out[1])
    R.assert_teacher_forced(ref, prompts[2], out[2], px[1:, :, :28, :56], isz[1:])


def test_stop_tokens_end_rows_and_the_loop(pair):
    _, jm = pair
    prompts = [[1, 50, 60], [1, 70, 80, 90]]
    free = generate(jm, prompts, max_new_tokens=8, stop_tokens=[])
    stop = free[0][2]
    out = generate(jm, prompts, max_new_tokens=8, stop_tokens=[stop])
    first = free[0].index(stop)
    assert out[0] == free[0][:first + 1]
    want1 = free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert out[1] == want1
    # default stop tokens are the config's eos ids
    eos = jm.config.text.eos_token_id
    assert all(t not in eos for o in generate(jm, prompts, max_new_tokens=8) for t in o[:-1])


def test_sampling_is_reproducible_and_top_k_1_is_greedy(pair):
    _, jm = pair
    prompts = [[1, 50, 60], [1, 70, 80, 90]]
    greedy = generate(jm, prompts, max_new_tokens=8, stop_tokens=[])
    a = generate(jm, prompts, max_new_tokens=8, temperature=1.0, seed=3, stop_tokens=[])
    assert a == generate(jm, prompts, max_new_tokens=8, temperature=1.0, seed=3, stop_tokens=[])
    assert a != generate(jm, prompts, max_new_tokens=8, temperature=1.0, seed=4, stop_tokens=[])
    assert generate(jm, prompts, max_new_tokens=8, temperature=1.0, top_k=1, stop_tokens=[]) == greedy
    assert generate(jm, prompts, max_new_tokens=8, temperature=1.0, top_p=1e-6, stop_tokens=[]) == greedy


def test_sample_logits_respects_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([0.05, 0.4, 0.3, 0.2, 0.05]))
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    draw = jax.jit(jax.vmap(sample_logits, in_axes=(None, 0, None, None, None)))
    assert set(np.asarray(draw(logits, keys, 1.0, 2, 1.0)).tolist()) == {1, 2}
    # nucleus 0.65: 0.4 + 0.3 reaches it, so tokens 1 and 2 only; 0.75 adds token 3
    assert set(np.asarray(draw(logits, keys, 1.0, 0, 0.65)).tolist()) == {1, 2}
    assert set(np.asarray(draw(logits, keys, 1.0, 0, 0.75)).tolist()) == {1, 2, 3}
    counts = np.bincount(np.asarray(draw(logits, keys, 1.0, 0, 1.0)), minlength=5) / 2000
    np.testing.assert_allclose(counts, [0.05, 0.4, 0.3, 0.2, 0.05], atol=0.04)
    assert set(np.asarray(draw(logits, keys, 0.0, 0, 1.0)).tolist()) == {1}


def test_streaming_callback_sees_every_token(pair):
    _, jm = pair
    prompts = [[1, 50, 60], [1, 70, 80, 90]]
    seen = []
    out = generate(jm, prompts, max_new_tokens=6, stop_tokens=[], callback=lambda step, toks: seen.append((step, toks)))
    assert [s for s, _ in seen] == list(range(6))
    assert [[t[r] for _, t in seen] for r in range(2)] == out


def test_new_lengths_in_a_bucket_do_not_recompile(pair):
    _, jm = pair
    generate(jm, [[1, 2, 3], [4, 5, 6, 7]], max_new_tokens=5, stop_tokens=[])
    n = compiled_programs()
    generate(jm, [[1, 2, 3, 4, 5], [4, 5]], max_new_tokens=7, temperature=0.5, top_k=3, seed=9)
    assert compiled_programs() == n


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[[1, 2], []]), "prompts[1] is empty"),
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts=[[1, 256]]), "outside the vocabulary [0, 256)"),
    (dict(prompts=[[1, -1]]), "outside the vocabulary"),
    (dict(prompts=[[1] * 200], max_new_tokens=57), "max_position_embeddings = 256"),
    (dict(prompts=[[1, 10, 10]], pixel_values=np.zeros((1, 3, 28, 28), np.float32)), "image tokens"),
    (dict(prompts=[[1, 2]], top_p=0.0), "top_p must be in (0, 1]"),
    (dict(prompts=[[1, 2]], top_p=1.5), "top_p must be in (0, 1]"),
    (dict(prompts=[[1, 2]], temperature=-1.0), "temperature"),
    (dict(prompts=[[1, 2]], max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[1, 2]], stop_tokens=[999]), "stop_tokens"),
])
def test_bad_input_is_refused_before_compiling(pair, kwargs, message):
    _, jm = pair
    n = compiled_programs()
    with pytest.raises(InputError) as e:
        generate(jm, **kwargs)
    assert message in str(e.value)
    assert compiled_programs() == n


def test_absorbed_attention_equals_expanded():
    """docs/model.md 3.3.6: folding W_UK into the query and W_UV after the softmax is the same function."""
    from mistral4_jax.model import ops

    g = np.random.default_rng(64)
    b, t, s, h, n, r, c, v = 2, 3, 7, 4, 8, 6, 16, 5
    q_nope, q_pe = g.standard_normal((b, t, h, n)), g.standard_normal((b, t, h, r))
    w_uk, w_uv = g.standard_normal((c, h, n)), g.standard_normal((c, h, v))
    c_kv, k_pe = g.standard_normal((b, s, c)), g.standard_normal((b, s, r))
    pos = np.asarray([[4, 5, 6], [0, 1, 2]])
    mask = ops.causal_mask(jnp.asarray(pos), jnp.broadcast_to(jnp.arange(s), (b, s)))
    k = np.concatenate([np.einsum("bsc,chn->bshn", c_kv, w_uk), np.broadcast_to(k_pe[:, :, None], (b, s, h, r))], -1)
    want = ops.attention(jnp.asarray(np.concatenate([q_nope, q_pe], -1), jnp.float32), jnp.asarray(k, jnp.float32),
                         jnp.asarray(np.einsum("bsc,chv->bshv", c_kv, w_uv), jnp.float32), mask, 0.3)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    got = ops.mla_absorbed_attention(f32(q_nope), f32(q_pe), f32(w_uk), f32(w_uv), f32(c_kv), f32(k_pe), mask, 0.3)
    assert R.rel_err(got, want) < 1e-5


def test_compiled_decode_does_not_grow_with_depth():
    """The layer stack is one scanned body: the program for 36 layers is the program for 4."""
    from flax import nnx

    from mistral4_jax.model.cache import Cache
    from mistral4_jax.config import ModelConfig
    from mistral4_jax.checkpoints.read import abstract_model

    sizes = []
    for depth in (4, 36):
        cfg = ModelConfig.tiny(num_hidden_layers=depth)
        gd, st = nnx.split(abstract_model(cfg, jnp.float32))
        t = cfg.text
        cache = Cache(jax.ShapeDtypeStruct((depth, 2, 64, t.kv_lora_rank), jnp.float32),
                             jax.ShapeDtypeStruct((depth, 2, 64, t.qk_rope_head_dim), jnp.float32))
        step = jax.jit(lambda s, x, p, c, gd=gd: nnx.merge(gd, s).forward_cached(x, p, c))
        text = step.lower(st, jax.ShapeDtypeStruct((2, 1, t.hidden_size), jnp.float32),
                          jax.ShapeDtypeStruct((2, 1), jnp.int32), cache).as_text()
        sizes.append(len(text.replace(str(depth), "")))
    assert sizes[1] < 1.02 * sizes[0]


def test_repeated_generate_compiles_nothing_and_decodes_steps_per_call(pair, monkeypatch):
    """What keeps decode fast, checked without a clock (bench/bench_decode.py times it against transformers):
    a second call with the same shapes compiles no program (XLA's compile events, counted), and the decode
    runs STEPS_PER_CALL steps per device call (the engine's decode calls, counted)."""
    import jax.monitoring

    from mistral4_jax.inference import engine

    _, jm = pair
    prompts, n = [[1, 50, 60, 61], [1, 70, 80, 90]], 64
    calls = []
    decode = engine.Engine._decode
    monkeypatch.setattr(engine.Engine, "_decode", lambda self: (calls.append(1), decode(self))[1])
    generate(jm, prompts, max_new_tokens=n, stop_tokens=[])
    compiles = []

    def count(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        calls.clear()
        out = generate(jm, prompts, max_new_tokens=n, stop_tokens=[])
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiles == []
    assert [len(o) for o in out] == [n, n]
    # the first token comes from the prefill, the other n - 1 from decode calls of STEPS_PER_CALL steps
    assert len(calls) == -(-(n - 1) // engine.STEPS_PER_CALL), len(calls)


def test_cli_generate_prints_the_generations(pair, capsys):
    import json

    from mistral4_jax.cli import main

    _, jm = pair
    assert main(["generate", "--model", jm.path, "--dtype", "float32", "--ids", "1,50,60", "--ids", "1,70,80,90",
                 "--max-new-tokens", "8", "--stop", ""]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["outputs"] == generate(jm, [[1, 50, 60], [1, 70, 80, 90]], max_new_tokens=8, stop_tokens=[])
    assert main(["generate", "--model", jm.path, "--ids", "1,2,999"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err


def test_images_of_sizes_in_one_bucket_share_one_vision_program(pair):
    """Image counts, pixel grids, patch and token counts are padded to powers of two before the vision
    tower runs; the results must still be the reference's (the padding is invisible)."""
    from mistral4_jax.inference.generate import _image_features

    ref, jm = pair
    sizes = [(56, 84), (28, 56)]
    px, isz = R.pixel_batch(sizes, seed=64)
    prompt = R.image_prompt(sizes)
    generate(jm, [prompt], max_new_tokens=3, stop_tokens=[], pixel_values=px, image_sizes=isz)
    n = _image_features._cache_size()
    sizes = [(42, 70), (56, 42)]  # other sizes, the same buckets (grid 4 x 8, 32 patches)
    px, isz = R.pixel_batch(sizes, seed=65)
    prompt = R.image_prompt(sizes)
    out = generate(jm, [prompt], max_new_tokens=6, stop_tokens=[], pixel_values=px, image_sizes=isz)
    assert _image_features._cache_size() == n
    R.assert_teacher_forced(ref, prompt, out[0], px, isz)
