"""The tiny demo model and the synthetic checkpoint and tokenizer writers used by the demo, examples,
bench and tests."""
