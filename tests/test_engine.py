"""Continuous batching in generate(): more prompts than slots, per-request lengths and stops.

Greedy tokens are checked against the reference's teacher-forced argmax, one request at a time; the
scheduling checks (refilled slots, reproducible sampling) compare runs of the engine with itself
under different slot counts, where only the schedule differs.
"""

import numpy as np
import pytest

import reference as R
from mistral4_jax import InputError, from_pretrained, generate
from mistral4_jax.inference.engine import compiled_programs, cut_at_stop_strings
from mistral4_jax.inference.generate import generated_text


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = R.build(R.hf_config(), seed=71)
    jm = from_pretrained(R.save(ref, tmp_path_factory.mktemp("engine")), dtype="float32")
    return ref, jm


def _workload(n, seed):
    """Heavy-tailed: most requests ask a few tokens, one in five many; prompts of 2 to 40 tokens."""
    g = np.random.default_rng(seed)
    prompts = [g.integers(20, 256, int(g.integers(2, 41))).tolist() for _ in range(n)]
    limits = [int(g.integers(24, 40)) if i % 5 == 2 else int(g.integers(1, 5)) for i in range(n)]
    return prompts, limits


class FakeTokenizer:
    """Token t decodes to the letter chr(97 + t % 26): stop strings by arithmetic."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + int(t) % 26) for t in ids)


def test_greedy_with_more_prompts_than_slots_equals_teacher_forced_argmax(pair):
    ref, jm = pair
    prompts, limits = _workload(14, seed=72)
    out = generate(jm, prompts, max_new_tokens=limits, stop_tokens=[], batch_size=4, prefill_chunk=8)
    assert [len(o) for o in out] == limits
    for p, o in zip(prompts, out):
        R.assert_teacher_forced(ref, p, o)


def test_a_waiting_request_takes_the_first_free_slot(pair):
    """Slot 0 runs a 30-token request; the three short ones behind it run in slot 1 meanwhile."""
    _, jm = pair
    prompts, limits = [[1, 5, 6], [1, 7], [1, 8, 9], [1, 10]], [30, 2, 2, 2]
    first = {}

    def seen(step, toks):
        for r, t in enumerate(toks):
            if t is not None:
                first.setdefault(r, step)

    out = generate(jm, prompts, max_new_tokens=limits, stop_tokens=[], batch_size=2, callback=seen)
    assert [len(o) for o in out] == limits
    assert max(first[r] for r in (1, 2, 3)) < 30  # all started while request 0 was still decoding


def test_sampling_depends_on_the_request_not_on_its_slot_or_neighbours(pair):
    _, jm = pair
    prompts, limits = _workload(7, seed=73)
    kw = dict(max_new_tokens=limits, temperature=1.0, seed=5, stop_tokens=[])
    wide = generate(jm, prompts, batch_size=8, **kw)
    assert generate(jm, prompts, batch_size=2, **kw) == wide  # (2 and 8 slots: a schedule of their own each)
    other = [prompts[0], [1, 99, 98, 97], *prompts[2:]]  # another neighbour in request 1
    got = generate(jm, other, batch_size=2, **kw)
    assert got[:1] + got[2:] == wide[:1] + wide[2:]
    # and the static single-batch path draws the same: request i's k-th token from fold_in(fold_in(key, i), k)
    assert generate(jm, prompts[:2], max_new_tokens=limits[:2], temperature=1.0, seed=5, stop_tokens=[]) == wide[:2]


def test_stop_sequences_end_a_request_at_their_first_occurrence(pair):
    _, jm = pair
    prompts = [[1, 50, 60], [1, 70, 80, 90], [1, 33]]
    free = generate(jm, prompts, max_new_tokens=12, stop_tokens=[], batch_size=2)  # the programs of the stopped run
    seq = free[0][3:5]

    def ends(o):
        for k in range(1, len(o)):
            if o[k - 1:k + 1] == seq:
                return o[:k + 1]
        return o

    out = generate(jm, prompts, max_new_tokens=12, stop_tokens=[], stop_sequences=[seq, [255, 255, 255]],
                   batch_size=2)
    assert out == [ends(o) for o in free]
    assert len(out[0]) <= 5


def test_stop_strings_stop_within_a_few_steps_and_cut_as_lm_eval(pair):
    _, jm = pair
    tok = FakeTokenizer()
    prompts = [[1, 50, 60], [1, 70, 80, 90], [1, 33], [1, 40, 41]]
    free = generate(jm, prompts, max_new_tokens=40, stop_tokens=[], batch_size=2)  # the programs of the stopped run
    text0 = tok.decode(free[0])
    stop = text0[6:8]  # a 2-letter string the first request writes at tokens 6-7 (or earlier)
    out = generate(jm, prompts, max_new_tokens=40, stop_tokens=[], stop_strings=[stop, "zzzzzz"], tokenizer=tok,
                   batch_size=2)
    for o, f in zip(out, free):
        assert o == f[:len(o)]  # a prefix of the free run
        t = tok.decode(f)
        if stop in t:
            end = t.index(stop) + len(stop)  # tokens = letters here
            assert end <= len(o) <= end + 8  # stopped within a call of the watched cadence
        assert generated_text(tok, o, [stop, "zzzzzz"]) == cut_at_stop_strings(t, [stop, "zzzzzz"])
    per_prompt = generate(jm, prompts, max_new_tokens=40, stop_tokens=[], stop_strings=[[stop], [], [], []],
                          tokenizer=tok, batch_size=2)
    assert per_prompt[1:] == free[1:]


def test_cut_at_stop_strings_is_lm_eval_s_sequential_split():
    # each string in turn cuts at its first occurrence; '' is ignored
    assert cut_at_stop_strings("ab\n\ncd.ef", ["\n\n", "."]) == "ab"
    assert cut_at_stop_strings("abc.de\n\nf", ["\n\n", "."]) == "abc"
    assert cut_at_stop_strings("abcd", ["", "c"]) == "ab"
    # a later string straddling the first cut is not found in what is left
    assert cut_at_stop_strings("xxABCyy", ["C", "BCy"]) == "xxAB"
    lm_utils = pytest.importorskip("lm_eval.models.utils")
    for text, stops in [("ab\n\ncd.ef", ["\n\n", "."]), ("xxABCyy", ["C", "BCy"]), ("abcd", ["", "c"])]:
        assert cut_at_stop_strings(text, stops) == lm_utils.postprocess_generated_text(text, stops, None)


def test_images_with_prompts_waiting_for_a_slot(pair):
    ref, jm = pair
    sizes = [(56, 84), (28, 56)]
    px, isz = R.pixel_batch(sizes, seed=74)
    prompts = [R.image_prompt(sizes[:1]), [1, 40, 41], R.image_prompt(sizes[1:], text_after=(20, 4, 7, 9))]
    out = generate(jm, prompts, max_new_tokens=[6, 3, 9], stop_tokens=[], pixel_values=px, image_sizes=isz,
                   batch_size=1)
    R.assert_teacher_forced(ref, prompts[0], out[0], px[:1], isz[:1])
    R.assert_teacher_forced(ref, prompts[1], out[1])
    R.assert_teacher_forced(ref, prompts[2], out[2], px[1:, :, :28, :56], isz[1:])


def test_streaming_with_waiting_prompts_sees_each_token_once(pair):
    _, jm = pair
    prompts, limits = _workload(6, seed=75)
    seen = []
    out = generate(jm, prompts, max_new_tokens=limits, stop_tokens=[], batch_size=2,
                   callback=lambda step, toks: seen.append((step, toks)))
    assert [s for s, _ in seen] == list(range(len(seen)))
    assert [[t[r] for _, t in seen if t[r] is not None] for r in range(len(prompts))] == out


def test_many_short_prompts_through_few_slots(pair):
    _, jm = pair
    g = np.random.default_rng(76)
    prompts = [g.integers(20, 256, int(g.integers(1, 6))).tolist() for _ in range(300)]
    out = generate(jm, prompts, max_new_tokens=2, stop_tokens=[], batch_size=8)
    assert [len(o) for o in out] == [2] * 300
    few = generate(jm, prompts[:8], max_new_tokens=2, stop_tokens=[], batch_size=8)
    assert out[:8] == few


def test_other_workloads_in_the_same_buckets_do_not_recompile(pair):
    _, jm = pair
    generate(jm, [[1, 2, 3], [4, 5, 6, 7], [8, 9]], max_new_tokens=[5, 2, 3], stop_tokens=[], batch_size=2)
    n = compiled_programs()
    generate(jm, [[1, 2], [4, 5, 6], [7, 8, 9, 10], [3]], max_new_tokens=[1, 6, 2, 4], temperature=0.5, seed=2,
             batch_size=2)
    assert compiled_programs() == n


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=[3]), "max_new_tokens has 1 entries for 2 prompts"),
    (dict(max_new_tokens=[3, 0]), "max_new_tokens[1]"),
    (dict(batch_size=0), "batch_size"),
    (dict(stop_sequences=[[1]] * 9), "at most 8 sequences"),
    (dict(stop_sequences=[[1, 300]]), "stop_sequences[0][1] = 300 is outside the vocabulary"),
    (dict(stop_strings=["x"]), "need tokenizer="),
    (dict(stop_strings=[["x"]], tokenizer=FakeTokenizer()), "1 lists for 2 prompts"),
    (dict(prompts=[[1] * 10, [1] * 200], max_new_tokens=[200, 57]), "prompts[1] (200 tokens)"),
])
def test_bad_engine_arguments_are_refused_before_compiling(pair, kwargs, message):
    _, jm = pair
    kwargs = dict(dict(prompts=[[1, 2], [3, 4]]), **kwargs)
    n = compiled_programs()
    with pytest.raises(InputError) as e:
        generate(jm, **kwargs)
    assert message in str(e.value)
    assert compiled_programs() == n
