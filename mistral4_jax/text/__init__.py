"""Text and images in: the Tekken tokenizer, the v15 chat format, streaming and image preprocessing."""
