"""The chat CLI, text `generate`, the demo and every example's quick mode, on the tiny default model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mistral4_jax import cli
from mistral4_jax.demo.tiny import build_tiny
from mistral4_jax.text.streaming import ChatStream
from mistral4_jax.text.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["generate", "chat_with_image", "batch_eval", "convert_checkpoint", "finetune"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), log=lambda m: None)


def test_chat_stream_splits_reasoning_and_whole_characters(tiny):
    tok = Tokenizer.from_pretrained(tiny["hf"])
    ids = [tok.think, *tok.encode("Let me think: 東京."), tok.think_end, *tok.encode("Tokyo 🎉 is it."), tok.eos,
           *tok.encode("ignored")]
    stream, got = ChatStream(tok), {"reasoning": "", "answer": ""}
    for i in ids:
        for kind, text in stream.push(i):
            assert "\ufffd" not in text  # multi-byte characters split over tokens come out whole
            got[kind] += text
    assert stream.close() == []
    assert got == {"reasoning": "Let me think: 東京.", "answer": "Tokyo 🎉 is it."}
    assert stream.finished


def test_chat_cli_streams_and_splits(tiny, capsys, monkeypatch):
    import mistral4_jax.inference.generate as gen_mod
    tok = Tokenizer.from_pretrained(tiny["orbax"])
    # The real model first (random weights: only the shape of the output is known), then a scripted reply
    # with reasoning through the same callback and printing path.
    rc = cli.main(["chat", "--model", str(tiny["orbax"]), "--prompt", "What is the capital of France?",
                   "--reasoning-effort", "high", "--max-new-tokens", "6", "--dtype", "float32", "--no-color"])
    out = capsys.readouterr()
    assert rc == 0 and "6 tokens" in out.err
    assert out.out.startswith(("answer: ", "reasoning: ", "tool: "))

    scripted = [tok.think, *tok.encode("Paris, surely"), tok.think_end, *tok.encode("Paris."), tok.eos]
    steps = []

    def fake_generate(model, prompts, max_new_tokens, callback=None, **kw):
        assert prompts[0][-1] == tok.inst_end and tok.model_settings in prompts[0]
        assert kw["pixel_values"] is not None and kw["pixel_values"].shape[0] == 1
        for s, t in enumerate(scripted):
            steps.append(s)
            callback(s, [t])
        return [scripted]

    monkeypatch.setattr(gen_mod, "generate", fake_generate)
    img = Path(tiny["hf"]).parent / "img.png"
    from mistral4_jax.demo.tiny import demo_image
    demo_image().save(img)
    rc = cli.main(["chat", "--model", str(tiny["orbax"]), "--prompt", "Where?", "--image", str(img),
                   "--system", "Be brief.", "--dtype", "float32", "--no-color"])
    out = capsys.readouterr()
    assert rc == 0 and len(steps) == len(scripted)
    assert out.out == "reasoning: Paris, surely\nanswer: Paris.\n"


def test_chat_cli_errors(tiny, tmp_path, capsys):
    (tmp_path / "config.json").write_text((Path(tiny["orbax"]) / "config.json").read_text())
    assert cli.main(["chat", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "no tokenizer beside the model" in capsys.readouterr().err
    assert cli.main(["chat", "--model", str(tiny["orbax"]), "--prompt", "hi", "--image", str(tmp_path / "none.png")]) == 2
    assert "cannot read image file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["chat", "--model", str(tiny["orbax"]), "--prompt", "hi", "--reasoning-effort", "low"])


def test_generate_text_prompts(tiny, capsys):
    tok = Tokenizer.from_pretrained(tiny["orbax"])
    rc = cli.main(["generate", "--model", str(tiny["orbax"]), "--dtype", "float32", "--max-new-tokens", "3",
                   "--prompt", "Hello, world!", "--ids", ",".join(map(str, tok.encode("Hello, world!", add_bos=True)))])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(res["outputs"]) == 2
    assert res["outputs"][0] == res["outputs"][1]  # the text prompt is exactly <s> + its encoding
    assert res["texts"][0] == tok.decode(res["outputs"][0], skip_special_tokens=True)


def test_demo_finishes(tmp_path, capsys):
    assert cli.main(["demo", "--dir", str(tmp_path), "--train-steps", "0"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "batched chat: 4 prompts" in out and "scored 4 continuations" in out
    assert out.count("user (high)") == 1 and "done in" in out


def test_examples_quick():
    """Every example in quick mode, all in one child process (they share compiled programs)."""
    code = ("import runpy, sys\n"
            f"for name in {EXAMPLES!r}:\n"
            "    print('=== ' + name, flush=True)\n"
            "    rc = runpy.run_path(f'examples/{name}.py', run_name='example')['main'](['--quick'])\n"
            "    assert rc == 0, (name, rc)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in EXAMPLES:
        assert f"=== {name}" in r.stdout
    assert "max |diff| = 0" in r.stdout and "accuracy" in r.stdout and "loss" in r.stdout
    readme = (ROOT / "README.md").read_text()
    for name in EXAMPLES:
        assert f"examples/{name}.py" in readme


def _readme_block(heading: str, lang: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    start = section.index(f"```{lang}\n") + len(f"```{lang}\n")
    return section[start:section.index("```", start)]


def test_readme_quick_start_runs(capsys):
    code = _readme_block("## Quick start in Python", "python")
    assert 10 <= len(code.strip().splitlines()) <= 16
    exec(compile(code, "README.md quick start", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].startswith("log p(' Paris.' | prompt) = -")


def test_readme_starts_with_the_two_commands_and_uses_hf_download():
    text = (ROOT / "README.md").read_text()
    assert text.index("pip install -q -e . && mistral4-jax demo") < text.index('pip install -q -e ".[test]" && '
                                                                                 "python -m pytest -q")
    assert text.index("## Two commands") < text.index("## Quick start in Python") < text.index("## The real checkpoint")
    real = _readme_block("## The real checkpoint", "bash")
    assert "hf download mistralai/Mistral-Small-4-119B-2603" in real and "huggingface-cli download" not in real
    assert "--weights fp8" in real
    assert "bench/README.md" in text and "| jitted decode, batch 1 |" in (ROOT / "bench" / "README.md").read_text()


def _cli(argv, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_cli_errors_are_one_prefixed_line(tiny, tmp_path, capsys):
    model = str(tiny["orbax"])
    with pytest.raises(SystemExit) as e:  # argparse: choices, exit 2
        cli.main(["generate", "--model", model, "--dtype", "bf16", "--prompt", "x"])
    assert e.value.code == 2
    assert "mistral4-jax generate: error: argument --dtype: invalid choice: 'bf16'" in capsys.readouterr().err
    for argv, want in (
            (["generate", "--model", model, "--prompt", ""], "mistral4-jax generate: error: --prompt is empty"),
            (["generate", "--model", model], "mistral4-jax generate: error: give at least one --prompt"),
            (["chat", "--model", model, "--prompt", "  "], "mistral4-jax chat: error: --prompt is empty"),
            (["generate", "--model", model, "--ids", "1,x"], "mistral4-jax generate: error: --ids must be"),
            (["generate", "--model", model, "--ids", "1", "--mesh", "1,64,1"],
             "mistral4-jax generate: error: --mesh 1,64,1: 1x64x1 = 64 devices, but 8 are visible"),
            (["eval", "--model", model, "--data", str(tmp_path / "none.jsonl")],
             f"mistral4-jax eval: error: {tmp_path / 'none.jsonl'}: cannot read the data file")):
        rc, err = _cli(argv, capsys)
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith(want), (argv, err)
    cfg = json.loads((Path(model) / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = "2"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    rc, err = _cli(["generate", "--model", str(bad), "--ids", "1,2"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1
    assert 'text_config.num_hidden_layers must be int, got "2" (str)' in err
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("mistral4-jax ")


def test_eval_reads_text_and_names_bad_lines(tiny, tmp_path, capsys):
    tok = Tokenizer.from_pretrained(tiny["orbax"])
    ctx, cont = "The capital of France is", " Paris."
    ids = tok.encode(ctx, add_bos=True)
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"context": ctx, "continuation": cont}) + "\n" +
                    json.dumps({"context": ids, "continuation": tok.encode(ctx + cont)[len(ids) - 1:]}) + "\n" +
                    json.dumps({"text": ctx + cont}) + "\n")
    rc = cli.main(["eval", "--model", str(tiny["orbax"]), "--dtype", "float32", "--data", str(data)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    a, b = out["loglikelihood"]
    assert (a["line"], b["line"]) == (1, 2) and a["logprob"] == b["logprob"]  # text == its token ids
    assert out["perplexity"]["texts"][0]["line"] == 3  # the default window fits the 256-token model
    data.write_text(json.dumps({"context": [1, 2], "continuation": [3]}) + "\n" +
                    json.dumps({"context": [1, 2], "continuation": [3, 99999]}) + "\n")
    rc, err = _cli(["eval", "--model", str(tiny["orbax"]), "--data", str(data)], capsys)
    assert rc == 2 and err == (f"mistral4-jax eval: error: {data}:2: continuation[1] = 99999 is outside the "
                               "vocabulary [0, 1024)")


def test_mesh_flag_is_one_meaning_and_says_when_devices_stay_unused(capsys):
    import jax

    n = len(jax.devices())
    mesh = cli._mesh("1,4,1")
    assert dict(mesh.shape) == {"data": 1, "expert": 4, "tensor": 1}
    assert capsys.readouterr().err.strip() == f"note: --mesh 1,4,1 uses 4 of the {n} visible devices"
    assert dict(cli._mesh("all").shape) == {"data": 1, "expert": n, "tensor": 1}  # --mesh with no value
    assert capsys.readouterr().err == "" and cli._mesh(None) is None
    for argv in (["finetune", "--model", "m", "--data", "d", "--steps", "1", "--out", "o", "--mesh", "2,2,2"],
                 ["eval", "--model", "m", "--data", "d", "--mesh", "2,2,2"], ["chat", "--model", "m", "--prompt", "p",
                                                                              "--mesh", "2,2,2"]):
        parser = cli.argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="command")
        for add in cli.COMMANDS:
            add(sub)
        assert parser.parse_args(argv).mesh == "2,2,2"
