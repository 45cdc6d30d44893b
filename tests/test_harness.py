"""Mistral4LM (lm-evaluation-harness) against lm-eval's own HuggingFace backend on the same tiny
transformers checkpoint, request by request, on the offline tasks of tests/lm_eval_tasks."""

import contextlib
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing comes from a hub: the tasks and the model are local
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import huggingface_hub.constants  # noqa: E402

huggingface_hub.constants.HF_HUB_OFFLINE = True  # read at import, perhaps before the line above ran

import lm_eval  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from tokenizers import processors  # noqa: E402

import reference as R  # noqa: E402
from mistral4_jax import InputError, from_pretrained  # noqa: E402
from mistral4_jax.demo.synthetic_tokenizer import write_tekken  # noqa: E402
from mistral4_jax.harness import Mistral4LM  # noqa: E402
from mistral4_jax.text.tokenizer import Tokenizer  # noqa: E402

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASKS = ["m4_mc", "m4_rolling", "m4_gen"]
SEED = 5  # m4_gen.yaml's stop strings are chosen from this model's generations
VOCAB = 512  # a Tekken vocabulary needs its 256 bytes and the v15 special ids
# The bound on a summed log-likelihood; float32 sums of up to 256 token log-probs, each within
# ~1e-6 relative of the reference (test_score's 1e-4 is per request), stay far inside it.
LL_TOL = 1e-3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(reference model, its HF tokenizer, checkpoint dir with tekken.json, loaded port model)."""
    ref = R.build(R.hf_config(text=dict(vocab_size=VOCAB), with_vision=False), seed=SEED)
    path = R.save(ref, tmp_path_factory.mktemp("harness"))
    write_tekken(path, vocab_size=VOCAB)
    # The same BPE as an HF tokenizer that puts <s> first, as the released tokenizer.json does.
    backend = tokenizers.Tokenizer.from_str(Tokenizer.from_pretrained(path).backend.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                  pad_token="<pad>", unk_token="<unk>",
                                                  clean_up_tokenization_spaces=False)
    return ref, hf_tok, path, from_pretrained(path, dtype="float32")


@pytest.fixture(scope="module")
def lms(checkpoint):
    ref, hf_tok, path, model = checkpoint
    return (Mistral4LM(pretrained=model, tokenizer=path, batch_size=4),
            HFLM(pretrained=ref, tokenizer=hf_tok, batch_size=4))


def _evaluate(model, model_args=None, **kw):
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, log_samples=True,
                                   task_manager=TaskManager(include_path=str(TASKS_DIR)), bootstrap_iters=0,
                                   **kw)


@contextlib.contextmanager
def _tasks_cwd():
    """The tasks' data_files are relative to their folder."""
    cwd = os.getcwd()
    os.chdir(TASKS_DIR)
    try:
        yield
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def hf_results(lms):
    with _tasks_cwd():
        return _evaluate(lms[1])


@pytest.fixture()
def in_tasks_dir():
    with _tasks_cwd():
        yield


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= LL_TOL * max(1.0, abs(b))


def _plain(x):
    """x as it reads back from a results JSON (tuples become lists)."""
    return json.loads(json.dumps(x, default=str))


