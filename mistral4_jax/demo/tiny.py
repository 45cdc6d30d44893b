"""The embedded default: a tiny Mistral Small 4 that needs no download, and the `demo` that runs it.

`build_tiny(root)` writes a tiny random-weight checkpoint in the released HF layout (FP8 E4M3 with
per-tensor / per-expert scales, `synthetic.write_checkpoint`) plus a small Tekken v15 tokenizer
(`synthetic_tokenizer.write_tekken`) to `root/hf`, optionally fine-tunes it for a few steps on text
that ships with Python (the Zen of Python, `this`) with the `train` machinery, and converts the result
with the converter to `root/orbax`. The examples and `mistral4-jax demo` start from it.
"""

from __future__ import annotations

import codecs
import importlib.util
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from PIL import Image, ImageDraw

from ..checkpoints.convert import convert
from ..checkpoints.load import from_pretrained
from ..config import ModelConfig
from ..inference.generate import generate
from ..inference.score import score
from ..sharding import make_mesh
from ..text.images import ImageConfig
from ..text.tokenizer import Tokenizer
from ..train import TrainConfig, Trainer
from ..train.data import tokenize_record
from ..train.trainer import copy_tokenizer
from . import synthetic
from .synthetic_tokenizer import write_tekken

QUESTIONS = ["What is the capital of France?", "Recite the Zen of Python."]


def zen_of_python() -> str:
    """The Zen of Python, from the standard library's `this` module (stored rot13-encoded there)."""
    spec = importlib.util.find_spec("this")
    src = Path(spec.origin).read_text(encoding="utf-8")
    s = src.split('s = """', 1)[1].split('"""', 1)[0]
    return codecs.decode(s, "rot13")


def demo_image(width: int = 84, height: int = 56):
    """A synthetic RGB picture (a red square and a blue disc on white) as a PIL image."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([4, 4, width // 2 - 4, height - 4], fill=(220, 30, 30))
    d.ellipse([width // 2 + 2, 8, width - 6, height - 8], fill=(30, 60, 220))
    return img


def training_chats() -> list[list[dict]]:
    """Short conversations for the optional fine-tuning (they fit the tiny model's 256 positions)."""
    zen = "\n".join(zen_of_python().strip().splitlines()[2:6])
    return [
        [{"role": "user", "content": QUESTIONS[0]},
         {"role": "assistant", "content": "The capital of France is Paris."}],
        [{"role": "user", "content": QUESTIONS[1]}, {"role": "assistant", "content": zen}],
    ]


def _training_examples(tok, reasoning: tuple[str, ...] = ("none", "high")):
    """The chats as fine-tuning records (`train.data.tokenize_record`: the v15 renderer, settings block
    included); the assistant turn is the target, with a thinking part under reasoning "high"."""
    out = []
    for chat in training_chats():
        for effort in reasoning:
            reply = chat[-1]["content"]
            msgs = chat[:-1] + [{"role": "assistant", "content": reply if effort == "none" else [
                {"type": "thinking", "thinking": "The user asks: " + chat[0]["content"]},
                {"type": "text", "text": reply}]}]
            out.append(tokenize_record({"messages": msgs, "reasoning_effort": effort}, tok))
    return out


def build_tiny(root: str | Path, train_steps: int = 0, log: Callable[[str], None] = print,
               cfg: ModelConfig | None = None) -> dict[str, Path]:
    """Write the tiny default under `root`; returns {"hf": HF dir, "orbax": converted dir}.

    train_steps > 0 fine-tunes the random model on `training_chats()` first (full fine-tuning, AdamW);
    the fine-tuned model is exported in the HF layout (float32) to `root/trained` and that is converted.
    """
    root = Path(root)
    cfg = cfg or ModelConfig.tiny()
    hf = root / "hf"
    t0 = time.perf_counter()
    synthetic.write_checkpoint(hf, cfg, fp8=True)
    write_tekken(hf, vocab_size=cfg.text.vocab_size, image_config=ImageConfig.from_model_config(cfg))
    log(f"wrote a tiny random checkpoint in the released HF layout (FP8 E4M3 + scales) and a "
        f"{cfg.text.vocab_size}-id Tekken v15 tokenizer to {hf} ({time.perf_counter() - t0:.1f}s)")
    src = hf
    if train_steps > 0:
        src = root / "trained"
        train_tiny(hf, src, train_steps, log)
    t0 = time.perf_counter()
    orbax = root / "orbax"
    convert(src, orbax, dtype="float32", overwrite=True, quiet=True)
    log(f"converted {src.name}/ with the converter to sharded Orbax {orbax} ({time.perf_counter() - t0:.1f}s)")
    return {"hf": hf, "orbax": orbax}


def train_tiny(src: Path, out: Path, steps: int, log: Callable[[str], None] = print, lr: float = 3e-3) -> list[dict]:
    """Fine-tune the model at `src` on `training_chats()` and export it (HF layout) to `out`."""
    t0 = time.perf_counter()
    tok = Tokenizer.from_pretrained(src)
    examples = _training_examples(tok)
    model = from_pretrained(src, dtype="float32")
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 10), batch_size=len(examples), seed=0)
    trainer = Trainer(model, examples, cfg, out / "run", save_every=10 ** 9)
    hist = trainer.run(progress=False)
    trainer.export(out)
    copy_tokenizer(src, out)
    log(f"fine-tuned {steps} steps on {len(examples)} chats (the Zen of Python, a capital): loss "
        f"{hist[0]['ce']:.2f} -> {hist[-1]['ce']:.2f} ({time.perf_counter() - t0:.1f}s)")
    return hist


