"""The Engine (`inference/engine.py`): its public interface (submit from other threads, cancel, results,
callbacks), the paged cache (admission by pages, preemption and recompute under a small pool, a request
longer than the pool refused), shared prefixes (cached pages reused, results unchanged) and scoring with
shared contexts (packed rows equal scoring each request alone).

Greedy tokens are checked against the reference's teacher-forced argmax (`reference.assert_teacher_forced`);
scores against the same requests scored one per row.
"""

import threading

import numpy as np
import pytest

import reference as R
from mistral4_jax import Engine, InputError, from_pretrained, generate, score


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = R.build(R.hf_config(), seed=81)
    jm = from_pretrained(R.save(ref, tmp_path_factory.mktemp("serving")), dtype="float32")
    return ref, jm


def test_submit_from_another_thread_while_stepping(pair):
    ref, jm = pair
    eng = Engine(jm, batch_size=2, max_len=64, page_tokens=8)
    first = eng.submit([1, 5, 6, 7], max_new_tokens=12, stop_tokens=[])
    later = []

    def feed():
        later.append(eng.submit([1, 9, 10], max_new_tokens=5, stop_tokens=[]))
        later.append(eng.submit([1, 11], max_new_tokens=3, stop_tokens=[]))

    t = threading.Thread(target=feed)
    eng.step()
    t.start()
    t.join()
    done = {r.id: r for r in eng}  # steps until idle
    assert set(done) == {first.id} | {r.id for r in later}
    for r in (first, *later):
        assert r.done.is_set() and r.finish_reason == "length"
        R.assert_teacher_forced(ref, r.prompt, r.tokens)


def test_cancel_and_streaming_callbacks(pair):
    _, jm = pair
    eng = Engine(jm, batch_size=2, max_len=64, page_tokens=8)
    got = []
    keep = eng.submit([1, 5, 6], max_new_tokens=6, stop_tokens=[], on_tokens=lambda r, toks: got.extend(toks))
    drop = eng.submit([1, 7, 8], max_new_tokens=40, stop_tokens=[])
    eng.step()
    eng.cancel(drop)
    eng.run()
    assert drop.finish_reason == "cancelled" and len(drop.tokens) < 40
    assert got == keep.tokens and len(keep.tokens) == 6
    assert eng.pool.available(0) + 1 == len(eng.pool.refs)  # every page but the trash page is back (or cached)


def test_small_pool_preempts_and_recomputes_exactly(pair):
    """Eight requests of 16-token prompts growing to 40 tokens in a pool of 96 tokens (12 pages of 8): they cannot
    all grow at once; the engine preempts, recomputes, and every output is still the teacher-forced argmax."""
    ref, jm = pair
    g = np.random.default_rng(82)
    prompts = [g.integers(20, 256, 16).tolist() for _ in range(8)]
    eng = Engine(jm, batch_size=4, max_len=64, page_tokens=8, cache_tokens=96)
    reqs = [eng.submit(p, max_new_tokens=24, stop_tokens=[]) for p in prompts]
    eng.run()
    assert eng.stats["preempted"] > 0
    for r in reqs:
        R.assert_teacher_forced(ref, r.prompt, r.tokens)
    # sampled requests draw the same tokens whatever the pool did to them
    kw = dict(max_new_tokens=[24] * 8, temperature=1.0, seed=3, stop_tokens=[], batch_size=4)
    assert generate(jm, prompts, cache_tokens=96, **kw) == generate(jm, prompts, cache_tokens=4096, **kw)


def test_a_request_longer_than_the_pool_is_refused_naming_cache_tokens(pair):
    _, jm = pair
    with pytest.raises(InputError, match="cache_tokens = 64"):
        generate(jm, [[1, 2, 3]] * 2, max_new_tokens=100, cache_tokens=64)


def test_shared_prompt_prefixes_are_computed_once(pair):
    ref, jm = pair
    g = np.random.default_rng(83)
    prefix = g.integers(20, 256, 40).tolist()
    prompts = [prefix + g.integers(20, 256, int(n)).tolist() for n in (3, 5, 1, 7)]
    eng = Engine(jm, batch_size=1, max_len=64, page_tokens=8)  # one slot: each request finds its predecessors' pages
    reqs = [eng.submit(p, max_new_tokens=4, stop_tokens=[]) for p in prompts]
    eng.run()
    assert eng.stats["reused"] == 3 * 40  # 5 full pages of the prefix, for each request after the first
    assert eng.stats["prefilled"] == sum(len(p) for p in prompts) - 3 * 40
    for r in reqs:
        R.assert_teacher_forced(ref, r.prompt, r.tokens)


def test_scoring_shared_contexts_equals_scoring_each_alone(pair):
    ref, jm = pair
    g = np.random.default_rng(84)
    contexts = [g.integers(20, 256, int(n)).tolist() for n in (30, 9, 50)]
    requests = [(ctx, g.integers(20, 256, int(m)).tolist()) for ctx in contexts for m in (1, 4, 2, 7)]
    requests.insert(3, (contexts[1], [7]))  # interleaved, and a context of its own
    requests.append(([1, 2, 3], [4, 5]))
    shared = score(jm, requests)
    alone = score(jm, requests, share_contexts=False)
    for (a, ga), (b, gb) in zip(shared, alone):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)) and ga == gb
    for (ctx, cont), (lp, _) in zip(requests[:2], shared):  # and the reference's log-probabilities
        logp = R.logits(ref, [ctx + cont[:-1]])[0].astype(np.float64)
        logp = logp - np.log(np.exp(logp - logp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logp.max(-1, keepdims=True)
        want = sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont))
        assert abs(lp - want) < 1e-4