def assert_same_samples(got: dict, want: dict):
    """Per task and document, the same responses: log-likelihoods within LL_TOL, the same is_greedy
    flags, identical generations; and so the same metrics."""
    for task in TASKS:
        g = sorted(got["samples"][task], key=lambda s: s["doc_id"])
        w = sorted(want["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in g] == [s["doc_id"] for s in w]
        for gs, ws in zip(g, w):
            assert _plain(gs["arguments"]) == _plain(ws["arguments"]), (task, gs["doc_id"])
            for gr, wr in zip(gs["resps"], ws["resps"], strict=True):
                gr, wr = gr[0], wr[0]
                if isinstance(wr, str):
                    assert gr == wr, (task, gs["doc_id"])
                elif isinstance(wr, (list, tuple)):  # (loglikelihood, is_greedy)
                    assert _close(gr[0], wr[0]) and gr[1] == wr[1], (task, gs["doc_id"], gr, wr)
                else:  # a rolling log-likelihood
                    assert _close(gr, wr), (task, gs["doc_id"], gr, wr)
        for metric, value in want["results"][task].items():
            if metric.endswith("_stderr,none") or not isinstance(value, float):
                continue
            if task == "m4_rolling":
                assert abs(got["results"][task][metric] - value) <= LL_TOL * abs(value), (task, metric)
            else:
                assert got["results"][task][metric] == value, (task, metric)


def test_registry_name_runs_the_tasks_as_the_hf_backend(checkpoint, hf_results, in_tasks_dir):
    assert lm_eval.api.registry.get_model("mistral4-jax") is Mistral4LM
    got = _evaluate("mistral4-jax", f"pretrained={checkpoint[2]},dtype=float32,batch_size=3")
    assert_same_samples(got, hf_results)
    # the tasks exercise what they claim: several rolling windows, stop strings that cut some generations
    assert len(Tokenizer.from_pretrained(checkpoint[2]).encode(
        got["samples"]["m4_rolling"][-1]["arguments"][0][0])) > 256
    hf = HFLM(pretrained=checkpoint[0], tokenizer=checkpoint[1], batch_size=4)
    gen = sorted(hf_results["samples"]["m4_gen"], key=lambda s: s["doc_id"])
    raw = hf.generate_until(_instances("generate_until", [(s["arguments"][0][0], {"until": [], "max_gen_toks": 16})
                                                          for s in gen]), disable_tqdm=True)
    cut = [s["resps"][0][0] != r for s, r in zip(gen, raw, strict=True)]
    assert any(cut) and not all(cut)


def test_cli_writes_the_results_json(checkpoint, hf_results, tmp_path, in_tasks_dir):
    from mistral4_jax.cli import main

    out = tmp_path / "results.json"
    assert main(["lm-eval", "--model", str(checkpoint[2]), "--tasks", ",".join(TASKS), "--include-path",
                 str(TASKS_DIR), "--dtype", "float32", "--batch-size", "4", "--output-path", str(out),
                 "--log-samples"]) == 0
    got = json.loads(out.read_text())
    assert_same_samples(got, hf_results)
    assert got["config"]["model_num_parameters"] == sum(p.numel() for p in checkpoint[0].parameters())


def _instances(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_edge_cases_match_per_request(lms):
    """Empty context (BOS as context), trailing spaces, a context that starts with <s>, control tokens
    in the text, and a context longer than max_length (truncated from the left).

    No two requests have the same context + continuation with different splits: for those the HF
    backend's shared-context cache reads the wrong positions (the first len(continuation) of the
    longer one's, not the last), and the reference says this port's numbers are the right ones."""
    ours, hf = lms
    long = "The quick brown fox jumps over the lazy dog. " * 30
    reqs = _instances("loglikelihood", [("", "Hello, world!"), ("The capital of France is   ", "Paris."),
                                        ("<s>Hello", ", world! How are you?"),
                                        ("[INST]What is the capital?[/INST]", " Paris"), (long, " The end."),
                                        ("A", "B")])
    got, want = ours.loglikelihood(reqs, disable_tqdm=True), hf.loglikelihood(reqs, disable_tqdm=True)
    assert len(ours.tok_encode(long)) > ours.max_length
    for g, w in zip(got, want, strict=True):
        assert _close(g[0], w[0]) and g[1] == w[1], (g, w)


def test_bos_follows_the_hf_tokenizer_beside_the_model(checkpoint, tmp_path):
    """transformers' own tekken conversion writes a tokenizer.json that puts no <s> first: with it
    beside the model, neither backend adds one."""
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    ref, _, path, model = checkpoint
    converted = convert_tekken_tokenizer(str(path / "tekken.json"))
    converted.save_pretrained(tmp_path)
    ours = Mistral4LM(pretrained=model, tokenizer=tmp_path, batch_size=2)
    hf = HFLM(pretrained=ref, tokenizer=converted, batch_size=2)
    assert ours.add_bos_token is False and Mistral4LM(pretrained=model, tokenizer=path).add_bos_token is True
    reqs = _instances("loglikelihood", [("", "Hello, world!"), ("The capital of France is ", "Paris.")])
    got, want = ours.loglikelihood(reqs, disable_tqdm=True), hf.loglikelihood(reqs, disable_tqdm=True)
    for g, w in zip(got, want, strict=True):
        assert _close(g[0], w[0]) and g[1] == w[1], (g, w)
    assert ours.tok_encode("Hello") == hf.tok_encode("Hello")


def test_short_max_length_truncates_as_the_hf_backend(checkpoint):
    """max_length 40: log-likelihood inputs keep their last 41 tokens, documents roll in 40-token
    windows, prompts keep their last 40 - max_gen_toks tokens."""
    ref, hf_tok, path, model = checkpoint
    ours = Mistral4LM(pretrained=model, tokenizer=path, batch_size=2, max_length=40)
    hf = HFLM(pretrained=ref, tokenizer=hf_tok, batch_size=2, max_length=40)
    text = "Die Würfel sind gefallen. Größe, Straße, schön, Grüße aus München. " * 3
    ll = _instances("loglikelihood", [(text, " Paris."), ("Hello", text[:30])])
    for g, w in zip(ours.loglikelihood(ll, disable_tqdm=True), hf.loglikelihood(ll, disable_tqdm=True), strict=True):
        assert _close(g[0], w[0]) and g[1] == w[1], (g, w)
    rolling = _instances("loglikelihood_rolling", [(text,), ("Hi",)])
    for g, w in zip(ours.loglikelihood_rolling(rolling, disable_tqdm=True),
                    hf.loglikelihood_rolling(rolling, disable_tqdm=True), strict=True):
        assert _close(g, w), (g, w)
    gen = _instances("generate_until", [(text, {"until": ["ü"], "max_gen_toks": 8}), ("Hi", {"max_gen_toks": 8}),
                                        ("<s>" + text, {"max_gen_toks": 8}), ("<s>Hi", {"max_gen_toks": 8})])
    assert ours.generate_until(gen, disable_tqdm=True) == hf.generate_until(gen, disable_tqdm=True)


def test_chat_template_text_encodes_to_the_v15_prompt(lms):
    ours, _ = lms
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
    text = ours.apply_chat_template(msgs)
    assert ours.tok_encode(text) == ours.tokenizer.apply_chat_template(msgs, reasoning_effort="none").input_ids
    cont = msgs + [{"role": "assistant", "content": "The capital"}]
    text = ours.apply_chat_template(cont, add_generation_prompt=False)
    want = ours.tokenizer.apply_chat_template(cont, add_generation_prompt=False, continue_final_message=True)
    assert ours.tok_encode(text) == want.input_ids
    assert ours.chat_template(True).endswith("(reasoning_effort=none)")


def test_tasks_with_the_chat_template_read_v15_prompts(lms, in_tasks_dir):
    ours, _ = lms
    res = lm_eval.simple_evaluate(model=ours, tasks=["m4_mc"], limit=1, apply_chat_template=True, log_samples=True,
                                  task_manager=TaskManager(include_path=str(TASKS_DIR)), bootstrap_iters=0)
    context, choice = res["samples"]["m4_mc"][0]["arguments"][0]
    user = "Question: What is the capital of France?\nAnswer: "
    want = ours.tokenizer.apply_chat_template([{"role": "user", "content": user}]).input_ids
    assert ours.tok_encode(context) == want and choice == "Paris."


def test_reasoning_generations_keep_the_answer_after_think_end(lms):
    ours, _ = lms
    t = ours.tokenizer
    ids = [t.think] + t.encode("Let me think.") + [t.think_end] + t.encode("  Paris. Done") + [t.eos]
    thinking = Mistral4LM(pretrained=ours.model, tokenizer=t, reasoning_effort="high")
    assert thinking._generation_text(ids, ["Done", "</s>"]) == "Paris. "
    assert ours._generation_text(t.encode("Paris. Done") + [t.eos], ["Done"]) == "Paris. "


@pytest.mark.parametrize("kwargs, message", [
    (dict(reasoning_effort="low"), "reasoning_effort must be one of"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(max_length=257), "max_length must be in [1, max_position_embeddings = 256]"),
    (dict(device="tpu:3"), "device 'tpu:3' is not available"),
])
def test_bad_arguments_are_refused(checkpoint, kwargs, message):
    with pytest.raises(InputError) as e:
        Mistral4LM(pretrained=checkpoint[3], tokenizer=checkpoint[2], **kwargs)
    assert message in str(e.value)


def test_bad_requests_are_refused(lms):
    ours, _ = lms
    with pytest.raises(InputError, match="unsupported generation kwargs \\['num_beams'\\]"):
        ours.generate_until(_instances("generate_until", [("Hi", {"num_beams": 2, "max_gen_toks": 8})]),
                            disable_tqdm=True)
    with pytest.raises(InputError, match="max_gen_toks = 256 leaves no room"):
        ours.generate_until(_instances("generate_until", [("Hi", {"max_gen_toks": 256})]), disable_tqdm=True)
    with pytest.raises(InputError, match="Mistral4LM: mesh must be DATA,EXPERT,TENSOR"):
        Mistral4LM(pretrained=str(Path("nowhere")), mesh="2,2")


def test_generations_stop_at_until_strings_and_match_the_hf_backend(lms, monkeypatch):
    """A request whose until string appears a few tokens in ends there (the engine returns few ids,
    far below max_gen_toks), and the texts are still the HF backend's."""
    import mistral4_jax.harness as harness

    ours, hf = lms
    calls = []

    def spy(model, prompts, **kwargs):  # each request's generated ids, by its prompt
        gens = harness_generate(model, prompts, **kwargs)
        calls.append({tuple(p): ids for p, ids in zip(prompts, gens, strict=True)})
        return gens

    harness_generate = harness.generate
    monkeypatch.setattr(harness, "generate", spy)
    texts = ["The capital of France is", "Hello, world! How are", "Grüße aus München, sagte er"]
    raw = ours.generate_until(_instances("generate_until", [(t, {"until": [], "max_gen_toks": 64}) for t in texts]),
                              disable_tqdm=True)
    assert [len(ids) for ids in calls[0].values()] == [64] * 3  # no eos: without stop strings, all 64 tokens
    stop = next(raw[0][k:k + 2] for k in range(3, 60) if raw[0][k:k + 2].strip() and "\ufffd" not in raw[0][k:k + 2])
    reqs = _instances("generate_until", [(t, {"until": [stop], "max_gen_toks": 64}) for t in texts])
    got = ours.generate_until(reqs, disable_tqdm=True)
    assert len(calls) == 2  # one call for the group: no request generated again in full
    first = raw[0].index(stop)
    assert got[0] == raw[0][:first] and len(calls[1][tuple(ours.tok_encode(texts[0]))]) <= 16
    assert got == [r.split(stop)[0] for r in raw]
    assert got == hf.generate_until(reqs, disable_tqdm=True)
    # A string before `stop` in until whose start ends the stopped text could still cut it earlier in
    # the full text: such a request is generated again in full (a third call), with the same result.
    assert not harness._early_stop_safe("xab", ["bc", "ab"]) and harness._early_stop_safe("xab", ["ab", "bc"])
    tail = ours.tok_decode(calls[1][tuple(ours.tok_encode(texts[0]))])[-1]
    until = [tail + "\x01\x02\x03", stop]
    got = ours.generate_until(_instances("generate_until", [(t, {"until": until, "max_gen_toks": 64}) for t in texts]),
                              disable_tqdm=True)
    assert len(calls) == 4 and len(calls[3][tuple(ours.tok_encode(texts[0]))]) == 64
    assert got == [r.split(until[0])[0].split(stop)[0] for r in raw]
