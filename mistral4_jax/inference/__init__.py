"""Compiled inference: sampling, batching, generation, scoring and log-probabilities."""
