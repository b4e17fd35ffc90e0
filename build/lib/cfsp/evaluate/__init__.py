"""Evaluation: perplexity at an explicit context length (more in later modules)."""
