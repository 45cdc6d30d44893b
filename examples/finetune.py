"""Fine-tune a model on chats (full or LoRA), then chat with the result.

    python examples/finetune.py                     # tiny default model, 40 steps on four short chats
    python examples/finetune.py --model /data/Mistral-Small-4-119B-2603 --data my.jsonl --steps 100 --lora-rank 8
(the same as `mistral4-jax finetune`; --model must be an HF-layout directory.)
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mistral4_jax import Tokenizer, from_pretrained, generate
from mistral4_jax.demo.tiny import QUESTIONS, training_chats
from mistral4_jax.demo.synthetic import write_checkpoint
from mistral4_jax.demo.synthetic_tokenizer import write_tekken
from mistral4_jax import ImageConfig, ModelConfig
from mistral4_jax.train import LoRAConfig, TrainConfig, finetune


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF-layout checkpoint with a tokenizer (default: write the tiny random one)")
    p.add_argument("--data", help="JSONL of {\"messages\": [...]} (default: four short chats)")
    p.add_argument("--out", help="output directory (default: a temporary one)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning")
    p.add_argument("--quick", action="store_true", help="3 steps (for tests)")
    args = p.parse_args(argv)
    steps = 3 if args.quick else args.steps
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else Path(tmp) / "hf"
        if not args.model:
            cfg = ModelConfig.tiny()
            write_checkpoint(model_dir, cfg, fp8=True)
            write_tekken(model_dir, vocab_size=cfg.text.vocab_size, image_config=ImageConfig.from_model_config(cfg))
        data = Path(args.data) if args.data else Path(tmp) / "chats.jsonl"
        if not args.data:
            data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in training_chats()))
        out = Path(args.out) if args.out else Path(tmp) / "out"
        lora = LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank) if args.lora_rank else None
        cfg = TrainConfig(steps=steps, lr=args.lr, batch_size=2, max_len=256, lora=lora)
        hist = finetune(model_dir, data, out, cfg, progress=not args.quick)
        print(f"loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f} over {len(hist)} steps")
        tok = Tokenizer.from_pretrained(model_dir)
        tuned = from_pretrained(out, dtype="float32")  # the exported model (LoRA merged)
        prompt = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}]).input_ids
        reply = generate(tuned, [prompt], max_new_tokens=4 if args.quick else 16)[0]
        print(f"{QUESTIONS[0]} -> {tok.parse_output(reply).content!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
