"""score() and perplexity() against the transformers reference's log-probabilities (float32)."""

import math

import numpy as np
import pytest
import torch

import reference as R
from mistral4_jax import InputError, from_pretrained, perplexity, score

TOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = R.build(R.hf_config(with_vision=False), seed=71)
    path = R.save(ref, tmp_path_factory.mktemp("score"))
    jm = from_pretrained(path, dtype="float32")
    jm.path = str(path)
    return ref, jm


def _ref_logp(ref, ids):
    """log p(ids[t] | ids[:t]) for t >= 1 from the reference, float64."""
    lg = torch.as_tensor(R.logits(ref, np.asarray([ids]))[0], dtype=torch.float64)
    lp = torch.log_softmax(lg, -1).numpy()
    return np.asarray([lp[t - 1, ids[t]] for t in range(1, len(ids))]), lg.numpy().argmax(-1)


def test_score_matches_reference_logprobs(pair):
    ref, jm = pair
    g = np.random.default_rng(72)
    requests = [(g.integers(0, 256, nc).tolist(), g.integers(0, 256, nx).tolist())
                for nc, nx in ((1, 3), (10, 1), (25, 14), (7, 30), (40, 5))]
    # one continuation that is the reference's greedy one
    ctx = g.integers(0, 256, 6).tolist()
    cont = []
    for _ in range(4):
        cont.append(int(R.logits(ref, np.asarray([ctx + cont]))[0, -1].argmax()))
    requests.append((ctx, cont))
    got = score(jm, requests, batch_size=4, chunk=3)  # lm_head over 3-position chunks, T = 8..64 padded
    for (c, x), (lp, greedy) in zip(requests, got):
        want, argmax = _ref_logp(ref, c + x)
        assert abs(lp - want[len(c) - 1:].sum()) < TOL * max(1.0, abs(want[len(c) - 1:].sum()))
        assert greedy == bool((argmax[len(c) - 1:-1] == np.asarray(x)).all())
    assert got[-1][1] is True


def test_perplexity_sliding_window_matches_reference(pair):
    ref, jm = pair
    tokens = np.random.default_rng(73).integers(0, 256, 90).tolist()
    full, _ = _ref_logp(ref, tokens)
    res = perplexity(jm, tokens, window=128)
    assert res["tokens"] == 89
    assert abs(res["nll"] + full.sum()) < TOL * abs(full.sum())
    assert abs(res["ppl"] - math.exp(-full.mean())) < TOL * res["ppl"]
    # window 40, stride 20: windows [0,40) [20,60) [40,80) [60,90); each scores the new tokens
    want = _ref_logp(ref, tokens[:40])[0].sum()
    for begin, scored, end in ((20, 40, 60), (40, 60, 80), (60, 80, 90)):
        want += _ref_logp(ref, tokens[begin:end])[0][scored - begin - 1:].sum()
    res = perplexity(jm, tokens, window=40, stride=20)
    assert abs(res["nll"] + want) < TOL * abs(want)


@pytest.mark.parametrize("requests, message", [
    ([], "non-empty list"),
    ([([], [1])], "requests[0].context"),
    ([([1], [])], "requests[0].continuation"),
    ([([1], [2]), ([1], [300])], "requests[1].continuation[0] = 300"),
    # 258 tokens feed 257 positions (the last is only predicted); 257 tokens, a full window, are accepted
    ([([1] * 250, [2] * 8)], "context + continuation - 1 = 257 tokens fed exceeds the context limit "
                             "max_position_embeddings = 256"),
])
def test_bad_requests_are_refused(pair, requests, message):
    with pytest.raises(InputError) as e:
        score(pair[1], requests)
    assert message in str(e.value)


def test_cli_eval_scores_a_jsonl_file(pair, tmp_path, capsys):
    import json

    from mistral4_jax.cli import main

    ref, jm = pair
    data = tmp_path / "data.jsonl"
    data.write_text('{"context": [1, 2, 3], "continuation": [4, 5]}\n\n{"text": [1, 9, 8, 7, 6, 5, 4]}\n')
    assert main(["eval", "--model", jm.path, "--dtype", "float32", "--data", str(data), "--window", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    want, _ = _ref_logp(ref, [1, 2, 3, 4, 5])
    assert out["loglikelihood"][0]["line"] == 1
    assert abs(out["loglikelihood"][0]["logprob"] - want[2:].sum()) < TOL * abs(want[2:].sum())
    assert out["perplexity"]["tokens"] == 6 and out["perplexity"]["texts"][0]["line"] == 3
    data.write_text('{"context": [1], "oops": [2]}\n')
    assert main(["eval", "--model", jm.path, "--data", str(data)]) == 2
    assert "data.jsonl:1" in capsys.readouterr().err
