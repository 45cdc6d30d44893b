"""Plain text generation: encode prompts with the model's tokenizer, generate a batch, stream the first.

    python examples/generate.py                      # the tiny default model (random weights)
    python examples/generate.py --model /data/m4-orbax --prompt "The Zen of Python says" --max-new-tokens 64
"""

import argparse
import sys
import tempfile
import time

from mistral4_jax import Tokenizer, from_pretrained, generate
from mistral4_jax.demo.tiny import model_or_tiny


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory with its tokenizer (default: build the tiny model)")
    p.add_argument("--prompt", action="append", help="a text prompt; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--quick", action="store_true", help="a few tokens only (for tests)")
    args = p.parse_args(argv)
    prompts = args.prompt or ["The capital of France is", "Beautiful is better than"]
    n_new = 4 if args.quick else args.max_new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        path = model_or_tiny(args.model, tmp)
        tok = Tokenizer.from_pretrained(path)
        model = from_pretrained(path, dtype="float32" if not args.model else "bfloat16")
        ids = [tok.encode(text, add_bos=True) for text in prompts]
        streamed, shown = [], [""]
        print(prompts[0], end="", flush=True)

        def on_step(step, tokens):  # called from inside the compiled loop after every step
            if tokens[0] is not None:
                streamed.append(tokens[0])
                text = tok.decode(streamed, skip_special_tokens=True).rstrip("\ufffd")  # wait for whole characters
                print(text[len(shown[0]):], end="", flush=True)
                shown[0] = text

        t0 = time.perf_counter()
        outs = generate(model, ids, max_new_tokens=n_new, temperature=args.temperature, top_p=0.95, seed=0,
                        callback=on_step)
        print(f"\n({sum(map(len, outs))} tokens for {len(ids)} prompts in {time.perf_counter() - t0:.1f}s)")
        for text, out in zip(prompts, outs):
            print(f"{text!r} -> {tok.decode(out, skip_special_tokens=True)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
