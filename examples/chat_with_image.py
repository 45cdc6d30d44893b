"""Chat about an image, with and without reasoning, streaming the reply as it is generated.

    python examples/chat_with_image.py                                  # tiny default model, a drawn image
    python examples/chat_with_image.py --model /data/m4-orbax --image cat.png --question "What is this?"
"""

import argparse
import sys
import tempfile

from mistral4_jax import Tokenizer, from_pretrained, generate
from mistral4_jax.demo.tiny import demo_image, model_or_tiny
from mistral4_jax.text.streaming import ChatStream


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory with its tokenizer (default: build the tiny model)")
    p.add_argument("--image", help="an image file (default: a drawn red square and blue disc)")
    p.add_argument("--question", default="Describe this image in one sentence.")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--quick", action="store_true", help="a few tokens only (for tests)")
    args = p.parse_args(argv)
    n_new = 4 if args.quick else args.max_new_tokens
    image = args.image or demo_image()
    with tempfile.TemporaryDirectory() as tmp:
        path = model_or_tiny(args.model, tmp)
        tok = Tokenizer.from_pretrained(path)  # reads the image settings from the config.json beside it
        model = from_pretrained(path, dtype="float32" if not args.model else "bfloat16")
        for effort in ("none", "high"):
            messages = [{"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": args.question}]}]
            prompt = tok.apply_chat_template(messages, reasoning_effort=effort)
            print(f"--- reasoning_effort={effort}: {len(prompt.input_ids)} prompt tokens, image "
                  f"{prompt.image_sizes[0][1]}x{prompt.image_sizes[0][0]} px")
            stream = ChatStream(tok)

            def show(step, tokens):
                for kind, text in stream.push(tokens[0]):
                    print(f"[{kind}] {text!r}", flush=True)

            out = generate(model, [prompt.input_ids], max_new_tokens=n_new, pixel_values=prompt.pixel_values,
                           image_sizes=prompt.image_sizes, callback=show)[0]
            for kind, text in stream.close():
                print(f"[{kind}] {text!r}")
            parsed = tok.parse_output(out)
            print(f"reasoning: {parsed.reasoning!r}\nanswer: {parsed.content!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