def _dim(text: str, color: bool) -> str:
    return f"\033[2m{text}\033[0m" if color and text else text


def run_demo(workdir: str | Path, train_steps: int = 0, color: bool = False,
             log: Callable[[str], None] = print) -> dict:
    """The demo of `mistral4-jax demo`; returns what it measured."""
    t_all = time.perf_counter()
    log("mistral4-jax demo: a tiny Mistral Small 4 built from RANDOM weights"
        + (f", then fine-tuned {train_steps} steps on a few sentences; it knows nothing else."
           if train_steps else "; what it writes means nothing."))
    log(f"jax {jax.__version__} on {jax.devices()[0].platform}, {len(jax.devices())} device(s)")
    paths = build_tiny(workdir, train_steps, log=lambda m: log("  " + m))
    t0 = time.perf_counter()
    mesh = make_mesh()
    model = from_pretrained(paths["orbax"], dtype="float32", mesh=mesh)
    tok = Tokenizer.from_pretrained(paths["orbax"])
    log(f"  loaded the converted model onto a {dict(mesh.shape)} mesh ({time.perf_counter() - t0:.1f}s)")

    chats = [
        ("none", [{"role": "user", "content": QUESTIONS[0]}]),
        ("high", [{"role": "user", "content": QUESTIONS[0]}]),
        ("none", [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": QUESTIONS[1]}]),
        ("none", [{"role": "user", "content": [{"type": "image", "image": demo_image()},
                                               {"type": "text", "text": "Describe this image in one sentence."}]}]),
    ]
    prompts, pixels, sizes = [], [], []
    for effort, msgs in chats:
        p = tok.apply_chat_template(msgs, reasoning_effort=effort)
        prompts.append(p.input_ids)
        if p.pixel_values is not None:
            pixels.append(p.pixel_values)
            sizes.append(p.image_sizes)
    pixel_values = np.concatenate(pixels) if pixels else None
    image_sizes = np.concatenate(sizes) if sizes else None
    t0 = time.perf_counter()
    # A batch of chats: the results are printed once every row is done.
    outs = generate(model, prompts, max_new_tokens=48, pixel_values=pixel_values, image_sizes=image_sizes)
    dt = time.perf_counter() - t0
    n_tok = sum(map(len, outs))
    log(f"  batched chat: {len(prompts)} prompts (reasoning none and high, one with a "
        f"{image_sizes[0][1]}x{image_sizes[0][0]} image), {n_tok} new tokens in {max(map(len, outs))} steps, "
        f"{dt:.1f}s including compilation")
    for (effort, msgs), out in zip(chats, outs):
        parsed = tok.parse_output(out)
        user = msgs[-1]["content"]
        user = user if isinstance(user, str) else "[image] " + user[-1]["text"]
        log(f"    user ({effort}): {user}")
        if parsed.reasoning is not None:
            log("    " + _dim(f"reasoning: {parsed.reasoning!r}", color))
        log(f"    answer: {parsed.content!r}" + ("" if parsed.finished else " (cut at 48 tokens)"))

    ctx = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}]).input_ids
    candidates = [" Paris.", " London.", " Berlin.", " Rome."]
    requests = [(ctx, tok.encode("The capital of France is" + c)) for c in candidates]
    t0 = time.perf_counter()
    scores = score(model, requests)
    log(f"  scored {len(requests)} continuations in one batch ({time.perf_counter() - t0:.1f}s including "
        f"compilation):")
    for c, (lp, greedy) in zip(candidates, scores):
        log(f"    log p(\"The capital of France is{c}\") = {lp:8.2f}" + ("  (greedy)" if greedy else ""))
    total = time.perf_counter() - t_all
    log(f"done in {total:.1f}s. For the real model, see the README section 'The real checkpoint'.")
    return {"outputs": outs, "scores": scores, "seconds": total}


def model_or_tiny(model: str | None, workdir: str | Path, log: Callable[[str], None] = print) -> Path:
    """`model` when given, else the tiny default (random weights) built under `workdir` (converted dir)."""
    if model:
        return Path(model)
    log("no --model given: building the tiny default model (random weights, its output means nothing)")
    return build_tiny(workdir, log=lambda m: log("  " + m))["orbax"]
