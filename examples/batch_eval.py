"""Batch evaluation: multiple-choice questions scored by log-likelihood, and the perplexity of a text.

    python examples/batch_eval.py                         # tiny default model (random weights)
    python examples/batch_eval.py --model /data/m4-orbax
"""

import argparse
import sys
import tempfile

from mistral4_jax import Tokenizer, from_pretrained, perplexity, score
from mistral4_jax.demo.tiny import model_or_tiny, zen_of_python

QUESTIONS = [  # (question, choices, index of the right one)
    ("What is the capital of France?", ["Paris", "London", "Berlin"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten"], 1),
    ("Which is larger, 2 or 3?", ["2", "3"], 1),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory with its tokenizer (default: build the tiny model)")
    p.add_argument("--quick", action="store_true", help="fewer questions, a shorter text (for tests)")
    args = p.parse_args(argv)
    questions = QUESTIONS[:2] if args.quick else QUESTIONS
    with tempfile.TemporaryDirectory() as tmp:
        path = model_or_tiny(args.model, tmp)
        tok = Tokenizer.from_pretrained(path)
        model = from_pretrained(path, dtype="float32" if not args.model else "bfloat16")
        requests, owner = [], []
        for qi, (q, choices, _) in enumerate(questions):
            ctx = tok.apply_chat_template([{"role": "user", "content": q}]).input_ids
            for c in choices:
                requests.append((ctx, tok.encode(c)))
                owner.append(qi)
        results = score(model, requests, batch_size=8)  # one batched forward per 8 requests
        correct = 0
        for qi, (q, choices, right) in enumerate(questions):
            lps = [lp for (lp, _), o in zip(results, owner) if o == qi]
            best = max(range(len(choices)), key=lambda i: lps[i])
            correct += best == right
            print(f"{q} -> {choices[best]!r} (log p: {', '.join(f'{c}={lp:.2f}' for c, lp in zip(choices, lps))})")
        print(f"accuracy {correct}/{len(questions)}")
        text = zen_of_python()
        ids = tok.encode(text[:200] if args.quick else text, add_bos=True)
        ppl = perplexity(model, ids, window=64 if args.quick else 128)
        print(f"perplexity of the Zen of Python ({ppl['tokens']} tokens): {ppl['ppl']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
