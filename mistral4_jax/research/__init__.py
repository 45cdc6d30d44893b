"""Research tools built on the model's hooks (expert load statistics)."""
