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
    gen_mod = sys.modules["mistral4_jax.inference.generate"]
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
