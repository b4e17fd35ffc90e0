"""Evaluation: perplexity at an explicit context length (perplexity.py), zero-shot accuracy
through lm-eval (zeroshot.py), speed and memory dense vs pruned (speed.py); from_spec.py loads a
model from its spec and scores it (what `cfsp eval` and the evaluate stage run)."""
